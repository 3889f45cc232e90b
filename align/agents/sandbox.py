"""The sandbox: each episode's agent code runs in its own process, holding the world and a persistent namespace.

Processes::

    trainer ──(unix socketpair, SEQPACKET)──► zygote          started once per trainer process with an EMPTY environment
                                                │               (`python -I`, no fds but its control socket), imports
                                                │               the world and common stdlib modules, then forks:
                                                ├─► keeper      one per episode (root): unshares the PID, network, IPC
                                                │     │         and UTS namespaces, forks the worker, waits for it,
                                                │     │         removes its jail directory
                                                │     └─► worker   PID 1 of a fresh PID namespace; talks to the trainer
                                                │                  over its own socketpair (length-prefixed JSON)

Worker set-up, in order: stdin/stdout/stderr -> /dev/null, the socket dup'ed to fd 3 and every other fd closed;
empty environment; resource limits (RLIMIT_AS memory, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC = 1 so it
cannot fork or start threads, RLIMIT_CORE 0); as root: chroot into a fresh empty directory (its only writable place)
and drop to a unique unprivileged uid/gid with no groups and no capabilities (a unique uid per worker makes
RLIMIT_NPROC exact and keeps workers from signalling each other or the trainer); without root, where the kernel allows
unprivileged user namespaces, the keeper first enters new user, mount, PID, network, IPC and UTS namespaces and the
worker chroots there, then drops every capability; no_new_privs; parent-death signal; not dumpable; last, the seccomp
allow-list (``align/agents/seccomp.py``). Everything the agent may import later is imported before the chroot (after
it, imports of new modules fail).

Per turn: the code runs with stdout/stderr captured (truncated to ``max_output_chars``); a SIGALRM after ``timeout``
seconds raises ``TimeoutError`` inside the agent's code (the episode goes on); if the worker does not answer within
``timeout + grace`` (a loop that swallows the exception, a long C call) the trainer SIGKILLs it (pidfd), the turn's
observation is the error and the episode ends (``TurnResult.dead``). The kernel then kills everything left in the
worker's PID namespace. The trainer only ever parses JSON from the worker (never pickle), with a size cap.

Levels (``LEVELS``, reported by ``sandbox_level()['level']``; docs/agents.md has the table of escape classes):
``root`` > ``userns`` (the non-root jail) > ``seccomp`` (non-root without user namespaces: no filesystem jail, the
worker's cwd is a fresh temporary directory and ``open()`` refuses other paths, which ``os.open`` bypasses) >
``python`` (no filter for this architecture).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

from align.agents import seccomp

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x04000000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
LEVELS = ("python", "seccomp", "userns", "root")
"""Sandbox levels, weakest first (``sandbox_level()['level']``; docs/agents.md lists what each one stops):
    python   Python-level guards only (no seccomp filter on this architecture)
    seccomp  + the seccomp allow-list; no filesystem jail (non-root, no user namespaces): open() guarded in Python
    userns   non-root jail: user, mount, PID, network, IPC and UTS namespaces, chroot into an empty directory,
             every capability dropped, + seccomp
    root     chroot, a unique unprivileged uid, PID/network/IPC/UTS namespaces, + seccomp"""
UID_BASE = 1_500_000  # workers (as root) get uid UID_BASE + (zygote pid % 4096) * 65536 + n % 65536: unused by any
# account, unique per live worker across zygotes (up to 65536 spawns per zygote before reuse)
MAX_REPLY_BYTES = 8 << 20
_HEADER = struct.Struct("!I")
# imported by the zygote so that the agent's `import json` etc. work after the chroot
PRELOAD = (
    "json",
    "math",
    "re",
    "random",
    "datetime",
    "_strptime",
    "collections",
    "itertools",
    "functools",
    "string",
    "statistics",
    "decimal",
    "fractions",
    "difflib",
    "textwrap",
    "copy",
    "operator",
    "time",
    "calendar",
    "traceback",
    "linecache",
    "io",
    "typing",
    "dataclasses",
    "enum",
    "heapq",
    "bisect",
    "pprint",
    "shutil",
    "tempfile",
    "encodings.idna",
    "unicodedata",
    "hashlib",
    "base64",
    "uuid",
)


@dataclass(frozen=True)
class Limits:
    """Per-worker resource limits (the worker lives for one episode)."""

    memory_mb: int = 512  # RLIMIT_AS: address space
    cpu_seconds: int = 30  # RLIMIT_CPU: CPU time of the whole episode
    file_size_mb: int = 4  # RLIMIT_FSIZE: largest file it may write
    open_files: int = 32  # RLIMIT_NOFILE
    processes: int = 1  # RLIMIT_NPROC: 1 = no fork, no threads


@dataclass
class TurnResult:
    output: str  # printed output (truncated)
    error: str | None  # "ValueError: no contact named 'Bobb'", "TimeoutError: ...", or None
    done: bool  # apis.supervisor.complete_task() was called
    db: dict | None  # the world's state after the turn (None when the worker died)
    dead: bool = False  # the worker is gone (killed on timeout, crashed, or closed)
    seconds: float = 0.0


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> bool:
    try:
        return _libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _unshare(flags: int) -> int:
    """0 on success, else errno."""
    libc = _libc()
    if libc.unshare(ctypes.c_int(flags)) == 0:
        return 0
    return ctypes.get_errno() or -1


# ------------------------------------------------------------------------------------------------- framing


def _send(sock: socket.socket, obj) -> None:
    data = json.dumps(obj, default=str).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            raise TimeoutError from None
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket, deadline: float | None = None, limit: int = MAX_REPLY_BYTES):
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if n > limit:
        raise ValueError(f"message of {n} bytes exceeds the {limit}-byte limit")
    return json.loads(_recv_exact(sock, n, deadline))


# ---------------------------------------------------------------------------------------- the trainer's side


class _Zygote:
    """The clean parent of every worker (one per trainer process)."""

    def __init__(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = str(Path(__file__).resolve().parents[2])
        boot = (
            "import sys; sys.path.insert(0, sys.argv[2]); "
            "from align.agents.sandbox import _zygote_main; _zygote_main(int(sys.argv[1]))"
        )
        debug = os.environ.get("ALIGN_SANDBOX_DEBUG") == "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", boot, str(child.fileno()), root],
            env={},
            cwd="/",
            pass_fds=(child.fileno(),),
            close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None if debug else subprocess.DEVNULL,
        )
        child.close()
        self.sock, self.owner, self.lock = parent, os.getpid(), threading.Lock()
        self.sock.settimeout(30)
        hello = self.sock.recv(1 << 16)
        if not hello:
            raise RuntimeError("the sandbox zygote failed to start (set ALIGN_SANDBOX_DEBUG=1 to see why)")
        self.info = json.loads(hello)

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def spawn(self, request: dict) -> tuple[socket.socket, dict]:
        with self.lock:
            self.sock.send(json.dumps(request).encode())
            msg, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
        if not msg:
            raise RuntimeError("the sandbox zygote died")
        info = json.loads(msg)
        if not fds:
            raise RuntimeError(f"the sandbox could not start a worker: {info.get('error')}")
        return socket.socket(fileno=fds[0]), info

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ZYGOTE: _Zygote | None = None
_ZLOCK = threading.Lock()
_ATEXIT: list = []


def _zygote() -> _Zygote:
    global _ZYGOTE
    with _ZLOCK:
        if _ZYGOTE is None or not _ZYGOTE.alive():
            if _ZYGOTE is not None and _ZYGOTE.owner == os.getpid():
                _ZYGOTE.close()
            _ZYGOTE = _Zygote()
            if not _ATEXIT:
                atexit.register(shutdown)
                _ATEXIT.append(True)
        return _ZYGOTE


def shutdown() -> None:
    """Stop the zygote (and with it every worker still running). The next Sandbox starts a new one."""
    global _ZYGOTE
    with _ZLOCK:
        if _ZYGOTE is not None and _ZYGOTE.owner == os.getpid():
            _ZYGOTE.close()
        _ZYGOTE = None


def _kill(pid: int, pidfd: int | None) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, OSError):
        pass


def _finalize(sock: socket.socket, pid: int, pidfd: int | None) -> None:
    _kill(pid, pidfd)
    if pidfd is not None:
        try:
            os.close(pidfd)
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass


class Sandbox:
    """One worker process holding a ``World(db)`` and the agent's namespace. ``run(code, timeout)`` per turn."""

    def __init__(
        self,
        db: dict,
        limits: Limits | None = None,
        max_output_chars: int = 2000,
        privileged: bool | None = None,
        start_timeout: float = 10.0,
        max_level: str | None = None,
    ):
        """``privileged=False`` (or ``max_level``, one of ``LEVELS``) caps the level tried, for tests and comparisons:
        by default the strongest this machine allows."""
        self.limits = limits or Limits()
        if max_level is not None and max_level not in LEVELS:
            raise ValueError(f"max_level must be one of {LEVELS}, not {max_level!r}")
        top = LEVELS.index(max_level or "root")
        started = time.monotonic()
        for attempt in (1, 2):  # a zygote that died (killed, OOM) is replaced once
            zyg = _zygote()
            root = zyg.info["euid"] == 0
            request = {
                "op": "spawn",
                "privileged": (root if privileged is None else bool(privileged and root))
                and top >= LEVELS.index("root"),
                "userns": top >= LEVELS.index("userns"),
                "seccomp": top >= LEVELS.index("seccomp"),
                "limits": asdict(self.limits),
                "max_output_chars": int(max_output_chars),
            }
            try:
                self._sock, info = zyg.spawn(request)
                break
            except (OSError, RuntimeError, ValueError):
                if attempt == 2:
                    raise
                shutdown()
        self.pid, self.jail = int(info["pid"]), info.get("jail")
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        self._finalizer = weakref.finalize(self, _finalize, self._sock, self.pid, self._pidfd)
        self.alive = True
        try:
            ready = _recv(self._sock, time.monotonic() + start_timeout)
            _send(self._sock, {"op": "init", "db": db})
        except (TimeoutError, EOFError, OSError, ValueError) as e:
            self.close()
            raise RuntimeError(f"the sandbox worker did not start: {type(e).__name__}: {e}") from None
        self.levels = {**info.get("levels", {}), **ready["levels"]}
        self.startup_seconds = time.monotonic() - started

    def run(self, code: str, timeout: float = 5.0, grace: float | None = None) -> TurnResult:
        if not self.alive:
            return TurnResult("", "SandboxError: the sandbox is closed", False, None, dead=True)
        grace = max(0.5, 0.2 * timeout) if grace is None else grace
        started = time.monotonic()
        try:
            self._sock.settimeout(timeout + grace)
            _send(self._sock, {"op": "exec", "code": code, "timeout": float(timeout)})
            reply = _recv(self._sock, started + timeout + grace)
            err = reply.get("error")
            result = TurnResult(
                str(reply.get("out", "")), None if err is None else str(err), bool(reply.get("done")), reply.get("db")
            )
            if not isinstance(result.db, dict):
                result.db = None
        except TimeoutError:
            self.close()
            result = TurnResult(
                "", f"TimeoutError: the turn ran past {timeout:g} s; its process was stopped", False, None, dead=True
            )
        except (EOFError, OSError, ValueError, AttributeError) as e:
            self.close()
            why = "it exited" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
            result = TurnResult("", f"SandboxError: the agent's process died ({why})", False, None, dead=True)
        result.seconds = time.monotonic() - started
        return result

    def close(self) -> None:
        """Kill the worker (its keeper removes its directory; the PID namespace takes any leftovers with it)."""
        self.alive = False
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_LEVEL: dict | None = None


