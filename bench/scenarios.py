"""The benchmark scenarios. Each returns a flat dict of figures; model load time is never counted.

- ``engine``: a plain loop of batched ``generate`` over input-order batches (the engine's own limit).
- ``sequential``: one problem at a time, the old way.
- ``pipeline``: the streaming pipeline with the same model, dtype, batch size and ``max_new_tokens``.
- ``overhead``: the pipeline with a zero-cost scripted backend: the cost of the pipeline itself.
- ``accuracy``: the pipeline over GSM8K with gold answers, per dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import anyio

from bench.plain import plain_generate
from pipeline.api import Pipeline
from pipeline.config import Config
from pipeline.items import Encoded, Job, Problem
from stages.backends.base import Backend
from stages.backends.fake import FakeBackend
from stages.extraction import check_answer
from stages.streams import batches, put
from stages.tokenization import encode

Figures = dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """What every scenario in one run shares."""

    problems: int = 32
    batch_size: int = 16
    max_new_tokens: int = 128
    dtype: str = "auto"
    device: str = "auto"
    model: str | None = None
    samples: int = 1
    overhead_problems: int = 5000
    profile: bool = True  # overhead: one more run under cProfile, for the report

    def config(self) -> Config:
        """The pipeline configuration these settings stand for (result cache off: every run computes)."""
        return Config().replace(
            model={"path": self.model, "dtype": self.dtype, "device": self.device},
            batch={"max_batch_size": self.batch_size},
            generation={"max_new_tokens": self.max_new_tokens, "samples": self.samples},
            cache={"size": 0},
        )


def load_backend(settings: Settings, dtype: str | None = None) -> Backend:
    """Load the benchmark model once (blocking)."""
    from stages.backends.transformers_backend import TransformersBackend

    return TransformersBackend.load(settings.model, device=settings.device, dtype=dtype or settings.dtype)


def _encode_all(problems: list[Problem], backend: Backend, cfg: Config) -> list[Encoded]:
    out = []
    for i, p in enumerate(problems):
        e = encode(Job(problem=p, key=str(i), serial=i), backend, cfg)
        assert isinstance(e, Encoded), e
        out.append(e)
    return out


def _figures(name: str, problems: list[Problem], seconds: float, new_tokens: int, correct: int) -> Figures:
    return {
        "scenario": name,
        "problems": len(problems),
        "seconds": round(seconds, 3),
        "problems_per_s": round(len(problems) / seconds, 3),
        "new_tokens": new_tokens,
        "new_tokens_per_s": round(new_tokens / seconds, 1),
        "accuracy": round(correct / len(problems), 4) if problems else None,
    }


def _loop(name: str, problems: list[Problem], backend: Backend, settings: Settings, batch: int) -> Figures:
    cfg = settings.config()
    a = cfg.answer
    encoded = _encode_all(problems, backend, cfg)
    new_tokens = correct = 0
    start = time.perf_counter()
    for i in range(0, len(encoded), batch):
        chunk = encoded[i : i + batch]
        outputs = plain_generate(backend, [e.prompt_ids for e in chunk], settings.max_new_tokens)
        for e, o in zip(chunk, outputs, strict=True):
            new_tokens += o.new_tokens
            answer = check_answer(o.text, modulus=a.modulus, lo=a.min, hi=a.max)[0]
            correct += answer is not None and answer == e.problem.answer
    return _figures(name, problems, time.perf_counter() - start, new_tokens, correct)


def engine(problems: list[Problem], backend: Backend, settings: Settings) -> Figures:
    """Batched ``generate`` in input order, batches of ``batch_size``."""
    return _loop("engine", problems, backend, settings, settings.batch_size)


def sequential(problems: list[Problem], backend: Backend, settings: Settings) -> Figures:
    """One ``generate`` call per problem."""
    return _loop("sequential", problems, backend, settings, 1)


async def pipeline(
    problems: list[Problem], backend: Backend, settings: Settings, *, name: str = "pipeline"
) -> Figures:
    """The streaming pipeline; timed from the first problem in to the last result out."""
    cfg = settings.config()
    fresh = [replace(p, submitted=time.perf_counter()) for p in problems]
    async with Pipeline(cfg, backend=backend) as p:
        start = time.perf_counter()
        results = [r async for r in p.stream(fresh)]
        seconds = time.perf_counter() - start
    stats = backend.scheduler.stats  # type: ignore[attr-defined]
    assert len(results) == len(problems)
    figures = _figures(
        name, problems, seconds, sum(r.new_tokens for r in results), sum(bool(r.correct) for r in results)
    )
    figures.update(
        batches=stats.batches,
        mean_batch=round(stats.rows / max(1, stats.batches), 2),
        padding_share=round(stats.padded_tokens / max(1, stats.padded_tokens + stats.prompt_tokens), 3),
        model_busy_share=round(stats.busy_s / seconds, 3),
        errors=sum(r.status == "error" for r in results),
        answers={str(r.id): r.answer for r in results},
    )
    return figures


async def overhead(settings: Settings) -> Figures:
    """The pipeline over a zero-cost backend: what parsing, queues, batching, worker processes,
    extraction and voting cost per problem."""
    from bench.data import synthetic

    problems = synthetic(settings.overhead_problems)
    cfg = settings.config().replace(
        batch={"max_batch_size": 64, "max_wait_ms": 1.0}, run={"max_in_flight": 256}
    )

    async def run() -> tuple[float, list[Any]]:
        backend = FakeBackend(record=False, max_batch_size=64, max_wait_s=0.001)  # the batches cfg asks
        async with Pipeline(cfg, backend=backend) as p:
            start = time.perf_counter()
            results = [r async for r in p.stream(problems)]
            return time.perf_counter() - start, results

    seconds, results = await run()
    wrong = sum(not r.correct for r in results)
    figures = _figures(
        "overhead", problems, seconds, sum(r.new_tokens for r in results), len(results) - wrong
    )
    figures["us_per_problem"] = round(seconds / len(problems) * 1e6, 1)
    figures["stream_floor_items_per_s"] = round(await stream_floor(len(problems), FLOOR_HOPS), 1)
    figures["batched_floor_items_per_s"] = round(
        await stream_floor(len(problems), FLOOR_HOPS, batched=True), 1
    )
    if settings.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        await run()
        profiler.disable()
        figures["profile"] = profile_rows(profiler, len(problems))
    return figures


FLOOR_HOPS = 7  # the memory streams one problem crosses: jobs, encoded, generations, candidates, ...


async def stream_floor(n: int, hops: int, *, batched: bool = False) -> float:
    """Items per second through ``hops`` bare anyio memory streams in a chain (a task per hop, buffers of
    64): the cost of the hand-offs alone. One item at a time (``async for`` and ``send``), or, with
    ``batched``, as the stages hand items on (``stages.streams.batches`` and ``put``): the floor under
    the pipeline's per-problem cost."""

    async def relay(receive: Any, send: Any) -> None:
        async with receive, send:
            if batched:
                async for items in batches(receive):
                    for x in items:
                        await put(send, x)
            else:
                async for x in receive:
                    await send.send(x)

    ends = [anyio.create_memory_object_stream[int](64) for _ in range(hops)]
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(hops - 1):
            tg.start_soon(relay, ends[i][1], ends[i + 1][0])

        async def feed() -> None:
            async with ends[0][0]:
                for i in range(n):
                    await (put(ends[0][0], i) if batched else ends[0][0].send(i))

        tg.start_soon(feed)
        async with ends[-1][1]:
            if batched:
                async for _ in batches(ends[-1][1]):
                    pass
            else:
                async for _ in ends[-1][1]:
                    pass
    return n / (time.perf_counter() - start)


