"""``accelerate launch tests/trainers/toy_agent_launch.py train RECIPE ...``: ``align`` with the agent trainer's
tasks and environments replaced by test_agent.py's toy world (deterministic rewards that differ between episodes, so
LOOP trains even from a random tiny policy). Not a test module: test_online_distributed.py launches it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests` as a package

import align.trainers.agent as A  # noqa: E402
from align.cli import main  # noqa: E402
from tests.trainers.test_agent import TASKS, ToyEnv  # noqa: E402

A.load_tasks = lambda recipe, split: TASKS
A.make_env = lambda recipe, task: ToyEnv(task)

if __name__ == "__main__":
    sys.exit(main())
