"""The escape probe of tests/agents/test_sandbox_escapes.py, importable without pytest: the non-root test runs it
as uid 65534 under an interpreter that may have the standard library only."""

from __future__ import annotations

import json
import os
import platform

from align.agents.sandbox import Limits, Sandbox

# numbers of the calls the filter must refuse (x86_64, aarch64): the kernel's tables, as libseccomp resolves them
DENIED = {
    "x86_64": {
        "unshare": 272, "setns": 308, "io_uring_setup": 425, "keyctl": 250, "bpf": 321, "ptrace": 101,
        "mount": 165, "personality": 135, "userfaultfd": 323, "socket": 41, "execve": 59, "chroot": 161,
        "prctl": 157, "process_vm_readv": 310,
    },
    "aarch64": {
        "unshare": 97, "setns": 268, "io_uring_setup": 425, "keyctl": 219, "bpf": 280, "ptrace": 117,
        "mount": 40, "personality": 92, "userfaultfd": 282, "socket": 198, "execve": 221, "chroot": 51,
        "prctl": 167, "process_vm_readv": 270,
    },
}  # fmt: skip
NR = DENIED.get(platform.machine())
SMALL = Limits(memory_mb=256, cpu_seconds=10, file_size_mb=1, open_files=32, processes=1)
EPERM = 1

# agent code: every escape attempt, errno per class (0 = it worked); SIBLING and SECRET are filled in
PROBE = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = __NR__
def sc(name, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
    return 0 if r >= 0 else ctypes.get_errno()
buf = ctypes.create_string_buffer(256)
res = {
    "unshare(CLONE_NEWUSER)": sc("unshare", 0x10000000),
    "setns": sc("setns", 0, 0),
    "io_uring_setup": sc("io_uring_setup", 1, ctypes.addressof(buf)),
    "keyctl": sc("keyctl", 0, -3, 1),  # KEYCTL_GET_KEYRING_ID of the session keyring, creating it
    "bpf": sc("bpf", 0, ctypes.addressof(buf), 72),  # BPF_MAP_CREATE with a zeroed attribute block
    "ptrace(sibling)": sc("ptrace", 16, __SIBLING__, 0, 0),  # PTRACE_ATTACH
    "mount": sc("mount", ctypes.addressof(ctypes.create_string_buffer(b"none")),
                ctypes.addressof(ctypes.create_string_buffer(b"/")),
                ctypes.addressof(ctypes.create_string_buffer(b"tmpfs")), 0, 0),
    "personality": sc("personality", 0x0040000),  # ADDR_NO_RANDOMIZE
    "userfaultfd": sc("userfaultfd", 1),  # UFFD_USER_MODE_ONLY: allowed to unprivileged users by the kernel
    "socket": sc("socket", 2, 1, 0),
    "execve": sc("execve", ctypes.addressof(ctypes.create_string_buffer(b"/bin/sh")), 0, 0),
    "process_vm_readv(sibling)": sc("process_vm_readv", __SIBLING__, 0, 0, 0, 0, 0),
    "prctl(PR_SET_DUMPABLE)": sc("prctl", 4, 1, 0, 0, 0),
}
try:
    os.kill(__SIBLING__, 0)
    res["kill(sibling)"] = 0
except OSError as e:
    res["kill(sibling)"] = e.errno
def read_raw(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        data = os.read(fd, 100)
        os.close(fd)
        return data.decode(errors="replace")
    except OSError as e:
        return e.errno
res["os.open(outside)"] = read_raw(__SECRET__)
fopen = libc.fopen
fopen.restype = ctypes.c_void_p
f = fopen(__SECRET__.encode(), b"r")
res["ctypes fopen(outside)"] = "opened" if f else ctypes.get_errno()
try:  # raw os.open: the Python-level open() guard of the weak levels must not be what stops it
    fd = os.open("/proc/self/mem", os.O_RDWR)
    os.pwrite(fd, b"x", id(res) + 64)
    os.close(fd)
    res["/proc/self/mem write"] = 0
except OSError as e:
    res["/proc/self/mem write"] = e.errno
print(json.dumps(res))
"""

SYSCALL_CLASSES = [
    "unshare(CLONE_NEWUSER)",
    "setns",
    "io_uring_setup",
    "keyctl",
    "bpf",
    "ptrace(sibling)",
    "mount",
    "personality",
    "userfaultfd",
    "socket",
    "execve",
    "process_vm_readv(sibling)",
    "prctl(PR_SET_DUMPABLE)",
    "kill(sibling)",
]


def probe(secret: str, max_level: str | None = None) -> tuple[str, dict]:
    """(the level in force, {escape class: errno or what leaked}) from a worker, with a sibling worker alive."""
    with Sandbox({}, SMALL, max_level=max_level) as sibling, Sandbox({}, SMALL, max_level=max_level) as sb:
        code = PROBE.replace("__NR__", repr(NR)).replace("__SIBLING__", str(sibling.pid))
        r = sb.run(code.replace("__SECRET__", repr(secret)), timeout=10)
        assert r.error is None, r.error
        assert sibling.run("print(1 + 1)", 5).output.strip() == "2"  # the sibling is untouched
        return sb.levels["level"], json.loads(r.output)


def check(level: str, res: dict, secret_text: str) -> None:
    for name in SYSCALL_CLASSES:
        assert res[name] == EPERM, f"{level}: {name} gave errno {res[name]} (0 = it worked)"
    if level in ("root", "userns"):  # a jail: nothing outside it exists, whatever the API
        for name in ("os.open(outside)", "ctypes fopen(outside)", "/proc/self/mem write"):
            assert res[name] != 0 and res[name] != "opened" and secret_text not in str(res[name]), (level, name, res)
    elif os.geteuid() != 0:  # no filesystem jail (docs/agents.md): /proc/self/mem is still closed (not dumpable: the
        assert res["/proc/self/mem write"] != 0, res  # file belongs to root), unless the worker really is root
