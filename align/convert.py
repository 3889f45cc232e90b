"""Convert a karpathy/llama2.c checkpoint (legacy ``model.bin``) and its SentencePiece tokenizer to a HF folder.

Legacy format (llama2.c ``export.py``, ``legacy_export``): a header of 7 int32 ``dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, max_seq_len`` (a negative ``vocab_size`` means the classifier is not shared
with the embedding), then float32 tensors, each stored as PyTorch keeps it (``[out, in]`` for linear layers):
token embedding, then per kind for all layers: rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3; then rms_final,
freq_cis_real and freq_cis_imag (``max_seq_len x head_size/2`` each, skipped here), then wcls if unshared.

llama2.c applies RoPE to interleaved pairs ``(2i, 2i+1)`` of each head; HF Llama rotates ``(i, i + head_size/2)``
(``rotate_half``). :func:`_to_rotate_half` reorders the rows of wq and wk so both give the same attention scores.
"""

import math
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from align.errors import UserError

HEADER = struct.Struct("<7i")


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7-int header of a legacy llama2.c checkpoint, with the classifier-sharing flag decoded."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    max_seq_len: int
    shared_classifier: bool

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the stored tensors, in file order."""
        d, h, n, v = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        kv = self.n_kv_heads * (d // self.n_heads)
        half_head = d // self.n_heads // 2
        shapes = [
            ("tok_embeddings", (v, d)),
            ("rms_att", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, kv, d)),
            ("wv", (n, kv, d)),
            ("wo", (n, d, d)),
            ("rms_ffn", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.max_seq_len, half_head)),
            ("freq_cis_imag", (self.max_seq_len, half_head)),
        ]
        return shapes if self.shared_classifier else [*shapes, ("wcls", (v, d))]

    def file_size(self) -> int:
        """Bytes a checkpoint with this header must have."""
        return HEADER.size + 4 * sum(math.prod(shape) for _, shape in self.tensor_shapes())


def read_header(path: str) -> Llama2cHeader:
    """Read and sanity-check the header of ``path``; raise UserError if it is not a llama2.c checkpoint."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise UserError(f"{path}: {len(raw)} bytes, too short for a llama2.c header")
    dim, hidden, layers, heads, kv_heads, vocab, seq = HEADER.unpack(raw)
    header = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq, vocab > 0)
    ok = (
        min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq) > 0
        and dim % heads == 0
        and (dim // heads) % 2 == 0
        and heads % kv_heads == 0
    )
    if not ok:
        names = "dim hidden_dim n_layers n_heads n_kv_heads vocab_size max_seq_len".split()
        fields = " ".join(f"{k}={v}" for k, v in zip(names, HEADER.unpack(raw)))
        raise UserError(f"{path}: not a llama2.c checkpoint (nonsense header: {fields})")
    return header


def read_llama2c(path: str) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint into its header and its raw tensors (llama2.c names and layout)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint file not found")
    try:
        header = read_header(path)
        size = os.path.getsize(path)
        if size != header.file_size():
            raise UserError(
                f"{path}: {size} bytes, but its header implies {header.file_size()}"
                " (truncated, or not a legacy llama2.c checkpoint)"
            )
        with open(path, "rb") as f:
            flat = torch.frombuffer(bytearray(f.read()), dtype=torch.float32, offset=HEADER.size)
    except OSError as e:
        raise UserError(f"{path}: cannot read checkpoint ({e.strerror or e})") from None
    tensors, offset = {}, 0
    for name, shape in header.tensor_shapes():
        n = math.prod(shape)
        tensors[name] = flat[offset : offset + n].view(shape)
        offset += n
    return header, tensors


