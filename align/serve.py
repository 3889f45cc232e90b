"""``align serve``: an OpenAI-compatible HTTP server over any rollout backend, on 127.0.0.1.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (n samples, stop, seed,
temperature/top_p/top_k, max_tokens, log-probs with top alternatives; no streaming). It is what local LLM judges and
agents talk to. Requests are served by a thread pool; one thread runs the engine and coalesces the requests that
arrive together into batches (``Batcher``: same sampling settings, unseeded or greedy). With ``--backend vllm`` the
process becomes vLLM's own OpenAI server (``align vllm-serve``: continuous batching). Bad requests get HTTP 400 with
an OpenAI-style error body; a failure inside the engine gets HTTP 500 (same body, type "server_error") and the
server keeps serving. With ``max_context`` set, a prompt that leaves no room for one generated token is refused
(400) and ``max_tokens`` is cut to what fits (finish reason "length"), as vLLM does. A connection that sits idle or
stalls mid-request for ``client_timeout`` seconds is closed, so stalled clients cannot pile up threads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from align.rollout import SamplingParams, encode_prompt

MAX_BODY = 8 * 2**20
CLIENT_TIMEOUT = 120.0  # seconds a connection may sit idle or stall mid-request before it is closed


class BadRequest(ValueError):
    pass


def _sampling(body: dict, chat: bool) -> tuple[SamplingParams, int, int | None]:
    def num(key, default, kind=float, lo=None, hi=None):
        v = body.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise BadRequest(f"'{key}' must be a number")
        if not math.isfinite(v):  # JSON parsers accept NaN and Infinity
            raise BadRequest(f"'{key}' must be a finite number")
        v = kind(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise BadRequest(f"'{key}' must be in [{lo}, {hi}]")
        return v

    max_tokens = (
        num("max_completion_tokens", None, int, 1, 32768)
        if chat and body.get("max_completion_tokens") is not None
        else num("max_tokens", 16 if not chat else 256, int, 1, 32768)
    )
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    if chat:
        want = body.get("logprobs") or False
        if not isinstance(want, bool):
            raise BadRequest("'logprobs' must be a boolean for chat completions")
        top = num("top_logprobs", 0, int, 0, 20) if want else 0
        logprobs = top if want else None
    else:
        lp = body.get("logprobs")
        logprobs = None if lp is None else num("logprobs", 0, int, 0, 20)
        top = logprobs or 0
    sp = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=num("temperature", 1.0, float, 0.0, 10.0),
        top_p=num("top_p", 1.0, float, 0.0, 1.0),
        top_k=num("top_k", 0, int, 0, 2**31 - 1),
        stop=stop,
        seed=None if body.get("seed") is None else num("seed", 0, int, -(2**63), 2**64 - 1),
        top_logprobs=top,
    )
    return sp, num("n", 1, int, 1, 128), logprobs


class Batcher:
    """One thread runs the engine; requests that arrive while it is busy (or within ``window`` seconds of each
    other) and can share a call are coalesced into one ``generate``: same n and sampling settings, and no seed or
    greedy (a seeded sampled request runs alone, so its samples do not depend on what else was queued).
    ``calls`` counts engine calls, ``requests`` the requests served."""

    def __init__(self, engine, window: float = 0.005, max_prompts: int = 256):
        import queue

        self.engine, self.window, self.max_prompts = engine, window, max_prompts
        self.queue: queue.Queue = queue.Queue()
        self.calls = self.requests = 0
        threading.Thread(target=self._run, daemon=True).start()

    def generate(self, prompts: list, n: int, sampling: SamplingParams):
        item = {"prompts": prompts, "n": n, "sp": sampling, "done": threading.Event()}
        self.queue.put(item)
        item["done"].wait()
        if "error" in item:
            raise item["error"]
        return item["result"]

    @staticmethod
    def _key(item):
        sp = item["sp"]
        if sp.seed is not None and sp.temperature > 0:
            return None  # runs alone
        return (item["n"], dataclasses.replace(sp, seed=None if sp.temperature > 0 else sp.seed).__repr__())

    def _run(self):
        import queue

        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.window
            while True:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict = {}
            for item in batch:
                key = self._key(item)
                groups.setdefault(key if key is not None else id(item), []).append(item)
            for items in groups.values():
                while items:
                    take, size = [], 0
                    while items and (not take or size + len(items[0]["prompts"]) <= self.max_prompts):
                        size += len(items[0]["prompts"])
                        take.append(items.pop(0))
                    self._serve(take)

    def _serve(self, items: list) -> None:
        prompts = [p for it in items for p in it["prompts"]]
        try:
            out = self.engine.generate(prompts, n=items[0]["n"], sampling=items[0]["sp"])
            self.calls += 1
            self.requests += len(items)
            k = 0
            for it in items:
                it["result"] = out[k : k + len(it["prompts"])]
                k += len(it["prompts"])
        except Exception as e:  # noqa: BLE001 - reported to each request (HTTP 500), the server keeps serving
            for it in items:
                it["error"] = e
        for it in items:
            it["done"].set()


class Server:
    def __init__(self, engine, tokenizer, model_name: str, max_context: int | None = None):
        self.engine, self.tok, self.name = engine, tokenizer, model_name
        self.batcher = Batcher(engine)
        self.max_context = max_context

    def _fit(self, prompts: list, sp: SamplingParams) -> SamplingParams:
        """With ``max_context``: refuse a prompt with no room for one new token; cut max_tokens to what fits."""
        if not self.max_context:
            return sp
        lengths = [len(encode_prompt(self.tok, p)) for p in prompts]
        for i, n in enumerate(lengths):
            if n >= self.max_context:
                which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise BadRequest(
                    f"{which} is {n} tokens; this model's maximum context length is {self.max_context} tokens "
                    "(prompt and completion together)"
                )
        room = self.max_context - max(lengths)
        return dataclasses.replace(sp, max_new_tokens=room) if sp.max_new_tokens > room else sp

    def _tok_str(self, tid: int) -> str:
        return self.tok.decode([tid])

    def completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("'prompt' must be a string or a list of strings")
        sp, n, logprobs = _sampling(body, chat=False)
        sp = self._fit(prompts, sp)
        groups = self.batcher.generate(prompts, n, sp)
        choices, used = [], 0
        for group in groups:
            for c in group:
                used += len(c.token_ids)
                choice = {"index": len(choices), "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                if logprobs is not None:
                    toks = [self._tok_str(t) for t in c.token_ids]
                    offsets, pos = [], 0
                    for s in toks:
                        offsets.append(pos)
                        pos += len(s)
                    choice["logprobs"] = {
                        "tokens": toks,
                        "token_logprobs": c.logprobs,
                        "text_offset": offsets,
                        "top_logprobs": [{self._tok_str(t): v for t, v in d.items()} for d in c.top_logprobs]
                        if c.top_logprobs
                        else None,
                    }
                choices.append(choice)
        prompt_tokens = sum(len(g[0].prompt_ids) for g in groups)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used},
        }

    def chat(self, body: dict) -> dict:
        msgs = body.get("messages")
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content")
        sp, n, logprobs = _sampling(body, chat=True)
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        sp = self._fit([msgs], sp)
        group = self.batcher.generate([msgs], n, sp)[0]
        choices, used = [], 0
        for c in group:
            used += len(c.token_ids)
            choice = {
                "index": len(choices),
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if logprobs is not None:
                content = []
                for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                    s = self._tok_str(t)
                    tops = c.top_logprobs[j] if c.top_logprobs else {}
                    content.append(
                        {
                            "token": s,
                            "logprob": lp,
                            "bytes": list(s.encode()),
                            "top_logprobs": [
                                {"token": self._tok_str(a), "logprob": b, "bytes": list(self._tok_str(a).encode())}
                                for a, b in tops.items()
                            ],
                        }
                    )
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        prompt_tokens = len(group[0].prompt_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "align"}]}


def make_handler(server: Server, client_timeout: float | None = CLIENT_TIMEOUT):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = client_timeout  # socket timeout: an idle or stalled connection is closed

        def log_message(self, fmt, *args):  # quiet: one line per request on stderr, never request bodies
            if fmt.startswith('"%s"'):  # log_request: '"<request line>" <code> <size>'
                print(
                    f"[serve] {getattr(self, 'command', None)} {getattr(self, 'path', '')} "
                    f"{args[1] if len(args) > 1 else ''}",
                    file=sys.stderr,
                )
            else:  # log_error: a timed-out connection, a malformed request line
                print(f"[serve] {(fmt % args)[:200]}", file=sys.stderr)

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client went away (broken pipe, reset, timeout): nobody to answer
                self.close_connection = True

        def _error(self, code: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(code, {"error": {"message": message, "type": kind, "code": code}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, server.models())
            if self.path.rstrip("/") in ("/health", ""):
                return self._send(200, {"status": "ok"})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:  # the body is not read: the connection cannot be reused
                self.close_connection = True
                return (
                    self._error(413, "request body too large")
                    if length > MAX_BODY
                    else self._error(400, "invalid Content-Length header")
                )
            try:
                raw = self.rfile.read(length)
            except OSError:  # the client stalled past the timeout or went away mid-body
                self.close_connection = True
                return None
            if len(raw) < length:  # the client closed its side mid-body
                self.close_connection = True
                return self._error(400, f"the request body ended after {len(raw)} of {length} bytes")
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                if body.get("stream"):
                    raise BadRequest("streaming is not supported")
                route = self.path.rstrip("/")
                if route == "/v1/completions":
                    return self._send(200, server.completions(body))
                if route == "/v1/chat/completions":
                    return self._send(200, server.chat(body))
                return self._error(404, f"no route {self.path}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                return self._error(400, "the request body is not valid JSON")
            except BadRequest as e:
                return self._error(400, str(e))
            except Exception as e:  # a failure inside the engine: answer it, keep serving
                line = (str(e).strip().splitlines() or [""])[0][:300]
                print(f"[serve] {self.command} {self.path} 500 {type(e).__name__}: {line}", file=sys.stderr)
                return self._error(500, f"internal error: {type(e).__name__}: {line}", "server_error")

    return Handler


def start(
    engine,
    tokenizer,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_context: int | None = None,
    client_timeout: float | None = CLIENT_TIMEOUT,
) -> ThreadingHTTPServer:
    """Start serving in a background thread; returns the server (``server.server_address[1]`` is the port)."""
    httpd = ThreadingHTTPServer(
        (host, port), make_handler(Server(engine, tokenizer, model_name, max_context), client_timeout)
    )
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def serve_main(
    model_path: str,
    backend: str = "hf",
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    max_context: int | None = None,
    client_timeout: float | None = CLIENT_TIMEOUT,
) -> None:
    """Load a model folder and serve it until interrupted (``max_context``, ``client_timeout``: see ``start``)."""
    from align.config import ModelConfig, RolloutConfig
    from align.models import for_inference, load_policy
    from align.rollout import make_engine

    if backend == "vllm":  # vLLM's own OpenAI server (continuous batching): this process becomes it
        from argparse import Namespace

        from align.rollout.vllm_cli import serve_main as vllm_serve_main

        vllm_serve_main(
            Namespace(
                model=model_path,
                host=host,
                port=port,
                served_model_name=name,
                dtype="auto",
                tensor_parallel_size=1,
                gpu_memory_utilization=None,
                kv_cache_memory_bytes=None,
                max_model_len=max_context,
                max_num_seqs=256,
                enforce_eager=False,
                enable_lora=False,
                max_lora_rank=16,
                max_loras=2,
                weight_transfer="folder",
                vllm_args=[],
            )
        )
        return
    model, tok = load_policy(ModelConfig(name_or_path=model_path, attn_implementation=None))
    model = for_inference(model)
    engine = make_engine(RolloutConfig(backend=backend), model, tok)
    httpd = start(engine, tok, name or model_path, host, port, max_context=max_context, client_timeout=client_timeout)
    print(
        f"serving {model_path} ({backend}) at http://{host}:{httpd.server_address[1]}/v1", file=sys.stderr, flush=True
    )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops it like Ctrl-C (SIGINT: Python's default handler)
    try:
        while True:  # a timed wait: Python runs signal handlers in the main thread only, and a signal the kernel
            time.sleep(0.5)  # delivered to another thread must not leave it blocked forever
    except KeyboardInterrupt:
        httpd.shutdown()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
