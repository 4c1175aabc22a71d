"""The same stream on a Ray cluster: ``python -m pipeline stream INPUT --engine ray`` (the ``ray`` extra).

The driver parses the input with the local rules (bad lines, duplicate ids and ``--resume`` are
decided here, before anything reaches Ray), then hands the good problems to Ray Data in chunks:
``from_items`` → ``map_batches(Solver, concurrency=replicas)``. Each ``Solver`` actor holds one
``Pipeline`` (this project's async engine with its own model on its own device, on an event loop in a
thread of the actor) and streams its batch through it. Results come back as rows and are written by
the same ``ResultWriter`` as the local engine's, in the same schema.

Nothing is lost: an actor that dies is restarted and its batch retried (``max_restarts`` /
``max_task_retries``); a batch that fails for good, or a chunk whose execution fails, turns every
problem of it that has no result yet into an error result naming the cause. The driver checks that
every problem it sent came back.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.config import Config
from pipeline.items import Problem, Result, error_result

INSTALL_RAY = "pip install 'aimo-pipeline[ray]' (or: pip install 'ray[data]>=2.40')"
_NO_ANSWER = -(2**63)  # Ray Data's integer columns hold no None
CHUNK = 100_000  # problems per Ray dataset (and actor pool): bounds the driver's memory on long inputs
ACTOR_RETRIES = 3


def ray_available() -> bool:
    """Whether Ray (with Ray Data) can be imported."""
    return importlib.util.find_spec("ray") is not None


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: ``address`` of an existing cluster (``None`` starts a local one),
    ``replicas`` actors, each with ``cpus`` CPUs and ``gpus`` GPUs, ``batch_size`` problems per call.
    ``backend`` is ``"module:callable"`` building a backend inside each actor (tests: a scripted one);
    ``None`` loads the configured model."""

    address: str | None = None
    replicas: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    batch_size: int = 16
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.cpus <= 0 or self.gpus < 0:
            raise ValueError("--cpus-per-replica must be positive and --gpus-per-replica >= 0")
        if self.batch_size < 1:
            raise ValueError("--ray-batch-size must be at least 1")


def _load(spec: str) -> Callable[[], Any]:
    module, _, name = spec.partition(":")
    factory: Callable[[], Any] = getattr(importlib.import_module(module), name)
    return factory


