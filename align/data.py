"""Preference and SFT data: read rows, normalise their format, tokenise, validate, and batch.

Sources: a .jsonl/.json/.parquet file (optionally gzipped), ``hf:owner/name[:config][@revision]`` (a datasets hub
id, a local dataset folder or ``save_to_disk`` folder, or a builder such as ``hf:json`` with ``data.data_files``; the
split is ``data.split`` / ``data.eval_split``), or ``builtin:tasks``. Row formats:
    plain           {"prompt": str, "chosen": str, "rejected": str}
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}  (prompt may be absent:
                    then the shared leading messages of chosen/rejected are the prompt)
    hh              {"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}  (HH-RLHF dialogues; the
                    prompt is everything up to the last "\\n\\nAssistant:")
Conversational rows, and plain rows when ``data.chat_template`` is set, go through the tokenizer's chat
template; the response is the rendered text after the rendered prompt, so prompt and response tokens never
depend on how the other is formatted. Every problem raises UserError naming the source and row.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.errors import UserError
from align.hh import HH_ASSISTANT, split_hh, split_hh_pair  # noqa: F401 (split_hh: part of this module's API)


@dataclass
class Example:
    idx: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    chosen_mask: list[int] | None = None
    """Which chosen tokens are trained (None: all): multi-turn SFT trains the assistant turns only."""


def _chosen_mask(e: Example) -> list[int]:
    return e.chosen_mask if e.chosen_mask is not None else [1] * len(e.chosen_ids)


# -------------------------------------------------------------------------------------------------------- reading


def read_rows(source: str, data_cfg, seed: int = 0, sft: bool = False, split: str | None = None) -> list[dict]:
    """Raw rows (dicts) from any supported source; ``split`` (default ``data_cfg.split``) is that of an hf: source."""
    if source.startswith("memory:"):  # rows handed to align.train() (the Python API)
        from align.memory import lookup

        return [dict(r) if isinstance(r, dict) else r for r in lookup(source, "data")]
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        from align import userdata

        if name.partition(":")[0] not in userdata.BUILTINS:
            raise UserError(
                f"data: unknown built-in dataset {source!r} (known: "
                f"{', '.join('builtin:' + b for b in userdata.BUILTINS)})"
            )
        if not name.startswith("tasks"):
            return userdata.builtin_rows(name, data_cfg, seed)
        from align import tasks

        split = name.partition(":")[2] or "train"
        if split not in ("train", "test"):
            raise UserError(f"data: {source!r}: the built-in tasks have splits train and test")
        try:
            ts = tasks.make_tasks(data_cfg.builtin_size, seed=seed, split=split, families=data_cfg.builtin_families)
        except ValueError as e:
            raise UserError(f"data.builtin_families: {e}") from None
        return tasks.sft_rows(ts, data_cfg.builtin_sloppy, seed) if sft else tasks.preference_rows(ts, seed=seed)
    if source == "mixture":
        return _read_mixture(data_cfg, seed, sft)
    if source.startswith("hf:"):
        return _read_hf(source[3:], split or getattr(data_cfg, "split", "train"), getattr(data_cfg, "data_files", None))
    path = Path(source)
    if not path.is_file():
        raise UserError(f"{source}: data file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        if name.endswith(".jsonl"):
            rows = []
            with opener(path, "rb") as f:
                for i, raw in enumerate(f):
                    line = _decode(raw, source, i)
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{source}: row {i}: invalid JSON ({e.msg})") from None
            return rows
        if name.endswith(".json"):
            with opener(path, "rb") as f:
                data = json.loads(_decode(f.read(), source, None))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise UserError(f"{source}: expected a JSON list of rows")
            return data
        if name.endswith(".parquet"):
            import pyarrow
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist()
            except pyarrow.ArrowException as e:
                raise UserError(f"{source}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{source}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except ImportError:
        raise UserError(f"{source}: reading parquet needs pyarrow (pip install pyarrow)") from None
    raise UserError(f"{source}: unsupported file type (use .jsonl, .json or .parquet, optionally .gz)")


def _decode(raw: bytes, source: str, row: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        where = f"row {row}: " if row is not None else ""
        raise UserError(f"{source}: {where}not valid UTF-8") from None


def _read_mixture(data_cfg, seed: int, sft: bool) -> list[dict]:
    """data.mixture: each source's rows shuffled (seeded by train.seed and the source's place), the first weight x
    rows of each kept (at least one), all shuffled together with the seed."""
    import random

    out = []
    for i, m in enumerate(data_cfg.mixture):
        rows = read_rows(m["source"], data_cfg, seed=seed, sft=sft, split=m.get("split"))
        order = list(range(len(rows)))
        random.Random(seed * 1000 + i).shuffle(order)
        keep = max(1, round(float(m.get("weight", 1.0)) * len(rows))) if rows else 0
        out += [rows[j] for j in order[:keep]]
    random.Random(seed).shuffle(out)
    return out


def parse_hf(spec: str) -> tuple[str, str | None, str | None]:
    """``owner/name[:config][@revision]`` -> (name, config, revision)."""
    rest, _, revision = spec.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, revision or None


def _read_hf(spec: str, split: str = "train", data_files=None) -> list[dict]:
    import datasets

    name, config, revision = parse_hf(spec)
    where = f"hf:{spec}" + (f" (split {split!r})" if split != "train" else "")
    local = Path(name)
    saved = local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists())
    if saved and (config or revision or data_files):
        raise UserError(f"hf:{spec}: a save_to_disk folder has no config, revision or data_files (set data.split)")
    try:
        if saved:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"{where}: no split {split!r} (splits: {', '.join(ds)}; set data.split)")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split, revision=revision, data_files=data_files)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for a missing/unreachable dataset
        raise UserError(f"{where}: cannot load dataset ({str(e).splitlines()[0][:200]})") from None
    return ds.to_list()


# ------------------------------------------------------------------------------------------------------ normalising


def detect_format(row: dict, cfg) -> str:
    if cfg.format != "auto":
        return cfg.format
    chosen = row.get(cfg.chosen_key, row.get("messages", row.get("completion")))
    if isinstance(chosen, list):
        return "conversational"
    if cfg.prompt_key not in row and isinstance(chosen, str) and HH_ASSISTANT in chosen:
        return "hh"
    return "plain"


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def normalise(rows: list[dict], cfg, source: str, sft: bool, kept: list[int] | None = None) -> tuple[str, list[tuple]]:
    """Rows -> (format, [(prompt, chosen, rejected)]) with strings (plain/hh) or message lists (conversational).
    With ``data.drop_invalid`` rows that fail validation are dropped (and counted on stderr) instead of fatal;
    ``kept``, if given, receives the indices of the rows returned."""
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    if not isinstance(rows[0], dict):
        raise UserError(f"{source}: row 0: expected an object, got {type(rows[0]).__name__}")
    fmt = detect_format(rows[0], cfg)
    out, dropped = [], 0
    for i, row in enumerate(rows):
        try:
            out.append(_normalise_row(row, i, fmt, cfg, source, sft))
            if kept is not None:
                kept.append(i)
        except UserError:
            if not cfg.drop_invalid:
                raise
            dropped += 1
    if dropped:
        print(f"[data] {source}: dropped {dropped} invalid rows of {len(rows)} (data.drop_invalid)", file=sys.stderr)
    if not out:
        raise UserError(f"{source}: no valid rows")
    return fmt, out


def _normalise_row(row: Any, i: int, fmt: str, cfg, source: str, sft: bool) -> tuple:
    if not isinstance(row, dict):
        raise UserError(f"{source}: row {i}: expected an object, got {type(row).__name__}")
    if cfg.chosen_key not in row and "completion" in row and "label" in row:
        raise UserError(
            f"{source}: row {i}: unpaired rows (prompt, completion, label: TRL's KTO format) are not read by any "
            "objective here yet; give pairs (prompt, chosen, rejected)"
        )
    for column in ("messages", "completion") if sft else ():  # TRL's conversational / prompt-completion SFT rows
        if cfg.chosen_key not in row and column in row:
            row = {**{k: v for k, v in row.items() if k != column}, cfg.chosen_key: row[column]}
    keys = [cfg.chosen_key] + ([] if sft else [cfg.rejected_key]) + ([cfg.prompt_key] if fmt == "plain" else [])
    for k in keys:
        if k not in row:
            raise UserError(f"{source}: row {i}: missing column {k!r}")
        if row[k] is None:
            raise UserError(f"{source}: row {i}: column {k!r} is null")
    row_fmt = detect_format(row, cfg)
    if row_fmt != fmt:
        raise UserError(f"{source}: row {i}: format {row_fmt!r} differs from the first row's {fmt!r} (mixed formats)")
    chosen, rejected = row[cfg.chosen_key], None if sft else row[cfg.rejected_key]
    if fmt == "conversational" and sft and cfg.prompt_key not in row:  # a whole conversation (TRL's messages)
        if not _is_messages(chosen) or not any(m["role"] == "assistant" for m in chosen):
            raise UserError(f"{source}: row {i}: {cfg.chosen_key!r} is not a conversation with an assistant turn")
        first = next(k for k, m in enumerate(chosen) if m["role"] == "assistant")
        if cfg.assistant_turns == "all" and first > 0:
            return chosen[:first], chosen[first:], None
    if fmt == "hh":
        if not isinstance(chosen, str) or not isinstance(rejected, (str, type(None))):
            raise UserError(f"{source}: row {i}: HH-RLHF dialogues must be strings")
        try:
            prompt, chosen, rejected = split_hh_pair(chosen, rejected)
        except ValueError as e:
            if "different prompts" in str(e):
                raise UserError(f"{source}: row {i}: {e}") from None
            raise UserError(f"{source}: row {i}: not an HH-RLHF dialogue (no '\\n\\nAssistant:' turn)") from None
    elif fmt == "conversational":
        prompt = row.get(cfg.prompt_key)
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if value is not None and not _is_messages(value):
                raise UserError(f"{source}: row {i}: {name!r} is not a list of {{role, content}} messages")
        if prompt is None:  # implicit prompt: the shared leading messages
            prompt, chosen = chosen[:-1], chosen[-1:]
            if rejected is not None:
                if rejected[:-1] != prompt:
                    raise UserError(f"{source}: row {i}: chosen and rejected do not share their leading messages")
                rejected = rejected[-1:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not _is_messages(prompt) or not prompt:
            raise UserError(f"{source}: row {i}: 'prompt' is not a list of {{role, content}} messages")
    else:
        prompt = row[cfg.prompt_key]
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{source}: row {i}: column {name!r} must be a string, got {type(value).__name__}")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is not None and _is_empty(value):
            raise UserError(f"{source}: row {i}: empty {name!r} response")
    try:
        json.dumps([prompt, chosen, rejected], ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{source}: row {i}: text is not valid Unicode (lone surrogate)") from None
    return prompt, chosen, rejected


def _is_empty(x: Any) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(not str(m.get("content", "")).strip() for m in x)


# ----------------------------------------------------------------------------------------------------- tokenising


def render(tokenizer, prompt, response, use_template: bool) -> tuple[str, str]:
    """(prompt text, response text) such that prompt + response is the full rendered conversation."""
    if not use_template:
        return prompt, response
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(p):
        raise ValueError("the chat template renders the prompt differently when a response follows")
    return p, full[len(p) :]


def turn_pieces(tokenizer, prompt: list, response: list) -> list[tuple[str, bool]]:
    """The rendered response of a multi-turn conversation cut into (text, trained) pieces: each assistant turn, from
    the end of its generation prompt to the end of the turn as the template writes it, is trained; user, tool and
    system turns and the headers before assistant turns are not. Raises ValueError if the template renders a
    conversation's beginning differently once later turns follow (no exact cut exists then)."""
    convo = prompt + response

    def text(n: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(convo[:n], add_generation_prompt=gen, tokenize=False)

    full, at = text(len(convo), False), len(text(len(prompt), True))
    pieces = []
    for k in range(len(prompt), len(convo)):
        if convo[k]["role"] != "assistant":
            continue
        head, turn = text(k, True), text(k + 1, False)
        if not (full.startswith(head) and full.startswith(turn) and len(head) >= at):
            raise ValueError(
                "the chat template renders earlier turns differently when later ones follow (set "
                "data.assistant_turns=last to train the last turn only)"
            )
        if len(head) > at:
            pieces.append((full[at : len(head)], False))
        pieces.append((full[len(head) : len(turn)], True))
        at = len(turn)
    if at < len(full):
        pieces.append((full[at:], False))
    return [(t, trained) for t, trained in pieces if t]


def tokenize_rows(triples: list[tuple], fmt: str, tokenizer, cfg, source: str) -> list[Example]:
    """Tokenise (prompt, chosen, rejected) triples; check and (optionally) truncate lengths."""
    use_template = fmt == "conversational" or cfg.chat_template
    prompts, chosens, rejecteds, turns = [], [], [], {}
    for i, (p, c, r) in enumerate(triples):
        try:
            pt, ct = render(tokenizer, p, c, use_template)
            rt = render(tokenizer, p, r, use_template)[1] if r is not None else None
            if use_template and r is None and isinstance(c, list) and not (len(c) == 1 and c[0]["role"] == "assistant"):
                turns[i] = turn_pieces(tokenizer, p, c)
        except ValueError as e:
            raise UserError(f"{source}: row {i}: {e}") from None
        prompts.append(pt)
        chosens.append(ct)
        rejecteds.append(rt)
    eos = [tokenizer.eos_token_id] if not use_template and tokenizer.eos_token_id is not None else []
    add_special = not use_template  # a chat template writes its own special tokens
    p_ids = tokenizer(prompts, add_special_tokens=add_special)["input_ids"]
    c_ids = tokenizer(chosens, add_special_tokens=False)["input_ids"]
    r_ids = (
        tokenizer([r or "" for r in rejecteds], add_special_tokens=False)["input_ids"]
        if triples[0][2] is not None
        else None
    )
    examples = []
    for i in range(len(triples)):
        prompt, chosen = p_ids[i], c_ids[i] + eos
        rejected = r_ids[i] + eos if r_ids is not None else None
        mask = None
        if i in turns:  # multi-turn: each piece tokenised on its own, the assistant turns' tokens trained
            ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in turns[i]]
            chosen = [t for piece in ids for t in piece]
            mask = [int(trained) for piece, (_, trained) in zip(ids, turns[i]) for _ in piece]
        if not prompt:
            raise UserError(f"{source}: row {i}: empty prompt")
        if len(prompt) > cfg.max_prompt_length:
            if not cfg.truncate:
                raise UserError(
                    f"{source}: row {i}: prompt has {len(prompt)} tokens > data.max_prompt_length "
                    f"{cfg.max_prompt_length} (set data.truncate=true to cut it)"
                )
            prompt = prompt[-cfg.max_prompt_length :]
        budget = cfg.max_length - len(prompt)
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            if resp is not None and len(resp) > budget and not cfg.truncate:
                raise UserError(
                    f"{source}: row {i}: prompt + {name} has {len(prompt) + len(resp)} tokens > data.max_length "
                    f"{cfg.max_length} (set data.truncate=true to cut it)"
                )
        examples.append(
            Example(
                i,
                prompt,
                chosen[:budget],
                rejected[:budget] if rejected is not None else None,
                mask[:budget] if mask is not None else None,
            )
        )
    return examples


