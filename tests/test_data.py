"""Data: reading every file type, normalising the three row formats, tokenising, bad input, batching."""

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.config import DataConfig
from align.data import (
    HH_ASSISTANT,
    Example,
    collate,
    detect_format,
    load_examples,
    normalise,
    read_rows,
    render,
    split_hh,
    tokenize_rows,
)
from align.errors import UserError
from align.models import char_tokenizer
from align.paths import shared_data_dir

PAIRS = [
    {"prompt": "2+3=", "chosen": "5", "rejected": "6"},
    {"prompt": "rev abc=", "chosen": "cba", "rejected": "abc"},
    {"prompt": "max 1 9 4=", "chosen": "9", "rejected": "1"},
]
HH_REAL_ROWS = 2312


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), **kw)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load_error(path, tok, data_cfg=None, sft=False) -> str:
    """load_examples must raise a UserError with one non-empty line that names the file."""
    with pytest.raises(UserError) as info:
        load_examples(str(path), tok, data_cfg or cfg(), sft=sft)
    msg = str(info.value)
    assert msg and "\n" not in msg, msg
    assert Path(path).name in msg, msg
    return msg


def tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- plain


def test_plain_rows_get_bos_and_eos(tok):
    fmt, triples = normalise(PAIRS, cfg(), "mem", sft=False)
    assert fmt == "plain"
    examples = tokenize_rows(triples, fmt, tok, cfg(), "mem")
    assert len(examples) == len(PAIRS)
    for i, (row, ex) in enumerate(zip(PAIRS, examples)):
        assert ex.idx == i
        assert ex.prompt_ids[0] == tok.bos_token_id
        assert ex.prompt_ids[1:] == tokens(tok, row["prompt"])
        assert ex.chosen_ids == tokens(tok, row["chosen"]) + [tok.eos_token_id]
        assert ex.rejected_ids == tokens(tok, row["rejected"]) + [tok.eos_token_id]
        assert tok.decode(ex.chosen_ids, skip_special_tokens=True) == row["chosen"]


def test_plain_sft_rows_have_no_rejected(tok):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in PAIRS]
    fmt, triples = normalise(rows, cfg(), "mem", sft=True)
    examples = tokenize_rows(triples, fmt, tok, cfg(), "mem")
    assert all(e.rejected_ids is None and e.chosen_ids[-1] == tok.eos_token_id for e in examples)


def test_plain_rows_with_chat_template(tok):
    fmt, triples = normalise(PAIRS[:1], cfg(chat_template=True), "mem", sft=False)
    ex = tokenize_rows(triples, fmt, tok, cfg(chat_template=True), "mem")[0]
    messages = [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]
    assert ex.prompt_ids + ex.chosen_ids == tokens(tok, tok.apply_chat_template(messages, tokenize=False))


def test_custom_column_names(tok):
    rows = [{"q": "hi", "good": "a", "bad": "b"}]
    c = cfg(prompt_key="q", chosen_key="good", rejected_key="bad")
    fmt, triples = normalise(rows, c, "mem", sft=False)
    assert triples == [("hi", "a", "b")]


# -------------------------------------------------------------------------------------------- conversational


def conv_full_text(tok, messages) -> str:
    return tok.apply_chat_template(messages, tokenize=False)


def test_conversational_with_explicit_prompt(tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3="}]
    chosen = [{"role": "assistant", "content": "5"}]
    rejected = [{"role": "assistant", "content": "six"}]
    rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}]
    fmt, triples = normalise(rows, cfg(), "mem", sft=False)
    assert fmt == "conversational"
    assert triples == [(prompt, chosen, rejected)]
    for response in (chosen, rejected):
        p, r = render(tok, prompt, response, use_template=True)
        assert p + r == conv_full_text(tok, prompt + response)
        assert p == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ex = tokenize_rows(triples, fmt, tok, cfg(), "mem")[0]
    # the template writes its own BOS/EOS: no extra BOS on the prompt, no extra EOS on the responses
    assert ex.prompt_ids + ex.chosen_ids == tokens(tok, conv_full_text(tok, prompt + chosen))
    assert ex.prompt_ids + ex.rejected_ids == tokens(tok, conv_full_text(tok, prompt + rejected))
    assert ex.prompt_ids.count(tok.bos_token_id) == 1
    assert tok.decode(ex.chosen_ids) == "5</s>"


