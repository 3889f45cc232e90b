"""align: an LLM alignment training suite (DPO family, SPO, INPO, VPL, LOOP, GRPO) on one loss registry and one
rollout engine."""

from align.version import __version__

__all__ = ["__version__", "train"]


def train(recipe, **kwargs):
    """``align.train(recipe, output_dir=..., train_dataset=None, eval_dataset=None, model=None, tokenizer=None)``:
    see ``align.api.train``."""
    from align.api import train as _train

    return _train(recipe, **kwargs)
