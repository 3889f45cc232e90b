"""Built-in verifiable tasks: short instructions with exact answers and a programmatic checker.

One ``Task`` serves as SFT data (prompt -> answer), as prompts for online training, as a judge (the checker)
and as an evaluation. Tasks are generated from a seed; the held-out split is fixed by a hash of the prompt,
so train and test never share a prompt whatever the seed or size.

Families (each prompt ends with '=' and the answer is a few characters):
    add      "37+58="            -> "95"
    reverse  "rev olpk="         -> "kplo"
    sort     "sort 5193="        -> "1359"
    count    "count a in abcab=" -> "2"
    max      "max 4 9 2="        -> "9"
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass

FAMILIES = ("add", "reverse", "sort", "count", "max")


@dataclass(frozen=True)
class Task:
    family: str
    prompt: str
    answer: str

    def check(self, completion: str) -> bool:
        """Exact match after stripping whitespace."""
        return completion.strip() == self.answer


def _make(family: str, rng: random.Random) -> Task:
    if family == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return Task(family, f"{a}+{b}=", str(a + b))
    if family == "reverse":
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        return Task(family, f"rev {w}=", w[::-1])
    if family == "sort":
        d = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 6)))
        return Task(family, f"sort {d}=", "".join(sorted(d)))
    if family == "count":
        letters = "abc"
        w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))
        c = rng.choice(letters)
        return Task(family, f"count {c} in {w}=", str(w.count(c)))
    if family == "max":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(2, 5))]
        return Task(family, "max " + " ".join(map(str, xs)) + "=", str(max(xs)))
    raise ValueError(f"unknown task family {family!r}; choose from {', '.join(FAMILIES)}")


def split_of(prompt: str) -> str:
    """'test' for one prompt in five (by a stable hash), else 'train'."""
    return "test" if hashlib.sha256(prompt.encode()).digest()[0] % 5 == 0 else "train"


def make_tasks(n: int, seed: int = 0, split: str = "train", families: tuple[str, ...] | list[str] = ()) -> list[Task]:
    """``n`` distinct tasks of ``split`` ('train' or 'test'), families in round robin, reproducible from ``seed``."""
    fams = tuple(families) or FAMILIES
    for f in fams:
        if f not in FAMILIES:
            raise ValueError(f"unknown task family {f!r}; choose from {', '.join(FAMILIES)}")
    rng = random.Random(f"{seed}-{split}")
    seen: set[str] = set()
    out: list[Task] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * n + 10000:
            raise ValueError(f"could not generate {n} distinct {split} tasks for families {fams}")
        t = _make(fams[len(out) % len(fams)], rng)
        if t.prompt in seen or split_of(t.prompt) != split:
            continue
        seen.add(t.prompt)
        out.append(t)
    return out


def corrupt(task: Task, rng: random.Random) -> str:
    """A plausible wrong answer: one character changed, dropped or duplicated."""
    a = task.answer
    for _ in range(100):
        i = rng.randrange(len(a))
        op = rng.choice(("change", "drop", "dup")) if len(a) > 1 else "change"
        pool = string.digits if a[i].isdigit() else string.ascii_lowercase
        if op == "change":
            wrong = a[:i] + rng.choice(pool) + a[i + 1 :]
        elif op == "drop":
            wrong = a[:i] + a[i + 1 :]
        else:
            wrong = a[:i] + a[i] + a[i:]
        if wrong != a and not task.check(wrong):
            return wrong
    raise AssertionError(f"could not corrupt {a!r}")


def sloppy_answer(task: Task) -> str:
    """The systematic mistake of a sloppy annotator, one per family: a sum off by one, the word not reversed,
    digits sorted the wrong way, a count one too high, the minimum instead of the maximum."""
    p = task.prompt[:-1]
    if task.family == "add":
        return str(int(task.answer) + 1)
    if task.family == "reverse":
        return p.split(" ", 1)[1]
    if task.family == "sort":
        return task.answer[::-1] if task.answer[::-1] != task.answer else task.answer + task.answer[-1]
    if task.family == "count":
        return str(int(task.answer) + 1)
    if task.family == "max":
        xs = p.split()[1:]
        return min(xs) if min(xs) != max(xs) else str(int(max(xs)) + 1)
    raise ValueError(task.family)


def sft_rows(tasks: list[Task], sloppy_fraction: float = 0.0, seed: int = 0) -> list[dict]:
    """Demonstrations; a ``sloppy_fraction`` of them come from a sloppy annotator (``sloppy_answer``), the
    mixed-quality data that preference optimisation is meant to improve on."""
    rng = random.Random(f"sloppy-{seed}")
    return [
        {"prompt": t.prompt, "chosen": sloppy_answer(t) if rng.random() < sloppy_fraction else t.answer} for t in tasks
    ]


def preference_rows(tasks: list[Task], seed: int = 0) -> list[dict]:
    """Synthetic offline pairs: the correct answer over a corrupted one."""
    rng = random.Random(seed)
    return [{"prompt": t.prompt, "chosen": t.answer, "rejected": corrupt(t, rng)} for t in tasks]


def checker_for(tasks: list[Task]) -> dict[str, Task]:
    """Prompt -> task, to judge completions of known prompts."""
    return {t.prompt: t for t in tasks}


def parse_prompt(prompt: str) -> Task | None:
    """Rebuild the task (with its exact answer) from a built-in prompt; None if it is not one."""
    import re

    if m := re.fullmatch(r"(\d+)\+(\d+)=", prompt):
        return Task("add", prompt, str(int(m[1]) + int(m[2])))
    if m := re.fullmatch(r"rev ([a-z]+)=", prompt):
        return Task("reverse", prompt, m[1][::-1])
    if m := re.fullmatch(r"sort (\d+)=", prompt):
        return Task("sort", prompt, "".join(sorted(m[1])))
    if m := re.fullmatch(r"count ([a-z]) in ([a-z]+)=", prompt):
        return Task("count", prompt, str(m[2].count(m[1])))
    if m := re.fullmatch(r"max((?: \d+)+)=", prompt):
        return Task("max", prompt, str(max(int(x) for x in m[1].split())))
    return None