def test_conversational_with_implicit_prompt(tok):
    shared = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+3="},
    ]
    rows = [
        {
            "chosen": shared + [{"role": "assistant", "content": "5"}],
            "rejected": shared + [{"role": "assistant", "content": "6"}],
        }
    ]
    fmt, triples = normalise(rows, cfg(), "mem", sft=False)
    assert fmt == "conversational"
    prompt, chosen, rejected = triples[0]
    assert prompt == shared
    assert chosen == [{"role": "assistant", "content": "5"}] and rejected == [{"role": "assistant", "content": "6"}]
    ex = tokenize_rows(triples, fmt, tok, cfg(), "mem")[0]
    assert ex.prompt_ids + ex.chosen_ids == tokens(tok, conv_full_text(tok, rows[0]["chosen"]))
    assert ex.prompt_ids + ex.rejected_ids == tokens(tok, conv_full_text(tok, rows[0]["rejected"]))


def test_conversational_string_prompt_becomes_a_user_turn(tok):
    rows = [
        {
            "prompt": "2+3=",
            "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": [{"role": "assistant", "content": "6"}],
        }
    ]
    _, triples = normalise(rows, cfg(), "mem", sft=False)
    assert triples[0][0] == [{"role": "user", "content": "2+3="}]


def test_conversational_implicit_prompt_must_be_shared():
    rows = [
        {
            "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "5"}],
            "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "6"}],
        }
    ]
    with pytest.raises(UserError, match="row 0: chosen and rejected do not share"):
        normalise(rows, cfg(), "mem", sft=False)


def test_conversational_bad_messages():
    rows = [{"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(UserError, match="row 0: 'chosen' is not a list of"):
        normalise(rows, cfg(), "mem", sft=False)


# ----------------------------------------------------------------------------------------------------------- hh


def test_split_hh_at_the_last_assistant_turn():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+3?\n\nAssistant: 5"
    prompt, response = split_hh(text)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+3?\n\nAssistant:"
    assert response == "5"
    with pytest.raises(ValueError):
        split_hh("\n\nHuman: no answer")


def test_hh_rows_are_detected_and_split(tok):
    rows = [{"chosen": "\n\nHuman: 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: 2+3?\n\nAssistant: 6"}]
    assert detect_format(rows[0], cfg()) == "hh"
    fmt, triples = normalise(rows, cfg(), "mem", sft=False)
    assert fmt == "hh"
    assert triples == [("\n\nHuman: 2+3?\n\nAssistant:", "5", "6")]
    ex = tokenize_rows(triples, fmt, tok, cfg(), "mem")[0]
    assert ex.prompt_ids[0] == tok.bos_token_id and ex.chosen_ids[-1] == tok.eos_token_id


def test_hh_rows_with_different_prompts_fail():
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: 5", "rejected": "\n\nHuman: b\n\nAssistant: 6"}]
    with pytest.raises(UserError, match="row 0: chosen and rejected dialogues have different prompts"):
        normalise(rows, cfg(), "mem", sft=False)


def test_hh_row_without_assistant_turn_fails():
    rows = [
        {"chosen": "\n\nHuman: a\n\nAssistant: 5", "rejected": "\n\nHuman: a\n\nAssistant: 6"},
        {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a\n\nAssistant: 6"},
    ]
    with pytest.raises(UserError, match="row 1: not an HH-RLHF dialogue"):
        normalise(rows, cfg(format="hh"), "mem", sft=False)


def hh_real_file() -> Path:
    data = shared_data_dir()
    if data is None:
        pytest.skip("shared data folder not found (../shared/data next to the repo, or set ALIGN_SHARED_DATA)")
    path = data / "preferences" / "hh-rlhf-harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found in the shared data")
    return path


# Rows of the real HH-RLHF harmless-base test split that are malformed as preference pairs:
#   - empty chosen response: the chosen dialogue ends with "\n\nAssistant: " and nothing after it;
#   - the final chosen response itself holds a "\n\nAssistant:" turn, so splitting at the last one gives
#     chosen and rejected different prompts.
HH_EMPTY_CHOSEN = {86, 516, 925, 1103}
# rows whose chosen response itself holds another "\n\nAssistant:" turn: split at the shared beginning, they load
HH_MULTI_TURN_RESPONSE = {1254, 1688, 1950, 1952, 2036}


def test_real_hh_rlhf_file_rows(tok):
    path = hh_real_file()
    rows = read_rows(str(path), cfg())
    assert len(rows) == HH_REAL_ROWS
    assert all(set(r) == {"chosen", "rejected"} for r in rows)
    hh = cfg(format="hh")
    good, errors = [], {}
    for i, row in enumerate(rows):  # row by row, to see every malformed row (the whole file stops at the first)
        try:
            good.append((i, normalise([row], hh, str(path), sft=False)[1][0]))
        except UserError as e:
            errors[i] = str(e)
    assert {i for i, e in errors.items() if "empty 'chosen' response" in e} == HH_EMPTY_CHOSEN
    assert set(errors) == HH_EMPTY_CHOSEN
    assert len(good) == HH_REAL_ROWS - 4
    loaded = dict(good)
    for i in HH_MULTI_TURN_RESPONSE:
        prompt, chosen, rejected = loaded[i]  # the last shared turn is the prompt; the responses stay whole
        assert rows[i]["chosen"] == prompt + " " + chosen or rows[i]["chosen"] == prompt + chosen, i
    fmt, whole = normalise(rows, cfg(format="hh", drop_invalid=True), str(path), sft=False)
    assert fmt == "hh" and len(whole) == HH_REAL_ROWS - 4
    for i, (prompt, chosen, rejected) in good:
        assert prompt.endswith("Assistant:"), i
        assert prompt.startswith("\n\nHuman:"), i
        assert chosen.strip() and rejected.strip(), i
        assert rows[i]["chosen"].startswith(prompt) and rows[i]["rejected"].startswith(prompt), i
    # the good rows tokenise (truncated: the dialogues are long for a character tokenizer)
    triples = [t for _, t in good[:200]]
    examples = tokenize_rows(
        triples, "hh", tok, cfg(format="hh", truncate=True, max_length=512, max_prompt_length=384), str(path)
    )
    assert len(examples) == 200
    assert all(len(e.prompt_ids) <= 384 and len(e.prompt_ids) + len(e.chosen_ids) <= 512 for e in examples)


def test_real_hh_rlhf_file_as_a_whole_names_the_first_bad_row(tok):
    path = hh_real_file()
    msg = load_error(path, tok, cfg(format="hh", truncate=True))
    assert f"row {min(HH_EMPTY_CHOSEN)}: empty 'chosen' response" in msg


# ------------------------------------------------------------------------------------------------ file types


def test_all_file_types_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [write_jsonl(tmp_path / "d.jsonl", PAIRS)]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in PAIRS))
    files.append(tmp_path / "d.jsonl.gz")
    (tmp_path / "d.json").write_text(json.dumps(PAIRS), encoding="utf-8")
    files.append(tmp_path / "d.json")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": PAIRS}), encoding="utf-8")
    files.append(tmp_path / "wrapped.json")
    with gzip.open(tmp_path / "d.json.gz", "wt", encoding="utf-8") as f:
        json.dump(PAIRS, f)
    files.append(tmp_path / "d.json.gz")
    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "d.parquet")
    files.append(tmp_path / "d.parquet")
    for path in files:
        assert read_rows(str(path), cfg()) == PAIRS, path.name


