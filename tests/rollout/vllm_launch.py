"""``accelerate launch tests/rollout/vllm_launch.py train RECIPE ...``: ``align`` with each rank's rollout engine
recorded: what vLLM was started with and the rank environment it saw go to ``<output>/engine-<rank>.json`` at exit.
Not a test module: test_vllm_distributed.py launches it."""

import atexit
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests` as a package

import align.trainers.kit as kit  # noqa: E402
from align.cli import main  # noqa: E402

made = []
_rollout_engine = kit.rollout_engine


def recording(recipe, accelerator, policy, tokenizer, resumed):
    engine = _rollout_engine(recipe, accelerator, policy, tokenizer, resumed)
    made.append((accelerator.process_index, accelerator.local_process_index, engine))
    return engine


def dump():
    out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
    for rank, local, engine in made:
        args = {
            k: v for k, v in getattr(engine, "engine_args", {}).items() if isinstance(v, (str, int, float, bool, dict))
        }
        record = {
            "rank": rank,
            "local_rank": local,
            "kind": type(engine).__name__,
            "engine_args": args,
            "placement": vars(engine.placement) if hasattr(engine, "placement") else None,
        }
        (out / f"engine-{rank}.json").write_text(json.dumps(record, default=str))


kit.rollout_engine = recording
atexit.register(dump)

if __name__ == "__main__":
    sys.exit(main())
