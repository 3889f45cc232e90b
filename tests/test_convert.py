"""llama2.c -> HF conversion on the real BabyLlama (../shared/data), checked against a llama2.c-style forward."""

import itertools
import math
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.convert import convert_llama2c
from align.errors import UserError
from align.paths import shared_data_dir

PROMPT = "Once upon a time"
# Greedy continuation observed after conversion (48 new tokens; the tokenizer is character level).
# With q/k rows left in llama2.c's order the same weights say "mupactinithta hockindy pontte. tketoner".
EXPECTED = ", there was a little girl named Lily. She loved "
STORY_WORDS = set("there was a an the little big girl boy named lily tom ben she he they loved liked to play".split())


def babyllama() -> Path:
    """The llama2.c BabyLlama folder in the shared data; skip the test when the shared data is absent."""
    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data not found (set ALIGN_SHARED_DATA)")
    return data / "models" / "babyllama-tok105"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """Convert BabyLlama once and load it back with the Auto classes, as a user would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = babyllama()
    out_dir = tmp_path_factory.mktemp("hf") / "babyllama"
    out = convert_llama2c(str(src / "model5000.bin"), str(src / "tok105.model"), str(out_dir))
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def llama2c_logits(bin_path: Path, tokens: list[int]) -> torch.Tensor:
    """llama2.c's forward (model.py / run.c) in plain torch, with weights read straight from the .bin.

    RoPE rotates the interleaved pairs (2i, 2i+1) of each head by the freq_cis tables stored in the file.
    """
    raw = bin_path.read_bytes()
    dim, hidden, L, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    hs, T = dim // n_heads, len(tokens)
    kv = n_kv * hs
    shapes = [
        (abs(vocab), dim),
        (L, dim),
        (L, dim, dim),
        (L, kv, dim),
        (L, kv, dim),
        (L, dim, dim),
        (L, dim),
        (L, hidden, dim),
        (L, dim, hidden),
        (L, hidden, dim),
        (dim,),
        (seq_len, hs // 2),
        (seq_len, hs // 2),
    ]
    offsets = list(itertools.accumulate(map(math.prod, shapes), initial=0))
    emb, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, cos, sin = (
        flat[start:end].view(shape) for start, end, shape in zip(offsets, offsets[1:], shapes)
    )
    assert vocab > 0, "this reference assumes a shared classifier"

    def rmsnorm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g

    def rope(x):  # x: (T, heads, hs); rotate each pair (2i, 2i+1) by angle pos * freq_i
        re_, im = x[..., 0::2], x[..., 1::2]
        c, s = cos[:T, None, :], sin[:T, None, :]
        return torch.stack([re_ * c - im * s, re_ * s + im * c], dim=-1).flatten(-2)

    x, mask = emb[tokens], torch.full((T, T), float("-inf")).triu(1)
    for i in range(L):
        h = rmsnorm(x, rms_att[i])
        q = rope((h @ wq[i].T).view(T, n_heads, hs))
        k = rope((h @ wk[i].T).view(T, n_kv, hs)).repeat_interleave(n_heads // n_kv, dim=1)
        v = (h @ wv[i].T).view(T, n_kv, hs).repeat_interleave(n_heads // n_kv, dim=1)
        att = (torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hs) + mask).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(T, dim) @ wo[i].T
        h = rmsnorm(x, rms_ffn[i])
        x = x + (F.silu(h @ w1[i].T) * (h @ w3[i].T)) @ w2[i].T
    return rmsnorm(x, rms_final) @ emb.T


def test_logits_match_llama2c_forward(hf_model):
    model, tok = hf_model
    ids = tok(PROMPT + ", there was a little girl")["input_ids"]
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0]
    ref = llama2c_logits(babyllama() / "model5000.bin", ids)
    assert hf.shape == ref.shape == (len(ids), 105)
    torch.testing.assert_close(hf, ref, atol=1e-4, rtol=0)


def test_greedy_continuation_is_tinystories_english(hf_model):
    model, tok = hf_model
    assert tok(PROMPT)["input_ids"][:2] == [1, 3]  # bos, then SentencePiece's "▁" prefix
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert re.fullmatch(r"[A-Za-z ,.]+", text) and len(words) >= 8, text
    assert {w.lower() for w in words} <= STORY_WORDS, text
    assert text == EXPECTED


def test_truncated_bin_raises_and_leaves_nothing(tmp_path):
    src = babyllama()
    bad = tmp_path / "model.bin"
    bad.write_bytes((src / "model5000.bin").read_bytes()[:1000])
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        convert_llama2c(str(bad), str(src / "tok105.model"), str(out))
    message = str(err.value)
    assert message.startswith(f"{bad}: ") and "truncated" in message and "\n" not in message
    assert sorted(tmp_path.iterdir()) == [bad]  # no output folder, no temp folder


def test_missing_tokenizer_raises(tmp_path):
    missing = tmp_path / "tok105.model"
    with pytest.raises(UserError, match=re.escape(f"{missing}: tokenizer file not found")):
        convert_llama2c(str(babyllama() / "model5000.bin"), str(missing), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "checkpoint file not found"),
        (b"\x00" * 10, "too short"),
        (struct.pack("<7i", 128, 352, 5, 7, 4, 105, 256), "nonsense header"),  # 7 heads do not divide dim 128
    ],
)
def test_bad_bin_raises_one_line(tmp_path, content, problem):
    bad = tmp_path / "model.bin"
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(UserError, match=re.escape(f"{bad}: ") + ".*" + problem) as err:
        convert_llama2c(str(bad), str(tmp_path / "tok.model"), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    src, out = babyllama(), tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(f"{out}: cannot write") + ".*No space left"):
        convert_llama2c(str(src / "model5000.bin"), str(src / "tok105.model"), str(out))
    assert list(tmp_path.iterdir()) == []  # neither the output folder nor the temp folder


def test_cli_convert_writes_a_model_folder(tmp_path):
    from align.paths import shared_data_dir
    from tests.conftest import run_align

    data = shared_data_dir()
    if data is None:
        pytest.skip("../shared/data not found (set ALIGN_SHARED_DATA)")
    src = data / "models" / "babyllama-tok105"
    out = tmp_path / "hf"
    res = run_align(
        "convert", "llama2c", str(src / "model5000.bin"), "--tokenizer", str(src / "tok105.model"), "--output", str(out)
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    bad = run_align(
        "convert",
        "llama2c",
        str(tmp_path / "missing.bin"),
        "--tokenizer",
        str(src / "tok105.model"),
        "--output",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and not (tmp_path / "x").exists()