def sandbox_level() -> dict:
    """Which protections are active on this machine (measured by starting a probe worker once)."""
    global _LEVEL
    if _LEVEL is None:
        with Sandbox({}) as sb:
            levels = dict(sb.levels)
            startup = sb.startup_seconds
        _LEVEL = {**levels, "probe_startup_ms": round(1000 * startup, 1)}
        _LEVEL["strong"] = bool(levels.get("chroot") and levels.get("uid_dropped") and levels.get("network") == "netns")
    return dict(_LEVEL)


def check_level(minimum: str, key: str = "agent.sandbox_min_level") -> str:
    """The level in force, or a UserError (one line) when it is below ``minimum`` (one of ``LEVELS``)."""
    from align.errors import UserError

    have = sandbox_level()["level"]
    if LEVELS.index(have) < LEVELS.index(minimum):
        why = {
            "python": "no seccomp filter for this architecture",
            "seccomp": "not root and no unprivileged user namespaces (kernel.unprivileged_userns_clone, "
            "user.max_user_namespaces)",
            "userns": "not root",
        }[have]
        raise UserError(f"{key}: {minimum!r} is required, this machine gives {have!r} ({why}); see docs/agents.md")
    return have


# ------------------------------------------------------------------------------------------ the zygote's side


def _zygote_main(fd: int) -> None:
    import importlib
    import shutil
    import tempfile

    trainer, zygote, base = os.getppid(), os.getpid(), None

    def leave() -> None:
        """Remove our folder and exit. The trainer's death ends the control socket and, a moment later, sends the
        parent-death SIGTERM, whose handler may interrupt a leave() in progress: it then runs leave() to the end."""
        for _ in range(100 if base is not None else 0):
            shutil.rmtree(base, ignore_errors=True)
            if not os.path.exists(base):
                break
            time.sleep(0.01)  # a keeper was removing its jail at the same time, or a dying worker still writing to it
        os._exit(0)

    def stop(*_):
        # the parent-death signal also fires when the trainer THREAD that started us exits: stop only if the
        # trainer process itself is gone (we were re-parented); EOF on the control socket covers the rest
        if os.getppid() != trainer:
            if os.getpid() == zygote:
                leave()
            raise SystemExit(0)  # a keeper, before it set its own handler

    signal.signal(signal.SIGTERM, stop)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    ctl = socket.socket(fileno=fd)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import align.agents.world  # noqa: F401 - the worker's payload, imported once here

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel
    base = tempfile.mkdtemp(prefix=f"align-sandbox-{os.getpid()}-")
    os.chmod(base, 0o711)
    for stale in Path(tempfile.gettempdir()).glob("align-sandbox-*-*"):  # left by a zygote that was SIGKILLed
        try:
            pid = int(stale.name.split("-")[2])
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError):
            pass
    euid = os.geteuid()
    ctl.send(json.dumps({"pid": os.getpid(), "euid": euid}).encode())
    count = 0
    try:
        while True:
            data = ctl.recv(1 << 20)
            if not data:
                break
            req = json.loads(data)
            if req.get("op") != "spawn":
                continue
            count += 1
            reply, sock = _spawn(req, ctl, base, count, euid)
            try:
                socket.send_fds(ctl, [json.dumps(reply).encode()], [sock.fileno()] if sock else [])
            finally:
                if sock is not None:
                    sock.close()
    finally:
        leave()


