"""Attacks on the batched hand-offs (stages.streams), the reused sample workers and their backlog
(stages.inference), the coalesced model-thread wake-ups (Poster), admission's fast acquire and the
auto batching choice. Each test states what must hold; the scripted FakeBackend plays the model."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from pipeline import Pipeline
from pipeline.config import Config
from pipeline.items import Problem, Result
from stages.backends.fake import FakeBackend
from stages.parse import read_problems
from tests.conftest import small_config

RAMBLE = "word " * 100_000  # never reaches an answer: runs to max_new_tokens (384 steps)


def problems(n: int, prefix: str = "p") -> list[dict]:
    return [{"id": f"{prefix}{i}", "problem": f"What is {i} + 2?", "answer": i + 2} for i in range(n)]


async def slots_back(p: Pipeline, within_s: float = 5.0) -> None:
    """Every admission slot is free again (a result still being routed may take a moment)."""
    with anyio.fail_after(within_s):
        while p.runner.slots.value < p.runner.admission.limit:
            await anyio.sleep(0.005)
    assert p.runner.slots.value == p.runner.admission.limit


def counts_add_up(report: dict, total: int | None = None) -> None:
    """Every sample ends exactly one way; a sample that never started is an aborted one."""
    ended = report["completed"] + report["failed"] + report["aborted"]
    assert report["requests"] + report["never_started"] == ended, report
    assert report["never_started"] <= report["aborted"], report
    if total is not None:
        assert ended == total, report


class Ticker:
    """A task that only sleeps(0): the longest gap between its turns is how long something else held
    the loop. Gaps are the loop thread's CPU time (``thread_time``), so neither the OS preempting the
    process nor the model thread holding the GIL counts; the garbage collector is off meanwhile (its
    pauses are not the pipeline's)."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self._stop = anyio.Event()

    async def run(self) -> None:
        last = time.thread_time()
        while not self._stop.is_set():
            await anyio.lowlevel.checkpoint()
            t = time.thread_time()
            self.gaps.append(t - last)
            last = t

    def stop(self) -> None:
        self._stop.set()

    @property
    def worst_ms(self) -> float:
        return max(self.gaps) * 1000


# --- ResultStream: results drained into ``_held`` ------------------------------------------------


async def test_breaking_out_mid_batch_gives_back_every_slot_and_later_streams_still_run():
    cfg = small_config(run={"max_in_flight": 8, "verify_workers": 1})
    held_at_break: list[int] = []
    async with Pipeline(cfg, backend=FakeBackend()) as p:
        with anyio.fail_after(30):
            for k in range(6):
                s = p.stream(problems(100, f"r{k}-"))
                async with s as results:
                    n = 0
                    async for _ in results:
                        n += 1
                        if n == 3:
                            held_at_break.append(len(s._held))
                            break
                await slots_back(p)
            # the plain form, closed with aclosing
            for k in range(3):
                async with aclosing(p.stream(problems(100, f"a{k}-")).__aiter__()) as results:
                    async for _ in results:
                        break
                await slots_back(p)
            after = [r async for r in p.stream(problems(40, "n"))]
            await slots_back(p)
    assert any(held_at_break), held_at_break  # the break did happen mid-batch (results were held)
    assert sorted(r.id for r in after) == sorted(f"n{i}" for i in range(40))
    assert all(r.correct for r in after)


async def test_a_consumer_cancelled_mid_batch_gives_back_its_slots():
    cfg = small_config(run={"max_in_flight": 8, "verify_workers": 1})
    async with Pipeline(cfg, backend=FakeBackend()) as p:
        with anyio.fail_after(30):
            for k in range(5):
                with anyio.CancelScope() as scope:
                    async with p.stream(problems(100, f"c{k}-")) as results:
                        async for _ in results:
                            scope.cancel()
                            await anyio.lowlevel.checkpoint()  # cancelled here, with results held
                await slots_back(p)
            assert len([r async for r in p.stream(problems(20, "z"))]) == 20


async def test_many_concurrent_streams_of_identical_problems_each_get_all_their_results():
    backend = FakeBackend(delay_s=0.002)
    cfg = small_config(run={"max_in_flight": 8, "verify_workers": 1})
    texts = [f"What is {i} + 2?" for i in range(30)]
    outs: dict[int, list] = {}
    async with Pipeline(cfg, backend=backend) as p:

        async def one(k: int) -> None:
            items = [{"id": f"s{k}-{i}", "problem": t, "answer": i + 2} for i, t in enumerate(texts)]
            outs[k] = [r async for r in p.stream(items)]

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                for k in range(20):
                    tg.start_soon(one, k)
        await slots_back(p)
        assert p.stats.problems == 600
        assert p.runner.inference.stats.in_flight == 0
    for k, rs in outs.items():
        assert sorted(r.id for r in rs) == sorted(f"s{k}-{i}" for i in range(30))
        assert all(r.correct for r in rs), [r for r in rs if not r.correct]
        assert {r.status for r in rs} <= {"ok", "cached"}
    computed = sum(len(c) for c in backend.calls)
    assert 30 <= computed < 600  # followers shared computations in flight


# --- Sample workers and their backlog ------------------------------------------------------------


def two_answer_then_ramble(text: str, nth: int) -> str:
    return "\\boxed{5}" if nth < 2 else RAMBLE


async def test_early_stop_with_many_samples_cancels_the_rest_within_a_few_steps():
    backend = FakeBackend(two_answer_then_ramble, step_s=0.005)
    cfg = small_config(
        generation={"samples": 16}, vote={"early_stop": 2}, run={"max_in_flight": 2, "verify_workers": 1}
    )
    async with Pipeline(cfg, backend=backend) as p:
        runner = p.runner
        with anyio.fail_after(20):
            for i in range(3):
                started = time.monotonic()
                r = await p.solve({"id": f"e{i}", "problem": f"Problem {i}"})
                took = time.monotonic() - started
                steps = backend.steps
                assert r.answer == 5 and r.early_stop, r
                assert took < 1.0, took  # a full ramble is 384 steps x 5 ms
                while backend.scheduler.running:
                    await anyio.sleep(0.001)
                assert backend.steps - steps <= 3  # the cancelled rows left within a few steps
            await slots_back(p)
    counts_add_up(runner.inference.stats.report(), total=3 * 16)
    assert runner.inference.stats.in_flight == 0


async def test_a_budget_that_doubles_the_samples_queues_them_and_early_stop_skips_the_queued_ones():
    # expected 2, in flight 1: the first problem gets the even split (4 samples), the second the
    # whole rest (max_samples: 8) on the 4 sample workers: 4 wait in the backlog.
    backend = FakeBackend(two_answer_then_ramble, step_s=0.005)
    cfg = small_config(
        generation={"samples": 4},
        vote={"early_stop": 2},
        run={"max_in_flight": 1, "verify_workers": 1},
        time={"budget_s": 100.0, "expected_problems": 2},
    )
    async with Pipeline(cfg, backend=backend) as p:
        runner = p.runner
        with anyio.fail_after(20):
            first = await p.solve({"id": "a", "problem": "first"})
            second = await p.solve({"id": "b", "problem": "second"})
        assert runner.inference.max_requests == 4
        assert runner.inference.stats.peak_in_flight <= 4
    assert first.answer == 5 and first.early_stop
    assert second.answer == 5 and second.early_stop
    report = runner.inference.stats.report()
    counts_add_up(report, total=4 + 8)
    # the two that answered freed their workers for two queued samples before the vote was taken;
    # the queued rest never reached the model
    assert report["never_started"] >= 2, report
    assert len(backend.requests) == report["requests"]


async def test_a_budget_that_doubles_the_samples_answers_with_all_of_them():
    backend = FakeBackend()
    cfg = small_config(
        generation={"samples": 2},
        run={"max_in_flight": 1, "verify_workers": 1},
        time={"budget_s": 100.0, "expected_problems": 2},
    )
    async with Pipeline(cfg, backend=backend) as p:
        runner = p.runner
        with anyio.fail_after(20):
            out = [r async for r in p.stream(problems(2))]
    by_id = {r.id: r for r in out}
    assert by_id["p0"].samples == 2 and by_id["p1"].samples == 4  # the second used the backlog
    assert all(r.correct for r in out)
    counts_add_up(runner.inference.stats.report(), total=6)


async def test_a_problem_timeout_expires_on_time_while_its_samples_wait_in_the_backlog():
    """Before the sample workers, a sample waiting for a request slot waited inside its own scope, so
    its deadline ended the wait: the problem came back timed out at its deadline (0.3 s here). Now a
    queued sample only sees its deadline when a worker takes it from the backlog."""

    def responder(text: str, nth: int) -> str:
        return RAMBLE if "long" in text else "\\boxed{3}"

    # the third and fourth of 4 expected problems (waves of 2) get twice the samples: 4 each, and 4
    # sample workers exist (2 in flight x 2 samples)
    cfg = small_config(
        generation={"samples": 2},
        run={"max_in_flight": 2, "verify_workers": 1},
        time={"budget_s": 100.0, "expected_problems": 4},
    )
    backend = FakeBackend(responder, step_s=0.005)
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(30):
            for i in range(2):
                assert (await p.solve({"id": f"q{i}", "problem": f"quick {i}"})).answer == 3
            async with anyio.create_task_group() as tg:
                tg.start_soon(p.solve, {"id": "L", "problem": "long one"})  # takes all 4 workers, ~2 s
                while p.runner.inference.stats.in_flight < 4:
                    await anyio.sleep(0.005)
                started = time.monotonic()
                x = await p.solve({"id": "X", "problem": "short one"}, timeout_s=0.3)
                took = time.monotonic() - started
                tg.cancel_scope.cancel()
    assert x.status == "fallback" and x.finish == {"aborted": 4}, x
    assert took < 1.0, f"a 0.3 s problem timeout came back after {took:.2f} s"


async def test_a_config_problem_timeout_with_one_slot_and_size_one_streams_returns_every_problem_on_time():
    backend = FakeBackend(lambda t, n: RAMBLE, step_s=0.005)
    cfg = small_config(
        generation={"samples": 3},
        run={"max_in_flight": 1, "queue_size": 1, "problem_timeout_s": 0.2, "verify_workers": 1},
    )
    async with Pipeline(cfg, backend=backend) as p:
        runner = p.runner
        with anyio.fail_after(20):
            started = time.monotonic()
            out = [r async for r in p.stream(problems(5))]
            took = time.monotonic() - started
        await slots_back(p)
    assert [r.status for r in out] == ["fallback"] * 5
    assert all(r.finish == {"aborted": 3} for r in out)
    assert took < 5 * 0.2 + 1.5, took
    counts_add_up(runner.inference.stats.report(), total=15)


async def test_size_one_streams_and_one_slot_with_samples_and_early_stop_answer_everything():
    def responder(text: str, nth: int) -> str:
        total = sum(int(w) for w in text.replace("?", " ").split() if w.isdigit())
        return f"\\boxed{{{total}}}" if nth % 3 != 2 else "\\boxed{99999}"

    cfg = small_config(
        generation={"samples": 3},
        vote={"early_stop": 2},
        run={"max_in_flight": 1, "queue_size": 1, "verify_workers": 1},
    )
    async with Pipeline(cfg, backend=FakeBackend(responder)) as p:
        runner = p.runner
        outs: dict[str, list] = {}

        async def one(prefix: str) -> None:
            outs[prefix] = [r async for r in p.stream(problems(30, prefix))]

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, "a")
                tg.start_soon(one, "b")
        await slots_back(p)
    for prefix, rs in outs.items():
        assert sorted(r.id for r in rs) == sorted(f"{prefix}{i}" for i in range(30))
        assert all(r.correct for r in rs), [r for r in rs if not r.correct][:3]
    counts_add_up(runner.inference.stats.report())
    assert runner.inference.stats.in_flight == 0 and not runner.inference._backlog


