"""Real server processes for tests: ``align vllm-serve`` on a local model folder, and a TCP proxy in front of a server
that counts connections and can be killed or frozen (a server that died, or one that stopped answering)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from align.paths import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def start_vllm_server(model_dir: Path, log: Path, *extra: str, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``align vllm-serve --model model_dir`` on a free port, fp32 (the tiny models' dtype), started in a session
    of its own; returns (process, base URL) once /health answers."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "align",
                "vllm-serve",
                "--model",
                str(model_dir),
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-num-seqs",
                "64",
                *extra,
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout, log)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``target`` (host, port). ``connections`` counts accepted connections; ``freeze()``
    keeps accepting and reading but never forwards or answers; ``close()`` stops listening (connection refused)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.connections, self.frozen = target, 0, False
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(client)
            if self.frozen:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.target)
            self._open.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                if not self.frozen:  # frozen: read and drop, never answer, never close
                    b.sendall(data)
        except OSError:
            pass
        if not self.frozen:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @staticmethod
    def _swallow(s: socket.socket) -> None:
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass

    def freeze(self) -> None:
        self.frozen = True

    def close(self) -> None:
        self.frozen = True
        self.sock.close()
        for s in self._open:
            try:
                s.close()
            except OSError:
                pass


def url_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)
