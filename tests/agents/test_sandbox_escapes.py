"""Escape classes the seccomp filter and the non-root jail close (issue 20), at every level this machine gives, as root
and as an unprivileged user (uid 65534, in a subprocess) in the same run.

Each probe is agent code that makes the raw system call through ctypes (what a model-written exploit would do) and
reports the errno: the seccomp filter answers EPERM before the kernel looks at the arguments, so EPERM is asserted
even where the kernel would also refuse (e.g. mount after the uid drop), and a call that succeeds fails the test.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from align.agents.sandbox import LEVELS
from align.paths import REPO_ROOT
from tests.agents.escape_probe import EPERM, NR, SYSCALL_CLASSES, check, probe

pytestmark = pytest.mark.skipif(NR is None, reason=f"no syscall table for {platform.machine()} in this test")


@pytest.fixture
def open_dir():
    """A folder every uid can read (pytest's tmp_path sits in a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="align-escape-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def secret(open_dir):
    path = open_dir / "secret.txt"
    path.write_text("TRAINER-SECRET-42")
    os.chmod(path, 0o644)  # readable by any uid: only the jail may keep it out
    return str(path)


@pytest.mark.parametrize("max_level", ["root", "userns", "seccomp"])
def test_escape_classes_are_closed_at_every_level(secret, max_level):
    level, res = probe(secret, max_level)
    if os.geteuid() != 0 and max_level == "root":
        assert level != "root"
    if max_level == "root" and os.geteuid() == 0:
        assert level == "root", level
    check(level, res, "TRAINER-SECRET-42")


def test_without_the_filter_the_classes_are_open(secret):
    """The same probe at the 'python' level (no seccomp filter): the syscall classes the filter closes are reachable
    there, so the test above does measure the filter (the kernel alone refuses few of them)."""
    level, res = probe(secret, "python")
    assert level == "python"
    worked = [n for n in SYSCALL_CLASSES if res[n] != EPERM]
    assert {"io_uring_setup", "personality", "keyctl"} <= set(worked), res


NONROOT = r"""
import ctypes, json, os, sys
from align.agents.sandbox import sandbox_level
sys.path.insert(0, sys.argv[1])
from escape_probe import probe
out = {}
for lv in ("root", "seccomp"):
    out[lv] = probe(sys.argv[2], lv)
out["sandbox_level"] = sandbox_level()
pid = os.fork()  # can this uid make a user namespace at all? (kernel settings differ between machines)
if pid == 0:
    os._exit(0 if ctypes.CDLL(None).unshare(0x10000000) == 0 else 1)
out["userns_possible"] = os.waitpid(pid, 0)[1] == 0
print(json.dumps(out))
"""


def _drop():
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root (the suite runs as root in CI)")
def test_escape_classes_as_an_unprivileged_user(open_dir, secret):
    """The whole probe as uid 65534: a copy of the package in a folder that uid can read, the system interpreter
    (the sandbox needs the standard library only) or this one where that uid can run it."""
    code = open_dir / "code"
    shutil.copytree(REPO_ROOT / "align", code / "align", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("escape_probe.py"), code / "escape_probe.py")
    for d in code.rglob("*"):
        os.chmod(d, 0o755 if d.is_dir() else 0o644)
    os.chmod(code, 0o755)
    env = {"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    last = None
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            p = subprocess.run(
                [python, "-c", NONROOT, str(code), secret],
                preexec_fn=_drop,
                env=env,
                cwd="/tmp",
                capture_output=True,
                text=True,
                timeout=120,
            )
        except OSError as e:  # this interpreter is not reachable by that uid
            last = e
            continue
        if p.returncode == 0:
            break
        pytest.fail(f"non-root probe failed ({python}): {p.stderr[-2000:]}")
    else:
        pytest.skip(f"no Python interpreter that uid 65534 can run ({last})")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    lv = out["sandbox_level"]
    assert lv["uid"] != 0 and not lv["uid_dropped"]
    top, res = out["root"]
    assert top == lv["level"] and top in LEVELS
    assert top == ("userns" if out["userns_possible"] else "seccomp"), lv
    check(top, res, "TRAINER-SECRET-42")
    level, res = out["seccomp"]
    assert level == "seccomp"
    check(level, res, "TRAINER-SECRET-42")
