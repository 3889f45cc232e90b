"""Model cards and the hub: README.md in every run folder, and ``align push RUN_DIR REPO_ID``.

The card is written at the end of a run (``kit.write_outputs``) from what the run knows: the base model, the
objective and its paper (the loss registry's ``paper``), the data, the final and evaluation metrics of
summary.json, the plots and the resolved recipe. ``align push`` uploads the finished folder without its
checkpoints (``upload_plan`` decides what goes; ``push`` hands it to huggingface_hub).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from align.errors import UserError
from align.version import __version__

REWARD_PAPERS = {
    "bt": "Bradley & Terry 1952; Ouyang et al. 2022, Training language models to follow instructions with human "
    "feedback (arXiv:2203.02155)",
    "vpl": "Poddar et al. 2024, Personalizing Reinforcement Learning from Human Feedback with Variational Preference "
    "Learning (arXiv:2408.10075)",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""A hub repository id (``owner/name``); local folders and ``tiny:``/``memory:`` models are not linked as base."""


def objective(recipe) -> tuple[str, str]:
    """(what was trained, its paper) for the recipe's trainer."""
    if recipe.trainer == "reward":
        kind = recipe.reward.kind
        return f"{kind.upper()} reward model", REWARD_PAPERS.get(kind, "")
    from align.losses import get_loss

    spec = get_loss(recipe.loss.name)
    name = {"online": "online self-play", "agent": "agent RL (multi-turn)"}.get(recipe.trainer, recipe.trainer)
    return f"{spec.name} ({name}): {spec.summary}", spec.paper


def _number(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return "nan" if math.isnan(v) else f"{v:.4g}"


def _table(metrics: dict) -> str:
    rows = [f"| {k} | {_number(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    return "\n".join(["| metric | value |", "|---|---|", *rows]) if rows else "(none)"


def model_card(output_dir: Path, recipe, summary: dict) -> str:
    """The README.md of a finished run folder (Hugging Face model card: YAML front matter, then Markdown)."""
    from align.config import dump_yaml

    what, paper = objective(recipe)
    base = recipe.model.name_or_path
    tags = ["align", recipe.trainer, recipe.reward.kind if recipe.trainer == "reward" else recipe.loss.name]
    front = ["---", f"library_name: {'peft' if recipe.lora.enabled else 'transformers'}"]
    if HUB_ID.match(base):
        front.append(f"base_model: {base}")
    front += ["tags:", *[f"- {t}" for t in tags], "---"]
    final = summary.get("final") or {}
    train_metrics = {k: v for k, v in final.items() if not k.startswith("eval/")}
    eval_metrics = {k: v for k, v in final.items() if k.startswith("eval/")}
    if isinstance(summary.get("eval"), dict):  # the agent trainer's held-out TGC/SGC
        eval_metrics.update({f"eval/{k}": v for k, v in summary["eval"].items()})
    plots = sorted(p.name for p in (output_dir / "plots").glob("*.png")) if (output_dir / "plots").is_dir() else []
    data = recipe.data.train if recipe.trainer != "agent" else f"agent world {recipe.agent.world!r}"
    lines = [
        *front,
        "",
        f"# {output_dir.name}",
        "",
        recipe.description or "",
        "",
        f"- **Base model:** `{base}`"
        + (" with a LoRA adapter (this folder holds the adapter)" if recipe.lora.enabled else ""),
        f"- **Objective:** {what}",
        f"- **Paper:** {paper or 'n/a'}",
        f"- **Data:** `{data}`",
        f"- **Run:** {summary.get('steps', '?')} steps on {summary.get('processes', 1)} process(es), "
        f"{_number(summary.get('wall_seconds', float('nan')))} s",
        f"- **Trained with:** align {__version__} (`align train recipe.yaml`)",
        "",
        "## Final metrics",
        "",
        _table(train_metrics),
        "",
        "## Evaluation",
        "",
        _table(eval_metrics) if eval_metrics else "No held-out evaluation in this run (set `train.eval_steps`).",
        "",
    ]
    if plots:
        lines += ["## Plots", "", *[f"![{p[:-4]}](plots/{p})" for p in plots], ""]
    lines += ["## Recipe", "", "```yaml", dump_yaml(recipe).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(output_dir: Path, recipe, summary: dict) -> None:
    from align.runs import atomic_write

    atomic_write(output_dir / "README.md", model_card(output_dir, recipe, summary))


SKIP = re.compile(r"^(checkpoint-\d+(\.tmp)?|.*\.tmp)$")
"""Top-level entries of a run folder that are not uploaded: checkpoints (optimizer state) and unfinished writes."""


def upload_plan(run_dir: Path, checkpoints: bool = False) -> list[str]:
    """The files (relative paths, sorted) that ``align push`` uploads: the finished run folder without its
    checkpoints unless ``checkpoints``. A folder that is not a finished run is a UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder")
    for name in ("summary.json", "README.md", "recipe.yaml"):
        if not (run_dir / name).is_file():
            raise UserError(f"{run_dir}: no {name} (not a finished align run; push the folder `align train` wrote)")
    files = []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        if not p.is_file() or (not checkpoints and SKIP.match(rel.parts[0])) or SKIP.match(p.name):
            continue
        files.append(rel.as_posix())
    return files


def push(run_dir: Path, repo_id: str, private: bool = False, checkpoints: bool = False, api=None) -> str:
    """Create ``repo_id`` (a model repo) if needed and upload the run folder in one commit; returns its URL."""
    if not HUB_ID.match(repo_id):
        raise UserError(f"{repo_id!r}: not a hub repository id (expected owner/name)")
    files = upload_plan(run_dir, checkpoints)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(run_dir),
            allow_patterns=files,
            commit_message=f"align run {Path(run_dir).name}",
        )
    except Exception as e:  # network, authentication, offline mode: one line, not a traceback
        from align.errors import first_line

        raise UserError(f"push {run_dir} -> {repo_id}: {type(e).__name__}: {first_line(e)}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