class Solver:
    """A Ray Data actor: one ``Pipeline`` for the actor's life (on a background event loop), fed one
    batch at a time."""

    def __init__(self, config: dict[str, Any], backend: str | None = None) -> None:
        from pipeline.portal import BackgroundPipeline

        self.cfg = Config.from_dict(config)
        self.held = BackgroundPipeline(self.cfg, _load(backend)() if backend else None)
        if not self.held.wait_ready():  # an actor that cannot load its model fails to start
            self.held.close()
            raise RuntimeError(f"the pipeline on a Ray actor failed to start: {self.held.load_error}")

    async def _solve(self, problems: list[Problem]) -> list[Result]:
        async with self.held.pipeline.stream(problems) as results:
            return [r async for r in results]

    def close(self) -> None:
        """Close the pipeline and its event loop (Ray Data calls nothing at the end; the actor's
        process ending releases it too)."""
        self.held.close()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Solve a batch of rows (``serial``, ``id``, ``problem``, ``answer``, ``line``); one result row
        (``serial``, ``result`` as JSON) per input row, whatever happens inside. An actor whose
        pipeline has died exits, so that Ray restarts it and retries the batch."""
        if self.held.pipeline is None:  # the model or engine died: a fresh actor, not rows of errors
            os._exit(1)
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        problems = []
        for r in rows:
            gold, line = int(r["answer"]), int(r["line"])
            problems.append(
                Problem(
                    id=str(r["id"]),
                    text=str(r["problem"]),
                    answer=None if gold == _NO_ANSWER else gold,
                    line=None if line < 0 else line,
                )
            )
        try:
            results = self.held.call(self._solve, problems)
        except Exception as e:  # the engine died: every row still gets its result
            reason = f"the pipeline on a Ray actor failed: {type(e).__name__}: {e}"
            results = [error_result(p.id, reason, line=p.line, gold=p.answer) for p in problems]
        by_id = {(r.id, r.line): r for r in results}
        out = []
        for p in problems:
            res = by_id.get((p.id, p.line)) or error_result(p.id, "no result from the actor", line=p.line)
            out.append(json.dumps(res.to_json()))
        return {"serial": [int(row["serial"]) for row in rows], "result": out}


def _row(serial: int, p: Problem) -> dict[str, Any]:
    # Ray Data's columns need one type each: no None for integer columns
    return {
        "serial": serial,
        "id": p.id,
        "problem": p.text,
        "answer": p.answer if p.answer is not None else _NO_ANSWER,
        "line": p.line if p.line is not None else -1,
    }


def init_ray(options: RayOptions) -> Any:
    """Connect to ``options.address`` or start a local cluster with this process's import path.

    Raises:
        RuntimeError: Ray is not installed (the message names the install command).
    """
    if not ray_available():
        raise RuntimeError(f"--engine ray needs Ray: {INSTALL_RAY}")
    import ray

    if not ray.is_initialized():
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1"}
        if options.address:
            ray.init(address=options.address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, int(options.replicas * options.cpus + 0.999))
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                runtime_env={"env_vars": env},
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def _retries() -> dict[str, Any]:
    # an actor that dies is restarted and its batch retried, a few times: a batch that kills every
    # actor it meets (an out-of-memory kill, say) must end as error results, not retry forever
    return {"max_restarts": ACTOR_RETRIES, "max_task_retries": ACTOR_RETRIES}


def _map(ds: Any, cfg: Config, options: RayOptions) -> Any:
    return ds.map_batches(
        Solver,
        fn_constructor_kwargs={"config": cfg.to_dict(), "backend": options.backend},
        batch_size=options.batch_size,
        batch_format="numpy",
        concurrency=options.replicas,
        num_cpus=options.cpus,
        num_gpus=options.gpus or None,
        ray_remote_args_fn=_retries,
    )


def solve_chunk(
    items: list[tuple[int, Problem]], cfg: Config, options: RayOptions, emit: Callable[[Result], None]
) -> None:
    """Send one chunk through Ray Data and ``emit`` each problem's result as it comes back (nothing
    lost: what fails or never comes back is emitted as an error result). Blocking: run it in a
    worker thread."""
    import ray.data

    by_serial = dict(items)
    ds = ray.data.from_items([_row(s, p) for s, p in items], override_num_blocks=max(1, min(len(items), 64)))
    with warnings.catch_warnings():  # Ray marks its remote-args hooks deprecated; they still work
        warnings.simplefilter("ignore", DeprecationWarning)
        mapped = _map(ds, cfg, options)
    try:
        for row in mapped.iter_rows():
            serial = int(row["serial"])
            p = by_serial.pop(serial, None)
            if p is not None:  # None: a retried batch's second answer
                emit(_from_json(row["result"], p))
    except Exception as e:  # the chunk failed on the cluster: what has no result gets an error
        first = str(e).splitlines()[0] if str(e) else ""
        reason = f"lost on the Ray cluster: {type(e).__name__}: {first}"
        structlog.get_logger("pipeline.ray").error("a chunk failed on the cluster", error=reason)
        for p in list(by_serial.values()):
            emit(error_result(p.id, reason, line=p.line, gold=p.answer))
        by_serial.clear()
    for p in by_serial.values():  # sent, never came back
        emit(error_result(p.id, "lost on the Ray cluster: no result came back", line=p.line, gold=p.answer))


def _from_json(text: str, p: Problem) -> Result:
    """The result an actor sent back for ``p`` (``Result.to_json()``), or an error result naming what
    was wrong with it."""
    try:
        return Result.from_json(json.loads(text))
    except ValueError as e:
        return error_result(
            p.id, f"an unreadable result came back from the Ray cluster: {e}", line=p.line, gold=p.answer
        )


@asynccontextmanager
async def stream_on_ray(
    items: AsyncIterator[Problem | Result], cfg: Config, options: RayOptions
) -> AsyncIterator[MemoryObjectReceiveStream[Result]]:
    """``async with stream_on_ray(items, cfg, options) as results:``: parse-level results at once;
    problems in chunks through Ray, each result as soon as it is back. Duplicate ids follow the local
    policy (``RecordConverter``). Leaving the block early stops reading ``items``."""
    from stages.parse import RecordConverter

    convert = RecordConverter()
    send, receive = anyio.create_memory_object_stream[Result](options.batch_size * options.replicas * 4)

    def emit(result: Result) -> None:  # from the Ray thread into this loop
        anyio.from_thread.run(send.send, result)

    async def produce() -> None:
        async with send:
            chunk: list[tuple[int, Problem]] = []
            serial = 0
            async for item in items:
                converted = convert(item)
                if isinstance(converted, Result):
                    await send.send(converted)
                    continue
                chunk.append((serial, converted))
                serial += 1
                if len(chunk) >= CHUNK:
                    await anyio.to_thread.run_sync(solve_chunk, chunk, cfg, options, emit)
                    chunk = []
            if chunk:
                await anyio.to_thread.run_sync(solve_chunk, chunk, cfg, options, emit)

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(produce)
        try:
            yield receive
        finally:
            tg.cancel_scope.cancel()  # after the caller has read what it wanted (or everything)
