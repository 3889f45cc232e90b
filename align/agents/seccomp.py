"""The sandbox worker's seccomp filter: an allow-list of system calls, as a classic BPF program built with the
standard library (no libseccomp binding is needed; where libseccomp is installed, a test checks our syscall numbers
against its resolver).

Installed by ``install`` as the worker's last set-up step (after the chroot, uid change and no_new_privs), right
before the first line of agent code runs. Every system call not on the list fails with EPERM; a call from another
architecture's ABI (i386 on x86_64) kills the process. The list: what ``strace -f`` of the workers shows for every
gold episode of the built-in world and the sandbox tests (docs/agents.md), and what agent code may do with the
preloaded standard library inside its jail (files and folders, memory, time and sleep, randomness, its own ids and
limits), plus:

    kill, tkill, tgkill   allowed only with the worker's own pid as the target (``signal.raise_signal``)
    ioctl                 allowed except TIOCSTI and TIOCLINUX (typing into a terminal)
    clone                 allowed only when ``Limits.processes`` > 1, and never with a namespace flag
    clone3                ENOSYS (its flags sit in memory a filter cannot read; libc falls back to clone)

Left out on purpose (EPERM), among others: socket, connect, bind (no network at any level); execve, execveat, fork,
vfork; unshare, setns, clone with CLONE_NEW*; mount, umount2, pivot_root, chroot; ptrace, process_vm_readv/writev;
io_uring_setup/enter/register; keyctl, add_key, request_key; bpf; perf_event_open; personality; userfaultfd; prctl;
setuid and friends; module, reboot, swap, time-setting and kexec calls.
"""

from __future__ import annotations

import ctypes
import platform
import struct

# per architecture: (AUDIT_ARCH_*, {name: number}); numbers from the kernel's syscall tables
ARCHES = {
    "x86_64": (
        0xC000003E,
        {
            "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7, "lseek": 8,
            "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
            "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21,
            "pipe": 22, "select": 23, "sched_yield": 24, "mremap": 25, "msync": 26, "mincore": 27, "madvise": 28,
            "dup": 32, "dup2": 33, "nanosleep": 35, "getitimer": 36, "alarm": 37, "setitimer": 38, "getpid": 39,
            "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48, "getsockname": 51,
            "getpeername": 52, "getsockopt": 55, "clone": 56, "exit": 60, "wait4": 61, "kill": 62, "uname": 63,
            "fcntl": 72, "flock": 73, "fsync": 74, "fdatasync": 75, "truncate": 76, "ftruncate": 77, "getcwd": 79,
            "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "unlink": 87,
            "readlink": 89, "chmod": 90, "fchmod": 91, "umask": 95, "gettimeofday": 96, "getrlimit": 97,
            "getrusage": 98, "sysinfo": 99, "times": 100, "getuid": 102, "getgid": 104, "geteuid": 107,
            "getegid": 108, "getppid": 110, "getpgrp": 111, "getgroups": 115, "getresuid": 118, "getresgid": 120,
            "getpgid": 121, "getsid": 124, "rt_sigpending": 127, "rt_sigtimedwait": 128, "rt_sigsuspend": 130,
            "sigaltstack": 131, "statfs": 137, "fstatfs": 138, "arch_prctl": 158, "gettid": 186, "tkill": 200,
            "time": 201, "futex": 202, "sched_getaffinity": 204, "getdents64": 217, "set_tid_address": 218,
            "restart_syscall": 219, "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
            "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233, "tgkill": 234, "waitid": 247, "openat": 257,
            "mkdirat": 258, "newfstatat": 262, "unlinkat": 263, "renameat": 264, "readlinkat": 267, "fchmodat": 268,
            "faccessat": 269, "pselect6": 270, "ppoll": 271, "set_robust_list": 273, "get_robust_list": 274,
            "utimensat": 280, "epoll_pwait": 281, "epoll_create1": 291, "dup3": 292, "pipe2": 293, "prlimit64": 302,
            "getcpu": 309, "renameat2": 316, "getrandom": 318, "statx": 332, "rseq": 334, "clone3": 435,
            "close_range": 436, "faccessat2": 439,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "getcwd": 17, "epoll_create1": 20, "epoll_ctl": 21, "epoll_pwait": 22, "dup": 23, "dup3": 24, "fcntl": 25,
            "ioctl": 29, "flock": 32, "mkdirat": 34, "unlinkat": 35, "renameat": 38, "statfs": 43, "fstatfs": 44,
            "truncate": 45, "ftruncate": 46, "faccessat": 48, "chdir": 49, "fchdir": 50, "fchmod": 52,
            "fchmodat": 53, "openat": 56, "close": 57, "pipe2": 59, "getdents64": 61, "lseek": 62, "read": 63,
            "write": 64, "readv": 65, "writev": 66, "pread64": 67, "pwrite64": 68, "pselect6": 72, "ppoll": 73,
            "readlinkat": 78, "newfstatat": 79, "fstat": 80, "fsync": 82, "fdatasync": 83, "utimensat": 88,
            "exit": 93, "exit_group": 94, "waitid": 95, "set_tid_address": 96, "futex": 98, "set_robust_list": 99,
            "get_robust_list": 100, "nanosleep": 101, "getitimer": 102, "setitimer": 103, "clock_gettime": 113,
            "clock_getres": 114, "clock_nanosleep": 115, "sched_getaffinity": 123, "sched_yield": 124,
            "restart_syscall": 128, "kill": 129, "tkill": 130, "tgkill": 131, "sigaltstack": 132,
            "rt_sigsuspend": 133, "rt_sigaction": 134, "rt_sigprocmask": 135, "rt_sigpending": 136,
            "rt_sigtimedwait": 137, "rt_sigreturn": 139, "getresuid": 148, "getresgid": 150, "times": 153,
            "getpgid": 155, "getsid": 156, "getgroups": 158, "uname": 160, "getrlimit": 163, "getrusage": 165,
            "umask": 166, "getcpu": 168, "gettimeofday": 169, "getpid": 172, "getppid": 173, "getuid": 174,
            "geteuid": 175, "getgid": 176, "getegid": 177, "gettid": 178, "sysinfo": 179, "getsockname": 204,
            "getpeername": 205, "sendto": 206, "recvfrom": 207, "getsockopt": 209, "shutdown": 210, "sendmsg": 211,
            "recvmsg": 212, "brk": 214, "munmap": 215, "mremap": 216, "clone": 220, "mmap": 222, "mprotect": 226,
            "msync": 227, "mincore": 232, "madvise": 233, "wait4": 260, "prlimit64": 261, "renameat2": 276,
            "getrandom": 278, "statx": 291, "rseq": 293, "clone3": 435, "close_range": 436, "faccessat2": 439,
        },
    ),
}  # fmt: skip

