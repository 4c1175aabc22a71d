"""The sandbox kernel's audit hook (PEP 578): defence in depth, not the boundary.

Loaded by ``stages/sandbox_kernel.py`` from the file beside it, last of its layers. It refuses, from
Python and by name, what the kernel's other layers refuse in the operating system (starting processes,
sockets, signals to others, ``ctypes``, changing directory, writing outside the working directory,
other processes' ``/proc`` entries), with a clearer error than ``EPERM``. Python code can reach around
it (frames, ``gc``); the namespaces, the filesystem, the identity and the seccomp filter hold anyway.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import MappingProxyType
from typing import Any

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


def install(root: str) -> None:
    """Add the hook (it cannot be removed) and drop the calls that raise no audit event."""
    me = os.getpid()
    local = threading.local()  # per thread: another thread's events are never skipped
    # the hook's tables and helpers live in its closure, frozen: the module's globals are reachable
    # from a cell (``sys.modules["__main__"]``), these are not
    refused = MappingProxyType(dict(_REFUSED))
    path_events = MappingProxyType(dict(_PATH_EVENTS))
    inside, other_proc, dir_outside = _inside, _other_proc, _refuse_dir_outside
    write_flags = _WRITE_FLAGS

    def hook(event: str, args: tuple[Any, ...]) -> None:
        what = refused.get(event)
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
                    isinstance(flags, int) and bool(flags & write_flags)
                )
                if writing and not inside(path, root):
                    raise PermissionError(f"sandbox: writing outside the working directory ({path})")
                if other_proc(path):
                    raise PermissionError(f"sandbox: reading another process's /proc entry ({path})")
                if isinstance(flags, int) and dir_outside(path, root):
                    raise PermissionError(
                        f"sandbox: opening a directory outside the working directory ({path})"
                    )
            elif event in path_events:
                for p in args[: path_events[event]]:
                    if not inside(p, root):
                        raise PermissionError(f"sandbox: changing files outside the working directory ({p})")
            elif event == "sqlite3.connect" and args and args[0] != ":memory:" and not inside(args[0], root):
                raise PermissionError(f"sandbox: a database outside the working directory ({args[0]})")
            elif event == "os.listdir" and args and other_proc(args[0]):
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
