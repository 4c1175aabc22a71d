"""The ``stream`` command's work, after its arguments were checked: ``run_file`` (also called by the
benchmarks). It reads the input (resuming past what is written), runs the pipeline (here or on Ray),
writes the results and the submission, shows progress, and turns SIGINT/SIGTERM into a clean stop.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from pipeline.api import Pipeline, PipelineError
from pipeline.config import Config
from pipeline.items import Problem, Result
from pipeline.sink import OutputError, ResultWriter, Written, read_written
from pipeline.startup import resume_gc
from stages.backends.base import Backend
from stages.clock import now, scope_deadline
from stages.parse import dedupe, read_problems

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


async def _skip_written(
    items: AsyncIterator[Problem | Result], done: Written
) -> AsyncIterator[Problem | Result]:
    """Skip inputs that already have their result; a repeat of an id finished earlier is still a
    duplicate (the duplicate-id policy sees the earlier run's first occurrences)."""
    seen = dict(done.first_lines)
    async for item in items:
        if not done.has(item.id, item.line):
            yield dedupe(item, seen)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few metrics the summary shows (the rest go to ``--metrics-json``)."""
    out: dict[str, Any] = {"peak_rss_mib": metrics["memory"]["peak_rss_mib"]}
    if "cuda_max_allocated_mib" in metrics["memory"]:
        out["cuda_max_allocated_mib"] = metrics["memory"]["cuda_max_allocated_mib"]
    if "batches" in metrics:
        b = metrics["batches"]
        if "steps" in b:  # continuous batching: no batches, a step at a time
            out["batch_fill"] = f"continuous: mean {b['mean_rows']} requests per step over {b['steps']} steps"
        else:
            out["batch_fill"] = f"{b['prompt_fill']} (mean {b['mean_rows']} rows in {b['batches']} batches)"
    peaks = {k: f"{q['peak']}/{q['capacity']:g}" for k, q in metrics["queues"].items()}
    out["queue_peaks"] = ", ".join(f"{k} {v}" for k, v in peaks.items())
    waits = metrics["waits_s"]
    out["waits_s"] = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in waits.items())
    if "memory_plan" in metrics:
        out["memory_plan"] = metrics["memory_plan"]
    return out


def _write_metrics(path: str, summary: dict[str, Any], metrics: dict[str, Any], cfg: Config) -> None:
    data = {"summary": summary, "metrics": metrics, "config": cfg.to_dict()}
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, default=str)
    except OSError as e:  # the answers are written; a metrics file that cannot be is a warning
        structlog.get_logger("pipeline.cli").warning("cannot write the metrics file", path=path, error=str(e))


def _print_summary(summary: dict[str, Any]) -> None:
    width = max(len(k) for k in summary)
    lines = [f"  {k.replace('_', ' '):<{width}}  {v}" for k, v in summary.items()]
    print("summary\n" + "\n".join(lines), file=sys.stderr)


@dataclass
class _Stopping:
    """The command's stop state: the first signal's name (``None`` until one came) and the number of
    input lines read, which the input reader counts and the interrupt message reports."""

    requested: anyio.Event = field(default_factory=anyio.Event)
    signal: str | None = None
    read: int = 0


async def _until_stopped(
    items: AsyncIterator[Problem | Result], stop: _Stopping
) -> AsyncIterator[Problem | Result]:
    async for item in items:
        if stop.requested.is_set():
            return
        stop.read += 1
        yield item


async def _watch_signals(stop: _Stopping, consume: anyio.CancelScope, grace_s: float) -> None:
    """First SIGINT/SIGTERM: stop reading input and give in-flight work ``grace_s``; second: stop now."""
    logger = structlog.get_logger("pipeline.cli")
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if stop.requested.is_set():
                consume.cancel()
                continue
            stop.signal = signal.Signals(signum).name
            stop.requested.set()
            consume.deadline = min(consume.deadline, scope_deadline(now() + grace_s))
            logger.warning(
                "stopping: no new input is read; in-flight problems get a grace period",
                signal=stop.signal,
                grace_s=grace_s,
            )


async def run_stream(
    args: argparse.Namespace, cfg: Config, backend: Backend | None = None, backend_spec: str | None = None
) -> int:
    """The ``stream`` command (after its arguments were checked); ``backend`` replaces the configured
    model (the tests drive the whole command with a scripted one); with ``--engine ray``,
    ``backend_spec`` (``"module:callable"``) builds one in each actor."""
    logger = structlog.get_logger("pipeline.cli")
    done = Written()
    if args.resume:
        if not args.output:
            raise OutputError("--resume needs --output (the file to resume)")
        done = read_written(args.output)
        logger.info(
            "resuming", output=args.output, already_written=done.count, repaired_last_line=done.repaired
        )
    show_progress = sys.stderr.isatty() and not args.no_progress
    spread = cfg.time.budget_s is not None and cfg.time.expected_problems is None
    to_do = None
    if show_progress or spread:  # counting costs a second read of the input: only when needed
        lines = await anyio.to_thread.run_sync(_count_lines, args.input)
        to_do = None if lines is None else max(0, lines - done.count)
    total = to_do if show_progress else None
    if spread and to_do is not None:  # the budget is spread over what is left to do
        cfg = cfg.replace(time={"expected_problems": max(1, to_do)})
        logger.info("time budget", seconds=cfg.time.budget_s, problems=cfg.time.expected_problems)
    items: AsyncIterator[Problem | Result] = read_problems(args.input)
    if args.resume:
        items = _skip_written(items, done)
    stop = _Stopping()
    items = _until_stopped(items, stop)
    writer = ResultWriter(args.output, args.submission, fallback=cfg.answer.fallback or 0)
    if args.engine == "ray":
        resume_gc()  # the models load in the replicas
        return await _run_on_ray(args, cfg, items, writer, backend_spec)
    async with Pipeline(cfg, backend=backend) as pipeline:
        resume_gc()  # the model is loaded: start-up is over
        if pipeline.memory_plan is not None:
            logger.info("memory plan", plan=pipeline.memory_plan.describe())
        logger.info("model loaded", model=pipeline.backend.model_id)
        send, receive = anyio.create_memory_object_stream[Result](cfg.run.max_in_flight)
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            with anyio.CancelScope() as consume:
                async with anyio.create_task_group() as watch:
                    watch.start_soon(_watch_signals, stop, consume, args.grace_s)
                    async with send:
                        if show_progress:
                            await _stream_with_progress(pipeline, items, send, total)
                        else:
                            async with pipeline.stream(items) as results:
                                async for result in results:
                                    await send.send(result)
                    watch.cancel_scope.cancel()
        if stop.signal is not None:
            pipeline.abort()
        summary = pipeline.stats.summary()
        metrics = pipeline.metrics()
    summary.update(_headline(metrics))
    _print_summary(summary)
    if args.metrics_json:
        _write_metrics(args.metrics_json, summary, metrics, cfg)
    logger.info("done", **summary)
    if stop.signal is not None:
        where = f"--output {args.output}" if args.output else "an --output file"
        print(
            f"interrupted by {stop.signal}: {writer.written} results written of {stop.read} input lines "
            "read; "
            "unfinished problems were not. "
            f"Run the same command with --resume and {where} to finish the rest.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return EXIT_OK


async def _run_on_ray(
    args: argparse.Namespace,
    cfg: Config,
    items: AsyncIterator[Problem | Result],
    writer: ResultWriter,
    backend_spec: str | None,
) -> int:
    from pipeline.ray_engine import RayOptions, init_ray, stream_on_ray
    from pipeline.runner import RunStats

    logger = structlog.get_logger("pipeline.cli")
    options = RayOptions(
        address=args.ray_address,
        replicas=args.replicas,
        cpus=args.cpus_per_replica,
        gpus=args.gpus_per_replica,
        batch_size=args.ray_batch_size,
        backend=backend_spec,
    )
    try:
        ray = await anyio.to_thread.run_sync(init_ray, options)
        resources = await anyio.to_thread.run_sync(ray.cluster_resources)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PipelineError(f"cannot start or join the Ray cluster: {e}") from e
    logger.info("ray", address=args.ray_address or "local", replicas=options.replicas, resources=resources)
    stats = RunStats()
    send, receive = anyio.create_memory_object_stream[Result](cfg.run.max_in_flight)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run, receive)
        async with send:
            async with stream_on_ray(items, cfg, options) as results:
                async for result in results:
                    stats.record(result)
                    await send.send(result)
    summary = stats.summary()
    summary["engine"] = f"ray, {options.replicas} replicas"
    _print_summary(summary)
    if args.metrics_json:  # the replicas' own metrics stay on the cluster; the run's figures are here
        _write_metrics(args.metrics_json, summary, {"engine": "ray", "replicas": options.replicas}, cfg)
    logger.info("done", **summary)
    return EXIT_OK


async def _stream_with_progress(
    pipeline: Pipeline, items: AsyncIterator[Problem | Result], send: Any, total: int | None
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("solving"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("solve", total=total, rate="")
        async with pipeline.stream(items) as results:
            async for result in results:
                await send.send(result)
                s = pipeline.stats.summary()
                progress.update(
                    task,
                    advance=1,
                    rate=f"answered {s['answered']}, errors {s['errors']}, "
                    f"{s['problems_per_s']:.2f} problems/s, {s['new_tokens_per_s']:.0f} tokens/s",
                )


run_file = run_stream  # the public name: ``await run_file(args, cfg)``