async def test_abandoned_streams_of_rambling_samples_free_their_workers_and_counts_add_up():
    backend = FakeBackend(lambda t, n: RAMBLE if "ramble" in t else "\\boxed{4}", step_s=0.005)
    cfg = small_config(generation={"samples": 4}, run={"max_in_flight": 4, "verify_workers": 1})
    async with Pipeline(cfg, backend=backend) as p:
        runner = p.runner
        with anyio.fail_after(30):
            for k in range(4):
                with anyio.move_on_after(0.15):
                    items = [{"id": f"x{k}-{i}", "problem": f"ramble {k} {i}"} for i in range(20)]
                    async with p.stream(items) as results:
                        async for _ in results:
                            pass
                await slots_back(p)
            started = time.monotonic()
            r = await p.solve("What is 2 + 2?")
            assert r.answer == 4 and time.monotonic() - started < 1.0
            while runner.inference.stats.in_flight:
                await anyio.sleep(0.005)
            assert not backend.scheduler.running
    counts_add_up(runner.inference.stats.report())


# --- Cancelling the whole pipeline -----------------------------------------------------------------


def test_cancelling_the_pipeline_mid_generation_is_quick_and_leaves_no_task():
    async def scenario() -> tuple[int, float]:
        backend = FakeBackend(lambda t, n: RAMBLE, step_s=0.005)
        cfg = small_config(generation={"samples": 4}, run={"max_in_flight": 8, "verify_workers": 1})
        cancelled_at = 0.0
        with anyio.CancelScope() as scope:
            async with Pipeline(cfg, backend=backend) as p:

                async def cancel_soon() -> None:
                    nonlocal cancelled_at
                    while p.runner.inference.stats.in_flight < 32:  # every worker mid-generation
                        await anyio.sleep(0.005)
                    await anyio.sleep(0.1)
                    cancelled_at = time.monotonic()
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(cancel_soon)
                    async for _ in p.stream(problems(1000)):
                        pass
        took = time.monotonic() - cancelled_at
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not left, left
        return backend.scheduler.stats.aborted, took

    aborted, took = anyio.run(scenario)
    assert took < 3.0, took
    assert aborted >= 1  # rows were mid-generation when it stopped


