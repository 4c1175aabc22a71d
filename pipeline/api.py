"""The public async API.

```python
async with Pipeline(Config()) as p:
    async with p.stream(problems) as results:  # Problems, dicts, strings, or an async iterable
        async for result in results:
            print(result.id, result.answer)
    one = await p.solve("What is 2 + 3?")
```

A ``Pipeline`` loads the model once and keeps its stages running until the ``async with`` block ends;
any number of ``stream()`` and ``solve()`` calls, one after another or at the same time, share them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import replace
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from pipeline.admission import Route, Ticket
from pipeline.budget import MemoryPlan, plan_memory
from pipeline.cache import ResultCache
from pipeline.config import Config
from pipeline.items import Problem, Result
from pipeline.runner import Runner, RunStats
from stages.backends.base import Backend, BackendError
from stages.clock import now
from stages.parse import RecordConverter
from stages.streams import batches
from stages.verification import Verification


class PipelineError(RuntimeError):
    """The pipeline cannot run (the model does not load, the cache cannot open)."""


def _first_exception(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (task groups wrap what their tasks raised)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def load_backend(cfg: Config) -> Backend:
    """Load the configured model backend (blocking).

    Raises:
        BackendError: the model is missing or cannot be loaded; the message says what to do.
    """
    m = cfg.model
    if m.backend == "replay":
        from stages.backends.replay import ReplayBackend

        if m.replay is None:
            raise BackendError("the replay backend needs a file: --replay FILE.jsonl")
        return ReplayBackend.load(m.replay, speed=m.replay_speed)
    if m.backend == "vllm":
        from stages.backends.vllm_backend import VllmBackend

        return VllmBackend.load(cfg)
    if m.backend == "openai":
        from stages.backends.openai_backend import OpenAIBackend

        return OpenAIBackend.load(cfg)
    from stages.backends.transformers_backend import TransformersBackend

    g = cfg.generation
    return TransformersBackend.load(
        m.path,
        device=m.device,
        dtype=m.dtype,
        quantize=m.quantize,
        batching=cfg.batch.mode,
        sampled=g.samples > 1 or g.uses_tools,
    )


def open_backend(cfg: Config, backend: Backend | None = None) -> tuple[Backend, MemoryPlan | None]:
    """Load the configured backend (or take ``backend``), plan its memory and set its batching limits
    (blocking): what comes back is ready to serve; on failure a backend loaded here is closed again.

    Raises:
        BackendError: the model is missing or cannot be loaded.
        PipelineError: it does not fit the memory budget.
    """
    own = backend is None
    ready = load_backend(cfg) if backend is None else backend
    try:
        plan: MemoryPlan | None = None
        max_tokens = cfg.batch.max_batch_tokens
        if max_tokens is None:
            try:
                plan = plan_memory(ready.memory_profile(), cfg.model.memory_gb, device=ready.device)
            except ValueError as e:
                raise PipelineError(str(e)) from e
            if plan is not None:
                max_tokens = plan.max_batch_tokens
        ready.configure(  # micro-batching limits (a backend that batches on its own ignores them)
            max_batch_size=cfg.batch.max_batch_size,
            max_wait_s=cfg.batch.max_wait_ms / 1000.0,
            max_batch_tokens=max_tokens,
        )
    except BaseException:
        if own:
            ready.close()
        raise
    return ready, plan


def _shielded(close: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        with anyio.CancelScope(shield=True):
            await close()

    return run


class Pipeline:
    """The streaming solver. Use as ``async with Pipeline(cfg) as p``.

    ``backend`` replaces the configured model (tests pass a scripted fake). The model loads, the memory
    plan is made and the verification workers start in ``__aenter__``.
    """

    def __init__(self, config: Config | None = None, *, backend: Backend | None = None) -> None:
        self.config = config or Config()
        self._backend = backend
        self._own_backend = backend is None
        self._tg: TaskGroup | None = None
        self._runner: Runner | None = None
        self._feeders: list[anyio.CancelScope] = []
        self._stats: RunStats | None = None
        self.memory_plan: MemoryPlan | None = None
        self._exit: AsyncExitStack | None = None

    @property
    def backend(self) -> Backend:
        """The loaded model backend.

        Raises:
            PipelineError: the pipeline has not been entered.
        """
        if self._backend is None:
            raise PipelineError("the pipeline is not running: use `async with Pipeline(cfg) as p`")
        return self._backend

    @property
    def runner(self) -> Runner:
        """The running stages.

        Raises:
            PipelineError: the pipeline has not been entered.
        """
        if self._runner is None:
            raise PipelineError("the pipeline is not running: use `async with Pipeline(cfg) as p`")
        return self._runner

    @property
    def stats(self) -> RunStats:
        """Counters since the pipeline started (still readable after it stopped).

        Raises:
            PipelineError: the pipeline was never entered.
        """
        if self._stats is None:
            raise PipelineError("the pipeline has not run: use `async with Pipeline(cfg) as p`")
        return self._stats

    async def __aenter__(self) -> Pipeline:
        """Load the model and start the verification workers (at the same time), plan memory, start the
        backend and the stages.

        Every resource registers its clean-up on one exit stack as it is made; a failure part-way
        unwinds exactly what was made, and ``__aexit__`` unwinds the same stack.

        Raises:
            PipelineError: the model cannot be loaded, does not fit the memory budget, the cache cannot
                open, or the workers cannot start.
        """
        try:
            async with AsyncExitStack() as stack:
                await self._start(stack)
                self._exit = stack.pop_all()
        except BaseException as e:
            leaf = _first_exception(e)
            if isinstance(leaf, PipelineError):
                raise leaf from e
            if isinstance(leaf, Exception):
                raise PipelineError(f"the model backend failed to start: {leaf}") from e
            raise
        assert self._runner is not None
        self._runner.stats.started = now()
        self._stats = self._runner.stats
        return self

    async def _start(self, stack: AsyncExitStack) -> None:
        cfg = self.config
        verification = Verification(cfg)
        stack.push_async_callback(_shielded(verification.aclose))
        errors: list[Exception] = []
        given = self._backend
        loaded: list[tuple[Backend, MemoryPlan | None]] = []

        async def load() -> None:
            try:
                loaded.append(await anyio.to_thread.run_sync(open_backend, cfg, given))
            except Exception as e:
                errors.append(e)

        async def workers() -> None:
            try:
                await verification.start()
            except Exception as e:
                errors.append(PipelineError(f"cannot start the verification worker processes: {e}"))

        # The workers start while the model loads: on a small machine that hides their start-up.
        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            tg.start_soon(workers)
        if loaded:
            backend, self.memory_plan = loaded[0]
            self._backend = backend
            if self._own_backend:
                stack.callback(self._close_backend)
        if errors:
            e = errors[0]
            raise (e if isinstance(e, PipelineError) else PipelineError(str(e))) from e
        try:
            cache = ResultCache(cfg.cache.size, cfg.cache.dir)
        except Exception as e:
            raise PipelineError(f"cannot open the result cache in {cfg.cache.dir}: {e}") from e
        stack.callback(cache.close)
        if cfg.model.record is not None:
            from stages.backends.replay import RecordingBackend

            try:
                backend = recorder = RecordingBackend(backend, cfg.model.record)
            except BackendError as e:
                raise PipelineError(str(e)) from e
            stack.callback(recorder.close_file)
        self._runner = runner = Runner(cfg, backend, cache, verification)
        stack.callback(self._forget_runner)
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        await self._tg.start(runner.run)

    def _close_backend(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _forget_runner(self) -> None:
        self._tg = None
        self._runner = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop feeding, let the stages drain, then unwind what ``__aenter__`` made, last first."""
        stack, self._exit = self._exit, None
        if stack is None:
            return None
        for scope in self._feeders:
            scope.cancel()
        if self._runner is not None:
            self._runner.close()
        if exc is not None and self._tg is not None:
            self._tg.cancel_scope.cancel()
        # True when the block's error was the engine's own cancellation (after ``abort()``), which its
        # task group absorbed: passing that on keeps it from escaping the block
        return await stack.__aexit__(exc_type, exc, tb)

    def metrics(self) -> dict[str, Any]:
        """Queue depths per stream, time waiting per stage, batch fill, sandbox and memory figures
        (see ``pipeline.metrics``); the memory plan's derivation when there is one.

        Raises:
            PipelineError: the pipeline is not running.
        """
        out = self.runner.metrics()
        if self.memory_plan is not None:
            out["memory_plan"] = self.memory_plan.describe()
        return out

    def abort(self) -> None:
        """Stop now: cancel every stream's feeder and every stage; in-flight work is dropped.

        Called when a run is interrupted; leaving the ``async with`` block afterwards is quick.
        """
        for scope in self._feeders:
            scope.cancel()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def stream(self, problems: AsyncIterable[Any] | Iterable[Any]) -> ResultStream:
        """Solve ``problems``: one ``Result`` per input as each finishes (completion order).

        Use it as ``async with p.stream(problems) as results: async for r in results: ...``: leaving
        the block (``break``, an error, cancellation) gives back every slot and cancels the problems
        only this stream waited for, at once. ``async for r in p.stream(problems)`` works too; there
        that clean-up waits for the generator to be closed (wrap it in ``contextlib.aclosing``).

        Items may be ``Problem``s, dicts (``id`` and ``problem``), strings (ids are their positions),
        or the output of ``stages.parse.read_problems`` (``Problem``s and error ``Result``s).

        Raises (from the iteration):
            PipelineError: the pipeline has not been entered.
            Exception: whatever reading ``problems`` raised, after the results already made.
        """
        return ResultStream(self, problems)

    async def solve(
        self, problem: Problem | str | dict[str, Any], *, timeout_s: float | None = None
    ) -> Result:
        """Solve one problem and return its result.

        ``timeout_s``: after this many seconds the problem's unfinished samples are cancelled and the
        vote is taken on what finished (a ``fallback`` answer when nothing did). An identical problem
        already in flight is shared, with that one's deadline.

        Raises:
            PipelineError: the pipeline has not been entered.
        """
        if timeout_s is not None:
            if not isinstance(problem, Problem):
                converted = RecordConverter()(problem)
                if isinstance(converted, Result):
                    return converted
                problem = converted
            problem = replace(problem, deadline=now() + timeout_s)
        result: Result | None = None
        async with self.stream([problem]) as results:
            async for r in results:
                result = r
        assert result is not None
        return result


