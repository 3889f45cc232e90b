"""The vLLM backend as separate server processes (``rollout.vllm.mode: server``): the same protocol as ``HFEngine``.

    align vllm-serve --model PATH --port 8001 [--tensor-parallel-size 4] [--enable-lora --max-lora-rank 16]
    engine = VLLMServerEngine(model, tokenizer, settings=recipe.rollout.vllm)   # server_urls: [http://host:8001]
    engine.generate(prompts, n, sampling)    # one /v1/completions request per prompt, spread over the servers
    engine.update_weights(model)             # rank 0 pushes to every server; the other ranks wait at a barrier

``align vllm-serve`` (``serve_main``) is a thin start-up around vLLM's own OpenAI-compatible server (continuous
batching, prefix caching, tensor parallelism) with what training needs switched on: raw log-probs (before
temperature and filtering, what the learner recomputes), vLLM's development routes (``/collective_rpc``,
``/reset_prefix_cache``, ``/server_info``), runtime LoRA loading and, with ``--weight-transfer nccl``, vLLM's NCCL
weight transfer.

Requests: each prompt goes as token ids with ``n`` samples and seed ``seed + i * n`` (vLLM gives sample k seed + k),
so results do not depend on which server answers or in what order; ``return_token_ids`` gives the sampled ids and
``logprobs`` their log-probs; greedy decodes once and repeats. ``text`` is our tokenizer's decoding of the ids, as in
the other backends. Requests run concurrently (a pooled HTTP client per server), prompt i on server i mod S.

Weight pushes (every rank calls ``update_weights``; under ZeRO-3 every rank walks the gathers, one parameter at a
time, and only rank 0 sends):
    LoRA adapter  rank 0 writes the adapter folder and every server loads it under a new name
                  (``/v1/load_lora_adapter``); the previous one is unloaded. Generation names the adapter.
    full, folder  rank 0 streams the weights into safetensors shards (``weights.write_hf_folder``) and every server
                  reloads them in place (``/collective_rpc`` -> ``reload_weights(weights_path=...)``), then drops
                  its prefix cache. Needs a filesystem trainer and servers both see (``rollout.vllm.weights_dir``).
    full, nccl    vLLM's NCCL weight transfer (``NCCLTrainerWeightTransferEngine``): rank 0 broadcasts each gathered
                  parameter to the server's workers. GPU only; unverified until bench/gpu_check.py has run.
A server that is down or does not answer within ``rollout.vllm.server_timeout`` seconds stops the run with one line
naming it (``ServerError``), never a hang.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from align.errors import RunError
from align.rollout import Completion, Placement, Prompt, SamplingParams, encode_prompt
from align.rollout.weights import adapter_state, hf_weights, is_peft, write_hf_folder


class ServerError(RunError):
    """A vLLM server that is down, too slow, or answered with an error (one line naming the server)."""


class Server:
    """One ``align vllm-serve`` process: a pooled HTTP client with bounded timeouts."""

    def __init__(self, url: str, timeout: float):
        import httpx

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    def call(self, method: str, path: str, body: dict | None = None, what: str = "") -> dict:
        import httpx

        try:
            r = self.http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise ServerError(
                f"vLLM server {self.url}: no answer to {what or path} within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as e:
            raise ServerError(f"vLLM server {self.url}: {what or path} failed ({type(e).__name__}: {e})") from None
        if r.status_code >= 400:
            detail = r.text.strip().splitlines()[0][:300] if r.text.strip() else ""
            raise ServerError(f"vLLM server {self.url}: {what or path} answered HTTP {r.status_code} {detail}")
        try:
            return r.json() if r.content else {}
        except ValueError:  # some routes answer plain text ("Success: LoRA adapter ... added")
            return {"text": r.text}

    def close(self) -> None:
        self.http.close()


class VLLMServerEngine:
    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 64,
        *,
        settings=None,
        source: str | None = None,
        placement: Placement | None = None,
    ):
        """``settings``: a ``VLLMConfig`` with ``server_urls``; ``model`` the trainer's policy (a peft LoRA model
        syncs its adapter). The servers must serve the policy's starting weights (``align vllm-serve --model``)."""
        from align.config import VLLMConfig
        from align.rollout.vllm import lora_rank, lora_syncable

        s = settings or VLLMConfig(mode="server")
        if not s.server_urls:
            raise ValueError("rollout.vllm.server_urls: no server to talk to")
        self.settings, self.tokenizer, self.batch_size = s, tokenizer, batch_size
        self._model_config = (model.get_base_model() if is_peft(model) else model).config
        self.placement = placement or Placement()
        self.servers = [Server(u, s.server_timeout) for u in s.server_urls]
        self.lora = is_peft(model) and lora_syncable(model)
        self.transport = (
            s.weight_transfer if s.weight_transfer != "auto" else ("nccl" if torch.cuda.is_available() else "folder")
        )
        self._pool = ThreadPoolExecutor(max_workers=min(64, 8 * len(self.servers)))
        self._dir = Path(tempfile.mkdtemp(prefix="align-vllm-push-", dir=s.weights_dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._version = 0
        self._tag = self._shared(uuid.uuid4().hex[:8])  # adapter names unique to this run, the same on every rank
        self._adapter: str | None = None  # the LoRA name generation uses (None: the servers' full weights)
        self._nccl = None
        self.info = [self._check(srv, lora_rank(model) if self.lora else None) for srv in self.servers]
        self.model_name = self.info[0]["model"]
        if self.lora:  # the adapter as it is now (all ranks: under ZeRO-3 gathering it is a collective)
            self._sync_lora(model)

    def _check(self, srv: Server, rank: int | None) -> dict:
        """What the server serves, and that it was started the way training needs (``align vllm-serve``)."""
        models = srv.call("GET", "/v1/models", what="GET /v1/models").get("data") or [{}]
        try:
            cfg = srv.call("GET", "/server_info?config_format=json", what="GET /server_info")["vllm_config"]
        except ServerError as e:
            raise ServerError(
                f"{e} (start the server with `align vllm-serve`: it enables the routes training needs)"
            ) from None
        model_cfg, lora_cfg = cfg.get("model_config") or {}, cfg.get("lora_config")
        if model_cfg.get("logprobs_mode") not in (None, "raw_logprobs"):
            raise ServerError(
                f"vLLM server {srv.url}: logprobs_mode {model_cfg.get('logprobs_mode')!r}; training "
                "needs raw_logprobs (start it with `align vllm-serve`)"
            )
        if rank is not None:
            if not lora_cfg:
                raise ServerError(
                    f"vLLM server {srv.url}: LoRA is off; start it with `align vllm-serve --enable-lora "
                    f"--max-lora-rank {rank}` for a LoRA policy"
                )
            if int(lora_cfg.get("max_lora_rank") or 0) < rank:
                raise ServerError(
                    f"vLLM server {srv.url}: max_lora_rank {lora_cfg.get('max_lora_rank')} < the adapter's rank {rank}"
                )
        served = str(model_cfg.get("dtype") or "").removeprefix("torch.")
        policy = (
            str(getattr(self._model_config, "dtype", None) or "").removeprefix("torch.") if self._model_config else ""
        )
        if served and policy and served != policy and self.placement.rank == 0:
            print(
                f"[vllm-server] warning: {srv.url} serves {served}, the policy trains in {policy}: sampled log-probs "
                f"differ from the learner's (start it with `align vllm-serve --dtype {policy}` to match)",
                file=sys.stderr,
                flush=True,
            )
        parallel = cfg.get("parallel_config") or {}
        return {
            "model": models[0].get("id"),
            "max_model_len": models[0].get("max_model_len"),
            "world_size": int(parallel.get("world_size") or 1),
            "weight_transfer": (cfg.get("weight_transfer_config") or {}).get("backend"),
        }

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingParams | None = None
    ) -> list[list[Completion]]:
        sp = sampling or SamplingParams()
        ids = [list(encode_prompt(self.tokenizer, p)) for p in prompts]
        if sp.max_new_tokens <= 0:
            return [
                [Completion(p, [], "", [], "length", [] if sp.top_logprobs else None) for _ in range(n)] for p in ids
            ]
        greedy = sp.temperature <= 0
        body = {
            "model": self._adapter or self.model_name,
            "n": 1 if greedy else n,
            "max_tokens": sp.max_new_tokens,
            "temperature": 0.0 if greedy else sp.temperature,
            "top_p": sp.top_p,
            "logprobs": sp.top_logprobs,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
            "include_stop_str_in_output": False,
        }
        if sp.top_k:
            body["top_k"] = sp.top_k
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.stop_token_ids:
            body["stop_token_ids"] = list(sp.stop_token_ids)
        if sp.suppress_token_ids:
            banned = set(sp.suppress_token_ids)
            body["allowed_token_ids"] = [t for t in range(self._vocab_size()) if t not in banned]

        def one(i: int) -> list[Completion]:
            req = {**body, "prompt": ids[i]}
            if sp.seed is not None:
                req["seed"] = sp.seed + i * n
            srv = self.servers[i % len(self.servers)]
            reply = srv.call("POST", "/v1/completions", req, what="generation")
            choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
            if not choices:
                raise ServerError(f"vLLM server {srv.url}: a generation answered without choices")
            group = [self._completion(ids[i], c, sp) for c in choices]
            return group * n if greedy else group

        return list(self._pool.map(one, range(len(ids))))

    def _completion(self, prompt_ids: list[int], c: dict, sp: SamplingParams) -> Completion:
        token_ids = [int(t) for t in c.get("token_ids") or []]
        lp = c.get("logprobs") or {}
        logprobs = [float(x) for x in lp.get("token_logprobs") or []][: len(token_ids)]
        tops = None
        if sp.top_logprobs:
            tops = [
                dict(
                    sorted(((_token_id(k), float(v)) for k, v in (step or {}).items()), key=lambda kv: -kv[1])[
                        : sp.top_logprobs
                    ]
                )
                for step in lp.get("top_logprobs") or []
            ]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if isinstance(c.get("stop_reason"), str):
            cut = min((text.find(s) for s in sp.stop if s in text), default=len(text))
            text = text[:cut]
        reason = "stop" if c.get("finish_reason") == "stop" else "length"
        return Completion(list(prompt_ids), token_ids, text, logprobs, reason, tops)

    def _vocab_size(self) -> int:
        if not hasattr(self, "_vocab"):
            self._vocab = max(getattr(self._model_config, "vocab_size", 0) or 0, len(self.tokenizer))
        return self._vocab

    # ---------------------------------------------------------------- weights
    def update_weights(self, model) -> None:
        """Push ``model``'s weights (its LoRA adapter, for a peft LoRA model) to every server. Every rank calls it:
        the gathers are collective under ZeRO-3; rank 0 sends, the others wait at a barrier."""
        if self.lora:
            self._sync_lora(model)
        else:
            self._push_full(model)
        self._barrier()

    def _sync_lora(self, model) -> None:
        state = adapter_state(model)  # (a collective under ZeRO-3)
        self._version += 1
        name = f"align-{self._tag}-v{self._version}"
        if self.placement.rank == 0:
            path = self._dir / name
            model.save_pretrained(str(path), state_dict=state)
            self._each(
                lambda srv: srv.call(
                    "POST",
                    "/v1/load_lora_adapter",
                    {"lora_name": name, "lora_path": str(path)},
                    what="loading the adapter",
                )
            )
            old = self._adapter
            if old is not None:
                self._each(
                    lambda srv: srv.call(
                        "POST", "/v1/unload_lora_adapter", {"lora_name": old}, what="unloading the old adapter"
                    )
                )
                shutil.rmtree(self._dir / old, ignore_errors=True)
        self._adapter = name
        self._barrier()

    def _push_full(self, model) -> None:
        if self.transport == "nccl":
            self._push_nccl(model)
            return
        folder = self._dir / "weights"
        write_hf_folder(model, self.tokenizer, folder, hf_weights(model, merged=True), write=self.placement.rank == 0)
        if self.placement.rank == 0:
            body = {"method": "reload_weights", "kwargs": {"weights_path": str(folder), "is_checkpoint_format": True}}
            self._each(lambda srv: srv.call("POST", "/collective_rpc", body, what="reloading the weights"))
            self._each(lambda srv: srv.call("POST", "/reset_prefix_cache", None, what="resetting the prefix cache"))

    def _push_nccl(self, model) -> None:
        """vLLM's NCCL weight transfer to each server in turn (the gathers are repeated per server)."""
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if self._nccl is None:
            self._nccl = []
            for k, (srv, info) in enumerate(zip(self.servers, self.info)):
                if info["weight_transfer"] != "nccl":
                    raise ServerError(
                        f"vLLM server {srv.url}: start it with `align vllm-serve --weight-transfer nccl` "
                        "(or set rollout.vllm.weight_transfer: folder)"
                    )
                init = NCCLTrainerInitInfo(
                    master_address=os.environ.get("ALIGN_NCCL_HOST", "127.0.0.1"),
                    master_port=int(os.environ.get("ALIGN_NCCL_PORT", 29700)) + k,
                    world_size=1 + info["world_size"],
                    rank=self.placement.rank,
                )
                client = HTTPVLLMWeightSyncClient(srv.url, timeout=self.settings.server_timeout)
                self._nccl.append(
                    NCCLTrainerWeightTransferEngine.trainer_init(init, client=client, source=PolicySource(model))
                )
        for engine in self._nccl:
            engine.source = PolicySource(model)
            engine.send_weights()
        if self.placement.rank == 0:
            self._each(lambda srv: srv.call("POST", "/reset_prefix_cache", None, what="resetting the prefix cache"))

    def _each(self, fn) -> None:
        list(self._pool.map(fn, self.servers))

    def _shared(self, value):
        """Rank 0's ``value`` on every rank."""
        if self.placement.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [value]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return value

    def _barrier(self) -> None:
        if self.placement.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def sleep(self) -> None:
        """The servers keep their memory (they run on devices of their own)."""

    def wake(self) -> None:
        pass


def _token_id(key: str) -> int:
    """``token_id:123`` (``return_tokens_as_token_ids``) -> 123."""
    return int(str(key).rpartition(":")[2])


class PolicySource:
    """vLLM's ``WeightSource`` protocol over ``weights.hf_weights``: metadata without gathering, then one gathered
    parameter at a time (for the NCCL transfer)."""

    def __init__(self, model):
        self.model = model

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        out = []
        for name, p in self.model.named_parameters():
            from align.rollout.weights import hf_name

            hf = hf_name(name) if is_peft(self.model) else name
            if hf is not None:
                out.append(ParamMeta(hf, p.dtype, tuple(getattr(p, "ds_shape", None) or p.shape)))
        return out

    def __iter__(self):
        return hf_weights(self.model, merged=True)

    def held_names(self):
        return None

    def groups(self):
        return [[m.name] for m in self.metadata()]

    def iter_groups(self):
        for name, tensor in self:
            yield [name], [tensor]
