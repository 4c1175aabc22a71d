"""The graph: stages, the bounded streams between them, admission, de-duplication and routing.

```
feeder (one per stream() call)      runner (one per Pipeline, in its task group)
  parse → slot → cache ─miss─► jobs ─► tokenize ─► inference ─► verification ×N ─► vote ─► router
            │      │                      └─prompt rejected──────────────────────────────────►│
            │      └─hit / in flight: follow───────────────────────────────────────────────┐    │
            └─bad line──────────────────────────────────────────────────────────────► route ◄┴────┘
```

Admission: a problem takes one of ``max_in_flight`` slots before anything is done for it and gives it
back when the caller receives its result (or abandons it). Every stream between stages is sized to
hold all admitted work, so a slow consumer fills its route, slots run out, and the feeder stops reading
input: that is the backpressure, and host memory stays flat however long the input is. Results reach
the router as ``Routed`` envelopes (result, job key, job serial) and are routed by serial; callers get
the bare ``Result``. A caller that abandons its stream cancels the problems only it waited for.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.admission import Admission, Route, Ticket
from pipeline.budget import TimePlanner
from pipeline.cache import ResultCache, cache_key
from pipeline.config import Config
from pipeline.items import (
    Candidate,
    Encoded,
    Generation,
    Job,
    Problem,
    Result,
    Routed,
    Status,
    error_result,
)
from pipeline.metrics import QueueGauge, memory_report
from stages import tokenization, vote
from stages.backends.base import Backend
from stages.clock import now
from stages.inference import Inference
from stages.parse import RecordConverter
from stages.sandbox import Sandbox
from stages.streams import BATCH, batches, put
from stages.verification import Verification


@dataclass
class RunStats:
    """Counters over the pipeline's life; ``summary()`` is what the CLI prints at the end."""

    started: float = field(default_factory=now)
    problems: int = 0
    answered: int = 0
    fallbacks: int = 0
    errors: int = 0
    cache_hits: int = 0
    new_tokens: int = 0
    graded: int = 0
    correct: int = 0
    early_stops: int = 0
    cells: int = 0
    out_of_time: int = 0
    cleanups: int = 0
    cleanup_s: float = 0.0

    def record(self, r: Result) -> None:
        """Count one delivered result."""
        self.problems += 1
        if r.status == "error":
            self.errors += 1
        else:
            self.answered += 1
        self.fallbacks += r.status == "fallback"
        self.cache_hits += r.status == "cached"
        if r.status != "cached":
            self.new_tokens += r.new_tokens
        self.early_stops += r.early_stop
        self.cells += r.cells
        if r.gold is not None:
            self.graded += 1
            self.correct += bool(r.correct)

    def summary(self) -> dict[str, Any]:
        """Problems, answered, errors, cache hits, throughput and accuracy (when gold answers were given)."""
        elapsed = max(now() - self.started, 1e-9)
        out: dict[str, Any] = {
            "problems": self.problems,
            "answered": self.answered,
            "fallbacks": self.fallbacks,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "seconds": round(elapsed, 3),
            "problems_per_s": round(self.problems / elapsed, 3),
            "new_tokens_per_s": round(self.new_tokens / elapsed, 1),
        }
        if self.early_stops:
            out["early_stops"] = self.early_stops
        if self.cells:
            out["code_cells"] = self.cells
        if self.out_of_time:
            out["answered_after_the_budget"] = self.out_of_time
        if self.cleanups:
            out["cleanups"] = f"{self.cleanups} ({self.cleanup_s:.2f} s)"
        if self.graded:
            out["accuracy"] = round(self.correct / self.graded, 4)
            out["graded"] = self.graded
        return out


@dataclass
class _Waiter:
    problem: Problem
    ticket: Ticket
    key: str

    @property
    def route(self) -> Route:
        return self.ticket.route


