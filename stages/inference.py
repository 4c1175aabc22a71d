"""The inference stage: every sample is one request to the backend, sent on as soon as it completes.

Each encoded problem's ``samples`` samples are handed to sample workers, tasks of the stage's task
group that run one sample after another (a task per sample costs more than the sample itself when the
model is fast), so completions leave in completion order, not batch order. At most
``max_in_flight x samples`` samples run at once (one per worker; the rest wait in a backlog, which
admission bounds) and, optionally, ``run.max_tokens_in_flight`` tokens. Batching is the backend's
business.

A sample may take several rounds (prompt style ``tir``): a round that stops at the end of a code
block has its code run in the sandbox (``stages/sandbox.py``, one interpreter per sample), the output
is appended, and the same task sends the next round's request, until the sample ends, runs out of
rounds or tokens, or reaches the model's context. The feedback edge of the design (verification back
to inference) lives inside the sample's run on its worker: it holds its place for all its rounds, so
no queue lies on a cycle and nothing can deadlock, whatever the stream sizes.

A problem's samples can be cancelled together (``cancel(serial)``: the caller went away, or an
early-stopping vote decided): cancelling a sample's scope aborts its request in the engine or kills
its running cell, wherever it is; a sample still waiting for a worker never starts. A cancelled
sample still travels on as a ``Generation`` with ``finish_reason="aborted"``, so downstream counts
stay whole.

With a time budget (``pipeline.budget.TimePlanner``) each problem gets its deadline and its number of
samples when its samples start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stages.backends.base import Backend, Request, SamplingParams, sample_seed
from stages.budget import TimePlanner
from stages.clock import now, scope_deadline
from stages.confidence_stop import ConfidenceGate, ConfidenceTrack, ConfidenceWatch
from stages.config import Config
from stages.items import Encoded, Generation, Outcome
from stages.prompting import style_for
from stages.sandbox import Sandbox, SandboxError
from stages.selection import token_confidence, token_entropy
from stages.streams import BATCH, batches, put

TIME_LIMIT = "time limit reached"  # a timed-out sample's error text (its outcome is "timed_out")


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
        self.rounds = 0
        self.skipped = 0
        self.queue_wait_s = 0.0

    def report(self) -> dict[str, Any]:
        """A snapshot for the run's metrics."""
        return {
            "requests": self.requests,
            "rounds": self.rounds,
            "completed": self.completed,
            "failed": self.failed,
            "aborted": self.aborted,
            "never_started": self.skipped,
            "peak_in_flight": self.peak_in_flight,
            "new_tokens": self.new_tokens,
        }


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


@dataclass(frozen=True, slots=True)
class _Work:
    """A sample waiting for a worker."""

    encoded: Encoded
    index: int
    scope: anyio.CancelScope
    of: int
    queued: float


class _Park:
    """A worker waiting for its next sample (``None``: the stage's input has ended)."""

    __slots__ = ("event", "work")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.work: _Work | None = None

    def wake(self, work: _Work | None) -> None:
        self.work = work
        self.event.set()


@dataclass
class _Outcome:
    """A sample's rounds, put together."""

    text: str = ""
    new_tokens: int = 0
    finish: str = "eos"
    rounds: int = 0
    cells: int = 0
    clean: int = 0
    logprobs: list[float] | None = None
    entropies: list[float] | None = None
    confidences: list[float] | None = None
    errors: list[str] = field(default_factory=list)
    track: ConfidenceTrack | None = None  # DeepConf online: the sample's running confidence


