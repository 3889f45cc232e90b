"""``align serve``: an OpenAI-compatible HTTP server over any rollout backend, on 127.0.0.1.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (n samples, stop, seed,
temperature/top_p/top_k, max_tokens, log-probs with top alternatives; no streaming). It is what local LLM
judges and agents talk to. Requests are served by a thread pool; generation is serialised through one lock
(the engine batches within a request). Bad requests get HTTP 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from align.rollout import SamplingParams

MAX_BODY = 8 * 2**20


class BadRequest(ValueError):
    pass


def _sampling(body: dict, chat: bool) -> tuple[SamplingParams, int, int | None]:
    def num(key, default, kind=float, lo=None, hi=None):
        v = body.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise BadRequest(f"'{key}' must be a number")
        v = kind(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise BadRequest(f"'{key}' must be in [{lo}, {hi}]")
        return v

    max_tokens = num("max_completion_tokens", None, int, 1, 32768) if chat and body.get("max_completion_tokens") is not None else num("max_tokens", 16 if not chat else 256, int, 1, 32768)
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
    sp = SamplingParams(max_new_tokens=max_tokens, temperature=num("temperature", 1.0, float, 0.0, 10.0),
                        top_p=num("top_p", 1.0, float, 0.0, 1.0), top_k=num("top_k", 0, int, 0, None), stop=stop,
                        seed=None if body.get("seed") is None else num("seed", 0, int), top_logprobs=top)
    return sp, num("n", 1, int, 1, 128), logprobs


class Server:
    def __init__(self, engine, tokenizer, model_name: str):
        self.engine, self.tok, self.name, self.lock = engine, tokenizer, model_name, threading.Lock()

    def _tok_str(self, tid: int) -> str:
        return self.tok.decode([tid])

    def completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest("'prompt' must be a string or a list of strings")
        sp, n, logprobs = _sampling(body, chat=False)
        with self.lock:
            groups = self.engine.generate(prompts, n=n, sampling=sp)
        choices, used = [], 0
        for i, group in enumerate(groups):
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
                        "tokens": toks, "token_logprobs": c.logprobs, "text_offset": offsets,
                        "top_logprobs": [{self._tok_str(t): v for t, v in d.items()} for d in c.top_logprobs] if c.top_logprobs else None,
                    }
                choices.append(choice)
        prompt_tokens = sum(len(g[0].prompt_ids) for g in groups)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}}

    def chat(self, body: dict) -> dict:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content")
        sp, n, logprobs = _sampling(body, chat=True)
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        with self.lock:
            group = self.engine.generate([msgs], n=n, sampling=sp)[0]
        choices, used = [], 0
        for c in group:
            used += len(c.token_ids)
            choice = {"index": len(choices), "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason, "logprobs": None}
            if logprobs is not None:
                content = []
                for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs)):
                    s = self._tok_str(t)
                    tops = c.top_logprobs[j] if c.top_logprobs else {}
                    content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                                    "top_logprobs": [{"token": self._tok_str(a), "logprob": b, "bytes": list(self._tok_str(a).encode())} for a, b in tops.items()]})
                choice["logprobs"] = {"content": content}
            choices.append(choice)
        prompt_tokens = len(group[0].prompt_ids)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "align"}]}


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per request on stderr, never request bodies
            print(f"[serve] {self.command} {self.path} {args[1] if len(args) > 1 else ''}", file=sys.stderr)

        def _send(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, server.models())
            if self.path.rstrip("/") in ("/health", ""):
                return self._send(200, {"status": "ok"})
            self._error(404, f"no route {self.path}")

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._error(413, "request body too large")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
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
            except json.JSONDecodeError:
                return self._error(400, "the request body is not valid JSON")
            except BadRequest as e:
                return self._error(400, str(e))
            except (BrokenPipeError, ConnectionResetError):  # the client went away
                return None

    return Handler


def start(engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Start serving in a background thread; returns the server (``server.server_address[1]`` is the port)."""
    httpd = ThreadingHTTPServer((host, port), make_handler(Server(engine, tokenizer, model_name)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def serve_main(model_path: str, backend: str = "hf", host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    """Load a model folder and serve it until interrupted."""
    from align.config import ModelConfig, RolloutConfig
    from align.models import load_policy
    from align.rollout import make_engine

    model, tok = load_policy(ModelConfig(name_or_path=model_path, attn_implementation=None))
    model.eval()
    engine = make_engine(RolloutConfig(backend=backend), model, tok)
    httpd = start(engine, tok, name or model_path, host, port)
    print(f"serving {model_path} ({backend}) at http://{host}:{httpd.server_address[1]}/v1", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        httpd.shutdown()