class Runner:
    """The long-lived stages of one ``Pipeline``: started once, fed by any number of streams."""

    def __init__(
        self, cfg: Config, backend: Backend, cache: ResultCache, verification: Verification | None = None
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.cache = cache
        self.fingerprint = cfg.fingerprint(backend.model_id)
        self.sandbox: Sandbox | None = None
        if cfg.generation.uses_tools:
            size = cfg.sandbox.pool_size or max(2, 2 * cfg.generation.samples)
            self.sandbox = Sandbox(cfg.sandbox, size, max_cells=cfg.generation.max_rounds)
        self.planner = TimePlanner.from_config(cfg)
        self.inference = Inference(
            backend,
            cfg,
            wanted=lambda serial: serial in self._waiters,
            sandbox=self.sandbox,
            planner=self.planner,
        )
        self.verification = verification or Verification(cfg)
        self.admission = Admission(cfg.run.max_in_flight)
        self.stats = RunStats()
        self._serial = 0
        self._routed = 0
        self._waiters: dict[int, list[_Waiter]] = {}
        self._by_key: dict[str, int] = {}
        cap = cfg.run.queue_size or cfg.run.max_in_flight
        rows = cfg.run.queue_size or cfg.run.max_in_flight * cfg.generation.samples
        self._jobs_send, self._jobs_receive = anyio.create_memory_object_stream[Job](cap)
        self._encoded = anyio.create_memory_object_stream[Encoded](cap)
        self._generations = anyio.create_memory_object_stream[Generation](rows)
        self._candidates = anyio.create_memory_object_stream[Candidate](rows)
        self._results = anyio.create_memory_object_stream[Routed](cap)
        self.gauge = QueueGauge(
            {
                "jobs": self._jobs_send,
                "encoded": self._encoded[0],
                "generations": self._generations[0],
                "candidates": self._candidates[0],
                "results": self._results[0],
            }
        )

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the backend's scheduler, then every stage; return once ``close()`` has let the stages
        drain (the backend is then stopped).

        Raises:
            BackendError: the backend failed to start or died (through ``task_status`` at start).
        """
        enc_send, enc_receive = self._encoded
        gen_send, gen_receive = self._generations
        cand_send, cand_receive = self._candidates
        res_send, res_receive = self._results
        async with anyio.create_task_group() as outer:
            try:
                await outer.start(self.backend.serve)
                if self.sandbox is not None:
                    await outer.start(self.sandbox.serve)
                await outer.start(self.gauge.run)
            except BaseException:
                self._close_streams()  # the stages never started: nothing else will close them
                raise
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    tokenization.run, self._jobs_receive, enc_send, self.backend, self.cfg, res_send.clone()
                )
                tg.start_soon(self.inference.run, enc_receive, gen_send)
                for _ in range(self.cfg.run.verify_workers):
                    tg.start_soon(self.verification.run, gen_receive.clone(), cand_send.clone())
                gen_receive.close()
                cand_send.close()
                tg.start_soon(vote.run, cand_receive, res_send, self.cfg, self.inference.cancel)
                tg.start_soon(self._route_results, res_receive)
                task_status.started()
            outer.cancel_scope.cancel()

    def _close_streams(self) -> None:
        for pair in (self._encoded, self._generations, self._candidates, self._results):
            for end in pair:
                end.close()
        self._jobs_receive.close()
        self._jobs_send.close()

    def metrics(self) -> dict[str, Any]:
        """Queue depths per stream, time waiting per stage, batch fill, sandbox and memory figures."""
        inf = self.inference.stats
        out: dict[str, Any] = {
            "queues": self.gauge.report(),
            "waits_s": {
                "admission_slot": round(self.admission.wait_s, 3),
                "request_slot": round(inf.queue_wait_s, 3),
                "verification_busy": round(self.verification.busy_s, 3),
            },
            "inference": inf.report(),
            "verification": {
                "in_process": self.verification.quick,
                "worker_batches": self.verification.batches,
                "worker_failures": self.verification.worker_failures,
            },
            "memory": memory_report(),
        }
        batches = self.backend.statistics()
        if batches is not None:
            out["batches"] = batches
        if self.sandbox is not None:
            out["sandbox"] = self.sandbox.statistics()
            out["waits_s"]["sandbox_interpreter"] = out["sandbox"]["interpreter_wait_s"]
        return out

    def close(self) -> None:
        """No more jobs: the stages finish what they hold and exit."""
        self._jobs_send.close()

    async def feed(self, items: AsyncIterable[Any] | Iterable[Any], route: Route) -> None:
        """Admit every item of one stream: parse errors and cache hits go straight to the route."""
        convert = RecordConverter()
        try:
            n = 0
            if isinstance(items, AsyncIterable):  # a file reader hands out a chunk of lines at once
                async for item in items:
                    await self._admit(convert(item), route)
                    n += 1
                    if n % BATCH == 0:  # admitting takes no trip through the loop while slots are free
                        await anyio.lowlevel.checkpoint()
            else:
                for item in items:
                    await self._admit(convert(item), route)
                    n += 1
                    if n % BATCH == 0:
                        await anyio.lowlevel.checkpoint()
        except Exception as e:  # the input itself failed (a read error): the caller's stream raises it
            route.error = e
        finally:
            route.fed_all = True
            route.finish_if_done()

    @property
    def slots(self) -> Admission:
        """The admission limit (``slots.value``: slots free now)."""
        return self.admission

    async def _admit(self, item: Problem | Result, route: Route) -> None:
        ticket = await self.admission.admit(route)
        try:
            if isinstance(item, Result):
                await self._deliver(item, ticket)
                return
            if self.planner is not None and self.planner.spent():
                self.stats.out_of_time += 1
                await self._deliver(self._out_of_time(item), ticket)
                return
            timeout = self.cfg.run.problem_timeout_s
            if timeout is not None and item.deadline is None and self.planner is None:
                item = replace(item, deadline=now() + timeout)
            key = cache_key(item.text, self.fingerprint)
            serial = self._by_key.get(key)
            if serial is not None:  # the same problem is already being computed: share it
                self._waiters[serial].append(_Waiter(item, ticket, key))
                return
            # Reserve the key before any await, so an identical problem arriving meanwhile follows this
            # one instead of becoming a second leader.
            self._serial += 1
            serial = self._serial
            self._by_key[key] = serial
            self._waiters[serial] = [_Waiter(item, ticket, key)]
        except BaseException:
            ticket.close()
            raise
        try:
            hit = await self.cache.get(item, key)
            if hit is None:
                await put(self._jobs_send, Job(problem=item, key=key, serial=serial))
                return
        except BaseException:
            with anyio.CancelScope(shield=True):  # route channels hold all admitted work: no wait
                await self._not_submitted(item, key, serial)
            raise
        self._release_key(key, serial)
        with anyio.CancelScope(shield=True):  # the hit is delivered whole even if this feeder is cancelled
            for w in self._waiters.pop(serial, []):
                await self._deliver(
                    replace(hit, id=w.problem.id, line=w.problem.line, gold=w.problem.answer), w.ticket
                )

    def _out_of_time(self, p: Problem) -> Result:
        budget = self.cfg.time.budget_s
        return Result(
            id=p.id,
            answer=self.cfg.answer.fallback,
            status="fallback" if self.cfg.answer.fallback is not None else "error",
            error=f"the time budget ({budget:g} s) was spent before this problem started",
            line=p.line,
            gold=p.answer,
        )

    async def _not_submitted(self, item: Problem, key: str, serial: int) -> None:
        """The leader's feeder was cancelled before its job was submitted. Followers from other streams
        still want the answer: submit it for them if the engine takes it now; anyone left gets an error
        result instead of waiting forever."""
        waiters = self._waiters.get(serial, [])
        if any(w.problem is not item for w in waiters):
            try:
                self._jobs_send.send_nowait(Job(problem=item, key=key, serial=serial))
            except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            else:
                return
        self._release_key(key, serial)
        for w in self._waiters.pop(serial, []):
            p = w.problem
            reason = "cancelled before it was solved"
            await self._deliver(error_result(p.id, reason, line=p.line, gold=p.answer), w.ticket)

    def _release_key(self, key: str, serial: int) -> None:
        if self._by_key.get(key) == serial:
            del self._by_key[key]

    def abandon(self, route: Route) -> int:
        """The caller of ``route`` has gone: forget its waiters, give back their slots, and cancel the
        problems nobody else waits for (their requests leave the engine). Returns how many were
        cancelled."""
        cancelled = 0
        for serial in list(self._waiters):
            waiters = self._waiters[serial]
            keep = [w for w in waiters if w.route is not route]
            for w in waiters:
                if w.route is route:
                    w.ticket.close()
            if keep:
                self._waiters[serial] = keep
                continue
            del self._waiters[serial]
            self._release_key(waiters[0].key, serial)
            self.inference.cancel(serial)
            cancelled += 1
        return cancelled

    async def _deliver(self, result: Result, ticket: Ticket) -> None:
        """Hand ``result`` to its caller's channel with its ticket (the caller releases the slot)."""
        self.stats.record(result)
        try:
            await put(ticket.route.channel, (result, ticket))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            ticket.release()  # the caller has gone; nobody will take this result
        ticket.delivered()

    def cleanup(self) -> None:
        """``gc.collect()`` and, where torch uses CUDA, ``torch.cuda.empty_cache()``."""
        started = now()
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.stats.cleanups += 1
        self.stats.cleanup_s += now() - started

    async def _route_results(self, receive: MemoryObjectReceiveStream[Routed]) -> None:
        async with receive:
            async for items in batches(receive):
                for item in items:
                    await self._route_one(item)

    async def _route_one(self, item: Routed) -> None:
        self._routed += 1
        every = self.cfg.run.cleanup_every
        if every is not None and self._routed % every == 0:
            self.cleanup()
        result, serial = item.result, item.serial
        self._release_key(item.key, serial)
        waiters = self._waiters.pop(serial, [])
        if not waiters:  # everyone who asked has gone
            return
        if not result.partial:  # a cut-short vote is not kept
            try:
                await self.cache.put(item.key, result)
            except Exception as e:  # a cache failure is a warning; the answers go on
                structlog.get_logger("pipeline.cache").warning(
                    "cannot store a result in the cache", error=f"{type(e).__name__}: {e}"
                )
        for w in waiters:
            p = w.problem
            if p.id == result.id and p.line == result.line:  # the problem that was computed
                await self._deliver(result, w.ticket)
                continue
            status: Status = "error" if result.status == "error" else "cached"
            shared = replace(result, id=p.id, line=p.line, gold=p.answer, status=status)
            await self._deliver(shared, w.ticket)