def load_examples(
    source: str, tokenizer, data_cfg, seed: int = 0, sft: bool = False, split: str | None = None
) -> list[Example]:
    """Everything above in one call: rows -> validated, tokenised examples."""
    rows = read_rows(source, data_cfg, seed=seed, sft=sft, split=split)
    if data_cfg.limit is not None:
        rows = rows[: data_cfg.limit]
    fmt, triples = normalise(rows, data_cfg, source, sft)
    if not getattr(data_cfg, "cache", False):
        return tokenize_rows(triples, fmt, tokenizer, data_cfg, source)
    return cached_tokenize(triples, fmt, tokenizer, data_cfg, source)


TOKENIZE_SETTINGS = ("max_length", "max_prompt_length", "truncate", "chat_template", "assistant_turns")
"""The data settings tokenised rows depend on (with the rows themselves and the tokenizer): the cache key."""


def cached_tokenize(triples: list[tuple], fmt: str, tokenizer, cfg, source: str) -> list[Example]:
    """``tokenize_rows`` through ``datasets.map`` with a cache file named by a fingerprint of the rows' content, the
    tokenizer and ``TOKENIZE_SETTINGS``: the first call tokenises (and checks) the rows, later calls with the same
    inputs read the Arrow file back. Problems are the same UserErrors, naming the source and row."""
    import hashlib

    import datasets
    from datasets.fingerprint import Hasher

    text = [json.dumps(t, ensure_ascii=False, sort_keys=True) for t in triples]
    h = hashlib.sha256()
    for line in text:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    settings = {k: getattr(cfg, k, None) for k in TOKENIZE_SETTINGS}
    h.update(json.dumps([fmt, settings, Hasher.hash(tokenizer)], sort_keys=True, default=str).encode())
    key = h.hexdigest()[:32]
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "align_tokenized"
    folder.mkdir(parents=True, exist_ok=True)

    def tokenize(batch, indices):
        try:
            exs = tokenize_rows([tuple(json.loads(x)) for x in batch["row"]], fmt, tokenizer, cfg, source)
        except UserError as e:  # row numbers of the batch -> of the source
            raise _RowError(str(e), indices[0]) from None
        return {
            "prompt_ids": [e.prompt_ids for e in exs],
            "chosen_ids": [e.chosen_ids for e in exs],
            "rejected_ids": [e.rejected_ids for e in exs],
            "chosen_mask": [e.chosen_mask for e in exs],
        }

    ds = datasets.Dataset.from_dict({"row": text})
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        out = ds.map(
            tokenize,
            batched=True,
            batch_size=1000,
            with_indices=True,
            remove_columns=["row"],
            cache_file_name=str(folder / f"{key}.arrow"),
            new_fingerprint=key,
            load_from_cache_file=True,
        )
    except _RowError as e:
        raise UserError(_shift_row(e.args[0], e.offset)) from None
    finally:
        if was:
            datasets.enable_progress_bars()
    cols = out.to_dict()
    return [
        Example(i, p, c, r, m)
        for i, (p, c, r, m) in enumerate(
            zip(cols["prompt_ids"], cols["chosen_ids"], cols["rejected_ids"], cols["chosen_mask"])
        )
    ]


