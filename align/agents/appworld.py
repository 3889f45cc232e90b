"""Adapter to the real AppWorld (Trivedi et al. 2024) through its environment server.

The ``appworld`` package pins an old stack (pydantic < 2, fastapi 0.110, ...), so it lives in its own virtual
environment (``bash evals/appworld/setup.sh`` makes ``.venv-appworld``) and align talks to
``appworld serve environment`` over HTTP (appworld/serve/environment.py, version 0.1.3):

    POST /initialize     {"task_id", ...AppWorld init options}  -> {"output": {"task_id", "instruction",
                                                                              "supervisor", "datetime"}}
    POST /execute        {"task_id", "code"}                    -> {"output": str}   (printed output or the traceback)
    POST /task_completed {"task_id"}                            -> {"output": bool}
    POST /evaluate       {"task_id", "suppress_errors"}         -> {"output": {"success", "difficulty", "num_tests",
                                                                              "passes", "failures"}}
    POST /close          {"task_id"}
    GET  /tasks/{task_id}                                       -> {"output": {"task_id", "instruction", ...}}

One server holds ONE world at a time. ``AppWorldEnv`` therefore keeps each episode's code history, and when another
episode has taken the server in between, re-initialises its own task and replays its history before going on
(AppWorld is deterministic: frozen time, seeded randomness), so any number of episodes can share one server, at the
cost of the replays. Give several servers (``base_url="http://127.0.0.1:8000,http://127.0.0.1:8001"``) and each
episode takes the least busy one. The task lists come from the data folder (``$APPWORLD_ROOT/data/datasets/*.txt``):
the server has no endpoint that lists them.

The AppWorld server runs the agent's code in its own process with AppWorld's own safety checks, not in align's
sandbox (align/agents/sandbox.py); run it in a container where that matters (AppWorld's docker option).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path

from align.agents.env import strip_fences
from align.errors import UserError
from align.paths import REPO_ROOT

DEFAULT_URL = "http://127.0.0.1:8000"
VENV = REPO_ROOT / ".venv-appworld"
SPLITS = {
    "train": "train",
    "dev": "dev",
    "test": "test_normal",
    "test_normal": "test_normal",
    "test_challenge": "test_challenge",
}
DOCS_HINT = (
    "Explore the APIs with apis.api_docs.show_app_descriptions(), apis.api_docs.show_api_descriptions("
    "app_name=...) and apis.api_docs.show_api_doc(app_name=..., api_name=...). "
    "Finish with apis.supervisor.complete_task() (answer=... for questions)."
)


class AppWorldError(RuntimeError):
    """The AppWorld server could not be reached or refused a call."""


@dataclass
class AppWorldTask:
    id: str  # e.g. "82e2fac_1"
    scenario: str  # the task's generator (AppWorld scenario), the id before "_"
    split: str
    difficulty: int | None = None
    instruction: str | None = None


# ------------------------------------------------------------------------------------------------- data on disk


def appworld_root(root: str | os.PathLike | None = None) -> Path | None:
    """The AppWorld root holding ``data/`` (argument, else ``$APPWORLD_ROOT``, else ``.venv-appworld/root``)."""
    for cand in (root, os.environ.get("APPWORLD_ROOT"), VENV / "root"):
        if cand and (Path(cand) / "data" / "datasets").is_dir():
            return Path(cand)
    return None


def appworld_tasks(
    split: str, base_url: str | None = None, root: str | os.PathLike | None = None
) -> list[AppWorldTask]:
    """The tasks of an AppWorld split (train, dev, test = test_normal, test_challenge), read from the data folder."""
    name = SPLITS.get(split)
    if name is None:
        raise UserError(f"agent.split: AppWorld has no split {split!r} (choose {', '.join(SPLITS)})")
    folder = appworld_root(root)
    if folder is None:
        raise UserError(
            "AppWorld data not found (looked in the root argument, $APPWORLD_ROOT and .venv-appworld/root): "
            "run `bash evals/appworld/setup.sh --data` where the internet is reachable, or set APPWORLD_ROOT"
        )
    path = folder / "data" / "datasets" / f"{name}.txt"
    if not path.is_file():
        raise UserError(f"{path}: AppWorld split file missing")
    tasks = []
    for line in path.read_text().splitlines():
        tid = line.strip().split(":")[0]  # drop a tag ("id:tag")
        if not tid:
            continue
        meta = folder / "data" / "tasks" / tid / "ground_truth" / "metadata.json"
        difficulty = None
        if meta.is_file():
            try:
                difficulty = json.loads(meta.read_text()).get("difficulty")
            except (json.JSONDecodeError, OSError):
                pass
        spec = folder / "data" / "tasks" / tid / "specs.json"
        instruction = None
        if spec.is_file():
            try:
                instruction = json.loads(spec.read_text()).get("instruction")
            except (json.JSONDecodeError, OSError):
                pass
        tasks.append(AppWorldTask(tid, tid.split("_")[0], split, difficulty, instruction))
    return tasks


# ------------------------------------------------------------------------------------------------------ the client


class _Server:
    """Client state for one AppWorld server: which episode's world it holds now, and how many episodes use it."""

    _all: dict[str, _Server] = {}
    _lock = threading.Lock()

    def __init__(self, url: str):
        self.url, self.users, self.active = url.rstrip("/"), 0, None  # active: weakref to the env holding the world
        self.lock = threading.RLock()

    @classmethod
    def pick(cls, base_url: str) -> _Server:
        urls = [u.strip().rstrip("/") for u in str(base_url).split(",") if u.strip()]
        if not urls:
            raise UserError("agent.appworld_url: empty")
        with cls._lock:
            servers = [cls._all.setdefault(u, cls(u)) for u in urls]
            best = min(servers, key=lambda s: s.users)
            best.users += 1
            return best

    def release(self) -> None:
        with self._lock:
            self.users = max(0, self.users - 1)

    def call(self, method: str, payload: dict | None = None, timeout: float = 120.0, raw: bool = False):
        url = f"{self.url}/{method.lstrip('/')}"
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            url, data=data, method="GET" if payload is None else "POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            raise AppWorldError(f"AppWorld server {self.url}: {method} failed with HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise AppWorldError(
                f"AppWorld server not reachable at {self.url} ({reason}); start it with "
                "`.venv-appworld/bin/appworld serve environment --port N` (see evals/appworld/setup.sh)"
            ) from None
        try:
            return json.loads(body) if raw else json.loads(body)["output"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise AppWorldError(
                f"AppWorld server {self.url}: {method} answered without an 'output': {body[:200]!r}"
            ) from None


class AppWorldEnv:
    """The Environment protocol over one AppWorld task; same interface as ``WorldEnv``."""

    def __init__(
        self,
        task: AppWorldTask | str,
        base_url: str = DEFAULT_URL,
        max_output_chars: int = 2000,
        show_docs: bool = True,
        timeout: float = 120.0,
        experiment_name: str = "align",
        init_options: dict | None = None,
    ):
        self.task = task if isinstance(task, AppWorldTask) else AppWorldTask(task, task.split("_")[0], "")
        self.base_url, self.max_output_chars, self.show_docs, self.timeout = (
            base_url,
            max_output_chars,
            show_docs,
            timeout,
        )
        self.init_options = {"experiment_name": experiment_name, **(init_options or {})}
        self.history: list[str] = []
        self.turns: list[dict] = []
        self.done, self.replays = False, 0
        self._server: _Server | None = None
        self._final: dict | None = None

    # the server holds one world: make it ours (replaying our turns if another episode took it)
    def _activate(self) -> dict | None:
        s = self._server
        if s is None:
            raise AppWorldError("AppWorldEnv: call reset() first")
        if s.active is not None and s.active() is self:
            return None
        info = s.call("initialize", {"task_id": self.task.id, **self.init_options}, self.timeout)
        for code in self.history:
            s.call("execute", {"task_id": self.task.id, "code": code}, self.timeout)
        if self.history:
            self.replays += 1
        s.active = weakref.ref(self)
        return info

    def reset(self) -> str:
        self.close()
        self.history, self.turns, self.done, self._final = [], [], False, None
        self._server = _Server.pick(self.base_url)
        with self._server.lock:
            self._server.active = None
            info = self._activate() or {}
        sup = info.get("supervisor") or {}
        self.task.instruction = info.get("instruction", self.task.instruction)
        name = f"{sup.get('first_name', '')} {sup.get('last_name', '')}"
        who = f"I am {name} ({sup.get('email', '')}, {sup.get('phone_number', '')}).\n"
        obs = (who if sup else "") + f"Task: {self.task.instruction}"
        return f"{obs}\n\n{DOCS_HINT}" if self.show_docs else obs

    def step(self, text: str) -> tuple[str | None, bool]:
        if self.done or self._server is None:
            return "the episode is over", True
        code = strip_fences(text)
        with self._server.lock:
            try:
                self._activate()
                out = self._server.call("execute", {"task_id": self.task.id, "code": code}, self.timeout)
                self.history.append(code)
                self.done = bool(self._server.call("task_completed", {"task_id": self.task.id}, self.timeout))
            except AppWorldError as e:
                out, self.done = f"AppWorldError: {e}", True
        out = str(out) if str(out).strip() else "(no output)"
        if len(out) > self.max_output_chars:
            out = out[: self.max_output_chars] + "\n...[truncated]"
        self.turns.append({"code": code, "output": out})
        return out, self.done

    def evaluate(self) -> dict:
        """AppWorld's own state-based tests: passed = len(passes), total = num_tests."""
        if self._final is None:
            if self._server is None:
                raise AppWorldError("AppWorldEnv.evaluate: the episode was never started")
            with self._server.lock:
                self._activate()
                out = self._server.call("evaluate", {"task_id": self.task.id, "suppress_errors": True}, self.timeout)
            self._final = out
        out = self._final
        passed = len(out.get("passes", []))
        total = int(out.get("num_tests") or passed + len(out.get("failures", [])))
        return {
            "passed": passed,
            "total": total,
            "reward": passed / total if total else 0.0,
            "success": bool(out.get("success", total > 0 and passed == total)),
            "difficulty": out.get("difficulty"),
            "failures": [f.get("requirement") for f in out.get("failures", []) if isinstance(f, dict)],
        }

    def close(self) -> None:
        s, self._server = self._server, None
        if s is None:
            return
        with s.lock:
            if s.active is not None and s.active() is self:
                if self._final is None and self.history:
                    try:  # keep evaluate() working after close
                        self._final = s.call(
                            "evaluate", {"task_id": self.task.id, "suppress_errors": True}, self.timeout
                        )
                    except AppWorldError:
                        pass
                try:
                    s.call("close", {"task_id": self.task.id}, self.timeout)
                except AppWorldError:
                    pass
                s.active = None
        s.release()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ------------------------------------------------------------------------------------------------ the server process


def venv_python(venv: str | os.PathLike | None = None) -> Path | None:
    py = Path(venv or os.environ.get("APPWORLD_VENV") or VENV) / "bin" / "python"
    return py if py.exists() else None


class AppWorldServer:
    """``appworld serve environment`` on 127.0.0.1 from the separate venv (the CLI binds 0.0.0.0 and refuses to
    start without data/; this starts the same FastAPI app with uvicorn on loopback only)."""

    def __init__(
        self,
        root: str | os.PathLike,
        port: int | None = None,
        venv: str | os.PathLike | None = None,
        wait: float = 90.0,
    ):
        py = venv_python(venv)
        if py is None:
            raise UserError(f"{venv or VENV}: no AppWorld virtual environment; run `bash evals/appworld/setup.sh`")
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port, self.url, self.root = port, f"http://127.0.0.1:{port}", Path(root)
        boot = (
            "import sys, uvicorn; from appworld.serve.environment import app; "
            "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')"
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "APPWORLD_ROOT": str(self.root),
        }  # nothing else of ours (no API keys)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [str(py), "-c", boot, str(port)], cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=self.log
        )
        deadline = time.monotonic() + wait
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")[-800:]
                raise AppWorldError(f"the AppWorld server exited with status {self.proc.returncode}: {err}")
            try:
                self.welcome = _Server(self.url).call("", None, timeout=2, raw=True)
                break
            except AppWorldError:
                if time.monotonic() > deadline:
                    self.close()
                    raise AppWorldError(f"the AppWorld server did not answer on {self.url} within {wait:g} s") from None
                time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
