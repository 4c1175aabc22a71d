"""Micro-batching for a blocking model: requests in, batches to one model thread, completions out.

The transformers adapter and the scripted fake use this. ``BatchScheduler.generate(request)`` queues a
``Row`` on a bounded stream and waits for it; ``serve`` forms batches with ``pipeline.batching``'s
micro-batcher (size, token cap, wait, length grouping) and runs the backend's blocking ``run_batch``
in one dedicated thread. ``run_batch`` delivers each row's completion as soon as that row ends, so a
short answer does not wait for the longest row of its batch; it checks ``Row.aborted`` at every decode
step and stops computing a row whose caller has gone, ending the batch once all its rows are gone.

Faults: an out-of-memory error splits the batch in halves and lowers the token cap (which recovers,
doubling, after ``recover_s`` without errors); any other error retries the rows one at a time; a row
that still fails gets the exception.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from stages.backends.base import BackendError, Completion, Request
from stages.batching import MicroBatcher
from stages.clock import now
from stages.streams import put


@dataclass
class SchedulerStats:
    """Counters the benchmarks and the summary read."""

    batches: int = 0
    rows: int = 0
    padded_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    busy_s: float = 0.0
    oom_splits: int = 0
    aborted: int = 0
    abort_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


def _batch_report(st: SchedulerStats) -> dict[str, Any] | None:
    if not st.rows:
        return None
    real = st.prompt_tokens
    return {
        "batches": st.batches,
        "rows": st.rows,
        "mean_rows": round(st.rows / max(1, st.batches), 2),
        "prompt_fill": round(real / max(1, real + st.padded_tokens), 3),
        "model_busy_s": round(st.busy_s, 3),
        "oom_splits": st.oom_splits,
    }


class Poster:
    """Calls from a model thread to the event loop, delivered in order, a burst of them with one wake-up:
    ``post(fn, *args)`` queues the call and schedules a flush only when none is pending, so a batch
    whose rows end together costs the loop one trip, not one per row."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._pending = False

    def __call__(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` on the loop (any thread; never waits)."""
        self._calls.append((fn, args))  # queued before the flag is read: a flush under way takes it
        if not self._pending:
            self._pending = True
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._pending = False  # cleared before draining: a call queued from now on schedules its own
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            fn(*args)


def loop_poster() -> Poster | None:
    """A ``Poster`` for the running asyncio loop (``None`` elsewhere: the thread then waits a round trip)."""
    try:
        return Poster(asyncio.get_running_loop())
    except RuntimeError:
        return None


class Row:
    """One request inside the scheduler. ``run_batch`` reads it from the model thread."""

    __slots__ = ("_event", "_post", "_stats", "aborted", "aborted_at", "dropped_at", "outcome", "request")

    def __init__(
        self, request: Request, stats: SchedulerStats, post: Callable[..., object] | None = None
    ) -> None:
        self.request = request
        self._stats = stats
        self._post = post  # schedules a call on the event loop from the model thread, without waiting
        self.aborted = False
        self.aborted_at: float | None = None
        self.dropped_at: float | None = None
        self.outcome: Completion | BaseException | None = None
        self._event = anyio.Event()

    @property
    def done(self) -> bool:
        """Whether the row has its outcome (or was dropped after an abort)."""
        return self.outcome is not None or self.dropped_at is not None

    def _set(self, outcome: Completion | BaseException) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self._event.set()

    def finish(self, outcome: Completion | BaseException) -> None:
        """Deliver the row's outcome from the model thread (wakes the waiting task). The model thread
        does not wait for the event loop: the outcome is set there before the batch call's own return
        is seen (the loop runs the thread's calls in order)."""
        if self.outcome is None and self.dropped_at is None:
            if self._post is not None:
                self._post(self._set, outcome)
            else:
                anyio.from_thread.run_sync(self._set, outcome)

    async def wait(self, on_abort: Callable[[], object] | None = None) -> Completion:
        """Wait for the row's outcome and return it (raise it when it is an error). Cancelled first:
        mark the row aborted (the model thread drops it at its next step), call ``on_abort``, raise."""
        try:
            await self._event.wait()
        except BaseException:
            if self.outcome is None:
                self.aborted = True
                self.aborted_at = now()
                if on_abort is not None:
                    on_abort()
            raise
        outcome = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def finish_here(self, outcome: Completion | BaseException) -> None:
        """Deliver the row's outcome from the event-loop thread."""
        self._set(outcome)

    def drop(self) -> None:
        """Stop working on an aborted row (any thread); counts it and its abort latency at once."""
        if self.dropped_at is None:
            self.dropped_at = now()
            self._stats.aborted += 1
            if self.aborted_at is not None:
                self._stats.abort_latency_s.append(self.dropped_at - self.aborted_at)


RunBatch = Callable[[list[Row]], None]
"""Blocking: generate for every row, calling ``row.finish`` per row; drop rows whose ``aborted`` is set."""


class BatchScheduler:
    """Micro-batches ``Request``s for a blocking ``run_batch`` run in one thread.

    ``max_tokens`` caps ``rows x (widest prompt + largest max_new_tokens)`` per batch (``None``: no
    cap); ``max_pending`` bounds the requests queued and not yet in a batch.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        is_out_of_memory: Callable[[BaseException], bool],
        max_size: int = 16,
        max_wait_s: float = 0.02,
        max_tokens: int | None = None,
        max_pending: int = 4096,
        recover_s: float = 30.0,
    ) -> None:
        self.run_batch = run_batch
        self.is_out_of_memory = is_out_of_memory
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_tokens = max_tokens
        self.recover_s = recover_s
        self.stats = SchedulerStats()
        self._cap = max_tokens
        self._last_oom = 0.0
        self.max_pending = max_pending
        self._send: MemoryObjectSendStream[Row] | None = None
        self._post: Callable[..., object] | None = None
        self._thread = anyio.CapacityLimiter(1)
        self.running: set[Row] = set()

    def statistics(self) -> dict[str, Any] | None:
        """A snapshot of the batches run so far, for the run's metrics (``None`` before the first)."""
        return _batch_report(self.stats)

    def configure(self, *, max_size: int, max_wait_s: float, max_tokens: int | None) -> None:
        """Set the batch limits (before ``serve``)."""
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_tokens = self._cap = max_tokens

    @property
    def token_cap(self) -> int | None:
        """The batch token cap now (lower than ``max_tokens`` for a while after an out-of-memory error)."""
        return self._cap

    async def generate(self, request: Request) -> Completion:
        """Queue ``request`` and wait for its completion; cancelling aborts it within one decode step.

        Raises:
            BackendError: the scheduler is not serving.
            Exception: the model failed for this request.
        """
        send = self._send
        if send is None:
            raise BackendError("the backend is not serving: it was stopped or never started")
        row = Row(request, self.stats, self._post)
        try:
            await put(send, row)
        except BaseException:
            row.aborted = True
            row.aborted_at = now()
            raise
        return await row.wait()

    def _recover_cap(self) -> None:
        if self._cap is None or self.max_tokens is None or self._cap >= self.max_tokens:
            return
        if now() - self._last_oom >= self.recover_s:
            self._cap = min(self.max_tokens, self._cap * 2)
            self._last_oom = now()

    @staticmethod
    def _drop_if_aborted(row: Row) -> bool:
        if row.aborted:
            row.drop()
            return True
        return False

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Form batches and run them until cancelled; rows left waiting then get a ``BackendError``.

        Raises:
            BackendError: it is already serving.
        """
        if self._send is not None:
            raise BackendError("the backend is already serving another pipeline")
        self._send, receive = anyio.create_memory_object_stream[Row](self.max_pending)
        self._post = loop_poster()  # on asyncio the model thread hands rows over without waiting
        batcher = MicroBatcher(
            receive,
            max_size=self.max_size,
            max_wait_s=self.max_wait_s,
            length=lambda r: len(r.request.prompt_ids),
            reserve=lambda r: r.request.params.max_new_tokens,
            max_tokens=self._cap,
            drop=self._drop_if_aborted,
        )
        task_status.started()
        try:
            while (batch := await batcher.next_batch()) is not None:
                await self._run(batch)
                self._recover_cap()
                batcher.max_tokens = self._cap if self._cap is not None else math.inf
        finally:
            self._send.close()
            self._send = None
            stopped = BackendError("the backend stopped before this request ran")
            for row in batcher.pending:
                row.finish_here(stopped)
            with receive:
                while True:
                    try:
                        receive.receive_nowait().finish_here(stopped)
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break

    async def _run(self, rows: list[Row]) -> None:
        rows = [r for r in rows if not r.done and not self._drop_if_aborted(r)]
        if not rows:
            return
        started = now()
        self.running.update(rows)
        s = self.stats
        # counted as the batch starts: rows are delivered as they end, before the batch call returns
        width = max(len(r.request.prompt_ids) for r in rows)
        s.batches += 1
        s.rows += len(rows)
        s.prompt_tokens += sum(len(r.request.prompt_ids) for r in rows)
        s.padded_tokens += sum(width - len(r.request.prompt_ids) for r in rows)
        try:
            await anyio.to_thread.run_sync(self.run_batch, rows, limiter=self._thread)
        except Exception as e:  # the model's failure is these rows' failure; the run goes on
            left = [r for r in rows if not r.done]
            if not left:
                return
            for r in left:  # a row run again starts its watch again
                if r.request.params.watch is not None:
                    r.request.params.watch.reset()
            if self.is_out_of_memory(e):
                if len(left) == 1:
                    left[0].finish_here(BackendError("out of memory even in a batch of one"))
                    return
                self.stats.oom_splits += 1
                width = max(len(r.request.prompt_ids) for r in left)
                reserve = max(r.request.params.max_new_tokens for r in left)
                half = len(left) // 2
                self._cap = max(1, half * (width + reserve))
                self._last_oom = now()
                await self._run(left[:half])
                await self._run(left[half:])
                return
            if len(left) > 1:
                for r in left:
                    await self._run([r])
                return
            left[0].finish_here(e)
            return
        finally:
            self.running.difference_update(rows)
        s.busy_s += now() - started
        for r in rows:
            if isinstance(r.outcome, Completion):
                s.new_tokens += r.outcome.new_tokens
            elif not r.done:
                r.finish_here(RuntimeError("the backend returned no completion for this request"))