SPECIAL = ("kill", "tkill", "tgkill", "ioctl", "clone", "clone3")
"""Calls the filter allows only with some arguments (see the module docstring)."""
ALLOWED = tuple(sorted({n for _, table in ARCHES.values() for n in table} - set(SPECIAL)))
"""Calls the filter allows whatever their arguments (those of them that the machine's architecture has)."""

TIOCSTI, TIOCLINUX = 0x5412, 0x541C
CLONE_NS_FLAGS = 0x00000080 | 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
"""CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET."""

_LD_ABS, _JEQ, _JSET, _RET = 0x20, 0x15, 0x45, 0x06
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
EPERM, ENOSYS = 1, 38
_NR, _ARCH = 0, 4


def _arg(i: int) -> int:
    """Offset of the low 32 bits of argument ``i`` in struct seccomp_data (little-endian)."""
    return 16 + 8 * i


def arch() -> str | None:
    """The machine's architecture if the filter knows its syscall table, else None (no filter: reported)."""
    m = platform.machine()
    return m if m in ARCHES else None


def program(own_pid: int, allow_clone: bool, machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions."""
    audit, table = ARCHES[machine or arch()]
    deny = RET_ERRNO | EPERM
    p = [(_LD_ABS, 0, 0, _ARCH), (_JEQ, 1, 0, audit), (_RET, 0, 0, RET_KILL_PROCESS), (_LD_ABS, 0, 0, _NR)]
    for name in ("kill", "tkill", "tgkill"):  # target = our own pid only
        p += [(_JEQ, 0, 4, table[name]), (_LD_ABS, 0, 0, _arg(0)), (_JEQ, 0, 1, own_pid)]
        p += [(_RET, 0, 0, RET_ALLOW), (_RET, 0, 0, deny)]
    p += [(_JEQ, 0, 5, table["ioctl"]), (_LD_ABS, 0, 0, _arg(1)), (_JEQ, 2, 0, TIOCSTI), (_JEQ, 1, 0, TIOCLINUX)]
    p += [(_RET, 0, 0, RET_ALLOW), (_RET, 0, 0, deny)]
    if allow_clone:
        p += [(_JEQ, 0, 4, table["clone"]), (_LD_ABS, 0, 0, _arg(0)), (_JSET, 1, 0, CLONE_NS_FLAGS)]
        p += [(_RET, 0, 0, RET_ALLOW), (_RET, 0, 0, deny)]
    p += [(_JEQ, 0, 1, table["clone3"]), (_RET, 0, 0, RET_ERRNO | ENOSYS)]
    for name in ALLOWED:
        if name in table:
            p += [(_JEQ, 0, 1, table[name]), (_RET, 0, 0, RET_ALLOW)]
    return p + [(_RET, 0, 0, deny)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


def install(allow_clone: bool = False) -> str | None:
    """Install the filter on this (single-threaded) process; None on success, else why not (the level reports it)."""
    import os

    if arch() is None:
        return f"no syscall table for {platform.machine()}"
    code = b"".join(struct.pack("HBBI", *ins) for ins in program(os.getpid(), allow_clone))
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _Fprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return f"no_new_privs: errno {ctypes.get_errno()}"
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        return f"prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}"
    return None
