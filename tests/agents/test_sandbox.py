"""Sandbox escapes (issue 8, item 6): runaway loops, memory bombs, fork bombs, network access, the trainer's files,
environment variables and file descriptors, writes outside the jail. Each is contained, reported as an observation,
and the next turn / episode works. Limits are small (~1 s) to keep the file fast."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from align.agents import sandbox
from align.agents.env import WorldEnv
from align.agents.sandbox import Limits, Sandbox, sandbox_level
from align.agents.world import make_tasks
from align.paths import REPO_ROOT

ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(
    not ROOT, reason="chroot, uid drop and namespaces need root (non-root degrades: see docs/agents.md)"
)
SMALL = Limits(memory_mb=192, cpu_seconds=5, file_size_mb=1, open_files=32, processes=1)


@pytest.fixture(scope="module")
def task():
    return next(t for t in make_tasks() if t.scenario == "send_message")


def gone(pid: int, wait: float = 3.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def gold_episode_works(task) -> None:
    env = WorldEnv(task, turn_timeout=2)
    env.reset()
    obs, done = env.step(task.solution)
    assert done and env.evaluate()["success"], obs
    env.close()


@root_only
def test_levels_on_this_machine():
    lv = sandbox_level()
    assert lv["strong"] and lv["chroot"] and lv["uid_dropped"] and lv["network"] == "netns" and lv["pid_namespace"]
    assert lv["environment"] == "empty" and lv["no_new_privs"] and lv["seccomp"] and lv["level"] == "root"
    assert lv["probe_startup_ms"] < 2000


def test_infinite_loop_soft_timeout_keeps_the_episode(task):
    with Sandbox(task.db, SMALL) as sb:
        assert sb.run("x = 41", 1).error is None
        t0 = time.monotonic()
        r = sb.run("while True:\n    pass", timeout=0.5, grace=10)  # (a long grace: a loaded machine may be slow)
        assert 0.4 < time.monotonic() - t0 < 10
        assert r.error.startswith("TimeoutError") and not r.dead and r.db is not None
        r = sb.run("print(x + 1)", 1)  # same process, namespace kept
        assert r.output.strip() == "42" and r.error is None


def test_runaway_turn_is_killed_and_the_next_episode_is_fine(task):
    env = WorldEnv(task, turn_timeout=0.5, limits=SMALL)
    env.reset()
    pid, jail = env._sandbox.pid, env._sandbox.jail
    env.step(f'apis.messages.send("{task.db["contacts"][0]["name"]}", "first")')
    t0 = time.monotonic()
    # swallows the in-process TimeoutError, so only the hard kill stops it
    obs, done = env.step(
        "while True:\n    try:\n        x = sum(range(10**5))\n    except BaseException:\n        pass"
    )
    assert time.monotonic() - t0 < 3.0
    assert done and obs.startswith("TimeoutError") and "stopped" in obs
    assert gone(pid)
    assert jail is None or _wait_removed(jail)
    res = env.evaluate()  # the state before the killed turn is kept: one message sent
    assert res["total"] == 2 and not res["success"]
    env.close()
    gold_episode_works(task)


def _wait_removed(path: str, wait: float = 3.0) -> bool:
    deadline = time.monotonic() + wait
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not Path(path).exists()


def test_memory_bomb(task):
    with Sandbox(task.db, SMALL) as sb:
        r = sb.run("x = bytearray(1 << 34)", 2)
        assert r.error == "MemoryError" and not r.dead
        r = sb.run("a = []\nwhile True:\n    a.append(bytearray(10**7))", 2)
        assert r.error == "MemoryError" or r.dead
        if not r.dead:
            r = sb.run("del a\nprint('alive')", 2)
            assert r.output.strip() == "alive"
    gold_episode_works(task)


def test_fork_bomb_and_threads(task):
    with Sandbox(task.db, SMALL) as sb:
        r = sb.run("import os\nwhile True:\n    os.fork()", 2)  # clone: EPERM (seccomp), else EAGAIN (RLIMIT_NPROC)
        assert r.error.startswith(("PermissionError", "BlockingIOError")) and not r.dead
        r = sb.run("import threading\nthreading.Thread(target=print).start()", 2)
        assert "can't start new thread" in r.error
        r = sb.run("import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo hi'])", 2)
        assert r.error is not None and "hi" not in r.output
        r = sb.run("print('still here')", 2)
        assert r.output.strip() == "still here"
    gold_episode_works(task)


def test_no_network(task):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    try:
        with Sandbox(task.db, SMALL) as sb:
            r = sb.run(code, 2)
            assert r.error is not None and "connected" not in r.output
            r = sb.run("import socket\nsocket.getaddrinfo('pypi.org', 443)", 2)
            assert r.error is not None
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing ever reached the listening socket
            server.accept()
    finally:
        server.close()


@root_only
def test_trainer_files_are_unreachable(task, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("trainer data")
    readme = REPO_ROOT / "README.md"
    assert readme.exists()
    with Sandbox(task.db, SMALL) as sb:
        for path in (str(readme), str(secret), "/etc/passwd", "/proc/1/environ"):
            r = sb.run(f"print(open({path!r}).read())", 2)
            assert r.error is not None and "trainer data" not in r.output, path
            r = sb.run(f"import os\nprint(os.open({path!r}, os.O_RDONLY))", 2)
            assert r.error is not None, path
        r = sb.run("import os\nprint(os.listdir('/'), os.listdir('..'), os.getuid())", 2)
        assert r.output.startswith("[] []") and int(r.output.split()[-1]) >= sandbox.UID_BASE
        r = sb.run("import os\nos.chroot('/')", 2)  # no way back out
        assert r.error.startswith("PermissionError")
        r = sb.run(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)", 2)  # the trainer is not visible
        assert r.error is not None
        r = sb.run("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('ok')", 2)
    assert os.getpid() > 0  # we are alive


def test_environment_variables_do_not_leak(task, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-should-not-leak")
    sandbox.shutdown()  # the next sandbox starts a fresh zygote with the key set in this process
    try:
        with Sandbox(task.db, SMALL) as sb:
            r = sb.run("import os\nprint(dict(os.environ))\nprint(os.environ.get('OPENAI_API_KEY'))", 2)
            assert r.output.split("\n")[:2] == ["{}", "None"]
            zygote = sandbox._ZYGOTE.proc.pid
        environ = Path(f"/proc/{zygote}/environ").read_bytes()
        cmdline = Path(f"/proc/{zygote}/cmdline").read_bytes()
        assert b"sk-test" not in environ and b"sk-test" not in cmdline and environ == b""
    finally:
        sandbox.shutdown()


def test_no_inherited_file_descriptors(task, tmp_path):
    f = open(tmp_path / "open-in-trainer.txt", "w")  # an fd the trainer holds
    try:
        with Sandbox(task.db, SMALL) as sb:
            r = sb.run(
                "import os\nfds = []\nfor i in range(256):\n    try:\n        os.fstat(i)\n        fds.append(i)\n"
                "    except OSError:\n        pass\nprint(fds)",
                2,
            )
            assert r.output.strip() == "[0, 1, 2, 3]"
    finally:
        f.close()


def test_writes_are_confined(task, tmp_path):
    outside = tmp_path / "escape.txt"
    with Sandbox(task.db, SMALL) as sb:
        jail = sb.jail
        r = sb.run(f"open({str(outside)!r}, 'w').write('x')", 2)
        assert r.error is not None
        r = sb.run("open('../../../escape.txt', 'w').write('x')", 2)  # lands inside the jail (as root) or is refused
        r = sb.run("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", 2)
        assert r.output.strip() == "ok"
        r = sb.run("open('big.bin', 'wb').write(b'0' * (4 << 20))", 2)  # RLIMIT_FSIZE 1 MB
        assert r.error is not None and r.error.startswith("OSError") and "File too large" in r.error
    assert not outside.exists()
    assert not Path("/escape.txt").exists() and not (REPO_ROOT / "escape.txt").exists()
    if jail:
        assert _wait_removed(jail)


def test_output_is_truncated_and_errors_are_one_line(task):
    with Sandbox(task.db, SMALL, max_output_chars=100) as sb:
        r = sb.run("print('y' * 10000)", 2)
        assert len(r.output) < 200 and "truncated" in r.output
        r = sb.run("def f():\n    f()\nf()", 2)
        assert r.error.startswith("RecursionError")
        r = sb.run("import sys\nsys.exit(3)", 2)
        assert r.error == "SystemExit: 3" and not r.dead
        r = sb.run("import os\nos._exit(0)", 2)  # the worker ends itself: reported, episode over
        assert r.dead and r.error.startswith("SandboxError")


def test_many_episodes_leave_nothing_behind(task):
    pids, jails = [], []
    for i in range(20):
        env = WorldEnv(task, turn_timeout=1, limits=SMALL)
        env.reset()
        pids.append(env._sandbox.pid)
        jails.append(env._sandbox.jail)
        env.step("print(1)")
        if i % 2:
            env.close()
        else:
            del env  # garbage collection closes it
    assert all(gone(p) for p in pids)
    assert all(_wait_removed(j) for j in jails if j)


@pytest.mark.parametrize("max_level", ["userns", "seccomp"])
def test_degraded_mode_still_contains(task, tmp_path, max_level):
    """The code paths used without root: a user-namespace jail (chroot inside it), or, where user namespaces are off,
    no filesystem jail (the open() guard and the seccomp filter); what remains must still hold."""
    secret = tmp_path / "secret.txt"
    secret.write_text("trainer data")
    with Sandbox(task.db, SMALL, privileged=False, max_level=max_level) as sb:
        assert sb.levels["level"] == max_level and not sb.levels["uid_dropped"] and sb.levels["seccomp"]
        assert sb.levels["chroot"] == (max_level == "userns")
        r = sb.run(f"print(open({str(secret)!r}).read())", 2)
        assert r.error.startswith("FileNotFoundError" if max_level == "userns" else "PermissionError")
        r = sb.run("import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))", 2)
        assert r.error is not None
        r = sb.run("import os\nprint(dict(os.environ))", 2)
        assert r.output.strip() == "{}"
        r = sb.run("while True: pass", 0.3, grace=10)
        assert r.error.startswith("TimeoutError") and not r.dead
        r = sb.run("open('here.txt', 'w').write('ok')\nprint(open('here.txt').read())", 2)
        assert r.output.strip() == "ok"
    gold_episode_works(task)


PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from align.agents.sandbox import Limits, Sandbox, sandbox_level
lv = sandbox_level()
out = {"level": lv, "runs": {}}
with Sandbox({}, Limits(memory_mb=192, cpu_seconds=5)) as sb:
    for name, code in {"fork": "import os\nos.fork()", "open": "open(sys.argv[1] + '/README.md')",
                       "net": "import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))",
                       "env": "import os\nprint(len(os.environ))", "loop": "while True: pass"}.items():
        r = sb.run(code.replace("sys.argv[1]", repr(sys.argv[1])), 0.5)
        out["runs"][name] = [r.output.strip(), r.error, r.dead]
print(json.dumps(out))
"""