class ResultStream:
    """One ``Pipeline.stream`` call: an async context manager whose value is the results' iterator
    (the feeder starts on entry; the exit cleans up), and, for the simple form, an async iterable."""

    def __init__(self, pipeline: Pipeline, problems: AsyncIterable[Any] | Iterable[Any]) -> None:
        self._pipeline = pipeline
        self._problems = problems
        self._entered = False
        self._held: deque[tuple[Result, Ticket]] = deque()

    async def __aenter__(self) -> AsyncIterator[Result]:
        if self._entered:
            raise PipelineError("a stream can be entered once")
        self._entered = True
        p = self._pipeline
        runner = p.runner
        if p._tg is None:
            raise PipelineError("the pipeline has not been entered (use `async with Pipeline(...)`)")
        size = p.config.run.max_in_flight
        self._send, self._receive = anyio.create_memory_object_stream[tuple[Result, Ticket]](size)
        self._route = route = Route(self._send)
        self._scope = scope = anyio.CancelScope()
        p._feeders.append(scope)
        problems = self._problems

        async def feed() -> None:
            with scope:
                await runner.feed(problems, route)

        p._tg.start_soon(feed)
        return self._results()

    async def _results(self) -> AsyncIterator[Result]:
        held = self._held  # taken from the channel, not yet read: ``__aexit__`` frees their slots
        async for batch in batches(self._receive):
            held.extend(batch)
            while held:
                result, ticket = held.popleft()
                ticket.release()
                yield result
        if self._route.error is not None:
            raise self._route.error

    async def __aexit__(self, *exc: object) -> None:
        p, route, receive = self._pipeline, self._route, self._receive
        self._scope.cancel()
        p._feeders.remove(self._scope)
        if not route.fed_all or route.outstanding:
            # The caller stopped early: problems only it waits for are cancelled in the runner.
            p.runner.abandon(route)
        while self._held:  # give back the slots of results already made that nobody will read
            self._held.popleft()[1].release()
        while True:
            try:
                _, ticket = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            ticket.release()
        receive.close()
        self._send.close()

    async def __aiter__(self) -> AsyncIterator[Result]:
        async with self as results:
            async for r in results:
                yield r
