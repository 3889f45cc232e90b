"""A bounded load test of ``align serve`` on 127.0.0.1 (issue 8, item 5).

Starts the server in its own process on a tiny local model (or ``--model DIR``), warms it up, then runs
``--clients`` concurrent clients x ``--requests`` requests each, mixing:

    completion, chat          normal requests (n 1-2, log-probs, seeds) on keep-alive connections: 200
    near_limit                a prompt a few tokens short of the context limit: 200, max_tokens cut to fit
    over_limit                a prompt longer than the context: 400 naming the limit
    stream                    ``"stream": true`` (not supported): 400
    bad_json                  a malformed body: 400
    cancel                    a full request, then the client closes its socket before the answer
    cancel_mid_body           half a body, then close
    stall                     half a body, then silence: the server must close the connection itself

and checks every answer is well-formed (status, JSON shape, usage arithmetic). The server's RSS and thread
count are read from /proc after the warm-up and after the load. Prints one JSON object.

    .venv/bin/python -m align.bench.serve_load --clients 8 --requests 50
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from align.paths import REPO_ROOT as ROOT

KINDS = {
    "completion": 30,
    "chat": 25,
    "near_limit": 10,
    "over_limit": 8,
    "stream": 5,
    "bad_json": 5,
    "cancel": 10,
    "cancel_mid_body": 5,
    "stall": 2,
}
GENERATING = ("completion", "chat", "near_limit")
WORDS = "the a cat dog sat ran on under big small red blue quickly slowly and then 12 34 + = ?".split()

SERVER = """
import sys
from align.serve import serve_main
serve_main(sys.argv[1], port=int(sys.argv[2]), name="tiny", max_context=int(sys.argv[3]),
           client_timeout=float(sys.argv[4]))
"""


# ------------------------------------------------------------------ the server process
def save_tiny_model(folder: Path, max_positions: int = 256) -> Path:
    from align.models import build_tiny_model, char_tokenizer

    tok = char_tokenizer()
    model = build_tiny_model(
        "llama",
        hidden_size=64,
        layers=2,
        heads=2,
        intermediate_size=128,
        max_positions=max_positions,
        seed=0,
        tokenizer=tok,
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, max_context: int, client_timeout: float, log=subprocess.DEVNULL
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(model_dir), str(port), str(max_context), str(client_timeout)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if json.loads(r.read()) == {"status": "ok"}:
                    return proc, port
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("align serve did not come up") from None
            time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def proc_status(pid: int) -> dict:
    """VmRSS (MB) and Threads of a process, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            out["rss_mb"] = int(value.split()[0]) / 1024
        elif key == "Threads":
            out["threads"] = int(value)
    return out