async def test_abort_mid_generation_then_leaving_the_block_is_quick_and_stops_every_worker():
    backend = FakeBackend(lambda t, n: RAMBLE, step_s=0.005)
    cfg = small_config(generation={"samples": 4}, run={"max_in_flight": 8, "verify_workers": 1})
    with anyio.fail_after(20):
        async with Pipeline(cfg, backend=backend) as p:
            runner = p.runner
            async with anyio.create_task_group() as tg:

                async def consume() -> None:
                    async with p.stream(problems(100)) as results:
                        async for _ in results:
                            pass

                tg.start_soon(consume)
                while runner.inference.stats.in_flight < 32:  # every worker mid-generation
                    await anyio.sleep(0.005)
                tg.cancel_scope.cancel()  # the caller is interrupted (as the CLI's signal watch does)
            p.abort()  # then, as the CLI does, abort and leave the block
            started = time.monotonic()
        assert time.monotonic() - started < 3.0
    assert not backend.scheduler.running
    assert runner.inference.stats.in_flight == 0
    workers = [t for t in asyncio.all_tasks() if "Inference._worker" in repr(t) and not t.done()]
    assert not workers, workers


async def test_an_await_after_abort_inside_the_block_does_not_leak_a_cancellation():
    """Not from this change (f792971 fails it too): ``abort()`` cancels the pipeline's task group,
    whose scope encloses the caller's block; the group swallows that cancellation on exit, but
    ``Pipeline.__aexit__`` drops the exit stack's "suppressed" answer, so it is raised again."""
    escaped: BaseException | None = None
    with anyio.fail_after(10):
        try:
            async with Pipeline(small_config(), backend=FakeBackend()) as p:
                p.abort()
                await anyio.lowlevel.checkpoint()
        except BaseException as e:
            escaped = e
    assert escaped is None, repr(escaped)


