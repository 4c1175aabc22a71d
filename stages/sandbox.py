"""Running model-written Python: a pool of warm, confined interpreters, one per sample.

Model-written code never runs in the pipeline's process. Each sample that writes code gets its own
interpreter (``stages/sandbox_kernel.py``) for its whole life, so its cells share state like a notebook
kernel's; when the sample ends the interpreter is killed, never reused, so one sample cannot see or
poison another's. Interpreters are started ahead of need with ``sympy``, ``numpy`` and ``mpmath``
already imported (the pool keeps ``size`` of them alive, idle ones included), so a cell starts in
milliseconds rather than the second an import takes.

Limits: the parent enforces a wall-clock limit per cell with ``anyio.fail_after``, never a signal (the
Kaggle gateway calls from a worker thread); on a timeout the kernel's whole process group is killed and
the sample's next cell gets a fresh interpreter (its earlier variables are gone, and the output says
so). In the kernel: address-space, CPU-seconds and file-size limits, no new processes, no network,
a fresh temporary working directory (removed afterwards), a stripped environment, output capped; see
``stages/sandbox_kernel.py`` for how each is enforced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import Process, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from pipeline.config import SandboxConfig

KERNEL = Path(__file__).with_name("sandbox_kernel.py")
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
SPAWN_FAILURES = 3  # consecutive failed starts before a cell gets the error instead of waiting


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


class Kernel:
    """One confined interpreter process and its working directory."""

    def __init__(self, process: Process, workdir: str) -> None:
        self.process = process
        self.workdir = workdir
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.missing: list[str] = []

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

    async def ready(self) -> None:
        """Wait for the kernel's set-up.

        Raises:
            SandboxError: it failed to set up, broke the protocol, or took over a minute.
        """
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                reply = await self._receive()
        except _GONE as e:
            raise SandboxError(
                f"the interpreter exited during set-up (code {self.process.returncode})"
            ) from e
        except TimeoutError as e:
            raise SandboxError(f"the interpreter took over {START_TIMEOUT_S:g} s to start") from e
        if not reply.get("ready"):
            raise SandboxError(f"the interpreter could not set up: {reply.get('error')}")
        self.missing = [str(m) for m in reply.get("missing", [])]

    async def run(self, code: str, timeout_s: float) -> CellResult:
        """Run one cell.

        Raises:
            TimeoutError: the cell ran past ``timeout_s`` (the caller kills the kernel).
            SandboxError: the kernel died or broke the protocol.
        """
        data = json.dumps({"code": code}).encode()
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
        return CellResult(
            output=output,
            error=error,
            dropped=int(dropped) if isinstance(dropped, int) else 0,
            seconds=time.perf_counter() - started,
        )

    async def kill(self) -> None:
        """Kill the kernel's whole process group and remove its working directory."""
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    self.process.kill()
            await self.process.wait()
            await self.process.aclose()
            await anyio.to_thread.run_sync(shutil.rmtree, self.workdir, True)


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


class Sandbox:
    """Up to ``cfg.pool_size`` live interpreters (idle ones waiting warm, the rest bound to samples).

    ``serve`` runs in the engine's task group: it starts the interpreters and replaces each one a
    sample gives back. A sample takes one through ``session()``.
    """

    def __init__(self, cfg: SandboxConfig, size: int, max_cells: int = 8) -> None:
        self.cfg = cfg
        self.size = max(1, size)
        self.max_cells = max_cells
        self.stats = SandboxStats()
        self.missing: list[str] = []
        self._idle: list[Kernel] = []
        self._live = 0
        self._failures = 0
        self._last_error = ""
        self._changed = anyio.Event()
        self._serving = False
        self._closed = False

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _limits(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "memory_mb": c.memory_mb,
            "cpu_s": int(c.cell_timeout_s * (self.max_cells + 1)) + 30,
            "file_mb": c.file_mb,
            "output_chars": c.output_chars,
            "preload": list(PRELOAD),
        }

    async def spawn(self) -> Kernel:
        """Start one interpreter and wait until it is confined and ready.

        Raises:
            SandboxError: it could not start.
        """
        if self._closed:
            raise SandboxError("the sandbox has stopped")
        try:
            workdir = tempfile.mkdtemp(prefix="pipeline-cell-")
        except OSError as e:
            raise SandboxError(f"cannot make a working directory: {e}") from e
        kernel: Kernel | None = None
        try:
            if os.geteuid() == 0:  # the kernel drops to nobody: its working directory must be its own
                try:
                    import pwd

                    nobody = pwd.getpwnam("nobody")
                    os.chown(workdir, nobody.pw_uid, nobody.pw_gid)
                except (KeyError, OSError):
                    pass
            try:
                process = await anyio.open_process(
                    [sys.executable, "-I", str(KERNEL), json.dumps(self._limits())],
                    cwd=workdir,
                    env=stripped_env(workdir),
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:
                raise SandboxError(f"cannot start an interpreter: {e}") from e
            kernel = Kernel(process, workdir)
            await kernel.ready()
        except BaseException:
            if kernel is not None:
                await kernel.kill()  # removes the working directory too
            else:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutil.rmtree, workdir, True)
            raise
        self.stats.started += 1
        return kernel

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool full until cancelled; then kill every interpreter."""
        try:
            async with anyio.create_task_group() as tg:
                self._serving = True
                task_status.started()
                while True:
                    while self._live < self.size and self._failures < SPAWN_FAILURES:
                        self._live += 1
                        tg.start_soon(self._start_one)
                    await self._changed.wait()
        finally:
            self._closed = True
            with anyio.CancelScope(shield=True):
                for k in self._idle:
                    await k.kill()
                self._idle.clear()

    async def _start_one(self) -> None:
        try:
            kernel = await self.spawn()
        except BaseException as e:
            self._live -= 1
            if not isinstance(e, SandboxError):
                raise
            self._failures += 1
            self._last_error = str(e)
            self._notify()
            return
        self._failures = 0
        if kernel.missing and not self.missing:
            structlog.get_logger("pipeline.sandbox").warning(
                "the sandbox runs without some of its protections", missing="; ".join(kernel.missing)
            )
        self.missing = kernel.missing
        self._idle.append(kernel)
        self._notify()

    async def acquire(self) -> Kernel:
        """A warm interpreter for one sample (waits while every one is in use).

        Raises:
            SandboxError: interpreters keep failing to start.
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

    async def release(self, kernel: Kernel) -> None:
        """Kill a sample's interpreter (never reused) and let the pool start a fresh one."""
        await kernel.kill()
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
        self.cells = 0
        self.clean = 0

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
        self.cells += 1
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
        if result.error is None:
            self.clean += 1
        else:
            sb.stats.errors += 1
        return result

    async def aclose(self) -> None:
        """Give the interpreter back (it is killed; the pool starts a fresh one)."""
        if self.kernel is not None:
            kernel, self.kernel = self.kernel, None
            await self.sandbox.release(kernel)
