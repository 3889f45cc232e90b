"""The AppWorld adapter: the HTTP protocol against a fake environment server of ours (one world at a time, like the
real one), task lists from a data folder, clear errors; the real server from .venv-appworld when it is installed
(start + answer without data); tasks that need AppWorld's data skip with that reason."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.agents.appworld import (
    VENV,
    AppWorldEnv,
    AppWorldError,
    AppWorldServer,
    AppWorldTask,
    appworld_root,
    appworld_tasks,
    venv_python,
)
from align.errors import UserError


class FakeAppWorld:
    """Mimics appworld/serve/environment.py: one active world; code that mentions `pay` moves money, and
    `apis.supervisor.complete_task()` completes the task; evaluate has two tests (paid, completed)."""

    def __init__(self):
        self.world = None  # {"task_id", "paid", "completed"}
        self.calls: list[tuple[str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, obj) -> None:
                body = json.dumps(obj).encode() if code == 200 else b"Internal Server Error"
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/":
                    return self._reply(200, {"message": "Welcome to AppWorld Server!"})
                self._reply(404, {})

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                method = self.path.strip("/")
                fake.calls.append((method, data))
                if method == "initialize":
                    fake.world = {"task_id": data["task_id"], "paid": 0, "completed": False}
                    return self._reply(
                        200,
                        {
                            "output": {
                                "task_id": data["task_id"],
                                "instruction": f"Pay Ann $5 ({data['task_id']}).",
                                "supervisor": {
                                    "first_name": "Joe",
                                    "last_name": "Doe",
                                    "email": "joe@x.com",
                                    "phone_number": "555",
                                },
                                "datetime": "2023-05-18T12:00:00",
                            }
                        },
                    )
                w = fake.world
                if w is None or w["task_id"] != data.get("task_id"):
                    return self._reply(500, {})
                if method == "execute":
                    code = data["code"]
                    if "pay" in code:
                        w["paid"] += 1
                    if "apis.supervisor.complete_task()" in code:
                        w["completed"] = True
                    out = "" if "print" not in code else f"paid {w['paid']}"
                    return self._reply(200, {"output": out})
                if method == "task_completed":
                    return self._reply(200, {"output": w["completed"]})
                if method == "evaluate":
                    tests = [("paid once", w["paid"] == 1), ("completed", w["completed"])]
                    return self._reply(
                        200,
                        {
                            "output": {
                                "success": all(ok for _, ok in tests),
                                "difficulty": 1,
                                "num_tests": 2,
                                "passes": [{"requirement": r, "label": "no_op_fail"} for r, ok in tests if ok],
                                "failures": [
                                    {"requirement": r, "label": "no_op_fail", "trace": "x"} for r, ok in tests if not ok
                                ],
                            }
                        },
                    )
                if method == "close":
                    fake.world = None
                    return self._reply(200, {"output": None})
                self._reply(404, {})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakeAppWorld()
    yield f
    f.close()


def test_protocol_one_episode(fake):
    env = AppWorldEnv(AppWorldTask("abc_1", "abc", "dev"), fake.url)
    first = env.reset()
    assert "Task: Pay Ann $5 (abc_1)." in first and "Joe Doe" in first and "api_docs" in first
    obs, done = env.step("```python\nr = pay()\nprint(r)\n```")
    assert obs == "paid 1" and not done
    assert fake.calls[-2] == ("execute", {"task_id": "abc_1", "code": "r = pay()\nprint(r)"})
    obs, done = env.step("apis.supervisor.complete_task()")
    assert done and obs == "(no output)"
    res = env.evaluate()
    assert res == {"passed": 2, "total": 2, "reward": 1.0, "success": True, "difficulty": 1, "failures": []}
    env.close()
    assert fake.calls[-1][0] == "close" and env.evaluate()["success"]  # evaluate still answers after close
    env.show_docs = False
    assert env.reset().endswith("Task: Pay Ann $5 (abc_1).")
    env.close()


def test_episodes_sharing_one_server_replay_their_turns(fake):
    """The server holds one world: interleaved episodes (the trainer steps K of them in lockstep) stay independent."""
    a, b = AppWorldEnv("abc_1", fake.url), AppWorldEnv("abc_2", fake.url)
    a.reset()
    b.reset()  # b takes the server
    assert a.step("pay()") == ("(no output)", False)  # a re-initialises (nothing to replay yet) and pays
    assert b.step("apis.supervisor.complete_task()") == ("(no output)", True)  # b replays nothing, completes
    obs, done = a.step("apis.supervisor.complete_task()")  # a re-initialises and replays its `pay()`
    assert done and a.replays == 1
    ra, rb = a.evaluate(), b.evaluate()
    assert (ra["passed"], ra["total"], ra["success"]) == (2, 2, True)
    assert (rb["passed"], rb["total"], rb["success"]) == (1, 2, False) and rb["failures"] == ["paid once"]
    a.close()
    b.close()


def test_several_servers_are_shared_out(fake):
    other = FakeAppWorld()
    try:
        envs = [AppWorldEnv(f"abc_{i}", f"{fake.url},{other.url}") for i in range(4)]
        for e in envs:
            e.reset()
        assert sorted(e._server.url for e in envs) == sorted([fake.url, other.url] * 2)
        for e in envs:
            e.close()
    finally:
        other.close()


def test_unreachable_server_is_a_clear_error():
    env = AppWorldEnv("abc_1", "http://127.0.0.1:9")
    with pytest.raises(AppWorldError, match="not reachable at http://127.0.0.1:9"):
        env.reset()
    env.close()


def test_server_errors_end_the_episode_with_an_observation(fake):
    env = AppWorldEnv("abc_1", fake.url)
    env.reset()
    fake.world = None  # the server lost our world (restarted, or closed by someone else): it refuses the call
    obs, done = env.step("print(1)")
    assert done and obs.startswith("AppWorldError") and "HTTP 500" in obs


def test_task_lists_from_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("APPWORLD_ROOT", raising=False)
    data = tmp_path / "data"
    (data / "datasets").mkdir(parents=True)
    (data / "datasets" / "dev.txt").write_text("abc_1\nabc_2\nxyz_1\n")
    (data / "datasets" / "test_normal.txt").write_text("t1_1\n")
    (data / "tasks" / "abc_1" / "ground_truth").mkdir(parents=True)
    (data / "tasks" / "abc_1" / "ground_truth" / "metadata.json").write_text(json.dumps({"difficulty": 2}))
    (data / "tasks" / "abc_1" / "specs.json").write_text(json.dumps({"instruction": "do it"}))
    tasks = appworld_tasks("dev", root=tmp_path)
    assert [(t.id, t.scenario, t.difficulty) for t in tasks] == [
        ("abc_1", "abc", 2),
        ("abc_2", "abc", None),
        ("xyz_1", "xyz", None),
    ]
    assert tasks[0].instruction == "do it"
    monkeypatch.setenv("APPWORLD_ROOT", str(tmp_path))
    assert [t.id for t in appworld_tasks("test")] == ["t1_1"]  # test = test_normal
    assert appworld_root() == tmp_path
    with pytest.raises(UserError, match="no split"):
        appworld_tasks("nope")
    monkeypatch.setenv("APPWORLD_ROOT", str(tmp_path / "missing"))
    if appworld_root() is None:
        with pytest.raises(UserError, match="AppWorld data not found"):
            appworld_tasks("dev")


# ----------------------------------------------------------------------- the real package (separate venv)

needs_venv = pytest.mark.skipif(
    venv_python() is None, reason=f"AppWorld venv absent ({VENV}): bash evals/appworld/setup.sh"
)


@needs_venv
def test_real_server_starts_and_answers_without_data(tmp_path):
    (tmp_path / "data").mkdir()  # the server needs a data folder to exist; an empty one has no tasks
    with AppWorldServer(tmp_path) as server:
        assert "Welcome to AppWorld Server" in server.welcome["message"]
        env = AppWorldEnv("82e2fac_1", server.url, timeout=60)
        with pytest.raises(AppWorldError, match="initialize failed with HTTP 500"):
            env.reset()  # no task data here
        env.close()
    assert server.proc.poll() is not None


@needs_venv
def test_real_task_episode():
    root = appworld_root()
    if root is None or not (root / "data" / "tasks").is_dir():
        pytest.skip("AppWorld data not downloaded (`appworld download data` needs internet; not possible here)")
    tasks = appworld_tasks("dev")
    with AppWorldServer(root) as server:
        env = AppWorldEnv(tasks[0], server.url)
        assert "Task:" in env.reset()
        obs, done = env.step("print(apis.api_docs.show_app_descriptions())")
        assert obs and not done
        res = env.evaluate()
        assert res["total"] > 0 and not res["success"]
        env.close()
