"""The Linux calls the sandbox's forked child confines itself with, through ctypes (Python 3.11 has no
os.unshare or os.mount, and no binding for Landlock or seccomp): namespaces and mounts, prctl, a Landlock
ruleset and a seccomp filter. Everything here is prepared in the parent; the child only calls `apply`,
`mount` and `check` (no allocation or import after fork). `kat_core.tasks.sandbox` says when each is used.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# Linux constants (sched.h, mount.h, prctl.h); Python 3.11 has no os.unshare / os.mount.
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new syscalls share one table)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
# landlock access rights (linux/landlock.h): what a read-only tree, a plain file and the workdir may do
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_TRUNCATE = 1 << 14

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
LIBC.syscall.restype = ctypes.c_long
# prctl is variadic: fix full-width arguments, or the kernel may see garbage in the unused ones (EINVAL)
LIBC.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is packed
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class Landlock:
    """A Landlock ruleset, prepared in the parent (no allocation in the forked child) and applied there:
    read and execute in `read_dirs`, read `read_files`, read and write `rw_files`, anything in `workdir`;
    no TCP (ABI >= 4); no signals or abstract unix sockets beyond the sandbox (ABI >= 6)."""

    _abi: int | None = None

    @classmethod
    def prepare(cls, read_dirs: list[str], read_files: list[str], rw_files: list[str],
                workdir: str) -> Landlock | None:
        if cls._abi is None:
            word = ctypes.c_long
            cls._abi = max(0, int(LIBC.syscall(word(SYS_LANDLOCK_CREATE_RULESET), None, word(0), word(1))))
        return cls(cls._abi, read_dirs, read_files, rw_files, workdir) if cls._abi else None

    def __init__(self, abi: int, read_dirs: list[str], read_files: list[str], rw_files: list[str],
                 workdir: str) -> None:
        fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
        fs |= (1 << 13 if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
        self.attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
        self.attr_size = 8 if abi < 4 else 16 if abi < 6 else 24  # the fields this kernel knows
        truncate = LL_TRUNCATE if abi >= 3 else 0
        read_tree = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
        self.rules = (
            [(d.encode(), _PathBeneath(read_tree, -1)) for d in read_dirs]
            + [(f.encode(), _PathBeneath(LL_EXECUTE | LL_READ_FILE, -1)) for f in read_files]
            + [(f.encode(), _PathBeneath(LL_READ_FILE | LL_WRITE_FILE | truncate, -1)) for f in rw_files]
            + [(workdir.encode(), _PathBeneath(fs, -1))]
        )

    def apply(self) -> None:
        word = ctypes.c_long
        ruleset = LIBC.syscall(word(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(self.attr),
                                word(self.attr_size), word(0))
        check(0 if ruleset >= 0 else -1, "landlock_create_ruleset")
        for path, rule in self.rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this machine (/lib64, say): nothing to allow
            rule.parent_fd = fd
            rc = LIBC.syscall(word(SYS_LANDLOCK_ADD_RULE), word(ruleset), word(LANDLOCK_RULE_PATH_BENEATH),
                               ctypes.byref(rule), word(0))
            os.close(fd)
            check(0 if rc == 0 else -1, "landlock_add_rule")
        check(0 if LIBC.syscall(word(SYS_LANDLOCK_RESTRICT_SELF), word(ruleset), word(0)) == 0 else -1,
               "landlock_restrict_self")
        os.close(ruleset)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class Seccomp:
    """A seccomp filter: socket() of any family but AF_UNIX, io_uring_setup, any syscall of another ABI (i386
    through int 0x80, x32), and the calls below fail with EACCES; everything else is allowed.

    The calls below make kernel state that outlives the run or its process group: keyrings (a uid's user
    keyring persists after its last process exits), SysV shared memory, semaphores and message queues, and
    POSIX message queues (all persist until removed), and setsid/setpgid (a process that leaves the run's
    process group survives the final killpg; only the per-run uid's kill(-1) would still reach it). Such
    state is memory that survives the verdict (a run can leave gigabytes of shared memory behind) and a
    channel from one run to the next: the judge's calls tell a candidate which of its answers passed (the
    next call comes only after an assert held), so a candidate that remembers them across runs learns the
    expected values without solving the task. Benchmark code needs none of these calls."""

    # (AUDIT_ARCH, __NR_socket, the calls above) per machine; io_uring_setup is 425 on both
    _ARCH = {
        "x86_64": (0xC000003E, 41, (
            109, 112,  # setpgid, setsid
            248, 249, 250,  # add_key, request_key, keyctl
            29, 30, 31, 67,  # shmget, shmat, shmctl, shmdt
            64, 65, 66, 220,  # semget, semop, semctl, semtimedop
            68, 69, 70, 71,  # msgget, msgsnd, msgrcv, msgctl
            240, 241, 242, 243, 244, 245,  # mq_open .. mq_getsetattr
        )),
        "aarch64": (0xC00000B7, 198, (
            154, 157,  # setpgid, setsid
            217, 218, 219,  # add_key, request_key, keyctl
            *range(180, 198),  # mq_open .. mq_getsetattr, msgget .. msgsnd, semget .. semop, shmget .. shmdt
        )),
    }

    def __init__(self, audit_arch: int, nr_socket: int, denied: tuple[int, ...] = ()) -> None:
        ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
        allow, deny = 0x7FFF0000, 0x00050000 | errno.EACCES  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
        program = [
            (ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, deny),  # seccomp_data.arch
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, deny),  # .nr; x32 numbers
        ]
        for nr in (425, *denied):  # io_uring_setup, then the calls above
            program += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
        program += [
            (jeq, 0, 3, nr_socket), (ld, 0, 0, 16), (jeq, 1, 0, 1), (ret, 0, 0, deny),  # .args[0] == AF_UNIX?
            (ret, 0, 0, allow),
        ]
        self.filters = (_SockFilter * len(program))(*[_SockFilter(*insn) for insn in program])
        self.prog = _SockFprog(len(program), self.filters)

    @classmethod
    def for_this_machine(cls) -> Seccomp | None:
        arch = cls._ARCH.get(platform.machine())
        return cls(*arch) if arch else None

    def apply(self) -> None:
        check(LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self.prog), 0, 0), "seccomp")


SECCOMP = Seccomp.for_this_machine()


def mount(source: bytes | None, target: str, fstype: bytes | None, flags: int,
           data: bytes | None = None) -> None:
    check(LIBC.mount(source, target.encode(), fstype, flags, data), f"mount {target}")


def check(rc: int, what: str) -> None:
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def write_file(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)