def profile_rows(profiler: Any, n: int, top: int = 12) -> dict[str, Any]:
    """Where the event loop's time goes, from a ``cProfile`` run over ``n`` problems: each part's own
    (exclusive) time per problem, and the functions with the most. The profiler slows every call, so
    the shares matter, not the absolute figures; it sees the event-loop thread only (the backend's
    batch thread is not in it)."""
    import pstats

    stats = pstats.Stats(profiler)
    parts: dict[str, float] = {}
    funcs: list[tuple[float, str]] = []
    for (file, line, name), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "/stages/" in file or "/pipeline/" in file or "/bench/" in file:
            part = "/".join(file.split("/")[-2:])
        elif "anyio" in file:
            part = "anyio"
        elif "asyncio" in file:
            part = "asyncio"
        elif file == "~":
            part = "built-ins (" + ("waiting in epoll" if "poll" in name else "C calls") + ")"
        else:
            part = "other"
        parts[part] = parts.get(part, 0.0) + own
        funcs.append(
            (
                own,
                f"{part}:{line} {name}"
                if part not in ("anyio", "asyncio")
                else f"{file.split('/')[-1]}:{line} {name}",
            )
        )
    total = sum(parts.values()) or 1.0
    return {
        "profiled_us_per_problem": round(total / n * 1e6, 1),
        "parts": [
            {"part": k, "share": round(v / total, 3), "us_per_problem": round(v / n * 1e6, 1)}
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1])
        ],
        "functions": [
            {"function": f, "share": round(t / total, 3)} for t, f in sorted(funcs, reverse=True)[:top]
        ],
    }