def _to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from llama2.c's interleaved RoPE pairs to HF's rotate_half halves.

    Within each head, llama2.c row ``2i + j`` (pair i, component j) becomes HF row ``j * head_size/2 + i``.
    This is llama2.c ``export.py``'s ``permute_original``.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_state_dict(header: Llama2cHeader, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map llama2.c tensors to ``LlamaForCausalLM`` parameter names (q/k rows permuted to rotate_half)."""
    sd = {
        "model.embed_tokens.weight": t["tok_embeddings"],
        "model.norm.weight": t["rms_final"],
        "lm_head.weight": t["tok_embeddings"] if header.shared_classifier else t["wcls"],
    }
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = _to_rotate_half(t["wq"][i], header.n_heads)
        sd[p + "self_attn.k_proj.weight"] = _to_rotate_half(t["wk"][i], header.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
    return {k: v.contiguous() for k, v in sd.items()}


def load_sentencepiece_tokenizer(path: str, model_max_length: int):
    """Build a HF fast tokenizer that encodes like the SentencePiece BPE model at ``path``.

    Pieces, ids and merge order come from SentencePiece itself (no protobuf needed), as in transformers' own
    converter: BPE over the pieces, a "▁" prefix and spaces as "▁". bos is id 1 and eos id 2, as llama2.c assumes;
    bos is prepended. Characters outside the vocabulary become ``<unk>`` unless the model has byte pieces, and
    runs of spaces collapse if SentencePiece collapses them (``remove_extra_whitespaces``).
    """
    import sentencepiece as spm
    from tokenizers import Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer file not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a SentencePiece model ({reason})") from None
    n = sp.get_piece_size()
    if n < 3:
        raise UserError(f"{path}: SentencePiece vocabulary has {n} pieces; need at least <unk>, <s>, </s>")
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = dict(unk_token=sp.id_to_piece(sp.unk_id()), bos_token=sp.id_to_piece(1), eos_token=sp.id_to_piece(2))
    has_bytes = any(sp.is_byte(i) for i in range(n))
    backend = Tokenizer(
        BPE(vocab, generate_merges(vocab), unk_token=special["unk_token"], fuse_unk=True, byte_fallback=has_bytes)
    )
    collapse = [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    prefix = [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence((collapse if sp.encode("a  b ") == sp.encode("a b") else []) + prefix)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, add_bos_token=True, model_max_length=model_max_length, padding_side="left", **special
    )


def convert_llama2c(bin_path: str, tokenizer_path: str, output_dir: str) -> str:
    """Convert llama2.c ``bin_path`` + SentencePiece ``tokenizer_path`` into a HF LlamaForCausalLM folder.

    All inputs are checked before anything is written; the folder is built in a temporary sibling and renamed
    into place, so a failure leaves no ``output_dir``. Returns ``output_dir``. Bad input raises UserError.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    bin_path, tokenizer_path, output_dir = str(bin_path), str(tokenizer_path), str(output_dir)
    header, tensors = read_llama2c(bin_path)
    tokenizer = load_sentencepiece_tokenizer(tokenizer_path, header.max_seq_len)
    if len(tokenizer) != header.vocab_size:
        raise UserError(f"{tokenizer_path}: {len(tokenizer)} tokens, but {bin_path} has vocab_size {header.vocab_size}")
    out = Path(output_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"{output_dir}: already exists; remove it or pick another output folder")

    config = LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.dim // header.n_heads,
        max_position_embeddings=header.max_seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(to_hf_state_dict(header, tensors), strict=True)

    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"{output_dir}: cannot write the converted model ({e.strerror or e})") from None
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def convert_shared_babyllama(output_dir: str | Path) -> tuple[str | None, str | None]:
    """The shared pretrained BabyLlama (``<shared data>/models/babyllama-tok105``) as a HF folder in ``output_dir``:
    (path, None), or (None, why) when the shared data folder is absent."""
    from align.paths import shared_data_dir

    data = shared_data_dir()
    if data is None:
        return None, "shared data folder not found (set ALIGN_SHARED_DATA)"
    src = data / "models" / "babyllama-tok105"
    return convert_llama2c(str(src / "model5000.bin"), str(src / "tok105.model"), str(output_dir)), None