def _spawn(req: dict, ctl: socket.socket, base: str, count: int, euid: int):
    jail = os.path.join(base, f"w{count}")
    privileged = bool(req.get("privileged")) and euid == 0
    uid = UID_BASE + (os.getpid() % 4096) * 65536 + count % 65536 if privileged else None
    a = b = None
    try:
        os.mkdir(jail, 0o700)
        if uid is not None:
            try:
                os.chown(jail, uid, uid)
            except OSError:  # root without CAP_CHOWN (a restricted container): no uid drop either
                uid = None
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the keeper
            try:
                ctl.close()
                a.close()
                os.close(r)
                _keeper(b, w, jail, uid, req)
            finally:
                os._exit(1)
        b.close()
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        if not data:
            a.close()
            return {"error": "the keeper process failed"}, None
        return {**json.loads(data), "jail": jail}, a
    except Exception as e:  # noqa: BLE001 - reported to the trainer
        for s in (a, b):
            if s is not None:
                s.close()
        return {"error": f"{type(e).__name__}: {e}"}, None


def _keeper(b: socket.socket, w: int, jail: str, uid: int | None, req: dict) -> None:
    import shutil

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    levels = {"namespaces": []}
    if uid is not None:
        flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if _unshare(flags) == 0:
            levels["namespaces"] = ["pid", "net", "ipc", "uts"]
        elif _unshare(CLONE_NEWNET) == 0:
            levels["namespaces"] = ["net"]
    elif req.get("userns", True) and _enter_user_namespace():
        levels["namespaces"] = ["user", "mount", "pid", "net", "ipc", "uts"]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    wpid = os.fork()
    if wpid == 0:
        try:
            os.close(w)
            _worker(b, jail, uid, req, levels)
        finally:
            os._exit(1)
    b.close()
    os.write(w, json.dumps({"pid": wpid, "levels": levels}).encode())
    os.close(w)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(wpid, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        os.waitpid(wpid, 0)
    except ChildProcessError:
        pass
    shutil.rmtree(jail, ignore_errors=True)
    os._exit(0)


def _enter_user_namespace() -> bool:
    """Without root: new user, mount, PID, network, IPC and UTS namespaces, our uid and gid mapped to themselves (so
    files keep their owner), with every capability inside them (the worker uses CAP_SYS_CHROOT, then drops all)."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if _unshare(flags) != 0:
        return False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False  # (the worker then finds it cannot chroot and reports the lower level)
    return True


def _drop_capabilities() -> bool:
    """Empty the bounding set and the effective, permitted and inheritable sets (capset); True if none is left."""
    libc = _libc()
    for cap in range(64):
        libc.prctl(ctypes.c_int(PR_CAPBSET_DROP), ctypes.c_ulong(cap), ctypes.c_ulong(0), 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        return False
    libc.capget(header, data)
    return not any(data)


def _limit(which: int, value: int, hard: int | None = None) -> None:
    import resource

    try:
        resource.setrlimit(which, (value, value if hard is None else hard))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(which)
        if hard == resource.RLIM_INFINITY or value <= hard:
            resource.setrlimit(which, (value, hard))


def _worker(b: socket.socket, jail: str, uid: int | None, req: dict, levels: dict) -> None:
    import resource

    fd = b.detach()
    null = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(null, i)
    if fd != 3:
        os.dup2(fd, 3)
    os.closerange(4, 1 << 16)  # /dev/null's own fd and anything else inherited
    os.environ.clear()
    levels = {
        **levels,
        "process": "separate process per episode",
        "environment": "empty",
        "file_descriptors": "only its socket (and /dev/null as stdio)",
    }
    lim = req["limits"]
    was_root = os.geteuid() == 0  # (a user namespace below would hide it)
    in_userns = "user" in levels["namespaces"]
    network = "netns" if "net" in levels["namespaces"] else None
    if uid is None and not in_userns and _unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        levels["namespaces"] = ["user", "net"]
    if "net" in levels["namespaces"]:
        network = "netns (user namespace)" if uid is None else "netns"
    _limit(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    _limit(resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 1)  # SIGXCPU (an error), then SIGKILL
    _limit(resource.RLIMIT_FSIZE, lim["file_size_mb"] << 20)
    _limit(resource.RLIMIT_NOFILE, lim["open_files"])
    _limit(resource.RLIMIT_NPROC, lim["processes"])
    _limit(resource.RLIMIT_CORE, 0)
    chrooted = dropped = caps_dropped = False
    if uid is not None or in_userns:  # root, or a user namespace's root-like capabilities: chroot
        try:
            os.chroot(jail)
            os.chdir("/")
            chrooted = True
        except OSError:
            pass
    if uid is not None:  # root: a unique unprivileged uid (each step degrades if not permitted)
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            dropped = caps_dropped = True
        except OSError:
            pass
    elif in_userns:
        caps_dropped = _drop_capabilities()
    if not chrooted:
        os.chdir(jail)
        _guard_open(jail)
    if was_root and not dropped:  # root is exempt from RLIMIT_NPROC: refuse process creation in Python too
        _block_processes()
        levels["processes"] = "fork/exec refused in Python and by seccomp (root ignores RLIMIT_NPROC)"
    else:
        levels["processes"] = f"RLIMIT_NPROC {lim['processes']}" + (
            " (own uid)" if dropped else " (the user's processes count)"
        )
    if chrooted and dropped:
        filesystem = "chroot into a fresh empty directory, unique unprivileged uid, no capabilities"
    elif chrooted:
        filesystem = "chroot into a fresh empty directory inside a user and mount namespace, " + (
            "no capabilities" if caps_dropped else "CAPABILITIES KEPT"
        )
    else:
        filesystem = "cwd is a fresh temporary directory; open() refuses other paths (weak: os.open bypasses)"
    levels.update(chroot=chrooted, uid_dropped=dropped, capabilities_dropped=caps_dropped, filesystem=filesystem)
    levels["no_new_privs"] = _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change (which clears it)
    levels["dumpable"] = not _prctl(PR_SET_DUMPABLE, 0)  # /proc/self/mem then belongs to root, not to our uid
    failed = "seccomp not requested"
    if req.get("seccomp", True):
        failed = seccomp.install(allow_clone=lim["processes"] > 1)
    levels["seccomp"] = failed is None
    if failed is not None:
        levels["seccomp_missing"] = failed
    if network is None:
        if failed is None:
            network = "socket() refused by seccomp"
        else:
            _block_sockets()
            network = "socket module blocked (weak)"
    levels["uid"] = os.getuid()
    levels["network"] = network
    levels["pid_namespace"] = "pid" in levels["namespaces"]
    levels["limits_applied"] = lim
    if failed is not None:
        levels["level"] = "python"
    elif chrooted and dropped and "pid" in levels["namespaces"] and "net" in levels["namespaces"]:
        levels["level"] = "root"
    elif chrooted and caps_dropped and in_userns:
        levels["level"] = "userns"
    else:
        levels["level"] = "seccomp"
    _serve(socket.socket(fileno=3), levels, int(req.get("max_output_chars", 2000)))


def _block_sockets() -> None:
    import _socket

    def refuse(*_a, **_k):
        raise PermissionError("network access is disabled in the sandbox")

    for mod in (socket, _socket):
        for name in ("socket", "create_connection", "socketpair", "fromfd", "create_server", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, refuse)


def _block_processes() -> None:
    import _posixsubprocess

    def refuse(*_a, **_k):
        raise PermissionError("starting processes is disabled in the sandbox")

    for name in (
        "fork",
        "forkpty",
        "system",
        "popen",
        "posix_spawn",
        "posix_spawnp",
        "execv",
        "execve",
        "execvp",
        "execvpe",
        "execl",
        "execle",
        "execlp",
        "execlpe",
        "spawnv",
        "spawnve",
        "spawnl",
        "spawnle",
    ):
        if hasattr(os, name):
            setattr(os, name, refuse)
    _posixsubprocess.fork_exec = refuse


def _guard_open(jail: str) -> None:
    import builtins
    import io

    real_open, root = io.open, os.path.realpath(jail)

    def guarded(file, *args, **kwargs):
        if isinstance(file, int):
            return real_open(file, *args, **kwargs)
        path = os.path.realpath(os.fspath(file))
        if path != root and not path.startswith(root + os.sep):
            raise PermissionError(f"the sandbox may only open files in its own directory, not {os.fspath(file)!r}")
        return real_open(file, *args, **kwargs)

    builtins.open = io.open = guarded


class _Capped:
    """A text stream that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int):
        self.limit, self.parts, self.size, self.dropped = limit, [], 0, 0

    def write(self, s) -> int:
        s = str(s)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n...[{self.dropped} more characters truncated]"
        return text


