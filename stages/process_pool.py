"""A small pool of worker processes (``python -m stages.pool_worker``) driven from the event loop.

Why not ``multiprocessing`` or ``anyio.to_process``: both re-import the parent's ``__main__`` in each
worker, which breaks a user's script without a main guard; and a ``ProcessPoolExecutor`` is broken for
good once one worker dies. Here a worker that dies, hangs past its timeout, breaks the pipe protocol
(a reply that is not a length line and a pickle), or is cancelled mid-call is killed and replaced on
the next call; the others carry on. No call waits on a worker past its limit: a live worker is killed,
never waited for. ``aclose`` stops them all.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ByteSendStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

EXIT_WAIT_S = 1.0  # how long a worker that closed its pipes gets to exit before it is killed


class WorkerDied(RuntimeError):
    """The worker process exited (crashed, was killed) during a call, or broke the protocol and was
    killed."""


class ProtocolError(Exception):
    """A worker's reply was not a length line followed by a pickle."""


class _Worker:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin: ByteSendStream = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)

    async def call(self, request: bytes) -> tuple[str, Any]:
        """Send one request; ``("ok", value)`` or ``("error", exception raised by the function)``.

        A reply that arrives whole but cannot be unpickled here is an ``"error"``; the worker stays
        in step.

        Raises:
            ProtocolError: the reply is not framed as the protocol says (the worker is out of step).
            anyio.EndOfStream, anyio.BrokenResourceError, anyio.IncompleteRead: the pipes closed.
        """
        await self.stdin.send(b"%d\n" % len(request) + request)
        try:
            header = await self.stdout.receive_until(b"\n", 32)
        except anyio.DelimiterNotFound as e:
            raise ProtocolError("no length line in the reply") from e
        if not header.isdigit():
            raise ProtocolError(f"bad length line {header[:32]!r}")
        data = await self.stdout.receive_exactly(int(header))
        try:
            status, value = pickle.loads(data)
        except Exception as e:
            return "error", RuntimeError(f"cannot read the worker's reply: {type(e).__name__}: {e}")
        return status, value

    async def kill(self) -> None:
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.kill()
            await self.process.wait()
            await self.process.aclose()


class WorkerPool:
    """Up to ``size`` worker processes; ``run`` sends a call to an idle one (starting it if needed)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._limit = anyio.Semaphore(size)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self.started = 0
        self.deaths = 0

    async def _spawn(self) -> _Worker:
        env = dict(os.environ)
        # the parent's import path, so functions from any of its modules can be unpickled
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        process = await anyio.open_process(
            [sys.executable, "-u", "-m", "stages.pool_worker"], env=env, stderr=subprocess.DEVNULL
        )
        self.started += 1
        worker = _Worker(process)
        self._all.add(worker)
        return worker

    async def start(self, warm_up: Callable[[], Any] | None = None) -> None:
        """Start every worker now and run ``warm_up`` in each (imports), so the first call is quick."""
        async with anyio.create_task_group() as tg:
            for _ in range(self.size):
                tg.start_soon(self._start_one, warm_up)

    async def _start_one(self, warm_up: Callable[[], Any] | None) -> None:
        worker = await self._spawn()
        if warm_up is not None:
            try:
                status, value = await worker.call(
                    pickle.dumps((warm_up, ()), protocol=pickle.HIGHEST_PROTOCOL)
                )
            except BaseException:
                self._all.discard(worker)
                await worker.kill()
                raise
            if status == "error":
                self._all.discard(worker)
                await worker.kill()
                raise value
        self._idle.append(worker)

    async def run(self, func: Callable[..., Any], *args: Any, limit_s: float) -> Any:
        """Call ``func(*args)`` in a worker and return its result.

        Raises:
            WorkerDied: the worker exited during the call, or broke the protocol (it is killed, and
                replaced on the next call).
            TimeoutError: the call took longer than ``limit_s`` seconds (the worker is killed).
            Exception: whatever ``func`` raised in the worker.
        """
        request = pickle.dumps((func, args), protocol=pickle.HIGHEST_PROTOCOL)
        async with self._limit:
            worker = self._idle.pop() if self._idle else await self._spawn()
            healthy = False
            try:
                with anyio.fail_after(limit_s):
                    status, value = await worker.call(request)
                healthy = True
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.IncompleteRead) as e:
                self.deaths += 1
                with anyio.move_on_after(EXIT_WAIT_S, shield=True):  # it is exiting: get its code
                    await worker.process.wait()
                code = worker.process.returncode
                if code is None:
                    raise WorkerDied("worker process closed its pipes; it was killed") from e
                raise WorkerDied(f"worker process exited with code {code}") from e
            except ProtocolError as e:  # still alive but out of step: never wait for it
                self.deaths += 1
                raise WorkerDied(f"worker process broke the call protocol ({e}); it was killed") from e
            finally:
                if healthy:
                    self._idle.append(worker)
                else:  # dead, timed out, or cancelled mid-call: its state is unknown
                    self._all.discard(worker)
                    await worker.kill()
        if status == "error":
            raise value
        return value

    async def aclose(self) -> None:
        """Stop every worker: end their input, then kill what is left."""
        with anyio.CancelScope(shield=True):
            for worker in list(self._all):
                with anyio.move_on_after(1):
                    await worker.stdin.aclose()
                    await worker.process.wait()
                await worker.kill()
            self._all.clear()
            self._idle.clear()
