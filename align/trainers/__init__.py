"""One trainer per data flow. ``run(recipe, output_dir, resume)`` dispatches on ``recipe.trainer``."""

from __future__ import annotations


def run(recipe, output_dir, resume: bool = False) -> dict:
    import os

    from align.extras import check_run_extras

    check_run_extras(recipe, deepspeed=os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true")
    if recipe.trainer in ("preference", "sft"):
        from align.trainers.offline import train

        return train(recipe, output_dir, resume=resume)
    if recipe.trainer == "online":
        from align.trainers.online import train

        return train(recipe, output_dir, resume=resume)
    if recipe.trainer == "reward":
        from align.trainers.reward import train

        return train(recipe, output_dir, resume=resume)
    if recipe.trainer == "agent":
        from align.trainers.agent import train

        return train(recipe, output_dir, resume=resume)
    raise ValueError(f"unknown trainer {recipe.trainer!r}")