def test_jsonl_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n" + json.dumps(PAIRS[0]) + "\n  \n" + json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    assert read_rows(str(path), cfg()) == PAIRS[:2]


def test_limit_uses_the_first_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    assert len(load_examples(str(path), tok, cfg(limit=2))) == 2


def test_builtin_tasks(tok):
    examples = load_examples("builtin:tasks", tok, cfg(builtin_size=20, builtin_families=["add", "sort"]))
    assert len(examples) == 20 and all(e.rejected_ids is not None for e in examples)
    sft = load_examples("builtin:tasks", tok, cfg(builtin_size=10), sft=True)
    assert all(e.rejected_ids is None for e in sft)
    with pytest.raises(UserError, match="data.builtin_families"):
        read_rows("builtin:tasks", cfg(builtin_families=["nope"]))
    with pytest.raises(UserError, match="builtin:other"):
        read_rows("builtin:other", cfg())


# ------------------------------------------------------------------------------------------------- bad input


def test_missing_column_names_row_and_column(tmp_path, tok):
    rows = [PAIRS[0], {"prompt": "p", "chosen": "c"}]
    msg = load_error(write_jsonl(tmp_path / "nocol.jsonl", rows), tok)
    assert "row 1" in msg and "'rejected'" in msg


def test_missing_prompt_column(tmp_path, tok):
    msg = load_error(write_jsonl(tmp_path / "noprompt.jsonl", [{"chosen": "c", "rejected": "r"}]), tok)
    assert "row 0" in msg and "'prompt'" in msg


@pytest.mark.parametrize("empty", ["", "   ", "\n"])
def test_empty_chosen(tmp_path, tok, empty):
    rows = [PAIRS[0], PAIRS[1], {"prompt": "p", "chosen": empty, "rejected": "r"}]
    msg = load_error(write_jsonl(tmp_path / "empty_chosen.jsonl", rows), tok)
    assert "row 2" in msg and "empty 'chosen'" in msg


