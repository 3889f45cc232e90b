"""Command line: ``align train | recipes | convert | serve | eval | demo | bench``.

Bad input prints one line ``error: ...`` on stderr and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from align.errors import RunError, UserError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _train(args) -> int:
    from align.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from align.dryrun import dry_run

        print(dry_run(recipe, args.recipe))
        return 0
    from align.trainers import run

    out = args.output_dir or str(Path("runs") / Path(args.recipe).stem)
    summary = run(recipe, out, resume=args.resume)
    if summary:
        print(
            json.dumps(
                {k: summary[k] for k in ("trainer", "steps", "wall_seconds") if k in summary} | {"output_dir": out}
            )
        )
    return 0


def _recipes(args) -> int:
    from align.config import describe_fields, load_recipe

    if args.explain:
        for key, default, help in describe_fields():
            print(f"{key:32s} {default:22s} {help}")
        return 0
    if args.losses:
        from align.losses import LOSSES

        for name, spec in sorted(LOSSES.items()):
            print(f"{name:10s} {'ref ' if spec.needs_reference else '    '}{spec.summary}")
            print(f"{'':15s}{spec.paper}")
        return 0
    root = Path(args.dir) if args.dir else RECIPES_DIR
    for path in sorted(root.rglob("*.yaml")):
        if "accelerate" in path.parts:
            continue
        try:
            desc = load_recipe(path).description
        except UserError as e:
            desc = f"INVALID: {e}"
        print(f"{str(path.relative_to(root)):40s} {desc}")
    return 0


def _convert(args) -> int:
    from align.convert import convert_llama2c

    out = convert_llama2c(args.model, args.tokenizer, args.output)
    print(out)
    return 0


def _serve(args) -> int:
    from align.serve import serve_main

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(
            f"--host {args.host}: align serve only binds to loopback (127.0.0.1); put a proxy in front for remote use"
        )
    serve_main(
        args.model, backend=args.backend, host=args.host, port=args.port, name=args.name, max_context=args.max_context
    )
    return 0


def _push(args) -> int:
    from align.card import push, upload_plan

    if args.dry_run:
        for name in upload_plan(Path(args.run_dir), args.checkpoints):
            print(name)
        return 0
    print(push(Path(args.run_dir), args.repo_id, private=args.private, checkpoints=args.checkpoints))
    return 0


def _demo(args) -> int:
    from align.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)
    return 0


def _bench(args) -> int:
    from align.bench import run_bench

    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise UserError(f"--plot {args.plot}: its folder does not exist")
    result = run_bench(args.name, args.extra)
    if args.plot:
        from align.bench import plot_curves

        if not isinstance(result.get("curves"), dict):
            raise UserError(f"bench {args.name}: --plot needs a benchmark that reports curves (online, agent)")
        plot_curves(result["curves"], args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align", description="LLM alignment training suite")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe")
    t.add_argument("recipe", help="recipes/<method>/<name>.yaml")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-5 lora.enabled=true")
    t.add_argument("--output-dir", "-o", help="run folder (default runs/<recipe name>)")
    t.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in the output dir"
    )
    t.add_argument(
        "--dry-run", action="store_true", help="validate recipe, data and launch configuration without loading weights"
    )
    t.set_defaults(fn=_train)

    r = sub.add_parser("recipes", help="list recipes with their description")
    r.add_argument("--dir", help="recipe folder (default: the recipes/ shipped with align)")
    r.add_argument("--explain", action="store_true", help="print every recipe key with its default and documentation")
    r.add_argument("--losses", action="store_true", help="print the loss registry")
    r.set_defaults(fn=_recipes)

    c = sub.add_parser("convert", help="convert checkpoints to HF format")
    csub = c.add_subparsers(dest="format", required=True)
    l2c = csub.add_parser("llama2c", help="llama2.c model.bin + SentencePiece tokenizer -> HF LlamaForCausalLM folder")
    l2c.add_argument("model")
    l2c.add_argument("--tokenizer", required=True)
    l2c.add_argument("--output", required=True)
    l2c.set_defaults(fn=_convert)

    s = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models)"
    )
    s.add_argument("--model", required=True, help="HF model folder")
    s.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", help="model name reported by /v1/models (default: the path)")
    s.add_argument(
        "--max-context",
        type=int,
        help="refuse prompts with no room for a token (400) and cut max_tokens to fit (default: no limit)",
    )
    s.set_defaults(fn=_serve)

    u = sub.add_parser(
        "push", help="upload a finished run folder (model, card, metrics, plots) to the Hugging Face hub"
    )
    u.add_argument("run_dir", help="the folder `align train` wrote")
    u.add_argument("repo_id", help="owner/name of the model repository (created if missing)")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--checkpoints", action="store_true", help="also upload checkpoint-N/ folders (optimizer state)")
    u.add_argument("--dry-run", action="store_true", help="print the files that would be uploaded; send nothing")
    u.set_defaults(fn=_push)

    d = sub.add_parser("demo", help="the quickstart: SFT -> self-judged pairs -> DPO -> evaluation, on CPU in minutes")
    d.add_argument("--output-dir", default="runs/quickstart")
    d.add_argument("--quick", action="store_true", help="a much smaller run (for tests)")
    d.set_defaults(fn=_demo)

    b = sub.add_parser("bench", help="benchmarks; --json prints exactly one JSON object on stdout")
    b.add_argument("name", help="dpo")
    b.add_argument("extra", nargs="*", help="key=value options of the benchmark")
    b.add_argument("--json", action="store_true")
    b.add_argument("--plot", metavar="FILE.png", help="also draw the benchmark's curves (online, agent) into this PNG")
    b.set_defaults(fn=_bench)
    from align.rollout.vllm_cli import add_parser as add_vllm_serve_parser

    add_vllm_serve_parser(sub)  # align vllm-serve
    from align.evals import add_eval_parser

    add_eval_parser(sub)  # align eval alpaca
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # dotted.key=value overrides may come after options
        if args.command not in ("train", "bench") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "train":
            args.overrides = [*args.overrides, *extra]
        else:
            args.extra = [*args.extra, *extra]
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else 'bad input'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RunError as e:  # a non-finite loss, a rollout server that stopped answering: one line
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _peer_stopped(e):
            raise
        # another rank of this launch failed first (its own error line says why): no traceback on this one
        print(
            f"error: rank {os.environ.get('RANK', '?')}: another process of this run stopped; see its error above",
            file=sys.stderr,
        )
        return 1


def _peer_stopped(e: RuntimeError) -> bool:
    """A collective that failed because another rank of the launch exited (gloo, NCCL)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(e)
    return (
        isinstance(e, getattr(dist, "DistBackendError", ()))
        or "Connection closed by peer" in text
        or ("Connection reset by peer" in text)
    )


if __name__ == "__main__":
    sys.exit(main())
