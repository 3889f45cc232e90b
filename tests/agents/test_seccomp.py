"""The seccomp filter's program (align/agents/seccomp.py): syscall numbers against libseccomp's resolver where the
library is installed, and the BPF program's decisions run on sample calls (a tiny interpreter of the instructions
it uses), without installing anything in the test process."""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

import pytest

from align.agents import seccomp
from align.agents.seccomp import ALLOWED, ARCHES, ENOSYS, EPERM, RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS, program


def _libseccomp():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_syscall_numbers_match_libseccomp(arch):
    lib = _libseccomp()
    if lib is None:
        pytest.skip("libseccomp is not installed (the filter does not need it; this is only the oracle)")
    resolve = lib.seccomp_syscall_resolve_name_arch
    resolve.argtypes, resolve.restype = [ctypes.c_uint32, ctypes.c_char_p], ctypes.c_int
    audit, table = ARCHES[arch]
    wrong = {n: (nr, resolve(audit, n.encode())) for n, nr in table.items() if resolve(audit, n.encode()) != nr}
    assert not wrong


def run(prog, nr, args=(0,) * 6, arch_token=None, machine="x86_64"):
    """The filter's answer for one call (the classic BPF subset the program uses)."""
    data = struct.pack("<iIQ6Q", nr, arch_token or ARCHES[machine][0], 0, *args)
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x45:
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


@pytest.mark.parametrize("machine", sorted(ARCHES))
def test_program_decisions(machine):
    _, nr = ARCHES[machine]
    prog = program(own_pid=77, allow_clone=False, machine=machine)
    assert len(prog) < 4096
    for name in ALLOWED:
        if name in nr:
            assert run(prog, nr[name], machine=machine) == RET_ALLOW, name
    assert run(prog, 9999, machine=machine) == RET_ERRNO | EPERM  # anything not listed
    assert run(prog, nr["kill"], (77, 9, 0, 0, 0, 0), machine=machine) == RET_ALLOW  # itself
    assert run(prog, nr["kill"], (1, 9, 0, 0, 0, 0), machine=machine) == RET_ERRNO | EPERM  # anyone else
    assert run(prog, nr["kill"], (2**64 - 1, 9, 0, 0, 0, 0), machine=machine) == RET_ERRNO | EPERM  # kill(-1)
    assert run(prog, nr["tgkill"], (77, 77, 14, 0, 0, 0), machine=machine) == RET_ALLOW
    assert run(prog, nr["ioctl"], (3, 0x5401, 0, 0, 0, 0), machine=machine) == RET_ALLOW  # TCGETS
    assert run(prog, nr["ioctl"], (0, 0x5412, 0, 0, 0, 0), machine=machine) == RET_ERRNO | EPERM  # TIOCSTI
    assert run(prog, nr["clone"], (0x11, 0, 0, 0, 0, 0), machine=machine) == RET_ERRNO | EPERM  # no processes
    assert run(prog, nr["clone3"], machine=machine) == RET_ERRNO | ENOSYS
    assert run(prog, nr["read"], arch_token=0x40000003, machine=machine) == RET_KILL_PROCESS  # i386 ABI
    assert run(prog, 0x40000000 | nr["read"], machine=machine) == RET_ERRNO | EPERM  # x32 numbering
    forks = program(own_pid=77, allow_clone=True, machine=machine)
    assert run(forks, nr["clone"], (0x01200011, 0, 0, 0, 0, 0), machine=machine) == RET_ALLOW  # fork()'s flags
    assert run(forks, nr["clone"], (0x10000011, 0, 0, 0, 0, 0), machine=machine) == RET_ERRNO | EPERM  # NEWUSER


def test_unknown_architecture_is_reported_not_guessed(monkeypatch):
    monkeypatch.setattr(seccomp.platform, "machine", lambda: "riscv64")
    assert seccomp.arch() is None and "riscv64" in seccomp.install()
