"""The sandboxed interpreter: ``python -I sandbox_kernel.py LIMITS_JSON``, started by ``Sandbox``.

It runs in its own process, never in the pipeline's, and normally inside ``bwrap`` (bubblewrap): new
pid, network, IPC, UTS and mount namespaces (and a user namespace when the pipeline is not root), a
root file system of nothing but read-only system directories and the Python installation. At start it
imports the math libraries (so a cell starts in milliseconds), then closes itself in, one *layer* at
a time, before it reads any cell:

``filesystem``  a private mount namespace of its own with one tmpfs, capped in bytes (``disk_mb``)
                and in files (``max_files``), mounted ``nosuid,nodev,noexec`` over ``/tmp``; ``/var/tmp``
                and ``/dev/shm`` are directories inside it, the working directory is ``/tmp/work``.
                Nothing of the host is writable; the host's ``/tmp``, ``/home``, ``/root`` (but for
                the Python installation), the project and every socket file are simply not there.
``identity``    every capability dropped (bounding and ambient sets included) and, when started as
                root, a uid and gid of its own (``uid``, unique among live kernels) with no groups.
``rlimits``     address space, CPU seconds (the kernel's whole life), file size, open files, no core
                files, no new processes.
``seccomp``     a filter (libseccomp through ``pyseccomp``) that refuses what a math cell never needs:
                new processes and programs, sockets, ``ptrace`` and other processes' memory, mounts and
                namespaces, keyrings, BPF, ``perf_event_open``, ``io_uring``, kernel modules, ...
``audit_hook``  a PEP 578 hook that refuses, from Python, the same things by name, with a clearer error
                than ``EPERM``. It is defence in depth only: Python code can reach around it.
``namespaces``  not applied here but checked: the kernel's namespaces differ from the pipeline's.

``layers`` in the limits names the layers this kernel must apply. A kernel that cannot apply one of
them answers ``{"ready": false, "error": ...}`` and is never used; with ``"probe": true`` it tries
each and reports which held (``Sandbox`` does this once, to learn what the machine allows).

Protocol on private copies of fds 0 and 1 (fds 0, 1, 2 then point at ``/dev/null``, so code writing to
them cannot forge a reply): the parent sends an ASCII length line and that many bytes of UTF-8 JSON
``{"code": ...}``; the kernel answers the same way with ``{"output": ..., "error": ..., "dropped": N}``.
The first reply, ``{"ready": true, "layers": {...}}`` or ``{"ready": false, "error": ...}``, is sent
once set-up is done. Cells share one namespace, like a notebook kernel; the value of a last bare
expression is printed.
"""

from __future__ import annotations

import ast
import errno
import io
import json
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, ClassVar

_CLONE_NEWNS = 0x00020000
_CLONE_THREAD = 0x00010000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_PR_CAPBSET_DROP = 24
_PR_SET_DUMPABLE = 4
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_TIOCSTI = 0x5412
WORKDIR = "/tmp/work"
_SELF = os.path.basename(__file__)  # kernel.py inside bwrap: its own frames are left out of errors
# refused by the seccomp filter with EPERM: nothing a math cell needs
_DENIED_CALLS = (
    "execve", "execveat", "fork", "vfork",
    "socket", "socketcall",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    "mount", "umount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "fanotify_init",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "open_by_handle_at", "name_to_handle_at",
    "mknod", "mknodat", "memfd_create", "memfd_secret",
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl",
    "semget", "semop", "semtimedop", "semctl", "mq_open", "mq_timedsend", "mq_notify",
    "personality", "syslog", "vhangup", "iopl", "ioperm", "uselib", "lookup_dcookie",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
)  # fmt: skip


