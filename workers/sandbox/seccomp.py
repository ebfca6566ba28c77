"""The seccomp filter bubblewrap installs just before it execs the user's command.

Everything is allowed except the system calls below, which answer EPERM: the kernel's
least-travelled and most-exploited doors, none of which a batch job needs. bwrap itself
(namespaces, mounts, pivot_root) runs before the filter; the filter then holds for the
command and everything it starts. System calls of another ABI (32-bit `int 0x80`, x32) are
not in the filter's architecture and kill the process, so the list cannot be bypassed that way.

The program is compiled with libseccomp (through `pyseccomp`, ctypes over `libseccomp.so.2`)
once per process; `bwrap --seccomp FD` reads it from a memfd.
"""
from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading

logger = logging.getLogger(__name__)

DENIED = (
    # other processes' memory and the kernel's debugging doors
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "perf_event_open", "bpf", "userfaultfd",
    # namespaces and mounts (bwrap has made them already)
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
    # the kernel keyring
    "keyctl", "add_key", "request_key",
    # the machine itself
    "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "acct", "syslog", "iopl", "ioperm", "quotactl", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "vhangup", "lookup_dcookie",
    # io_uring: a large kernel surface that seccomp cannot see into
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)  # fmt: skip

_lock = threading.Lock()
_program: list[bytes | str] = []


def program() -> bytes | str:
    """The compiled BPF program, or why there is none (once per process)."""
    with _lock:
        if not _program:
            _program.append(_compile())
        return _program[0]


def _compile() -> bytes | str:
    try:
        import pyseccomp
    except ImportError as err:  # also raised when libseccomp.so.2 is missing
        return f"seccomp: no libseccomp bindings ({err}; pip install pyseccomp, apt-get install libseccomp2)"
    try:
        rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in DENIED:
            try:
                rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
            except (RuntimeError, ValueError, OSError):  # a call this architecture does not have
                logger.debug("seccomp: %s is not a system call here", name)
        with tempfile.TemporaryFile() as out:
            rules.export_bpf(out)
            out.seek(0)
            return out.read()
    except (RuntimeError, ValueError, OSError) as err:
        return f"seccomp: libseccomp could not build the filter: {err}"


def memfd(data: bytes, name: str) -> int:
    """A file descriptor holding `data`, positioned at its start, inheritable by a child."""
    fd = os.memfd_create(name)  # close-on-exec; Popen(pass_fds=...) hands it to the one child
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd
