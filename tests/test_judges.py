"""Judges: the LLM judge against a real local OpenAI-compatible server (`align serve`), retries and faults."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.judges import LLMJudge, RewardModelJudge
from align.rollout.hf import HFEngine
from align.serve import start


def test_llm_judge_against_align_serve(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-value")
    httpd = start(HFEngine(tiny_model, tiny_tokenizer), tiny_tokenizer, "tiny")
    try:
        judge = LLMJudge(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "tiny", api_key_env="JUDGE_KEY")
        assert "sk-secret" not in repr(judge)
        p = judge.compare(["12+34=", "max 1 2="], ["46", "2"], ["45", "1"])
        q = judge.compare(["12+34=", "max 1 2="], ["45", "1"], ["46", "2"])
        assert all(0.0 <= x <= 1.0 for x in p)
        assert p == pytest.approx([1 - x for x in q], abs=1e-9)  # both orders judged: position bias cancels
    finally:
        httpd.shutdown()


class Flaky(BaseHTTPRequestHandler):
    plan: list = []
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        Flaky.seen.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers["Content-Length"]))
        kind = Flaky.plan.pop(0) if Flaky.plan else "ok"
        if kind in (500, 429):
            self.send_response(kind)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = (
            {"choices": [{"logprobs": {"top_logprobs": [{"1": -0.1, "2": -2.4}]}}]} if kind == "ok" else {"choices": []}
        )
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Flaky.seen.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_llm_judge_retries_then_succeeds_and_sends_the_key(flaky, monkeypatch):
    monkeypatch.setenv("K", "abc")
    Flaky.plan = [500, 429, "ok", "ok"]
    p = LLMJudge(flaky, "m", api_key_env="K", retries=3, backoff=0.01).compare(["x"], ["a"], ["b"])[0]
    import math

    p1 = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.4))
    assert p == pytest.approx((p1 + (1 - p1)) / 2)  # this server always prefers position 1: bias cancels to 1/2
    assert Flaky.seen[0] == "Bearer abc" and len(Flaky.seen) == 4


def test_llm_judge_gives_up_with_a_clear_error(flaky):
    Flaky.plan = [500] * 10
    with pytest.raises(RuntimeError, match="no valid answer after 3 attempts"):
        LLMJudge(flaky, "m", retries=2, backoff=0.01).compare(["x"], ["a"], ["b"])
    Flaky.plan = ["malformed"]
    with pytest.raises(RuntimeError, match="malformed reply"):
        LLMJudge(flaky, "m", retries=0).compare(["x"], ["a"], ["b"])


def test_reward_model_judge(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"))
    ra, rb = judge.rewards(["q", "q"], ["a", "bb"])
    p = judge.compare(["q"], ["a"], ["bb"])[0]
    import math

    assert p == pytest.approx(1 / (1 + math.exp(-(ra - rb))), abs=1e-6)
    assert judge.compare(["q"], ["bb"], ["a"])[0] == pytest.approx(1 - p, abs=1e-6)


# ----------------------------------------------------------------------------- the weighted AlpacaEval-style judge


class Weighted(BaseHTTPRequestHandler):
    """Answers with fixed top log-probs for the first token: chat format on /chat/completions, legacy on /completions.
    ``Weighted.tops(body) -> {token: logprob}``."""

    tops = staticmethod(lambda body: {"m": -0.2, "M": -1.8, "The": -3.0})
    bodies: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Weighted.bodies.append((self.path, body))
        tops = Weighted.tops(body)
        if self.path.endswith("/chat/completions"):
            lp = {
                "content": [
                    {
                        "token": next(iter(tops), "x"),
                        "logprob": -0.1,
                        "top_logprobs": [{"token": k, "logprob": v} for k, v in tops.items()],
                    }
                ]
            }
            choice = {"message": {"role": "assistant", "content": "m"}, "logprobs": lp}
        else:
            choice = {"text": "m", "logprobs": {"tokens": ["m"], "token_logprobs": [-0.1], "top_logprobs": [tops]}}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def weighted():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Weighted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Weighted.bodies = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_weighted_judge_reads_the_identifier_logprobs_in_both_orders(weighted, api):
    import math

    from align.judges import WeightedLLMJudge

    # the judge prefers whichever output mentions "good": p(m) high when it is shown first
    def tops(body):
        text = body["messages"][1]["content"] if "messages" in body else body["prompt"]
        first = text.index('"m"')
        good_first = "good" in text[first : text.index('"M"')]
        return {"m": -0.1, "M": -2.5, " ": -4.0} if good_first else {"M": -0.3, "m": -1.5}

    Weighted.tops = staticmethod(tops)
    judge = WeightedLLMJudge(weighted, "gpt-4-turbo", api=api, top_logprobs=5)
    d = judge.compare_detailed(["Say {x} please"], ["a good {answer}"], ["a bad one"])[0]
    p_hi = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.5))
    p_lo = math.exp(-1.5) / (math.exp(-1.5) + math.exp(-0.3))
    assert d["p_a_first"] == pytest.approx(p_hi) and d["p_b_first"] == pytest.approx(p_lo)
    assert d["p"] == pytest.approx((p_hi + 1 - p_lo) / 2)
    assert judge.compare(["Say {x} please"], ["a bad one"], ["a good {answer}"])[0] == pytest.approx(1 - d["p"])
    path, body = Weighted.bodies[0]
    assert path.endswith("/chat/completions" if api == "chat" else "/v1/completions")
    text = body["messages"][1]["content"] if api == "chat" else body["prompt"]
    assert '"""Say {x} please"""' in text and '"""a good {answer}"""' in text  # braces in the texts left alone
    assert body["max_tokens"] == 1 and (body["top_logprobs"] == 5 if api == "chat" else body["logprobs"] == 5)
    if api == "chat":
        assert body["messages"][0]["role"] == "system" and body["logprobs"] is True


def test_weighted_judge_without_the_identifiers_is_nan_or_one_order(weighted):
    import math

    from align.judges import WeightedLLMJudge

    Weighted.tops = staticmethod(lambda body: {"The": -0.1, "Based": -1.0})
    judge = WeightedLLMJudge(weighted, "m", api="chat")
    assert math.isnan(judge.compare(["q"], ["a"], ["b"])[0])

    def a_first_only(body):  # only the order with "a" shown first is informative
        text = body["messages"][1]["content"]
        return {"m": -0.5, "M": -0.5} if text.index('"""a"""') < text.index('"""b"""') else {"x": -0.1}

    Weighted.tops = staticmethod(a_first_only)
    d = judge.compare_detailed(["q"], ["a"], ["b"])[0]
    assert d["p"] == pytest.approx(0.5) and d["p_b_first"] is None


def test_llm_chat_returns_the_message(flaky):
    from align.judges import LLMChat

    chat = LLMChat(flaky, "m", retries=0)
    assert chat.url.endswith("/v1/chat/completions")
    Flaky.plan = ["malformed"]
    with pytest.raises(RuntimeError, match="malformed reply"):
        chat.chat([{"role": "user", "content": "hi"}])


def test_fill_template_is_one_pass():
    from align.judges import fill_template

    assert fill_template("{a}|{b}|{c}", a="{b}", b="x") == "{b}|x|{c}"


def test_llm_judge_concurrent_calls_equal_serial_calls_against_a_real_server(tiny_model, tiny_tokenizer):
    """``judge.max_concurrency`` requests in flight against ``align serve``: the same probabilities as one at a time,
    whatever order the answers arrive in."""
    import torch

    with torch.no_grad():  # the answer tokens '1' and '2' always on top, their split moving with the text
        tiny_model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in tiny_model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        tiny_model.lm_head.weight[:, 0] = -1.0
        tiny_model.lm_head.weight[tiny_tokenizer.convert_tokens_to_ids("1"), 0] = 0.5
        tiny_model.lm_head.weight[tiny_tokenizer.convert_tokens_to_ids("2"), 0] = 0.45
    httpd = start(HFEngine(tiny_model.eval(), tiny_tokenizer), tiny_tokenizer, "tiny")
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        prompts = [f"{a}+{b}=" for a in range(4) for b in range(3)]
        a = [str(int(p[0]) + int(p[2])) for p in prompts]
        b = [str(int(p[0]) + int(p[2]) + 1) for p in prompts]
        serial = LLMJudge(url, "tiny", max_concurrency=1).compare(prompts, a, b)
        concurrent = LLMJudge(url, "tiny", max_concurrency=8).compare(prompts, a, b)
        assert serial == concurrent and len(set(serial)) > 1
    finally:
        httpd.shutdown()


class Slow(BaseHTTPRequestHandler):
    """Answers after 50 ms and records how many requests were in flight at once; 429 + Retry-After on request."""

    lock = threading.Lock()
    inflight = peak = 0
    retry_after: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        import time

        self.rfile.read(int(self.headers["Content-Length"]))
        if Slow.retry_after:
            value = Slow.retry_after.pop(0)
            self.send_response(429)
            self.send_header("Retry-After", value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with Slow.lock:
            Slow.inflight += 1
            Slow.peak = max(Slow.peak, Slow.inflight)
        time.sleep(0.05)
        with Slow.lock:
            Slow.inflight -= 1
        data = json.dumps({"choices": [{"logprobs": {"top_logprobs": [{"1": -0.5, "2": -1.0}]}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_llm_judge_bounds_requests_in_flight_and_honours_retry_after():
    import time

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        Slow.peak = 0
        LLMJudge(url, "m", max_concurrency=3).compare(["p"] * 10, ["a"] * 10, ["b"] * 10)  # 20 requests
        assert Slow.peak == 3
        Slow.retry_after = ["0.4"]  # seconds: the judge waits about that long (+-25 % jitter), not its 10 ms backoff
        t = time.time()
        LLMJudge(url, "m", max_concurrency=1, backoff=0.01).compare(["p"], ["a"], ["b"])
        assert 0.3 <= time.time() - t < 2.0
    finally:
        httpd.shutdown()


class Digits(BaseHTTPRequestHandler):
    """A server whose model answers every scoring prompt with first-token log-probs over a few digits."""

    bodies: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        Digits.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        tops = {"7": math.log(0.5), " 3": math.log(0.25), "x": math.log(0.2)}
        data = json.dumps({"choices": [{"logprobs": {"top_logprobs": [tops]}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_llm_pointwise_score_is_the_expected_digit_over_nine(tiny_model, tiny_tokenizer):
    """judge.functions "llm:MODEL@URL": the expected digit under the first-token log-probs over '0'..'9' (other tokens
    ignored), / 9; against canned log-probs by hand, and against a real align serve (scores in [0, 1], concurrent
    calls equal serial ones up to the server's batching)."""
    from align.errors import UserError
    from align.judges import LLMScorer
    from align.judges import load_reward_function as load_function

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Digits)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        fn = load_function(f"llm:judge-model@http://127.0.0.1:{httpd.server_address[1]}/v1")
        assert fn(["2+2="], ["4"], answer=["4"]) == pytest.approx([(7 * 0.5 + 3 * 0.25) / 0.75 / 9])
        body = Digits.bodies[-1]
        assert body["model"] == "judge-model" and "## Response\n4" in body["prompt"] and body["max_tokens"] == 1
    finally:
        httpd.shutdown()
    with pytest.raises(UserError, match="expected 'llm:MODEL@http"):
        load_function("llm:no-url")
    served = start(HFEngine(tiny_model, tiny_tokenizer), tiny_tokenizer, "tiny")
    try:
        url = f"http://127.0.0.1:{served.server_address[1]}/v1"
        prompts, answers = ["12+34=", "max 1 2=", "sort 31="] * 2, ["46", "2", "13", "45", "1", "31"]
        serial = LLMScorer(url, "tiny", max_concurrency=1).score(prompts, answers)
        assert all(0.0 <= x <= 1.0 for x in serial)
        # align serve batches concurrent requests together: the same scores up to float rounding of the batch shapes
        assert LLMScorer(url, "tiny", max_concurrency=4).score(prompts, answers) == pytest.approx(serial, abs=1e-6)
    finally:
        served.shutdown()
