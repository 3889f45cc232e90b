"""The Python API: the same validation and code paths as ``align train``, with in-memory data and models.

    import align

    summary = align.train(
        "recipes/dpo/tiny.yaml",                 # a path, a nested dict or a Recipe
        output_dir="runs/api",
        train_dataset=my_dataset,                # a datasets.Dataset or a list of dicts (any format align reads)
        eval_dataset=None,
        model=None, tokenizer=None,              # a transformers model object and its tokenizer
        reward_funcs=None,                       # online trainer: f(prompts, completions, **columns) -> scores
        overrides=["train.max_steps=10"],        # dotted key=value, as on the command line
    )

In-memory objects are registered under ``memory:train_dataset``, ``memory:eval_dataset`` and ``memory:model`` for
the duration of the call (the run's recipe.yaml names them so); the rows go through the same checks as a file's. A
model object is trained in place (as TRL's trainers do); the reference, where the objective has one,
is a frozen copy of it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from align.memory import MEMORY


def _rows(dataset, what: str) -> list[dict]:
    from align.errors import UserError

    if hasattr(dataset, "to_list"):  # datasets.Dataset
        rows = dataset.to_list()
    elif isinstance(dataset, (list, tuple)):
        rows = list(dataset)
    else:
        raise UserError(f"{what}: expected a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
    if not rows:
        raise UserError(f"{what}: no rows")
    return rows


def train(
    recipe,
    *,
    output_dir,
    train_dataset=None,
    eval_dataset=None,
    model=None,
    tokenizer=None,
    reward_funcs: list | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
) -> dict:
    """Train ``recipe`` (a YAML path, a nested dict or a ``Recipe``) into ``output_dir``; returns the run's summary
    (what summary.json holds). Bad input raises ``align.errors.UserError`` with the same one line the CLI prints."""
    from align.config import Recipe, parse_overrides, read_tree, recipe_from_tree, set_dotted, to_dict
    from align.errors import UserError
    from align.trainers import run

    if (model is None) != (tokenizer is None):
        raise UserError("align.train: pass model and tokenizer together")
    if isinstance(recipe, (str, Path)):
        where, tree = Path(recipe), read_tree(Path(recipe))
    elif isinstance(recipe, dict):
        where, tree = Path("recipe"), copy.deepcopy(recipe)
    elif isinstance(recipe, Recipe):
        where, tree = Path("recipe"), to_dict(recipe)
    else:
        raise UserError(f"align.train: recipe must be a path, a dict or a Recipe, got {type(recipe).__name__}")
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value, str(where))
    try:
        if train_dataset is not None:
            MEMORY["train_dataset"] = _rows(train_dataset, "train_dataset")
            tree.setdefault("data", {})["train"] = "memory:train_dataset"
        if eval_dataset is not None:
            MEMORY["eval_dataset"] = _rows(eval_dataset, "eval_dataset")
            tree.setdefault("data", {})["eval"] = "memory:eval_dataset"
        if reward_funcs is not None:  # the online trainer's rewards: judge.kind function over these callables
            funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
            if not funcs or not all(callable(f) for f in funcs):
                raise UserError("reward_funcs: expected a callable or a list of callables")
            names = []
            for i, fn in enumerate(funcs):
                MEMORY[f"reward_func_{i}"] = fn
                names.append(f"memory:reward_func_{i}")
            judge = tree.setdefault("judge", {})
            judge["kind"], judge["functions"] = "function", names
            if len(judge.get("weights") or []) != len(names):  # the recipe's weights were for its own functions
                judge["weights"] = None
        if model is not None:
            MEMORY["model"] = (model, tokenizer)
            tree.setdefault("model", {})["name_or_path"] = "memory:model"
        return run(recipe_from_tree(tree, where), output_dir, resume=resume)
    finally:
        MEMORY.clear()
