"""Models and tokenizers: load from a local folder or hub id, build tiny ones for tests, wrap in LoRA.

With LoRA the reference model is the same network with the adapter disabled (``reference_context``), so no
second copy of the weights is held in memory.
"""

from __future__ import annotations

import contextlib
import string
from pathlib import Path

import torch

from align.errors import UserError, first_line

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_ARCHS = ("llama", "qwen2")


def char_tokenizer():
    """A character-level tokenizer (printable ASCII) with <pad>/<s>/</s>/<unk>, BOS added like Llama's, and a
    small chat template. Built locally: no download."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    arch: str = "llama",
    vocab_size: int = 104,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate_size: int = 256,
    max_positions: int = 256,
    seed: int = 0,
    tokenizer=None,
    tie_embeddings: bool = False,
):
    """A randomly initialised small causal LM (deterministic in ``seed``). head_dim = hidden/heads."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in TINY_ARCHS:
        raise UserError(
            f"model.name_or_path: unknown tiny architecture {arch!r}; choose tiny:{' or tiny:'.join(TINY_ARCHS)}"
        )
    ids = {}
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        ids = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        **ids,
    )
    # constructed directly, not through from_config: under DeepSpeed ZeRO-3 from_config initialises inside
    # zero.Init, partitioned per rank, and the "same seed" would give every launch a different model
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if name_or_path.startswith("tiny:"):
        return char_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.name_or_path: cannot load a tokenizer from {name_or_path!r} ({first_line(e)})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_model_path(name_or_path: str) -> None:
    """Fail early for a local path that does not hold a model (hub ids are left to the loader)."""
    if name_or_path.startswith("memory:"):
        from align.memory import lookup

        lookup(name_or_path, "model.name_or_path")
        return
    if name_or_path.startswith("tiny:"):
        arch = name_or_path[5:]
        if arch not in TINY_ARCHS:
            raise UserError(
                f"model.name_or_path: unknown tiny architecture {arch!r}; choose tiny:{' or tiny:'.join(TINY_ARCHS)}"
            )
        return
    p = Path(name_or_path)
    looks_local = p.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not p.is_dir():
            raise UserError(f"model.name_or_path: {name_or_path!r} is not a model folder (not found)")
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise UserError(f"model.name_or_path: {name_or_path!r} has no config.json (not a HF model folder)")


def load_policy(model_cfg, lora_cfg=None, seed: int = 0):
    """(model, tokenizer) from a ModelConfig; wrapped in a fresh LoRA adapter when ``lora_cfg.enabled``."""
    from transformers import AutoModelForCausalLM

    check_model_path(model_cfg.name_or_path)
    if model_cfg.name_or_path.startswith("memory:"):  # a model object handed to align.train()
        from align.memory import lookup

        model, tok = lookup(model_cfg.name_or_path, "model.name_or_path")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    else:
        tok = load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code)
    if model_cfg.name_or_path.startswith("memory:"):
        pass  # loaded above
    elif model_cfg.name_or_path.startswith("tiny:"):
        model = build_tiny_model(
            model_cfg.name_or_path[5:],
            hidden_size=model_cfg.tiny_hidden_size,
            layers=model_cfg.tiny_layers,
            heads=model_cfg.tiny_heads,
            intermediate_size=model_cfg.tiny_intermediate_size,
            max_positions=model_cfg.tiny_max_positions,
            seed=seed,
            tokenizer=tok,
        )
        if model_cfg.dtype not in ("float32", "auto"):
            model = model.to(_dtype(model_cfg.dtype))
    else:
        kwargs = dict(
            dtype=_dtype(model_cfg.dtype), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
        if model_cfg.attn_implementation:
            kwargs["attn_implementation"] = model_cfg.attn_implementation
        if getattr(model_cfg, "quantization", "none") != "none":
            kwargs["quantization_config"] = quantization_config(model_cfg)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(
                f"model.name_or_path: cannot load a causal LM from {model_cfg.name_or_path!r} ({first_line(e)})"
            ) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model_cfg, "quantization", "none") != "none":
        from peft import prepare_model_for_kbit_training

        # norms and the LM head in fp32, input embeddings' outputs requiring grad (so checkpointed adapters train)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if getattr(model_cfg, "disable_dropout", False):
        disable_dropout(model)
    if lora_cfg is not None and lora_cfg.enabled:
        model = add_lora(model, lora_cfg)
    return model, tok


def quantization_config(model_cfg):
    """transformers' BitsAndBytesConfig for model.quantization (QLoRA's NF4 + double quantization, or LLM.int8)."""
    from transformers import BitsAndBytesConfig

    from align.extras import require

    require("bitsandbytes", f"model.quantization {model_cfg.quantization!r}")
    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _dtype(model_cfg.dtype) if model_cfg.dtype != "auto" else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def disable_dropout(model) -> int:
    """Every dropout of ``model`` set to p = 0 (as TRL's ``disable_dropout``: preference and policy-gradient losses
    compare log-probs of the same text under two networks, and dropout noise enters those ratios); returns how many
    modules were changed. Call it before adding a LoRA adapter, whose dropout is ``lora.dropout``."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p = 0.0
            n += 1
        elif isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout:
            module.attention_dropout = 0.0  # functional attention dropout (transformers' attention modules)
            n += 1
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop", "dropout"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)  # functional dropout read from the config (e.g. SDPA's dropout_p)
    return n


def add_lora(model, lora_cfg):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def reference_context(model):
    """Inside: the LoRA base model (adapter off). For a non-LoRA model this is a no-op."""
    if is_peft(model):
        with model.disable_adapter():
            yield
    else:
        yield


def save_model(model, tokenizer, output_dir: str | Path, state_dict=None, is_main_process: bool = True) -> None:
    """HF-format model (or LoRA adapter) + tokenizer."""
    model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=is_main_process, safe_serialization=True)
    if is_main_process:
        tokenizer.save_pretrained(output_dir)


def load_pretrained(path: str | Path):
    """(causal LM, tokenizer) of a local HF folder (a finished run's output), without a progress bar."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def inference_device() -> str:
    """Where a model that only generates or scores goes: this process's CUDA device when there is one, else cpu."""
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def for_inference(model, dtype: str = "auto"):
    """``model`` in eval mode on ``inference_device()``. ``dtype`` 'auto': bfloat16 on a GPU that has it when the
    weights are float32, else unchanged (float32 on CPU); or a dtype name."""
    device = inference_device()
    if dtype == "auto":
        fp32 = next(model.parameters()).dtype == torch.float32
        target = torch.bfloat16 if device != "cpu" and fp32 and torch.cuda.is_bf16_supported() else None
    else:
        target = _dtype(dtype)
    model = model.to(device) if target is None else model.to(device=device, dtype=target)
    return model.eval()
