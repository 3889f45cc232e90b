"""Where the read-only shared data (models, eval sets) lives; the one place code and tests look it up."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the folder that holds the ``align`` package."""


def shared_data_dir() -> Path | None:
    """Return the shared ``data`` folder, or None if it is absent.

    ``$ALIGN_SHARED_DATA`` wins when set; otherwise ``<repo root>/../shared/data``.
    """
    env = os.environ.get("ALIGN_SHARED_DATA")
    folder = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return folder if folder.is_dir() else None