@root_only
def test_root_without_capabilities_degrades_gracefully():
    """Root in a restricted container (no capabilities: no chroot, no namespaces as root, no uid change): the
    non-root paths."""
    import json
    import shutil
    import subprocess
    import sys

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    proc = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", PROBE, str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    lv, runs = out["level"], out["runs"]
    assert not lv["strong"] and not lv["uid_dropped"] and lv["seccomp"]
    # no chroot or uid change as root: the user-namespace jail where the kernel allows one, else no filesystem jail
    assert lv["level"] == ("userns" if lv["chroot"] else "seccomp"), lv
    assert runs["fork"][1].startswith("PermissionError")
    assert runs["open"][1].startswith(("FileNotFoundError", "PermissionError"))
    assert runs["net"][1] is not None
    assert runs["env"][0] == "0"
    assert runs["loop"][1].startswith("TimeoutError")


def test_cpu_time_limit_per_episode(task):
    with Sandbox(task.db, Limits(memory_mb=192, cpu_seconds=1)) as sb:
        r = sb.run("while True: pass", 30)  # SIGXCPU at the soft limit: an error, the episode goes on
        assert r.error == "TimeoutError: the episode used up its CPU time" and not r.dead and r.seconds < 20
        r = sb.run("while True: pass", 30)  # the hard limit (soft + 1 s): SIGKILL
        assert r.dead and r.error.startswith("SandboxError") and r.seconds < 20
    gold_episode_works(task)