# ------------------------------------------------------------------ one client
class Client:
    def __init__(self, port: int, max_context: int, client_timeout: float, seed: int):
        self.port, self.max_context, self.client_timeout = port, max_context, client_timeout
        self.rng = random.Random(seed)
        self.conn: http.client.HTTPConnection | None = None
        self.used = False
        self.reconnects = 0

    def _text(self, lo: int, hi: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def _chars(self, n: int) -> str:
        return (self._text(n, n) * 2)[:n]

    def _post(self, path: str, payload: bytes) -> tuple[int, bytes]:
        """POST on the keep-alive connection; a connection the server closed while idle is reopened once."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn, self.used = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120), False
            try:
                self.conn.request("POST", path, payload, {"Content-Type": "application/json"})
                r = self.conn.getresponse()
                data = r.read()
                self.used = True
                if r.getheader("Connection", "").lower() == "close":
                    self.close()
                return r.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                stale = self.used
                self.close()
                if attempt or not stale:
                    raise
                self.reconnects += 1
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def _raw(self, head: bytes, body: bytes, send: int, then: str) -> str:
        """A raw socket: the headers, ``send`` bytes of the body, then 'close' or 'stall' (wait for the server)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=self.client_timeout + 30)
        try:
            s.sendall(head + body[:send])
            if then == "close":
                return "closed"
            t0 = time.time()
            data = b""
            while chunk := s.recv(4096):  # the server must end the connection by itself
                data += chunk
            waited = time.time() - t0
            if waited > self.client_timeout + 20:
                return f"the server kept a stalled connection for {waited:.0f} s"
            return "closed by server"
        except TimeoutError:
            return "the server never closed a stalled connection"
        finally:
            s.close()

    def one(self, kind: str) -> dict:
        """Send one request of ``kind``; returns {kind, status, latency, problem (None when well-formed)}."""
        rng, t0 = self.rng, time.time()
        status, problem = None, None
        try:
            if kind in ("cancel", "cancel_mid_body", "stall"):
                body = json.dumps({"prompt": self._text(3, 20), "max_tokens": 32}).encode()
                head = (
                    f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                outcome = self._raw(
                    head,
                    body,
                    len(body) if kind == "cancel" else len(body) // 2,
                    "stall" if kind == "stall" else "close",
                )
                if outcome not in ("closed", "closed by server"):
                    problem = outcome
            else:
                path, want, n, lp = "/v1/completions", 200, 1, None
                if kind == "completion":
                    n, lp = rng.randint(1, 2), rng.choice([None, 2])
                    req = {
                        "prompt": self._text(2, 30),
                        "max_tokens": rng.randint(4, 16),
                        "n": n,
                        "seed": rng.randint(0, 10**6),
                        "temperature": 1.0,
                    }
                    if lp:
                        req["logprobs"] = lp
                elif kind == "chat":
                    path, n, lp = "/v1/chat/completions", 1, rng.random() < 0.3
                    req = {
                        "messages": [{"role": "user", "content": self._text(2, 30)}],
                        "max_tokens": rng.randint(4, 16),
                        "temperature": 0.7,
                        "logprobs": lp,
                        **({"top_logprobs": 2} if lp else {}),
                    }
                elif kind == "near_limit":  # the character tokenizer: one token per character, plus BOS
                    req = {
                        "prompt": self._chars(self.max_context - 1 - rng.randint(1, 12)),
                        "max_tokens": 64,
                        "temperature": 1.0,
                    }
                elif kind == "over_limit":
                    req, want = {"prompt": self._chars(self.max_context + rng.randint(0, 2000)), "max_tokens": 8}, 400
                elif kind == "stream":
                    req, want = {"prompt": self._text(2, 5), "max_tokens": 4, "stream": True}, 400
                payload = b"{this is not json" if kind == "bad_json" else json.dumps(req).encode()
                if kind == "bad_json":
                    want = 400
                status, data = self._post(path, payload)
                problem = check(kind, status, data, want, n, lp, self.max_context)
        except Exception as e:  # noqa: BLE001 - every failure is a finding, reported with its kind
            problem = f"{type(e).__name__}: {e}"
        return {"kind": kind, "status": status, "latency": time.time() - t0, "problem": problem}


def check(kind: str, status: int, data: bytes, want: int, n: int, lp, max_context: int) -> str | None:
    """None when the answer is well-formed for its kind, else what is wrong."""
    if status != want:
        return f"status {status}, wanted {want}: {data[:200]!r}"
    try:
        obj = json.loads(data)
    except ValueError:
        return f"not JSON: {data[:200]!r}"
    if want != 200:
        err = obj.get("error") if isinstance(obj, dict) else None
        if not (
            isinstance(err, dict)
            and isinstance(err.get("message"), str)
            and err.get("code") == want
            and err.get("type")
        ):
            return f"malformed error body: {obj}"
        expect = {"over_limit": "maximum context length", "stream": "streaming", "bad_json": "JSON"}[kind]
        return None if expect in err["message"] else f"error message without {expect!r}: {err['message']}"
    choices, usage = obj.get("choices"), obj.get("usage") or {}
    if not isinstance(choices, list) or len(choices) != n:
        return f"{len(choices or [])} choices, wanted {n}"
    if usage.get("total_tokens") != usage.get("prompt_tokens", -1) + usage.get("completion_tokens", -1):
        return f"usage does not add up: {usage}"
    if kind == "near_limit" and usage["total_tokens"] > max_context:
        return f"prompt + completion {usage['total_tokens']} tokens exceed the context {max_context}"
    for c in choices:
        if c.get("finish_reason") not in ("stop", "length"):
            return f"finish_reason {c.get('finish_reason')!r}"
        text = c["message"]["content"] if kind == "chat" else c.get("text")
        if not isinstance(text, str):
            return f"no text in {c}"
        if lp and kind == "completion":
            L = c["logprobs"]
            if len(L["tokens"]) != len(L["token_logprobs"]) or any(v > 0 for v in L["token_logprobs"]):
                return f"bad logprobs {L}"
        if lp and kind == "chat" and not c["logprobs"]["content"]:
            return "empty chat logprobs"
    return None


# ------------------------------------------------------------------ the load
def run_load(port: int, clients: int, per_client: int, max_context: int, client_timeout: float, seed: int = 0) -> dict:
    """``clients`` threads x ``per_client`` requests of mixed kinds; returns counts, problems and timings."""
    results: list[dict] = []
    lock = threading.Lock()
    names, weights = zip(*KINDS.items())

    def worker(i: int) -> None:
        client = Client(port, max_context, client_timeout, seed * 1000 + i)
        kinds = client.rng.choices(names, weights, k=per_client)
        if per_client >= 10 and "stall" not in kinds:
            kinds[client.rng.randrange(per_client)] = "stall"  # every client stalls once
        mine = [client.one(k) for k in kinds]
        client.close()
        with lock:
            results.extend(mine)
            results.append({"kind": "_reconnects", "count": client.reconnects})

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    reconnects = sum(r.pop("count") for r in results if r["kind"] == "_reconnects")
    results = [r for r in results if r["kind"] != "_reconnects"]
    lat = sorted(r["latency"] for r in results if r["kind"] in GENERATING and not r["problem"])
    counts: dict[str, int] = {}
    for r in results:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None  # noqa: E731
    return {
        "requests": len(results),
        "kinds": counts,
        "problems": [r for r in results if r["problem"]],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 1),
        "generations_per_s": round(len(lat) / wall, 1),
        "latency_ms_p50": pct(0.50),
        "latency_ms_p95": pct(0.95),
        "latency_ms_mean": round(statistics.mean(lat) * 1000, 1) if lat else None,
        "reconnects": reconnects,
    }