async def test_rejected_prompts_and_answers_share_size_one_streams_without_a_stall():
    long = "What is 1 + 2? " + "x" * 2000
    items = []
    for i in range(40):
        items.append({"id": f"p{i}", "problem": f"What is {i} + 2?", "answer": i + 2})
        items.append({"id": f"long{i}", "problem": f"{long} {i}"})
    cfg = small_config(
        generation={"max_new_tokens": 16, "samples": 2},
        run={"max_in_flight": 2, "queue_size": 1, "verify_workers": 2},
    )
    async with Pipeline(cfg, backend=FakeBackend(max_context=1000)) as p:
        with anyio.fail_after(30):
            out = {r.id: r async for r in p.stream(items)}
        await slots_back(p)
    assert len(out) == 80
    assert all(out[f"p{i}"].correct for i in range(40))
    assert all(out[f"long{i}"].status == "error" for i in range(40))


# --- The event loop ----------------------------------------------------------------------------------


async def ticked(cfg: Config, items: Any) -> tuple[list[Result], float]:
    """Every result of ``items`` through a fresh pipeline (scripted backend, batches of 64) while a
    ``Ticker`` runs beside it, with the collector off: the results and the loop's longest hold in ms."""
    ticker = Ticker()
    gc.collect()
    gc.disable()
    try:
        async with Pipeline(cfg, backend=FakeBackend(record=False, max_batch_size=64)) as p:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker.run)
                with anyio.fail_after(60):
                    got = [r async for r in p.stream(items)]
                ticker.stop()
    finally:
        gc.enable()
    return got, ticker.worst_ms


