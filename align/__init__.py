"""align: an LLM alignment training suite (DPO family, SPO, INPO, VPL, LOOP, GRPO) on one loss registry and one
rollout engine."""

__version__ = "0.1.0"
