"""Fixtures of the harness tests: the public leaderboard CSV, a tiny policy saved to a folder, local judges over HTTP
on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from align.paths import shared_data_dir

_DATA = shared_data_dir()
ALPACA = _DATA / "alpaca_eval" if _DATA is not None and (_DATA / "alpaca_eval").is_dir() else None
NO_DATA = "shared data folder ../shared/data/alpaca_eval not found (set ALIGN_SHARED_DATA)"


@pytest.fixture(scope="session")
def public_leaderboard() -> dict[str, dict]:
    """The shared public AlpacaEval 2 leaderboard CSV, {model: row}."""
    if ALPACA is None:
        pytest.skip(NO_DATA)
    with open(ALPACA / "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv", newline="", encoding="utf-8") as f:
        return {row[""]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama + the character tokenizer (with a chat template), saved like a training run's output."""
    from align.models import build_tiny_model

    path = tmp_path_factory.mktemp("policy") / "tiny-policy"
    model = build_tiny_model(
        "llama", hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=0, tokenizer=tiny_tokenizer
    )
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def mm_judge_model(tok):
    """A tiny Llama that, whatever the prompt, puts almost all its next-token mass on the identifiers 'm' and 'M'
    (so the weighted judge's top log-probs always hold both), with a content-dependent split between them.

    Hidden dimension 0 of the residual stream is a constant 1 (every embedding has it, no layer writes it), and the
    output row of every token reads it with weight -1 except 'm' (+0.5) and 'M' (+0.45); the other weights stay
    random, so the m/M split moves a little with the text."""
    import torch

    from align.models import build_tiny_model

    m = build_tiny_model("llama", hidden_size=64, layers=2, heads=2, intermediate_size=128, seed=1, tokenizer=tok)
    with torch.no_grad():
        m.model.embed_tokens.weight[:, 0] = 1.0
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        m.lm_head.weight[:, 0] = -1.0
        m.lm_head.weight[tok.convert_tokens_to_ids("m"), 0] = 0.5
        m.lm_head.weight[tok.convert_tokens_to_ids("M"), 0] = 0.45
    return m.eval()


@pytest.fixture(scope="module")
def align_serve_judge(tmp_path_factory, tiny_tokenizer):
    """The m/M judge model saved to a folder and served by a real ``align serve`` process on 127.0.0.1 (the way a
    user runs a local judge); yields the base URL of its OpenAI API."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("judge") / "mm-judge"
    mm_judge_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "align", "serve", "--model", str(folder), "--port", str(port), "--name", "mm-judge"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    assert json.loads(r.read())["data"][0]["id"] == "mm-judge"
                break
            except OSError:
                assert proc.poll() is None, "align serve exited"
                assert time.time() < deadline, "align serve did not come up"
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def mm_judge_url(tiny_tokenizer):
    """``align serve``'s server (``align.serve.start``, in a thread of the test process) over the m/M judge model:
    base URL of its OpenAI API."""
    from align.rollout.hf import HFEngine
    from align.serve import start

    httpd = start(HFEngine(mm_judge_model(tiny_tokenizer), tiny_tokenizer), tiny_tokenizer, "mm-judge")
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


class FakeChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions endpoint whose reply text is ``FakeChat.reply(body)``; every request
    body is kept in ``FakeChat.requests``."""

    reply = staticmethod(lambda body: "Rating: [[5]]")
    requests: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeChat.requests.append(body)
        text = FakeChat.reply(body)
        data = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_chat():
    """(base URL, handler class): set ``FakeChat.reply`` in the test; requests are recorded."""
    FakeChat.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", FakeChat
    httpd.shutdown()


def write_judge(file: Path, **keys) -> Path:
    import yaml

    file.write_text(yaml.safe_dump(keys))
    return file
