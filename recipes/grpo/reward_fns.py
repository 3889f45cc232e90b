"""Reward functions for recipes/grpo/tiny-reward-fn.yaml: plain Python, called as TRL calls its reward_funcs.

Each gets the prompts, the completions and every other column of the prompt rows (here the built-in tasks'
``answer`` and ``family``), one entry per completion, and returns one number per completion.
"""


def correct(prompts, completions, answer, **columns):
    """1 for the exact answer (whitespace stripped), else 0."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def right_length(prompts, completions, answer, **columns):
    """Partial credit for the answer's length: 1 - |len(completion) - len(answer)| / len(answer), floored at 0."""
    return [max(0.0, 1.0 - abs(len(c.strip()) - len(a)) / max(len(a), 1)) for c, a in zip(completions, answer)]