def health(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        return r.status == 200 and json.loads(r.read()) == {"status": "ok"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--warmup", type=int, default=5, help="requests per client before the first RSS reading")
    ap.add_argument("--rounds", type=int, default=1, help="load rounds (RSS read after each)")
    ap.add_argument("--model", help="HF model folder (default: a tiny random Llama, 256 positions, built here)")
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--client-timeout", type=float, default=3.0)
    args = ap.parse_args()
    result_out = os.fdopen(os.dup(1), "w")  # stdout carries the JSON only: library chatter goes to stderr
    os.dup2(2, 1)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else save_tiny_model(Path(tmp) / "tiny", args.max_context)
        proc, port = start_server(model, args.max_context, args.client_timeout)
        try:
            warm = run_load(port, args.clients, args.warmup, args.max_context, args.client_timeout, seed=99)
            time.sleep(args.client_timeout + 1)
            before = proc_status(proc.pid)
            rounds = []
            for i in range(args.rounds):
                load = run_load(port, args.clients, args.requests, args.max_context, args.client_timeout, seed=i)
                time.sleep(args.client_timeout + 1)  # idle keep-alive connections time out
                rounds.append(
                    {
                        **load,
                        "after": proc_status(proc.pid),
                        "problems": load["problems"][:5],
                        "problem_count": len(load["problems"]),
                    }
                )
            ok = health(port)
        finally:
            stop_server(proc)
    print(
        json.dumps(
            {
                "clients": args.clients,
                "per_client": args.requests,
                "warmup_problems": len(warm["problems"]),
                "before": before,
                "rounds": rounds,
                "health_after": ok,
            },
            indent=1,
        ),
        file=result_out,
        flush=True,
    )
    return 0 if ok and not warm["problems"] and not any(r["problem_count"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