def test_non_utf8_line_names_the_row(tmp_path, tok):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        (json.dumps(PAIRS[0]) + "\n").encode()
        + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    msg = load_error(path, tok)
    assert "row 1" in msg and "UTF-8" in msg


def test_invalid_json_line_names_the_row(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + '\n{"prompt": "x", \n', encoding="utf-8")
    msg = load_error(path, tok)
    assert "row 2" in msg and "invalid JSON" in msg


def test_invalid_json_file(tmp_path, tok):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "x"', encoding="utf-8")
    assert "invalid JSON" in load_error(path, tok)


def test_json_that_is_not_a_list(tmp_path, tok):
    path = tmp_path / "obj.json"
    path.write_text('{"prompt": "x"}', encoding="utf-8")
    assert "list of rows" in load_error(path, tok)


def test_non_object_row(tmp_path, tok):
    path = tmp_path / "scalar_row.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n42\n", encoding="utf-8")
    assert "row 1: expected an object" in load_error(path, tok)


def test_plain_column_of_the_wrong_type(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": 5, "rejected": "r"}]
    msg = load_error(write_jsonl(tmp_path / "int.jsonl", rows), tok)
    assert "row 0" in msg and "'chosen' must be a string" in msg


def test_too_long_prompt_names_the_row_and_truncates_from_the_left(tmp_path, tok):
    long_prompt = "".join(str(i % 10) for i in range(40))
    rows = [PAIRS[0], {"prompt": long_prompt, "chosen": "x", "rejected": "y"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    msg = load_error(path, tok, cfg(max_prompt_length=16, max_length=32))
    assert "row 1" in msg and "data.max_prompt_length 16" in msg and "data.truncate" in msg
    examples = load_examples(str(path), tok, cfg(max_prompt_length=16, max_length=32, truncate=True))
    full = [tok.bos_token_id] + tokens(tok, long_prompt)
    assert examples[1].prompt_ids == full[-16:]  # the end of the prompt (next to the response) is kept
    assert tok.decode(examples[1].prompt_ids) == long_prompt[-16:]
    assert examples[0].prompt_ids[0] == tok.bos_token_id  # short rows are untouched


def test_too_long_response_fails_or_is_cut_from_the_right(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "abcdefghijklmnopqrstuvwxyz", "rejected": "y"}]
    path = write_jsonl(tmp_path / "longresp.jsonl", rows)
    msg = load_error(path, tok, cfg(max_prompt_length=8, max_length=16))
    assert "row 0" in msg and "prompt + chosen" in msg and "data.max_length 16" in msg
    ex = load_examples(str(path), tok, cfg(max_prompt_length=8, max_length=16, truncate=True))[0]
    assert len(ex.prompt_ids) + len(ex.chosen_ids) == 16
    assert tok.decode(ex.chosen_ids) == "abcdefghijklmn"


def test_mixed_formats_name_the_row(tmp_path, tok):
    rows = [
        PAIRS[0],
        PAIRS[1],
        {
            "prompt": "p",
            "chosen": [{"role": "assistant", "content": "x"}],
            "rejected": [{"role": "assistant", "content": "y"}],
        },
    ]
    msg = load_error(write_jsonl(tmp_path / "mixed.jsonl", rows), tok)
    assert "row 2" in msg and "mixed formats" in msg


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_file(tmp_path, tok, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert "empty" in load_error(path, tok)


def test_missing_file(tmp_path, tok):
    assert "not found" in load_error(tmp_path / "missing.jsonl", tok)


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.txt", "pairs.csv.gz"])
def test_unsupported_extension(tmp_path, tok, name):
    path = tmp_path / name
    path.write_text("prompt,chosen,rejected\na,b,c\n", encoding="utf-8")
    assert "unsupported file type" in load_error(path, tok)


def test_truncated_gzip(tmp_path, tok):
    data = gzip.compress(b"".join((json.dumps(r) + "\n").encode() for r in PAIRS * 50))
    path = tmp_path / "truncated.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    assert "cannot read" in load_error(path, tok)


def test_not_gzip(tmp_path, tok):
    path = tmp_path / "plain.jsonl.gz"
    path.write_text(json.dumps(PAIRS[0]) + "\n", encoding="utf-8")
    assert "cannot read" in load_error(path, tok)


# Regressions: each of these inputs once escaped as a non-UserError exception.


def test_corrupt_gzip_stream_is_a_user_error(tmp_path, tok):
    # a damaged deflate stream makes gzip raise zlib.error, which is neither OSError nor EOFError
    data = bytearray(gzip.compress(b"".join((json.dumps(r) + "\n").encode() for r in PAIRS * 300)))
    data[10:14] = b"\xff\xff\xff\xff"
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    load_error(path, tok)


def test_corrupt_parquet_is_a_user_error(tmp_path, tok):
    # pyarrow raises ArrowInvalid ("Parquet magic bytes not found"), a ValueError
    path = tmp_path / "corrupt.parquet"
    path.write_text("this is not parquet", encoding="utf-8")
    load_error(path, tok)


@pytest.mark.parametrize("content", ["[1, 2]", '["a"]', "[null]"])
def test_first_row_not_an_object_is_a_user_error(tmp_path, tok, content):
    # detect_format(rows[0]) calls rows[0].get before the per-row type check: AttributeError
    path = tmp_path / "scalars.json"
    path.write_text(content, encoding="utf-8")
    assert "row 0" in load_error(path, tok)


def test_lone_surrogate_escape_is_a_user_error(tmp_path, tok):
    # valid JSON ("\ud800" escape) that decodes to a str the tokenizer rejects with TypeError
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    assert "row 0" in load_error(path, tok)


@pytest.mark.parametrize(
    "rows",
    [
        [{"prompt": "p", "chosen": "a", "rejected": None}],
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": None}],
        [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": None}],
    ],
    ids=["plain-first-row", "plain-second-row", "hh"],
)
def test_null_rejected_in_pair_data_is_a_user_error(tmp_path, tok, rows):
    # a null 'rejected' passes normalise for pair data: on row 0 the whole dataset silently becomes SFT-shaped,
    # on a later row the rejected response silently becomes just EOS
    msg = load_error(write_jsonl(tmp_path / "null_rejected.jsonl", rows), tok)
    assert "rejected" in msg


@pytest.mark.parametrize(
    "row, sft",
    [
        ({"prompt": "p", "chosen": None, "rejected": "b"}, False),
        ({"prompt": "p", "chosen": None}, True),
        ({"prompt": None, "chosen": "a", "rejected": "b"}, False),
        ({"prompt": "p", "chosen": None, "rejected": [{"role": "assistant", "content": "x"}]}, False),
    ],
    ids=["plain-pair", "plain-sft", "plain-null-prompt", "conversational-null-chosen"],
)
def test_null_prompt_or_chosen_is_a_user_error(tmp_path, tok, row, sft):
    # None passes the type checks of normalise ("value is not None and not isinstance(value, str)") and then
    # crashes the tokenizer (ValueError) or render / the implicit-prompt split (TypeError)
    data_cfg = cfg(format="conversational") if isinstance(row.get("rejected"), list) else cfg()
    msg = load_error(write_jsonl(tmp_path / "null.jsonl", [row]), tok, data_cfg, sft=sft)
    assert "row 0" in msg


# --------------------------------------------------------------------------------------------------- collate


def test_collate_pairs(tok):
    examples = [Example(7, [1, 10, 11], [20, 2], [30, 31, 32, 2]), Example(3, [1, 12], [21, 22, 23, 24, 2], [33, 2])]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == (4, 7)
    assert batch["attention_mask"].shape == batch["completion_mask"].shape == (4, 7)
    assert batch["idx"].tolist() == [7, 3]
    order = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    for row, (prompt, response) in enumerate(order):
        n = len(prompt) + len(response)
        assert batch["input_ids"][row, :n].tolist() == prompt + response
        assert batch["input_ids"][row, n:].eq(0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (7 - n)
        expected = [0] * len(prompt) + [1] * len(response) + [0] * (7 - n)
        assert batch["completion_mask"][row].tolist() == expected
    assert int(batch["completion_mask"].sum()) == sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    assert batch["input_ids"].dtype == torch.long


def test_collate_sft_and_real_examples(tmp_path, tok):
    sft = load_examples(
        str(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in PAIRS])),
        tok,
        cfg(),
        sft=True,
    )
    batch = collate(sft, pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == len(sft)
    pairs = load_examples(str(write_jsonl(tmp_path / "pairs.jsonl", PAIRS)), tok, cfg())
    batch = collate(pairs, pad_id=tok.pad_token_id)
    B = len(pairs)
    assert batch["input_ids"].shape[0] == 2 * B
    for i, e in enumerate(pairs):
        for row, response in ((i, e.chosen_ids), (B + i, e.rejected_ids)):
            mask = batch["completion_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == response
            assert batch["input_ids"][row][~mask & batch["attention_mask"][row].bool()].tolist() == e.prompt_ids


# ------------------------------------------------------------------------------------------------ properties

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system"]) | st.text(max_size=5),
            "content": st.text(max_size=12) | junk,
        }
    ),
    max_size=3,
)
hh_text = st.builds(lambda h, a: f"\n\nHuman: {h}{HH_ASSISTANT} {a}", st.text(max_size=10), st.text(max_size=10))
field_values = st.one_of(st.none(), st.text(max_size=20), hh_text, messages, junk)


@st.composite
def rows_strategy(draw):
    n = draw(st.integers(1, 4))
    keys = draw(st.sets(st.sampled_from(["prompt", "chosen", "rejected"]), min_size=0, max_size=3))
    rows = []
    for _ in range(n):
        row_keys = keys if draw(st.booleans()) else draw(st.sets(st.sampled_from(["prompt", "chosen", "rejected"])))
        rows.append({k: draw(field_values) for k in sorted(row_keys)})
    return rows


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=rows_strategy(),
    sft=st.booleans(),
    fmt=st.sampled_from(["auto", "plain", "conversational", "hh"]),
    truncate=st.booleans(),
)
def test_property_rows_give_examples_or_user_error(rows, sft, fmt, truncate):
    tok = _PROPERTY_TOKENIZER
    data_cfg = cfg(format=fmt, truncate=truncate, max_length=64, max_prompt_length=32)
    try:
        f, triples = normalise(rows, data_cfg, "prop", sft)
        examples = tokenize_rows(triples, f, tok, data_cfg, "prop")
    except UserError as e:
        assert str(e).startswith("prop")
        return
    assert len(examples) == len(rows)
    for e in examples:
        assert e.prompt_ids and e.chosen_ids
        if sft:
            assert e.rejected_ids is None
        if truncate:
            assert len(e.prompt_ids) <= 32 and len(e.prompt_ids) + len(e.chosen_ids) <= 64


_PROPERTY_TOKENIZER = char_tokenizer()


def test_datasets_sources_local_folder_and_missing_hub_id(tmp_path):
    import datasets

    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}, {"prompt": "max 1 2=", "chosen": "2", "rejected": "1"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(f"hf:{tmp_path / 'ds'}", cfg()) == rows
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert read_rows(f"hf:{tmp_path / 'dd'}", cfg(), split="test") == rows[:1]
    assert read_rows(f"hf:{tmp_path / 'dd'}", cfg(split="test")) == rows[:1]
    with pytest.raises(UserError, match="no split 'train' \\(splits: test; set data.split\\)"):
        read_rows(f"hf:{tmp_path / 'dd'}", cfg())
    with pytest.raises(UserError, match="a save_to_disk folder has no config"):
        read_rows(f"hf:{tmp_path / 'dd'}:main", cfg())
    with pytest.raises(UserError, match="hf:no-such-org/no-such-dataset: cannot load dataset"):
        read_rows("hf:no-such-org/no-such-dataset", cfg())


def test_hf_sources_take_a_config_a_revision_data_files_and_a_split(tmp_path):
    """hf:owner/name[:config][@revision] as datasets.load_dataset(name, config, split=data.split, revision,
    data_files=data.data_files): a local dataset folder whose README declares two configs (as a hub repo does, e.g.
    openai/gsm8k's 'main'), and the json builder over data files."""
    from align.data import parse_hf

    assert parse_hf("openai/gsm8k:main@v1.0") == ("openai/gsm8k", "main", "v1.0")
    assert parse_hf("openai/gsm8k") == ("openai/gsm8k", None, None)
    repo = tmp_path / "repo"
    for conf, split, n in (("main", "train", 3), ("main", "test", 2), ("socratic", "train", 1)):
        (repo / conf).mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": f"{conf} {split} {i}", "answer": str(i)} for i in range(n)]
        (repo / conf / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n- config_name: socratic\n  data_files:\n  - split: train\n"
        "    path: socratic/train.jsonl\n---\n"
    )
    assert [r["prompt"] for r in read_rows(f"hf:{repo}:main", cfg())] == [
        "main train 0",
        "main train 1",
        "main train 2",
    ]
    assert [r["prompt"] for r in read_rows(f"hf:{repo}:main", cfg(split="test"))] == ["main test 0", "main test 1"]
    assert [r["prompt"] for r in read_rows(f"hf:{repo}:socratic", cfg())] == ["socratic train 0"]
    with pytest.raises(UserError, match=f"hf:{repo}:nope: cannot load dataset"):
        read_rows(f"hf:{repo}:nope", cfg())
    files = [str(repo / "main" / "train.jsonl"), str(repo / "socratic" / "train.jsonl")]
    assert len(read_rows("hf:json", cfg(data_files=files))) == 4


def test_hf_split_keys_apply_to_hf_sources_only(tmp_path):
    from align.config import load_recipe
    from align.paths import REPO_ROOT

    base = ["model.name_or_path=tiny:llama"]
    with pytest.raises(UserError, match="data.split applies to an 'hf:' data.train source"):
        load_recipe(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", [*base, "data.split=train_prefs"])
    with pytest.raises(UserError, match="data.data_files applies to 'hf:' sources"):
        load_recipe(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", [*base, "data.data_files=a.jsonl"])
    r = load_recipe(
        REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", [*base, "data.train=hf:json", "data.data_files=[a.jsonl]"]
    )
    assert r.data.data_files == ["a.jsonl"]


def test_online_prompt_rows_plain_and_conversational(tmp_path):
    """TRL's prompt-only rows: a plain prompt or a list of messages (kept as prompt_messages for the chat template;
    the prompt text is the user turn, or the turns as lines); other columns ride along; a prompt that ends with an
    assistant turn is one line."""
    from align.data import load_prompt_rows

    rows = [
        {"prompt": "plain one", "answer": "1"},
        {"prompt": [{"role": "user", "content": "hi there"}], "answer": "2"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}], "answer": "3"},
    ]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = load_prompt_rows(cfg(train=str(f)))
    assert [r["prompt"] for r in out] == ["plain one", "hi there", "system: be brief\nuser: why?"]
    assert "prompt_messages" not in out[0] and out[2]["prompt_messages"] == rows[2]["prompt"]
    assert [r["answer"] for r in out] == ["1", "2", "3"]
    f.write_text(json.dumps({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    with pytest.raises(UserError, match="row 0: the conversational 'prompt' ends with an assistant turn"):
        load_prompt_rows(cfg(train=str(f)))


@pytest.mark.parametrize("turns", ["all", "last"])
def test_sft_messages_rows_train_every_assistant_turn_against_the_chat_template(tmp_path, turns):
    """TRL's conversational SFT rows ({"messages": [...]}): with data.assistant_turns all (default) the mask marks
    exactly the tokens of each assistant turn as the chat template writes it (content and end of turn), never the
    system/user turns or the assistant headers; with last, only the final turn."""
    tok = _PROPERTY_TOKENIZER
    convo = [
        {"role": "system", "content": "terse"},
        {"role": "user", "content": "2+3="},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "times 4?"},
        {"role": "assistant", "content": "20"},
    ]
    f = write_jsonl(tmp_path / "m.jsonl", [{"messages": convo}])
    (ex,) = load_examples(str(f), tok, cfg(assistant_turns=turns), sft=True)
    ids = ex.prompt_ids + ex.chosen_ids
    assert ids == tok(tok.apply_chat_template(convo, tokenize=False), add_special_tokens=False)["input_ids"]
    mask = [0] * len(ex.prompt_ids) + (ex.chosen_mask or [1] * len(ex.chosen_ids))
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    eos = tok.eos_token
    assert trained == (f"5{eos}20{eos}" if turns == "all" else f"20{eos}")
    batch = collate([ex], tok.pad_token_id)
    assert batch["completion_mask"][0].tolist()[: len(mask)] == mask
    from align.data import collate_packed

    packed = collate_packed([ex, ex], tok.pad_token_id, row_len=2 * len(ids))
    assert packed["completion_mask"].sum().item() == 2 * sum(mask)


def test_assistant_turns_is_an_sft_key():
    from align.config import load_recipe
    from align.paths import REPO_ROOT

    with pytest.raises(UserError, match="data.assistant_turns applies to trainer 'sft', not 'preference'"):
        load_recipe(REPO_ROOT / "recipes" / "dpo" / "tiny.yaml", ["data.assistant_turns=last"])
    assert load_recipe(REPO_ROOT / "recipes" / "sft" / "tiny.yaml", ["data.assistant_turns=last"])


def test_prompt_completion_sft_rows_and_unpaired_rows(tmp_path):
    """TRL's prompt-completion SFT rows (plain or conversational) load as SFT; unpaired KTO-style rows (prompt,
    completion, label) are refused with one line naming the row, for SFT and preference trainers alike."""
    tok = _PROPERTY_TOKENIZER
    plain = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    (ex,) = load_examples(str(plain), tok, cfg(), sft=True)
    assert tok.decode(ex.chosen_ids, skip_special_tokens=True) == "2"
    conv = write_jsonl(
        tmp_path / "cc.jsonl",
        [{"prompt": [{"role": "user", "content": "1+1="}], "completion": [{"role": "assistant", "content": "2"}]}],
    )
    (ex,) = load_examples(str(conv), tok, cfg(), sft=True)
    assert ex.prompt_ids + ex.chosen_ids == tokens(
        tok,
        tok.apply_chat_template(
            [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}], tokenize=False
        ),
    )
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "1+1=", "completion": "3", "label": False}])
    for sft in (True, False):
        with pytest.raises(UserError, match="kto.jsonl: row 0: unpaired rows .* not read by any objective"):
            load_examples(str(kto), tok, cfg(), sft=sft)


