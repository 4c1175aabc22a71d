"""The sandboxed interpreter: ``python -I stages/sandbox_kernel.py LIMITS_JSON``, started by ``Sandbox``.

It runs in its own process (and process group), never in the pipeline's. At start it imports the math
libraries (so a cell starts in milliseconds), then closes itself in, in this order:

1. as root: a private network namespace (no interfaces but loopback, so no network), then the uid and
   gid of ``nobody`` with no supplementary groups (the parent's files and ``/proc/<pid>/environ`` are no
   longer readable, and no signal can reach the parent). Where the Python installation lies under a
   directory others cannot enter (a pyenv under ``/root``), a private mount namespace first shows the
   installation at its own path and hides the rest of that directory (``_reveal``); if even that is not
   allowed, the kernel stays root, and says so;
2. resource limits: address space, CPU seconds (the kernel's whole life), file size, no core files, no
   new processes (``RLIMIT_NPROC = 0``: ``fork`` fails with EAGAIN for a non-root uid);
3. an audit hook (PEP 578) that refuses, from Python: starting processes, sockets, signals to other
   processes, ``ctypes`` calls, changing directory, opening directories, writing or deleting outside
   the working directory, and reading other processes' ``/proc`` entries; calls that raise no audit
   event (``os.mkfifo``, ``os.pidfd_open``, ``_posixsubprocess``) are removed. Hooks cannot be removed
   once added. They are defence in depth on top
   of the OS limits above, which are the boundary; where the pipeline does not run as root (no uid
   drop, no network namespace) the hook is what stops sockets, so run untrusted models in a container
   if they may be hostile.

Protocol on private copies of fds 0 and 1 (fds 0, 1, 2 then point at ``/dev/null``, so code writing to
them cannot forge a reply): the parent sends an ASCII length line and that many bytes of UTF-8 JSON
``{"code": ...}``; the kernel answers the same way with ``{"output": ..., "error": ..., "dropped": N}``.
The first reply, ``{"ready": true}`` or ``{"ready": false, "error": ...}``, is sent once set-up is done.
Cells share one namespace, like a notebook kernel; the value of a last bare expression is printed.
"""

from __future__ import annotations

import ast
import io
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import traceback
from typing import Any

_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {
    "os.remove": 1,
    "os.rename": 2,
    "os.replace": 2,
    "os.rmdir": 1,
    "os.mkdir": 1,
    "os.chmod": 1,
    "os.chown": 1,
    "os.link": 2,
    "os.symlink": 2,
    "os.truncate": 1,
    "os.utime": 1,
    "shutil.rmtree": 1,
    "shutil.copyfile": 2,
    "shutil.copytree": 2,
    "shutil.move": 2,
}
_REFUSED = {
    "os.fork": "starting processes",
    "os.forkpty": "starting processes",
    "os.system": "starting processes",
    "os.exec": "starting processes",
    "os.posix_spawn": "starting processes",
    "os.spawn": "starting processes",
    "os.startfile": "starting processes",
    "subprocess.Popen": "starting processes",
    "pty.spawn": "starting processes",
    "socket.__new__": "network access",
    "socket.connect": "network access",
    "socket.bind": "network access",
    "socket.getaddrinfo": "network access",
    "socket.gethostbyname": "network access",
    "urllib.Request": "network access",
    "ctypes.dlopen": "ctypes",
    "ctypes.dlsym": "ctypes",
    "ctypes.call_function": "ctypes",
    "ctypes.cdata": "ctypes",
    "ctypes.addressof": "ctypes",
    "os.setuid": "changing user",
    "os.setreuid": "changing user",
    "sys.addaudithook": "audit hooks",
    "os.kill": "signals",
    "os.killpg": "signals",
    "signal.pthread_kill": "signals",
    "os.add_dll_directory": "ctypes",
    "os.chdir": "changing the working directory",
    "os.chroot": "changing the root directory",
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
}


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


def _inside(path: Any, root: str) -> bool:
    if isinstance(path, int):
        return True
    try:
        p = os.fsdecode(path)
    except TypeError:
        return False
    full = os.path.realpath(os.path.join(root, p))
    return full == root or full.startswith(root + os.sep)


def _other_proc(path: Any) -> bool:
    if isinstance(path, int):
        return False
    try:
        p = os.path.realpath(os.fsdecode(path))
    except TypeError:
        return False
    if not p.startswith("/proc/"):
        return False
    head = p.split("/")[2]
    return head not in ("self", "thread-self", str(os.getpid())) and head.isdigit()


def _refuse_dir_outside(path: Any, root: str) -> bool:
    """A directory outside the working directory opened as a descriptor (a ``dir_fd`` for escaping)."""
    if isinstance(path, int) or _inside(path, root):
        return False
    try:
        return os.path.isdir(os.fsdecode(path))
    except (TypeError, ValueError):
        return False


