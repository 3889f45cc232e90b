"""``align vllm-serve``: a thin start-up around vLLM's OpenAI-compatible server with what training needs switched on
(raw log-probs, vLLM's development routes for weight reloads and server info, runtime LoRA loading, and with
``--weight-transfer nccl`` vLLM's NCCL weight transfer). The trainer side is ``vllm_server.VLLMServerEngine``.
Imports nothing heavy until it runs (the CLI registers it on every start)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def server_argv(args) -> list[str]:
    """vLLM's OpenAI server arguments for ``align vllm-serve`` (see ``add_parser``)."""
    argv = [
        "--model",
        args.model,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--logprobs-mode",
        "raw_logprobs",
        "--generation-config",
        "vllm",
        "--enable-prefix-caching",
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--max-num-seqs",
        str(args.max_num_seqs),
    ]
    if args.served_model_name:
        argv += ["--served-model-name", args.served_model_name]
    if args.max_model_len:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.kv_cache_memory_bytes:
        argv += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    elif not _cuda():
        argv += ["--kv-cache-memory-bytes", str(256 << 20)]  # vLLM-CPU would take 92 % of the machine's memory
    if args.enforce_eager or not _cuda():
        argv += ["--enforce-eager"]
    if args.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(args.max_lora_rank), "--max-loras", str(args.max_loras)]
    if args.weight_transfer == "nccl":
        argv += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return argv + list(args.vllm_args or [])


def serve_main(args) -> int:
    """``align vllm-serve``: replace this process by vLLM's OpenAI server (signals reach vLLM directly)."""
    from align.errors import UserError
    from align.rollout.vllm import check_vllm

    check_vllm()
    if not (Path(args.model).is_dir() or not args.model.startswith(("/", "."))):
        raise UserError(f"--model {args.model}: not a model folder")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *server_argv(args)]
    print(f"[vllm-serve] {' '.join(argv[3:])}", file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, env)
    return 0  # pragma: no cover (exec does not return)


def add_parser(sub) -> None:
    s = sub.add_parser(
        "vllm-serve", help="a vLLM server for rollout.vllm.mode: server (vLLM's OpenAI server + weight-push routes)"
    )
    s.add_argument("--model", required=True, help="the policy's starting weights: HF model folder or hub id")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="model name in /v1/models (default: the --model value)")
    s.add_argument("--dtype", default="auto", help="weights and compute dtype (auto: the checkpoint's)")
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs this server spans")
    s.add_argument("--gpu-memory-utilization", type=float, help="fraction of each GPU vLLM may take (default 0.9)")
    s.add_argument("--kv-cache-memory-bytes", type=int, help="KV cache size (default on CPU: 256 MiB)")
    s.add_argument("--max-model-len", type=int, help="longest prompt + completion")
    s.add_argument("--max-num-seqs", type=int, default=256, help="sequences batched at once")
    s.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always on CPU)")
    s.add_argument("--enable-lora", action="store_true", help="accept LoRA adapter pushes (a LoRA policy)")
    s.add_argument("--max-lora-rank", type=int, default=16)
    s.add_argument("--max-loras", type=int, default=2, help="adapters held at once (2: the new one and the old)")
    s.add_argument(
        "--weight-transfer",
        choices=["folder", "nccl"],
        default="folder",
        help="how full weights arrive: safetensors folders (any device) or vLLM's NCCL transfer (GPU)",
    )
    s.add_argument("vllm_args", nargs="*", help="further vLLM server arguments, after --")
    s.set_defaults(fn=serve_main)