def test_mixture_keeps_each_sources_share_seeded_and_validates_its_entries(tmp_path):
    """data.train: mixture with data.mixture (TRL's dataset_mixture): weight x rows of each source, chosen and shuffled
    with the seed (same seed, same rows in the same order), any source kind (file, hf:, builtin:)."""
    import datasets

    from align.config import load_recipe
    from align.paths import REPO_ROOT

    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "x", "rejected": "y"} for i in range(10)])
    datasets.DatasetDict(
        {"dev": datasets.Dataset.from_list([{"prompt": f"b{i}", "chosen": "x", "rejected": "y"} for i in range(4)])}
    ).save_to_disk(str(tmp_path / "b"))
    mix = [{"source": str(a), "weight": 0.5}, {"source": f"hf:{tmp_path / 'b'}", "split": "dev"}]
    rows = read_rows("mixture", cfg(train="mixture", mixture=mix), seed=3)
    names = [r["prompt"] for r in rows]
    assert sum(n.startswith("a") for n in names) == 5 and sorted(n for n in names if n.startswith("b")) == [
        "b0",
        "b1",
        "b2",
        "b3",
    ]
    assert [r["prompt"] for r in read_rows("mixture", cfg(train="mixture", mixture=mix), seed=3)] == names
    assert [r["prompt"] for r in read_rows("mixture", cfg(train="mixture", mixture=mix), seed=4)] != names
    assert len(load_examples("mixture", _PROPERTY_TOKENIZER, cfg(train="mixture", mixture=mix), seed=3)) == 9

    dpo = REPO_ROOT / "recipes" / "dpo" / "tiny.yaml"
    ok = load_recipe(dpo, ["data.train=mixture", f"data.mixture=[{{source: {a}, weight: 0.5}}]"])
    assert ok.data.mixture == [{"source": str(a), "weight": 0.5}]
    for over, msg in (
        (["data.train=mixture"], "data.mixture and data.train: mixture go together"),
        ([f"data.mixture=[{{source: {a}}}]"], "go together"),
        (["data.train=mixture", f"data.mixture=[{{source: {a}, weight: 2}}]"], r"data.mixture\[0\].weight must be"),
        (["data.train=mixture", f"data.mixture=[{{source: {a}, weigth: 1}}]"], "unknown key 'weigth'"),
        (["data.train=mixture", f"data.mixture=[{{source: {a}, split: dev}}]"], "split applies to an 'hf:' source"),
        (["data.train=mixture", "data.mixture=[7]"], "must be a mapping with a 'source'"),
    ):
        with pytest.raises(UserError, match=msg):
            load_recipe(dpo, over)