def _install_hook(root: str) -> None:
    me = os.getpid()
    local = threading.local()  # per thread: another thread's events are never skipped

    def hook(event: str, args: tuple[Any, ...]) -> None:
        what = _REFUSED.get(event)
        if what is not None:
            if event == "os.kill" and args and args[0] in (me, 0):
                return  # a signal to itself is allowed (it only hurts this kernel)
            raise PermissionError(f"sandbox: {what} is not allowed ({event})")
        if getattr(local, "busy", False):  # the checks below raise events of their own
            return
        local.busy = True
        try:
            if event == "open":
                path, mode, flags = ([*list(args), None, None, None])[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
                )
                if writing and not _inside(path, root):
                    raise PermissionError(f"sandbox: writing outside the working directory ({path})")
                if _other_proc(path):
                    raise PermissionError(f"sandbox: reading another process's /proc entry ({path})")
                if isinstance(flags, int) and _refuse_dir_outside(path, root):
                    raise PermissionError(
                        f"sandbox: opening a directory outside the working directory ({path})"
                    )
            elif event in _PATH_EVENTS:
                for p in args[: _PATH_EVENTS[event]]:
                    if not _inside(p, root):
                        raise PermissionError(f"sandbox: changing files outside the working directory ({p})")
            elif event == "sqlite3.connect" and args and args[0] != ":memory:" and not _inside(args[0], root):
                raise PermissionError(f"sandbox: a database outside the working directory ({args[0]})")
            elif event == "os.listdir" and args and _other_proc(args[0]):
                raise PermissionError("sandbox: listing another process's /proc entry")
        finally:
            local.busy = False

    sys.addaudithook(hook)
    # calls that raise no audit event: gone from the modules the cell can reach
    for module, names in (
        (os, ("mkfifo", "mknod", "pidfd_open", "setxattr", "removexattr")),
        (signal, ("pidfd_send_signal",)),
    ):
        for name in names:
            if hasattr(module, name):
                delattr(module, name)
    sys.modules["_posixsubprocess"] = None  # type: ignore[assignment]
    sys.modules["_posixshmem"] = None  # type: ignore[assignment]


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True), ctypes


def _check(ret: int, what: str) -> None:
    if ret != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def _reveal(unreadable: list[str]) -> None:
    """In a private mount namespace, make the Python installation readable to ``nobody`` without
    changing any path: for each directory ``A`` that others cannot enter (``/root``), the entry under it
    that leads to Python (``/root/.pyenv``) is bind-mounted aside, a fresh empty tmpfs (mode 0755) is
    mounted over ``A`` (hiding the rest of it: keys, tokens, caches), and the entry is mounted back
    at its own path. The pipeline's own view of the files is untouched."""
    libc, _ = _libc()
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    done: set[tuple[str, str]] = set()
    for entry in unreadable:
        p = os.path.realpath(entry)
        parts = p.split(os.sep)
        for i in range(2, len(parts)):
            closed = os.sep.join(parts[:i]) or os.sep
            if not os.stat(closed).st_mode & 0o001:
                child = os.sep.join(parts[: i + 1])
                if (closed, child) not in done:
                    done.add((closed, child))
                    stash = tempfile.mkdtemp(prefix="pipeline-reveal-")
                    _check(libc.mount(child.encode(), stash.encode(), None, _MS_BIND | _MS_REC, None), "bind")
                    _check(libc.mount(b"tmpfs", closed.encode(), b"tmpfs", 0, b"mode=0755,size=1m"), "tmpfs")
                    os.makedirs(child, exist_ok=True)
                    _check(libc.mount(stash.encode(), child.encode(), None, _MS_BIND | _MS_REC, None), "bind")
                    _check(libc.umount2(stash.encode(), _MNT_DETACH), "umount")
                    os.rmdir(stash)
                break


def _confine(limits: dict[str, Any], root: str) -> list[str]:
    """Network namespace and uid drop (as root), then resource limits. Returns what could not be done."""
    missing: list[str] = []
    if os.geteuid() == 0:
        try:
            libc, ctypes = _libc()
            if libc.unshare(_CLONE_NEWNET) != 0:
                missing.append(f"network namespace ({os.strerror(ctypes.get_errno())})")
        except OSError as e:
            missing.append(f"network namespace ({e})")
        unreadable = [p for p in sys.path if os.path.exists(p) and not _world_readable(p)]
        if unreadable:  # as nobody, every import not done yet would fail: make it readable first
            try:
                _reveal(unreadable)
            except OSError as e:
                missing.append(
                    f"uid nobody (the Python installation in {unreadable[0]} is not readable "
                    f"by others, and a mount namespace to show it failed: {e})"
                )
                return missing + _limit(limits)
        try:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        except (KeyError, OSError) as e:
            missing.append(f"uid nobody ({e})")
    return missing + _limit(limits)


def _world_readable(path: str) -> bool:
    """Whether a user with no rights of its own can reach and read ``path``."""
    p = os.path.realpath(path)
    while True:
        try:
            mode = os.stat(p).st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
        parent = os.path.dirname(p)
        if parent == p:
            return True
        p = parent


def _limit(limits: dict[str, Any]) -> list[str]:
    missing: list[str] = []
    mb = int(limits["memory_mb"])
    cpu = int(limits["cpu_s"])
    plan = [
        (resource.RLIMIT_AS, mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, int(limits["file_mb"]) * 1024 * 1024),
        (resource.RLIMIT_CORE, 0),
    ]
    if os.geteuid() != 0:
        plan.append((resource.RLIMIT_NPROC, 0))
    else:
        missing.append("RLIMIT_NPROC (still root)")
    for which, value in plan:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as e:
            missing.append(f"rlimit {which} ({e})")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long file write raises instead of killing
    return missing


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
            cell_frames = "".join(ln for ln in tb if "sandbox_kernel.py" not in ln)
            error = _last_lines(cell_frames)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return {"output": out.text(), "error": error, "dropped": out.dropped}


def _send(out: Any, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    out.write(b"%d\n" % len(data))
    out.write(data)
    out.flush()


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
    root = os.path.realpath(os.getcwd())
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        for line in limits.get("preload", []):
            exec(line, namespace)
        missing = _confine(limits, root)
        _install_hook(root)
    except Exception as e:  # set-up failed: say so, and stop
        _send(out, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    _send(out, {"ready": True, "missing": missing})
    limit = int(limits["output_chars"])
    while True:
        header = inp.readline()
        if not header:
            return
        request = json.loads(inp.read(int(header)))
        _send(out, run_cell(request["code"], namespace, limit))


if __name__ == "__main__":
    main()
