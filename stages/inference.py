"""The inference stage: every sample is one request to the backend, sent on as soon as it completes.

Each encoded problem becomes ``samples`` requests, each awaited by its own task in the stage's task
group, so completions leave in completion order, not batch order. How many requests (and, optionally,
tokens) are in the backend at once is bounded here: when the bound is reached the stage stops taking
problems, and that block travels upstream as backpressure. Batching is the backend's business.

A problem's samples can be cancelled together (``cancel(serial)``: the caller went away, or, later, an
early-stopping vote): cancelling a request's task aborts it in the engine. A cancelled sample still
travels on as a ``Generation`` with ``finish_reason="aborted"``, so downstream counts stay whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.config import Config
from pipeline.items import Encoded, Generation, Result
from stages.backends.base import Backend, Completion, Request, SamplingParams, sample_seed
from stages.extraction import TIME_LIMIT


class InferenceStats:
    """Counters the summary and the benchmarks read."""

    def __init__(self) -> None:
        self.requests = 0
        self.completed = 0
        self.failed = 0
        self.aborted = 0
        self.prompt_tokens = 0
        self.new_tokens = 0
        self.in_flight = 0
        self.peak_in_flight = 0


class TokenGate:
    """At most ``limit`` tokens held at once; a holder larger than the limit waits until it is alone."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0
        self._changed = anyio.Event()

    async def acquire(self, tokens: int) -> None:
        """Wait until ``tokens`` fit (or nothing else is held)."""
        if self.limit is None:
            return
        while self.held and self.held + tokens > self.limit:
            await self._changed.wait()
        self.held += tokens

    def release(self, tokens: int) -> None:
        """Give ``tokens`` back."""
        if self.limit is None:
            return
        self.held -= tokens
        self._changed.set()
        self._changed = anyio.Event()


class Inference:
    """The stage's state: the request and token bounds, per-problem cancel scopes, counters.

    ``wanted(serial)`` says whether anyone still waits for a problem; one nobody wants is skipped.
    """

    def __init__(self, backend: Backend, cfg: Config, wanted: Callable[[int], bool] | None = None) -> None:
        self.backend = backend
        self.cfg = cfg
        self.wanted = wanted or (lambda _: True)
        self.max_requests = cfg.run.max_in_flight * cfg.generation.samples
        self._requests = anyio.Semaphore(self.max_requests)
        self._tokens = TokenGate(cfg.run.max_tokens_in_flight)
        self._scopes: dict[int, list[anyio.CancelScope]] = {}
        self.stats = InferenceStats()

    def params(self, encoded: Encoded, index: int) -> SamplingParams:
        """The sampling settings of sample ``index``; its seed depends on the problem and the index only."""
        g = self.cfg.generation
        return SamplingParams(
            max_new_tokens=g.max_new_tokens,
            greedy=g.greedy,
            temperature=g.temperature,
            top_p=g.top_p,
            min_p=g.min_p,
            seed=sample_seed(g.seed, encoded.job.key, index),
        )

    def cancel(self, serial: int) -> None:
        """Abort every running sample of problem ``serial`` (each still sends an aborted Generation)."""
        for scope in self._scopes.get(serial, []):
            scope.cancel()

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Encoded | Result],
        send: MemoryObjectSendStream[Generation | Result],
    ) -> None:
        """Submit every sample of every problem as a request; send each ``Generation`` as it completes."""
        async with receive, send, anyio.create_task_group() as tg:
            async for item in receive:
                if isinstance(item, Result):
                    await send.send(item)
                    continue
                serial = item.job.serial
                if not self.wanted(serial):
                    continue
                samples = self.cfg.generation.samples
                deadline = item.problem.deadline
                at = math.inf
                if deadline is not None:  # perf_counter time to the event loop's clock
                    at = anyio.current_time() + (deadline - time.perf_counter())
                scopes = [anyio.CancelScope(deadline=at) for _ in range(samples)]
                self._scopes[serial] = scopes
                live = [samples]
                for index, scope in enumerate(scopes):
                    await self._submit(tg, item, index, scope, live, send)

    async def _submit(
        self,
        tg: TaskGroup,
        encoded: Encoded,
        index: int,
        scope: anyio.CancelScope,
        live: list[int],
        send: MemoryObjectSendStream[Generation | Result],
    ) -> None:
        waited = time.perf_counter()
        params = self.params(encoded, index)
        tokens = encoded.prompt_tokens + params.max_new_tokens
        await self._requests.acquire()
        try:
            await self._tokens.acquire(tokens)
        except BaseException:
            self._requests.release()
            raise
        request = Request(id=f"{encoded.job.serial}-{index}", prompt_ids=encoded.prompt_ids, params=params)
        queue_s = time.perf_counter() - waited
        tg.start_soon(self._sample, encoded, index, request, scope, live, send, queue_s, tokens)

    async def _sample(
        self,
        encoded: Encoded,
        index: int,
        request: Request,
        scope: anyio.CancelScope,
        live: list[int],
        send: MemoryObjectSendStream[Generation | Result],
        queue_s: float,
        tokens: int,
    ) -> None:
        s = self.stats
        s.requests += 1
        s.in_flight += 1
        s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
        started = time.perf_counter()
        completion: Completion | None = None
        error: str | None = None
        try:
            with scope:
                try:
                    completion = await self.backend.generate(request)
                except Exception as e:  # the model's failure is this sample's failure; the run goes on
                    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            s.in_flight -= 1
            self._tokens.release(tokens)
            self._requests.release()
            live[0] -= 1
            if live[0] == 0:
                self._scopes.pop(encoded.job.serial, None)
        elapsed = time.perf_counter() - started
        reason: str
        if completion is not None:
            s.completed += 1
            s.prompt_tokens += encoded.prompt_tokens
            s.new_tokens += completion.new_tokens
            text, new_tokens, reason = completion.text, completion.new_tokens, completion.finish_reason
        elif error is not None:
            s.failed += 1
            text, new_tokens, reason = "", 0, "error"
        else:
            s.aborted += 1
            timed_out = anyio.current_time() >= scope.deadline
            text, new_tokens, reason = "", 0, "aborted"
            error = TIME_LIMIT if timed_out else "cancelled"
        await send.send(
            Generation(
                encoded=encoded,
                index=index,
                text=text,
                new_tokens=new_tokens,
                queue_s=queue_s,
                inference_s=elapsed,
                error=error,
                finish_reason=reason,
                logprobs=completion.logprobs if completion is not None else None,
            )
        )