TRAINER = r"""
import json, struct, sys, threading, time
sys.path.insert(0, sys.argv[1])
from align.agents.sandbox import Sandbox, _zygote
box = {}
th = threading.Thread(target=lambda: box.setdefault("sb", Sandbox({})))  # started from a thread that then exits
th.start(); th.join()
sbs = [box["sb"]] + [Sandbox({}) for _ in range(2)]
loop = "while True:\n    try:\n        sum(range(10**5))\n    except BaseException:\n        pass"
busy = json.dumps({"op": "exec", "timeout": 100, "code": loop}).encode()
sbs[1]._sock.sendall(struct.pack("!I", len(busy)) + busy)  # a worker stuck in a loop when the trainer dies
assert sbs[2].run("print(1)", 2).output == "1\n"  # the zygote outlived the thread that started it
print(json.dumps({"pids": [_zygote().proc.pid] + [s.pid for s in sbs], "jails": [s.jail for s in sbs]}), flush=True)
time.sleep(60)
"""


def _run_then_kill(script: str) -> dict:
    """Run a trainer-like ``script``, read the JSON line it prints, SIGKILL it; returns what it printed."""
    import json
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(REPO_ROOT)],
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"},
    )
    try:
        return json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_a_killed_trainer_leaves_nothing_behind():
    info = _run_then_kill(TRAINER)
    assert all(gone(p, wait=10) for p in info["pids"])  # zygote, idle workers, the busy worker
    assert all(_wait_removed(j, wait=5) for j in info["jails"] if j)
    assert all(_wait_removed(os.path.dirname(j), wait=5) for j in info["jails"] if j)  # the zygote's folder too


CLEANING = r"""
import json, socket, sys, time
sys.path.insert(0, sys.argv[1])
from align.agents.sandbox import Sandbox, _zygote
sb = Sandbox({})
out = sb.run("for i in range(3000):\n    open(f'f{i}', 'w').close()\nprint('written')", 30).output
_zygote().sock.shutdown(socket.SHUT_WR)  # EOF: the zygote starts removing its folder (3,000 files take a while)
print(json.dumps({"out": out, "jail": sb.jail}), flush=True)
time.sleep(60)
"""


def test_a_trainer_killed_while_the_zygote_cleans_up_leaves_nothing_behind():
    # the trainer's death ends the control socket (the zygote starts its clean-up) and, a moment later, sends the
    # parent-death SIGTERM: that used to cut the clean-up short (SystemExit), leaving the zygote's folder behind,
    # in 3 of 7 kills of the agent trainer in align/bench/kill_soak.py. Here the clean-up is slow and already running.
    info = _run_then_kill(CLEANING)
    assert info["out"] == "written\n"
    assert _wait_removed(os.path.dirname(info["jail"]), wait=10)