async def test_no_stage_holds_the_loop_for_long_while_5000_problems_stream():
    cfg = small_config(run={"max_in_flight": 64, "verify_workers": 1})
    got, worst = await ticked(cfg, [Problem(id=str(i), text=f"What is {i} + 1?") for i in range(5000)])
    assert len(got) == 5000
    assert worst < 15, f"the loop was held for {worst:.1f} ms"


async def test_a_file_input_with_many_slots_does_not_hold_the_loop(tmp_path: Path):
    """read_problems yields a 64 KiB chunk's lines without awaiting; with free slots admission takes
    one without a checkpoint (fast_acquire), and the feeder only yields every 64 items for a plain
    iterable, not an async one: it then admits ~1000 problems in one turn of the loop."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"id": str(i), "problem": f"What is {i} + 1?"}) + "\n" for i in range(5000)),
        encoding="utf-8",
    )
    cfg = small_config(run={"max_in_flight": 5000, "verify_workers": 1})
    got, worst = await ticked(cfg, read_problems(path))
    assert len(got) == 5000
    assert worst < 12, f"the loop was held for {worst:.1f} ms"


async def test_starting_many_samples_at_once_does_not_hold_the_loop():
    """The default 64 in flight with 16 samples each: the inference stage reads up to 64 encoded
    problems in one wake-up and starts a sample worker for each of their samples (1024 tasks) before
    it yields again; it used to start one problem's samples per wake-up."""
    cfg = small_config(run={"max_in_flight": 64, "verify_workers": 1}, generation={"samples": 16})
    got, worst = await ticked(cfg, [Problem(id=str(i), text=f"What is {i} + 1?") for i in range(300)])
    assert len(got) == 300 and all(r.answer is not None for r in got)
    assert worst < 10, f"the loop was held for {worst:.1f} ms"


# --- Poster -------------------------------------------------------------------------------------------


async def test_the_poster_runs_a_threads_calls_in_order_with_fewer_wake_ups():
    from stages.backends.scheduler import loop_poster

    post = loop_poster()
    assert post is not None
    loop = asyncio.get_running_loop()
    wakes = 0
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal wakes
        wakes += 1
        return original(*args, **kwargs)

    seen: list[int] = []
    done = anyio.Event()
    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:

        def thread() -> None:
            for burst in range(50):
                for i in range(200):
                    post(seen.append, burst * 200 + i)
                time.sleep(0.001)
            post(done.set)

        t = threading.Thread(target=thread)
        t.start()
        with anyio.fail_after(10):
            await done.wait()
        t.join()
    finally:
        del loop.call_soon_threadsafe
    assert seen == list(range(50 * 200))
    assert wakes < 50 * 200 / 4, wakes  # coalesced


# --- Auto batching -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "device", "sampled", "want"),
    [
        ("5.19.0", "cpu", False, "static"),
        ("5.19.0", "cpu", True, "continuous"),
        ("5.25.3", "cuda", False, "continuous"),
        ("5.25.3", "cuda:1", False, "continuous"),
        ("5.26.0", "cuda", True, "static"),
        ("4.57.1", "cpu", True, "static"),
    ],
)
def test_auto_batching_follows_the_run(monkeypatch, version, device, sampled, want):
    import transformers

    from stages.backends.transformers_backend import choose_batching

    monkeypatch.setattr(transformers, "__version__", version)
    assert choose_batching("auto", device=device, sampled=sampled) == want
    assert choose_batching("static", device="cuda", sampled=True) == "static"
    assert choose_batching("continuous", device="cpu", sampled=False) == "continuous"


def test_load_backend_tells_the_backend_whether_the_run_samples(monkeypatch):
    from pipeline import api
    from stages.backends import transformers_backend

    seen: list[bool] = []

    def fake_load(cls, path, **kw):
        seen.append(kw["sampled"])
        return "loaded"

    monkeypatch.setattr(transformers_backend.TransformersBackend, "load", classmethod(fake_load))
    for gen, want in [
        ({"samples": 1}, False),
        ({"samples": 4}, True),
        ({"samples": 1, "prompt_style": "tir"}, True),
    ]:
        assert api.load_backend(small_config(generation=gen)) == "loaded"
        assert seen[-1] is want, gen