def test_tokenised_rows_are_cached_by_content_tokenizer_and_settings(tmp_path, monkeypatch):
    """data.cache: the second load of the same rows with an equal tokenizer and settings reads datasets' cache file
    (no tokenising); other rows, another max_length or another tokenizer tokenise again; results equal the uncached
    path; a bad row is still one line naming its row number in the source."""
    import datasets

    import align.data as D

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    calls = []
    real = D.tokenize_rows
    monkeypatch.setattr(D, "tokenize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": "0"} for i in range(2500)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    c = cfg(cache=True)
    first = load_examples(str(f), char_tokenizer(), c)
    n = len(calls)
    assert n == 3  # batches of 1,000 rows
    again = load_examples(str(f), char_tokenizer(), c)  # an equal tokenizer object, the same rows and settings
    assert len(calls) == n and again == first
    fmt, triples = D.normalise(rows, c, str(f), False)
    assert first == real(triples, fmt, char_tokenizer(), c, str(f))  # the uncached path
    load_examples(str(f), char_tokenizer(), cfg(cache=True, max_length=40))
    assert len(calls) == 2 * n
    write_jsonl(f, rows[:-1] + [{"prompt": "x", "chosen": "y" * 600, "rejected": "z"}])
    with pytest.raises(UserError, match=r"d.jsonl: row 2499: prompt \+ chosen has"):
        load_examples(str(f), char_tokenizer(), c)
    assert sorted(p.suffix for p in (tmp_path / "cache" / "align_tokenized").iterdir()) == [".arrow", ".arrow"]