class _Capped(io.TextIOBase):
    """A text sink that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        s = str(s)
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self) -> str:
        return "".join(self.parts)


def _load_hook() -> Any:
    """``sandbox_hook.py`` from beside this file (``-I`` keeps this directory off ``sys.path``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_hook.py")
    spec = importlib.util.spec_from_file_location("_sandbox_hook", path)
    if spec is None or spec.loader is None:
        raise OSError(errno.ENOENT, f"no audit hook at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True), ctypes


def _call(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _status() -> dict[str, str]:
    """``/proc/self/status`` as a dict (the kernel's own view of its uids, capabilities and filters)."""
    out = {}
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _private_tmp(limits: dict[str, Any]) -> None:
    """One tmpfs of its own, capped in bytes and files, over ``/tmp``; ``/var/tmp``, ``/dev/shm`` and
    the working directory inside it. Needs ``CAP_SYS_ADMIN`` in the kernel's own namespaces (bwrap
    grants it for the set-up only; ``identity`` drops it)."""
    libc, _ = _libc()
    uid = limits.get("uid")
    _call(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _call(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    size, files = int(limits["disk_mb"]) * 1024 * 1024, int(limits["max_files"])
    opts = f"size={size},nr_inodes={files},mode=0755"
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    _call(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", flags, opts.encode()), "mount tmpfs /tmp")
    for name, target in ((".var_tmp", "/var/tmp"), (".shm", "/dev/shm")):
        inner = f"/tmp/{name}"
        os.mkdir(inner, 0o1777)
        if os.path.isdir(target):
            _call(libc.mount(inner.encode(), target.encode(), None, _MS_BIND, None), f"bind {target}")
    os.mkdir(WORKDIR, 0o700)
    os.chdir(WORKDIR)
    if uid is not None:  # made by root, then given to the kernel's own uid
        for p in ("/tmp", "/tmp/.var_tmp", "/tmp/.shm", WORKDIR):
            os.chown(p, uid, uid)
    st = os.statvfs("/tmp")
    if st.f_files > files or st.f_blocks * st.f_frsize > size:
        raise OSError(errno.EIO, f"the tmpfs over /tmp is not capped ({st.f_files} files)")


def _drop_identity(limits: dict[str, Any]) -> None:
    """Every capability gone (the bounding and ambient sets too) and, from root, a uid of its own."""
    import ctypes

    libc, _ = _libc()
    uid = limits.get("uid")
    st = _status()
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if int(st.get("CapBnd", "0"), 16):
        last = (
            int(open("/proc/sys/kernel/cap_last_cap").read())
            if os.path.exists("/proc/sys/kernel/cap_last_cap")
            else 40
        )
        for cap in range(last + 1):
            _call(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    u32 = ctypes.c_uint32

    class Header(ctypes.Structure):
        _fields_: ClassVar = [("version", u32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_: ClassVar = [("effective", u32), ("permitted", u32), ("inheritable", u32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    _call(libc.capset(ctypes.byref(header), data), "capset (drop every capability)")
    st = _status()
    held = {k: st.get(k, "?") for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    if any(v.strip("0") for v in held.values()):
        raise OSError(errno.EPERM, f"capabilities remain: {held}")
    if uid is not None:
        ids = st.get("Uid", "").split() + st.get("Gid", "").split()
        if ids != [str(uid)] * 8 or st.get("Groups", "").strip():
            raise OSError(errno.EPERM, f"the uid drop did not hold (Uid/Gid {ids})")
    elif os.geteuid() == 0 and not limits.get("userns"):
        raise OSError(errno.EPERM, "still root, and no uid to drop to")


def _seccomp() -> None:
    """Load the filter; ``pyseccomp`` was imported before the process limits (it runs ``ldconfig``)."""
    sc = sys.modules.get("pyseccomp")
    if sc is None:
        raise OSError(errno.ENOENT, "pyseccomp (or libseccomp) is not available")
    f = sc.SyscallFilter(sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in _DENIED_CALLS:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
            f.add_rule(deny, name)
    f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, _CLONE_THREAD, 0))  # threads yes, processes no
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")  # flags behind a pointer: glibc falls back to clone
    f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    # dumpable again would give the cell its own /proc/self files back (oom_score_adj among them)
    f.add_rule(deny, "prctl", sc.Arg(0, sc.EQ, _PR_SET_DUMPABLE))
    f.load()
    if _status().get("Seccomp") != "2":
        raise OSError(errno.EPERM, "the filter is not in force")


def _limit(limits: dict[str, Any]) -> None:
    mb = int(limits["memory_mb"])
    cpu = int(limits["cpu_s"])
    plan = [
        (resource.RLIMIT_AS, mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, int(limits["file_mb"]) * 1024 * 1024),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_NPROC, 0),  # root is exempt: ``identity`` drops root first
    ]
    for which, value in plan:
        resource.setrlimit(which, (value, value))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long file write raises instead of killing


def _oom_first(limits: dict[str, Any]) -> None:
    """Under memory pressure the kernel goes first, not the pipeline or the model server."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def _namespaces(limits: dict[str, Any]) -> None:
    """Checked, not applied: each namespace bwrap made differs from the pipeline's own."""
    for kind, host in dict(limits.get("host_ns", {})).items():
        mine = os.readlink(f"/proc/self/ns/{kind}")
        if mine == host:
            raise OSError(errno.EPERM, f"the {kind} namespace is the pipeline's own")


def _last_lines(text: str, n: int = 4, width: int = 300) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()][-n:]
    return "\n".join(ln if len(ln) <= width else ln[: width - 3] + "..." for ln in lines)


def run_cell(code: str, namespace: dict[str, Any], limit: int) -> dict[str, Any]:
    """Execute one cell in ``namespace``; the printed output (capped) and the error's last lines."""
    out = _Capped(limit)
    error: str | None = None
    sys.stdout = sys.stderr = out
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            expr = tree.body.pop()
            assert isinstance(expr, ast.Expr)
            last = ast.Expression(expr.value)
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<cell>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException as e:  # the cell's failure is reported; the kernel lives on
        if isinstance(e, MemoryError):
            error = "MemoryError: the cell ran out of memory"
        else:
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            cell_frames = "".join(
                ln
                for ln in tb
                if "sandbox_kernel.py" not in ln and _SELF not in ln and "sandbox_hook.py" not in ln
            )
            error = _last_lines(cell_frames)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return {"output": out.text(), "error": error, "dropped": out.dropped}


def _send(out: Any, obj: dict[str, Any]) -> None:
    # ensure_ascii: a lone surrogate in a cell's output travels as an escape, never as bad UTF-8
    data = json.dumps(obj, ensure_ascii=True).encode()
    out.write(b"%d\n" % len(data))
    out.write(data)
    out.flush()


def confine(limits: dict[str, Any]) -> dict[str, str | None]:
    """Apply the layers ``limits["layers"]`` names, in order; each maps to ``None`` (it holds) or why
    not. Without ``probe`` the first layer that fails stops the set-up (``OSError``)."""
    wanted = set(limits.get("layers", []))
    probe = bool(limits.get("probe"))
    steps: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
        ("namespaces", _namespaces),
        ("filesystem", _private_tmp),
        ("identity", _drop_identity),
        ("rlimits", _limit),
        ("seccomp", lambda _: _seccomp()),
    ]
    report: dict[str, str | None] = {}
    if "rlimits" in wanted:  # while /proc/self is still its own: after the uid drop it is root's
        steps.insert(0, ("rlimits", _oom_first))
    for name, step in steps:
        if name not in wanted:
            continue
        if report.get(name) is not None:
            continue  # an earlier part of this layer failed
        try:
            step(limits)
            report[name] = None
        except (OSError, ValueError, AttributeError) as e:
            reason = str(e) or type(e).__name__
            if not probe:
                raise OSError(f"the {name} layer cannot be applied: {reason}") from e
            report[name] = reason
    return report


def main() -> None:
    """Set up, confine, then answer cells until the input ends."""
    limits = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when its kernels stop
    inp_fd, out_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    inp = os.fdopen(inp_fd, "rb")
    out = os.fdopen(out_fd, "wb")
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        for line in limits.get("preload", []):
            exec(line, namespace)
        if "seccomp" in limits.get("layers", []):
            try:  # imported before the process limits: it looks for libseccomp with ``ldconfig``
                import pyseccomp  # noqa: F401
            except (ImportError, RuntimeError, OSError):
                pass
        report = confine(limits)
        root = os.path.realpath(os.getcwd())
        if "audit_hook" in limits.get("layers", []):
            _load_hook().install(root)
            report["audit_hook"] = None
    except Exception as e:  # set-up failed: say so, and stop
        _send(out, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    _send(out, {"ready": True, "layers": report, "workdir": root})
    limit = int(limits["output_chars"])
    while True:
        header = inp.readline()
        if not header:
            return
        request = json.loads(inp.read(int(header)))
        _send(out, run_cell(request["code"], namespace, limit))


if __name__ == "__main__":
    main()