class _TurnTimeout(Exception):
    pass


def _format_error(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    if isinstance(e, _TurnTimeout):
        return f"TimeoutError: {e}"
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _serve(sock: socket.socket, levels: dict, max_output: int) -> None:
    import builtins

    from align.agents.world import World

    me = os.getpid()
    state = {"in_agent": False, "timeout": 0.0}

    def on_alarm(*_):
        if state["in_agent"]:
            raise _TurnTimeout(f"the turn took longer than {state['timeout']:g} s")

    def on_xcpu(*_):
        raise _TurnTimeout("the episode used up its CPU time")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGXCPU, on_xcpu)
    _send(sock, {"ready": True, "levels": levels})
    try:
        init = _recv(sock, limit=64 << 20)
    except (EOFError, OSError, ValueError):
        os._exit(0)
    world = World(init.get("db") or {})
    world.db.setdefault("supervisor", {"completed": False, "answer": None})
    ns = {"__name__": "__main__", "__builtins__": builtins, "apis": world.apis}
    while True:
        try:
            msg = _recv(sock, limit=16 << 20)
        except (EOFError, OSError, ValueError):
            os._exit(0)
        if msg.get("op") != "exec":
            continue
        out = _Capped(max_output)
        err = None
        state["timeout"] = float(msg.get("timeout", 5.0))
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            code = compile(str(msg.get("code", "")), "<agent>", "exec")
            state["in_agent"] = True
            signal.setitimer(signal.ITIMER_REAL, max(state["timeout"], 1e-3))
            try:
                exec(code, ns)
            finally:
                state["in_agent"] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as e:  # noqa: BLE001 - everything the agent does is reported, SystemExit included
            if os.getpid() != me:
                os._exit(0)
            err = _format_error(e)
        finally:
            sys.stdout, sys.stderr = saved
        if os.getpid() != me:  # a process the agent forked never answers
            os._exit(0)
        try:
            data = json.dumps(
                {"out": out.getvalue(), "error": err, "done": world.completed, "db": world.db}, default=str
            )
        except BaseException as e:  # noqa: BLE001 - a state the agent broke
            data = json.dumps(
                {
                    "out": out.getvalue(),
                    "error": err or f"SandboxError: state not serialisable ({type(e).__name__})",
                    "done": False,
                    "db": None,
                }
            )
        raw = data.encode()
        sock.sendall(_HEADER.pack(len(raw)) + raw)