class Inference:
    """The stage's state: the request and token bounds, per-problem cancel scopes, counters.

    ``wanted(serial)`` says whether anyone still waits for a problem; one nobody wants is skipped.
    ``sandbox`` runs code cells (required for the ``tir`` style); ``planner`` gives each problem its
    deadline and samples under a time budget. Every sample has its cancel scope from the start, and
    runs inside it on a sample worker; how many samples exist is bounded by admission
    (``run.max_in_flight`` problems).
    """

    def __init__(
        self,
        backend: Backend,
        cfg: Config,
        wanted: Callable[[int], bool] | None = None,
        *,
        sandbox: Sandbox | None = None,
        planner: TimePlanner | None = None,
    ) -> None:
        self.backend = backend
        self.cfg = cfg
        self.wanted = wanted or (lambda _: True)
        self.style = style_for(cfg.generation.prompt_style)
        self.sandbox = sandbox
        self.planner = planner
        self.max_requests = cfg.run.max_in_flight * cfg.generation.samples  # samples running at once
        self._workers = 0  # sample workers started
        self._parked: deque[_Park] = deque()  # workers waiting to be handed a sample
        self._backlog: deque[_Work] = deque()  # samples waiting for a worker (all are busy)
        self._closed = False
        self._changed = anyio.Event()  # set when the backlog or a waiting sample's scope changes
        self._sweeping = False
        self._tokens = TokenGate(cfg.run.max_tokens_in_flight)
        self._scopes: dict[int, list[anyio.CancelScope]] = {}
        self._gates: dict[int, ConfidenceGate] = {}  # DeepConf online: each problem's threshold
        self.stats = InferenceStats()

    def params(
        self,
        encoded: Encoded,
        index: int,
        round_: int = 0,
        *,
        max_new_tokens: int | None = None,
        watch: ConfidenceWatch | None = None,
    ) -> SamplingParams:
        """The sampling settings of sample ``index``'s round ``round_`` (``max_new_tokens`` the round's
        budget, else the run's); its seed depends on the problem, the index and the round only."""
        g = self.cfg.generation
        return SamplingParams(
            max_new_tokens=max_new_tokens or g.max_new_tokens,
            watch=watch,
            greedy=g.greedy,
            temperature=g.temperature,
            top_p=g.top_p,
            min_p=g.min_p,
            seed=sample_seed(g.seed, encoded.job.key, index, round_),
            logprobs=g.logprobs or self.cfg.vote.confidence,
            top_logprobs=g.top_logprobs,
            stop_at_answer=g.stop_at_answer,
        )

    def cancel(self, serial: int) -> None:
        """Abort every sample of problem ``serial`` wherever it is (each still sends an aborted
        Generation)."""
        for scope in self._scopes.get(serial, []):
            scope.cancel()
        if self._backlog:
            self._backlog_changed()

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Encoded],
        send: MemoryObjectSendStream[Generation],
    ) -> None:
        """Submit every sample of every problem; send each ``Generation`` as its sample completes."""
        async with receive, send, anyio.create_task_group() as tg:
            try:
                async for items in batches(receive):
                    started = 0
                    for item in items:
                        started += self._start(item, send, tg)
                        if started >= BATCH:  # starting workers costs: let the loop breathe
                            await anyio.lowlevel.checkpoint()
                            started = 0
            finally:
                self._closed = True  # no more samples: parked workers end, busy ones end after theirs
                while self._parked:
                    self._parked.popleft().wake(None)

    def _start(self, item: Encoded, send: MemoryObjectSendStream[Generation], tg: anyio.abc.TaskGroup) -> int:
        """Hand each sample of ``item`` to a parked sample worker, or to a new one (at most
        ``max_requests`` run at once); past that the sample waits in the backlog, which admission
        bounds (``run.max_in_flight`` problems' samples) and ``_sweep`` watches for samples cancelled
        or out of time while they wait. Returns how many samples it handed out."""
        serial = item.job.serial
        if not self.wanted(serial):
            return 0
        samples = self.cfg.generation.samples
        deadline = item.problem.deadline
        if self.planner is not None:
            plan = self.planner.plan()
            samples = plan.samples
            if plan.deadline is not None:
                deadline = plan.deadline if deadline is None else min(deadline, plan.deadline)
        at = scope_deadline(deadline)
        scopes = [anyio.CancelScope(deadline=at) for _ in range(samples)]
        self._scopes[serial] = scopes
        v = self.cfg.vote
        if v.stops_early:
            self._gates[serial] = ConfidenceGate(
                fixed=v.deepconf_stop, warmup=v.deepconf_warmup, keep=v.deepconf_keep
            )
        queued = now()
        for index, scope in enumerate(scopes):
            work = _Work(item, index, scope, samples, queued)
            if self._parked:
                self._parked.popleft().wake(work)
            elif self._workers < self.max_requests:
                self._workers += 1
                tg.start_soon(self._worker, work, send)
            else:
                self._backlog.append(work)
                self._backlog_changed()
                if not self._sweeping:
                    self._sweeping = True
                    tg.start_soon(self._sweep, send)
        return samples

    def _backlog_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _sweep(self, send: MemoryObjectSendStream[Generation]) -> None:
        """While samples wait in the backlog: end each whose scope is cancelled or past its deadline as
        it happens (an aborted ``Generation``, as if it had started), not when a worker frees up."""
        backlog = self._backlog
        try:
            while backlog:
                changed = self._changed
                soonest = min(w.scope.deadline for w in backlog)
                with anyio.CancelScope(deadline=soonest):
                    await changed.wait()
                at = anyio.current_time()
                gone = [w for w in backlog if w.scope.cancel_called or w.scope.deadline <= at]
                for w in gone:
                    backlog.remove(w)
                for w in gone:
                    await self._sample(w.encoded, w.index, w.scope, send, w.of, w.queued)
        finally:
            self._sweeping = False

    async def _worker(self, work: _Work | None, send: MemoryObjectSendStream[Generation]) -> None:
        """Run samples one after another: the backlog's first, else park until handed one (a task per
        sample would cost more than the sample itself when the model is fast)."""
        while work is not None:
            await self._sample(work.encoded, work.index, work.scope, send, work.of, work.queued)
            if self._backlog:
                work = self._backlog.popleft()
                if not self._backlog:
                    self._backlog_changed()  # the sweeper ends with the backlog
            elif self._closed:
                return
            else:
                park = _Park()
                self._parked.append(park)
                await park.event.wait()
                work = park.work

    def _done(self, serial: int, scope: anyio.CancelScope) -> None:
        """Sample ``scope`` of problem ``serial`` has ended; the problem is forgotten with its last."""
        scopes = self._scopes.get(serial)
        if scopes is not None:
            scopes.remove(scope)
            if not scopes:
                del self._scopes[serial]
                self._gates.pop(serial, None)

    async def _rounds(self, encoded: Encoded, index: int, out: _Outcome) -> None:
        """Run sample ``index`` round by round into ``out`` (kept whole if cancelled midway), through the
        prompt style's dialogue: a round that leaves a code cell runs it in the sample's sandbox
        session and hands the output back."""
        g = self.cfg.generation
        backend = self.backend
        dialogue = self.style.dialogue(encoded.prompt_ids, encoded.problem.text, self.cfg, backend)
        session = self.sandbox.session() if self.sandbox is not None and g.uses_tools else None
        gate = self._gates.get(encoded.job.serial)
        if gate is not None:
            out.track = ConfidenceTrack(self.cfg.vote.deepconf_window)
        try:
            for round_ in range(g.max_rounds):
                prompt = await dialogue.prompt()
                budget = min(g.max_new_tokens - out.new_tokens, backend.max_context - len(prompt))
                if budget < 1:
                    out.finish = "length"
                    return
                watch = (
                    ConfidenceWatch(out.track, gate) if gate is not None and out.track is not None else None
                )
                params = dialogue.shape(
                    self.params(encoded, index, round_, max_new_tokens=budget, watch=watch)
                )
                request = Request(
                    id=f"{encoded.job.serial}-{index}-{round_}",
                    prompt_ids=prompt,
                    params=params,
                    problem_id=encoded.problem.id,
                    sample=index,
                    round=round_,
                )
                out.rounds += 1
                self.stats.rounds += 1
                c = await backend.generate(request)
                out.new_tokens += c.new_tokens
                out.finish = c.finish_reason
                if c.logprobs is not None:
                    out.logprobs = (out.logprobs or []) + list(c.logprobs)
                if c.top_logprobs is not None:
                    rows = [h for t in c.top_logprobs if (h := token_entropy(t)) is not None]
                    out.entropies = (out.entropies or []) + rows  # an empty or broken row: no figure
                    conf = [x for t in c.top_logprobs if (x := token_confidence(t)) is not None]
                    out.confidences = (out.confidences or []) + conf
                    if out.track is not None:  # the sample's running window, from the same figures
                        for x in conf:
                            out.track.add(x)
                step = dialogue.take(c)
                out.text = dialogue.text
                if step == "done" or c.finish_reason == "confidence":
                    return
                if step == "again":
                    continue
                if session is None:  # no sandbox: the code is text like any other
                    dialogue.unrun()
                    out.text = dialogue.text
                    continue
                if round_ == g.max_rounds - 1:  # no round left to read the output
                    dialogue.unrun()
                    out.text = dialogue.text
                    out.finish = "rounds"
                    return
                result = await session.run(dialogue.code)
                out.cells += 1
                out.clean += result.ok
                if result.error:
                    out.errors.append(result.error.strip().splitlines()[-1][:200])
                dialogue.answer(result.for_model(self.cfg.sandbox.output_chars))
                out.text = dialogue.text
            out.finish = "rounds"
        finally:
            if session is not None:
                with anyio.CancelScope(shield=True):
                    await session.aclose()

    async def _sample(
        self,
        encoded: Encoded,
        index: int,
        scope: anyio.CancelScope,
        send: MemoryObjectSendStream[Generation],
        samples: int,
        waited: float,
    ) -> None:
        """One sample, queued at ``waited``: wait for its tokens, then run its rounds, all inside the
        sample's cancel scope, so a decided or timed-out problem's sample stops wherever it is."""
        s = self.stats
        tokens = encoded.prompt_tokens + self.cfg.generation.max_new_tokens
        started = waited
        out = _Outcome()
        error: str | None = None
        finished = False
        holding = False
        try:
            with scope:
                await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled while queued: never starts
                await self._tokens.acquire(tokens)
                holding = True
                started = now()
                s.requests += 1
                s.in_flight += 1
                s.peak_in_flight = max(s.peak_in_flight, s.in_flight)
                try:
                    await self._rounds(encoded, index, out)
                    finished = True
                    gate = self._gates.get(encoded.job.serial)
                    if gate is not None and out.track is not None and out.finish != "confidence":
                        gate.finished(out.track)
                except SandboxError as e:
                    error = f"the sandbox cannot run code: {e}"
                except Exception as e:  # the model's failure is this sample's failure; the run goes on
                    error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            if holding:
                s.in_flight -= 1
                self._tokens.release(tokens)
            self._done(encoded.job.serial, scope)
        if not holding:
            s.skipped += 1
            started = now()
        queue_s = started - waited
        s.queue_wait_s += queue_s
        elapsed = now() - started
        s.new_tokens += out.new_tokens
        outcome: Outcome
        if finished:
            s.completed += 1
            s.prompt_tokens += encoded.prompt_tokens
            text, reason, outcome = out.text, out.finish, "finished"
        elif error is not None:
            s.failed += 1
            text, reason, outcome = "", "error", "failed"
        else:
            s.aborted += 1
            timed_out = anyio.current_time() >= scope.deadline
            text, reason = "", "aborted"
            outcome = "timed_out" if timed_out else "cancelled"
            error = TIME_LIMIT if timed_out else "cancelled"
        await put(
            send,
            Generation(
                encoded=encoded,
                index=index,
                text=text,
                new_tokens=out.new_tokens,
                queue_s=queue_s,
                inference_s=elapsed,
                error=error,
                finish_reason=reason,
                logprobs=tuple(out.logprobs) if out.logprobs is not None and finished else None,
                entropies=tuple(out.entropies) if out.entropies is not None and finished else None,
                confidences=tuple(out.confidences) if out.confidences is not None and finished else None,
                of=samples,
                rounds=out.rounds,
                cells=out.cells,
                clean_cells=out.clean,
                cell_errors=tuple(out.errors),
                outcome=outcome,
            ),
        )