class _RowError(Exception):
    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


def _shift_row(message: str, offset: int) -> str:
    """A UserError line about row i of a batch, about row offset + i of the source."""
    import re

    return re.sub(r"row (\d+):", lambda m: f"row {int(m.group(1)) + offset}:", message, count=1)


# ------------------------------------------------------------------------------------------------------- batching


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences: the B chosen responses, then the B rejected ones (or B sequences for
    SFT). ``completion_mask`` marks response tokens; ``idx`` the examples' row numbers."""
    seqs = [e.prompt_ids + e.chosen_ids for e in examples]
    masks = [[0] * len(e.prompt_ids) + _chosen_mask(e) for e in examples]
    if examples[0].rejected_ids is not None:
        seqs += [e.prompt_ids + e.rejected_ids for e in examples]
        masks += [[0] * len(e.prompt_ids) + [1] * len(e.rejected_ids) for e in examples]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        completion[i, : len(m)] = torch.tensor(m)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "idx": torch.tensor([e.idx for e in examples]),
    }


def pack(seqs: list[list[int]], masks: list[list[int]], pad_id: int, row_len: int | None = None) -> dict:
    """Padding-free rows: the sequences placed into rows of at most ``row_len`` tokens (default: the longest
    sequence), longest first, each into the first row with room (first-fit decreasing). Per token: ``position_ids``
    restarting at 0 for every sequence, ``seq_id`` (which sequence, in the order given), ``completion_mask``. The row
    ends are filled with pad tokens that form sequences of their own (position ids restart, completion mask 0), so
    they attend to nothing real. No ``attention_mask``: transformers derives the block-diagonal causal mask from the
    position ids (SDPA, eager) or uses the varlen kernel (flash-attention)."""
    row_len = row_len or max(len(x) for x in seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if len(seqs[i]) <= free:
                rows[r].append(i)
                room[r] -= len(seqs[i])
                break
        else:
            rows.append([i])
            room.append(row_len - len(seqs[i]))
    width = max(row_len - free for free in room)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position = torch.zeros(shape, dtype=torch.long)
    seq_id = torch.full(shape, len(seqs), dtype=torch.long)  # pad tokens: a sequence id past the real ones
    completion = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in sorted(members):  # a row's sequences in their original order
            n = len(seqs[i])
            input_ids[r, at : at + n] = torch.tensor(seqs[i])
            position[r, at : at + n] = torch.arange(n)
            seq_id[r, at : at + n] = i
            completion[r, at : at + n] = torch.tensor(masks[i])
            at += n
        position[r, at:] = torch.arange(width - at)
    return {
        "input_ids": input_ids,
        "position_ids": position,
        "seq_id": seq_id,
        "completion_mask": completion,
        "n_seq": torch.tensor(len(seqs)),
    }


PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"}
"""Model types whose attention derives the block-diagonal mask of packed rows from the position ids."""


def unwrap_model(model):
    """The HF model under DDP / DeepSpeed / peft wrappers (for its config and LM head)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def packs(model, enabled: bool) -> bool:
    """True when packed rows are asked for (``enabled``) and exact for ``model`` (its attention follows the position
    ids: ``PACKABLE``)."""
    return bool(enabled) and getattr(getattr(unwrap_model(model), "config", None), "model_type", None) in PACKABLE


def collator(model, data_cfg, pad_id: int):
    """``collate_packed`` when ``data.packing`` is on and the model's attention supports packed rows, else ``collate``
    (both as ``fn(examples) -> batch``)."""
    if packs(model, getattr(data_cfg, "packing", False)):
        return lambda exs: collate_packed(exs, pad_id)
    return lambda exs: collate(exs, pad_id)


def real_tokens(batch: dict) -> int:
    """Non-padding tokens of a padded or packed batch."""
    if "seq_id" in batch:
        return int((batch["seq_id"] < batch["n_seq"]).sum())
    return int(batch["attention_mask"].sum())


def collate_packed(examples: list[Example], pad_id: int, row_len: int | None = None) -> dict[str, torch.Tensor]:
    """``collate`` without padding: the same 2B (or B) sequences in the same order, packed into rows (``pack``);
    ``sequence_logps`` gives back one sum per sequence, so the losses see the same tensors as with ``collate``."""
    seqs = [e.prompt_ids + e.chosen_ids for e in examples]
    masks = [[0] * len(e.prompt_ids) + _chosen_mask(e) for e in examples]
    if examples[0].rejected_ids is not None:
        seqs += [e.prompt_ids + e.rejected_ids for e in examples]
        masks += [[0] * len(e.prompt_ids) + [1] * len(e.rejected_ids) for e in examples]
    packed = pack(seqs, masks, pad_id, row_len)
    if packed["input_ids"].shape[0] == len(seqs):  # one sequence per row: nothing saved, and padded rows keep
        return collate(examples, pad_id)  # the plain causal mask (memory-efficient attention kernels)
    return {**packed, "idx": torch.tensor([e.idx for e in examples])}


def load_prompts(d, seed: int = 0) -> list[str]:
    """The prompts of ``d.train`` (a DataConfig) for the online trainer (see ``load_prompt_rows``)."""
    return [r["prompt"] for r in load_prompt_rows(d, seed)]


def load_prompt_rows(d, seed: int = 0) -> list[dict]:
    """The prompt rows of ``d.train`` for the online trainer: {"prompt": text, **every other column} (reward functions
    receive the columns). The built-in tasks' rows carry ``answer`` and ``family``; stories have the prompt only;
    files and datasets give their ``d.prompt_key`` column as the prompt, plain (a string) or conversational (TRL's
    prompt-only rows: a list of messages ending with a user turn). A conversational prompt is kept as
    ``prompt_messages`` (what the engine renders through the chat template); its ``prompt`` text, for judges and
    rollout files, is the one user message, or the turns as 'role: content' lines."""
    if d.train in ("builtin:stories", "builtin:stories:train"):
        from align.stories import story_prompts

        return [{"prompt": p} for p in story_prompts(10**9, seed=seed, split="train")]
    if d.train.startswith("builtin:"):
        from align import tasks as T

        tasks = T.make_tasks(d.builtin_size, seed=seed, split="train", families=d.builtin_families)
        return [{"prompt": t.prompt, "answer": t.answer, "family": t.family} for t in tasks]
    rows = read_rows(d.train, d, seed=seed)
    out = []
    for i, row in enumerate(rows[: d.limit] if d.limit else rows):
        p = row.get(d.prompt_key) if isinstance(row, dict) else None
        extra = {}
        if _is_messages(p) and p and all(isinstance(m["content"], str) for m in p):
            if p[-1]["role"] == "assistant":
                raise UserError(
                    f"{d.train}: row {i}: the conversational {d.prompt_key!r} ends with an assistant turn (a prompt "
                    "ends with the turn the model answers)"
                )
            extra = {"prompt_messages": p}
            p = p[0]["content"] if len(p) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in p)
        if not isinstance(p, str) or not p.strip():
            raise UserError(
                f"{d.train}: row {i}: missing or empty {d.prompt_key!r} (the online trainer needs prompts: a string "
                "or a list of messages)"
            )
        out.append({**{k: v for k, v in row.items() if k != d.prompt_key}, **extra, "prompt": p})
    return out
