"""In-memory sources of the Python API: ``memory:<name>`` in a recipe names an object handed to ``align.train``
(rows, or a (model, tokenizer) pair), registered here for the duration of that call only."""

from __future__ import annotations

from align.errors import UserError

MEMORY: dict = {}
"""name -> object, filled and cleared by ``align.api.train``."""


def lookup(source: str, key: str):
    """The object ``source`` (``memory:<name>``) names; a UserError outside ``align.train``."""
    name = source.split(":", 1)[1]
    if name not in MEMORY:
        raise UserError(f"{key}: {source!r}: in-memory objects exist only inside align.train(...)")
    return MEMORY[name]