def run_pipeline(
    problems: list[Problem], backend: Backend, settings: Settings, name: str = "pipeline"
) -> Figures:
    """``pipeline`` from synchronous code."""
    return anyio.run(lambda: pipeline(problems, backend, settings, name=name))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def arrivals(
    problems: list[Problem], backend: Backend, cfg: Config, rate: float | None, *, seed: int = 0
) -> tuple[list[float], float]:
    """Each problem's latency (submit to result) and the whole run's seconds, for problems arriving at
    ``rate``/s with exponential gaps (Poisson), or one ``solve()`` at a time (``None``: the gateway)."""
    import random

    rng = random.Random(seed)
    latencies: list[float] = []
    async with Pipeline(cfg, backend=backend) as p:
        start = time.perf_counter()

        async def one(problem: Problem) -> None:
            t0 = time.perf_counter()
            await p.solve(replace(problem, submitted=t0))
            latencies.append(time.perf_counter() - t0)

        if rate is None:
            for problem in problems:
                await one(problem)
        else:
            async with anyio.create_task_group() as tg:
                for problem in problems:
                    tg.start_soon(one, problem)
                    await anyio.sleep(rng.expovariate(rate))
        seconds = time.perf_counter() - start
    return latencies, seconds


async def load(
    problems: list[Problem], backend: Backend, settings: Settings, rate: float | None, *, seed: int = 0
) -> Figures:
    """Submit problems as an arrival process and measure each one's latency (submit to result).

    ``rate`` problems/s with exponential gaps (Poisson arrivals); ``None`` is the Kaggle gateway: one
    ``solve()`` at a time, the next only after the previous answer.
    """
    latencies, seconds = await arrivals(problems, backend, settings.config(), rate, seed=seed)
    return {
        "scenario": "load",
        "arrival": "gateway (one at a time)" if rate is None else f"poisson {rate:g}/s",
        "rate": rate,
        "problems": len(problems),
        "seconds": round(seconds, 3),
        "problems_per_s": round(len(problems) / seconds, 3),
        "latency_p50_s": round(_percentile(latencies, 50), 3),
        "latency_p95_s": round(_percentile(latencies, 95), 3),
        "latency_p99_s": round(_percentile(latencies, 99), 3),
    }


async def memory(
    problems: list[Problem], backend: Backend, settings: Settings, *, interval_s: float = 0.05
) -> Figures:
    """Stream ``problems`` while sampling this process's RSS (and GPU memory where present)."""
    import psutil

    proc = psutil.Process()
    samples: list[tuple[float, float, float | None]] = []
    cuda = backend.device == "cuda"

    def gpu_mb() -> float | None:
        if not cuda:
            return None
        import torch

        return round(torch.cuda.memory_allocated() / 2**20, 1)

    cfg = settings.config()
    done = 0
    async with Pipeline(cfg, backend=backend) as p:
        start = time.perf_counter()

        async def sampler() -> None:
            while True:
                samples.append(
                    (
                        round(time.perf_counter() - start, 3),
                        round(proc.memory_info().rss / 2**20, 1),
                        gpu_mb(),
                    )
                )
                await anyio.sleep(interval_s)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler)
            async for _ in p.stream(problems):
                done += 1
            tg.cancel_scope.cancel()
        seconds = time.perf_counter() - start
    rss = [s[1] for s in samples]
    half = rss[len(rss) // 2 :] or rss
    return {
        "scenario": "memory",
        "problems": done,
        "seconds": round(seconds, 3),
        "problems_per_s": round(done / seconds, 3),
        "rss_start_mb": rss[0],
        "rss_peak_mb": max(rss),
        "rss_end_mb": rss[-1],
        # flat memory: the second half of the run grows by (almost) nothing
        "rss_growth_second_half_mb": round(max(half) - half[0], 1),
        "samples": samples,
    }
