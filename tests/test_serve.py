"""`align serve` over real HTTP on localhost, driven by the official OpenAI client."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

openai = pytest.importorskip("openai")

from align.rollout.hf import HFEngine  # noqa: E402
from align.serve import start  # noqa: E402


@pytest.fixture
def server(tiny_model, tiny_tokenizer):
    httpd = start(HFEngine(tiny_model, tiny_tokenizer), tiny_tokenizer, "tiny")
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", tiny_model, tiny_tokenizer
    httpd.shutdown()


def test_openai_client_completions_chat_models_and_logprobs(server):
    url, model, tok = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    c = client.completions.create(
        model="tiny", prompt=["12+34=", "max 1 2="], max_tokens=5, temperature=1.0, n=2, seed=0, logprobs=3
    )
    assert len(c.choices) == 4 and c.usage.completion_tokens > 0
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)

    greedy = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0.0,
        logprobs=True,
        top_logprobs=2,
    )
    ch = greedy.choices[0]
    assert ch.finish_reason in ("stop", "length") and len(ch.logprobs.content) >= 1
    first = ch.logprobs.content[0]
    assert first.top_logprobs[0].logprob == pytest.approx(first.logprob, abs=1e-5)  # greedy picks the argmax
    # the same request through the engine directly gives the same text
    from align.rollout import SamplingParams

    direct = HFEngine(model, tok).generate(
        [[{"role": "user", "content": "hi"}]], n=1, sampling=SamplingParams(max_new_tokens=4, temperature=0.0)
    )
    assert direct[0][0].text == ch.message.content


def test_bad_requests_get_400(server):
    url, *_ = server
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    req = urllib.request.Request(url + "/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "valid JSON" in json.loads(e.value.read())["error"]["message"]


def _terminate_another_thread(pid: int) -> None:
    """SIGTERM to one of the process's threads other than the main one (tgkill, Linux x86_64/aarch64), else to the
    process. The kernel may hand a process signal to any thread; Python runs the handler only in the main thread.
    Before the fix the server's main thread slept in an untimed wait and never woke (and SIGTERM was not handled).
    SIGTERM rather than SIGINT: a shell without job control starts background commands with SIGINT ignored."""
    import ctypes
    import platform

    number = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")] if os.path.isdir(f"/proc/{pid}/task") else []
    others = [t for t in tids if t != pid]
    if (
        number is None
        or not others
        or ctypes.CDLL(None, use_errno=True).syscall(number, pid, others[0], signal.SIGTERM) != 0
    ):
        os.kill(pid, signal.SIGTERM)


def test_cli_serve_process(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")  # a file, not a pipe nobody reads (a full pipe would block the server)
    proc = subprocess.Popen(
        [sys.executable, "-m", "align", "serve", "--model", str(tmp_path / "m"), "--port", str(port), "--name", "m"],
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    assert json.loads(r.read())["data"][0]["id"] == "m"
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="m", prompt="1+1=", max_tokens=3, temperature=0.0, logprobs=1)
        assert out.choices[0].logprobs.token_logprobs
        client.close()
    finally:
        _terminate_another_thread(proc.pid)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    assert proc.returncode == 0  # ended by SIGTERM within 30 s, not killed


def test_concurrent_requests_are_coalesced_into_batches(tiny_model, tiny_tokenizer):
    """Requests that arrive together with the same settings share engine calls; each gets the answer it would get
    alone (greedy), and a seeded sampled request still gets its seed's samples."""
    import threading

    from align.rollout import SamplingParams

    class Counting(HFEngine):
        calls = 0

        def generate(self, *a, **k):
            Counting.calls += 1
            return super().generate(*a, **k)

    httpd = start(Counting(tiny_model, tiny_tokenizer), tiny_tokenizer, "tiny")
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        prompts = [f"{k}+{k}=" for k in range(12)]
        answers = [None] * len(prompts)

        def ask(i):
            answers[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6, temperature=0.0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert Counting.calls < len(prompts)  # coalesced
        alone = HFEngine(tiny_model, tiny_tokenizer).generate(prompts, n=1, sampling=SamplingParams(6, 0.0))
        assert [a.choices[0].text for a in answers] == [g[0].text for g in alone]
        seeded = client.completions.create(model="tiny", prompt="1+1=", max_tokens=6, temperature=1.0, seed=5, n=2)
        direct = HFEngine(tiny_model, tiny_tokenizer).generate(
            ["1+1="], n=2, sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=5)
        )
        assert [c.text for c in seeded.choices] == [c.text for c in direct[0]]
    finally:
        httpd.shutdown()
