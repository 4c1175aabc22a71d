"""The whole pipeline with the scripted backend.

Invariants, cache, de-duplication, backpressure, cancellation.
"""

import asyncio
import time
from collections.abc import AsyncIterator

import anyio
import psutil
import pytest

from pipeline import Pipeline
from pipeline.items import Problem, Result
from stages.backends.fake import FakeBackend
from tests.conftest import small_config


def problems(n: int, prefix: str = "p") -> list[dict]:
    return [{"id": f"{prefix}{i}", "problem": f"What is {i} + 2?", "answer": i + 2} for i in range(n)]


async def collect(p: Pipeline, items) -> list[Result]:
    with anyio.fail_after(60):
        return [r async for r in p.stream(items)]


async def test_every_input_gets_exactly_one_result():
    items = [*problems(40), {"id": "bad"}, "not a dict but a plain problem 5"]
    async with Pipeline(small_config(), backend=FakeBackend()) as p:
        results = await collect(p, items)
    ids = [r.id for r in results]
    assert sorted(ids) == sorted([*(f"p{i}" for i in range(40)), "bad", "41"])
    by_id = {r.id: r for r in results}
    assert all(by_id[f"p{i}"].answer == i + 2 and by_id[f"p{i}"].correct for i in range(40))
    assert by_id["bad"].status == "error" and "missing field 'problem'" in (by_id["bad"].error or "")
    assert by_id["41"].answer == 5
    assert p.stats.summary()["accuracy"] == 1.0


async def test_cache_answers_repeats_across_streams_without_the_model():
    backend = FakeBackend()
    async with Pipeline(small_config(cache={"size": 100}), backend=backend) as p:
        first = await collect(p, problems(5))
        calls = sum(len(c) for c in backend.calls)
        second = await collect(p, problems(5, prefix="again"))
    assert calls == 5 and sum(len(c) for c in backend.calls) == 5
    assert {r.status for r in first} == {"ok"} and {r.status for r in second} == {"cached"}
    assert sorted(r.answer for r in second) == sorted(r.answer for r in first)
    assert {r.id for r in second} == {f"again{i}" for i in range(5)}


async def test_persistent_cache_survives_a_new_pipeline(tmp_path):
    cfg = small_config(cache={"size": 10, "dir": str(tmp_path / "cache")})
    async with Pipeline(cfg, backend=FakeBackend()) as p:
        await collect(p, problems(3))
    backend = FakeBackend()
    async with Pipeline(cfg, backend=backend) as p:
        again = await collect(p, problems(3))
    assert backend.calls == []
    assert {r.status for r in again} == {"cached"} and {r.answer for r in again} == {2, 3, 4}
    # different generation settings: a different key, so the model runs
    other = FakeBackend()
    async with Pipeline(cfg.replace(generation={"max_new_tokens": 7}), backend=other) as p:
        await collect(p, problems(3))
    assert sum(len(c) for c in other.calls) == 3


async def test_identical_problems_in_flight_share_one_computation():
    backend = FakeBackend(delay_s=0.05)
    items = [{"id": f"d{i}", "problem": "What is 20 + 22?"} for i in range(6)]
    async with Pipeline(small_config(), backend=backend) as p:
        results = await collect(p, items)
    assert sum(len(c) for c in backend.calls) == 1
    assert sorted(r.id for r in results) == [f"d{i}" for i in range(6)]
    assert {r.answer for r in results} == {42}
    assert sorted(r.status for r in results) == ["cached"] * 5 + ["ok"]


async def test_slow_consumer_bounds_how_much_input_is_read():
    read = 0

    async def source() -> AsyncIterator[Problem]:
        nonlocal read
        for i in range(500):
            read += 1
            yield Problem(id=str(i), text=f"What is {i} + 1?")

    cfg = small_config(run={"max_in_flight": 8, "verify_workers": 1})
    async with Pipeline(cfg, backend=FakeBackend()) as p:
        seen = 0
        max_ahead = 0
        with anyio.fail_after(60):
            async for _ in p.stream(source()):
                seen += 1
                await anyio.sleep(0.002)
                max_ahead = max(max_ahead, read - seen)
    assert seen == 500
    # at most max_in_flight admitted plus the one item the feeder holds while waiting for a slot
    assert max_ahead <= 8 + 1


async def test_backend_failure_becomes_error_results_and_the_run_goes_on():
    def fail(texts):
        if any("13" in t for t in texts):
            raise RuntimeError("CUDA error: device-side assert")

    async with Pipeline(small_config(), backend=FakeBackend(fail=fail)) as p:
        results = await collect(p, problems(20))
    by_id = {r.id: r for r in results}
    assert len(by_id) == 20
    assert by_id["p13"].status == "error" and "device-side assert" in (by_id["p13"].error or "")
    assert sum(r.status == "ok" for r in results) == 19


async def test_solve_and_concurrent_streams():
    async with Pipeline(small_config(), backend=FakeBackend(delay_s=0.01)) as p:
        one = await p.solve({"id": "x", "problem": "What is 40 + 2?"})
        outs: dict[str, list[Result]] = {}

        async def run(prefix: str) -> None:
            outs[prefix] = await collect(p, problems(15, prefix))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "a")
            tg.start_soon(run, "b")
    assert one.id == "x" and one.answer == 42
    assert sorted(r.id for r in outs["a"]) == sorted(f"a{i}" for i in range(15))
    assert sorted(r.id for r in outs["b"]) == sorted(f"b{i}" for i in range(15))


async def test_abandoning_a_stream_frees_its_slots():
    cfg = small_config(run={"max_in_flight": 4, "verify_workers": 1})
    async with Pipeline(cfg, backend=FakeBackend(delay_s=0.005)) as p:
        with anyio.fail_after(30):
            async for _ in p.stream(problems(50)):
                break
            # the abandoned stream's slots come back, so a new stream still runs to the end
            results = await collect(p, problems(10, "n"))
    assert len(results) == 10


def test_cancelling_a_run_leaves_no_task_or_process_behind():
    def children() -> list[psutil.Process]:
        return [c for c in psutil.Process().children(recursive=True) if c.is_running()]

    before = {c.pid for c in children()}

    async def scenario() -> int:
        got = 0
        with anyio.CancelScope() as scope:
            async with Pipeline(small_config(), backend=FakeBackend(delay_s=0.05)) as p:
                async for _ in p.stream(problems(10_000)):
                    got += 1
                    if got == 5:
                        scope.cancel()  # as Ctrl-C or a notebook's interrupt would, mid-stream
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not left, left
        assert not ({c.pid for c in children()} - before)  # the worker processes are gone already
        return got

    got = anyio.run(scenario)
    assert 0 < got < 10_000
    deadline = time.monotonic() + 5
    while {c.pid for c in children()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ({c.pid for c in children()} - before)


async def test_pipeline_must_be_entered():
    p = Pipeline(small_config(), backend=FakeBackend())
    with pytest.raises(RuntimeError, match="async with Pipeline"):
        await p.solve("1+1")


async def test_async_iterables_of_plain_records_get_positions_and_the_duplicate_policy():
    async def source():
        yield "What is 1 + 1?"
        yield {"id": "x", "problem": "What is 2 + 2?"}
        yield "What is 3 + 3?"
        yield {"id": "x", "problem": "again"}

    async with Pipeline(small_config(), backend=FakeBackend()) as p:
        results = await collect(p, source())
    by_line = sorted((str(r.id), r.status, r.answer) for r in results)
    assert by_line == [("0", "ok", 2), ("2", "ok", 6), ("x", "error", None), ("x", "ok", 4)]


async def test_concurrent_solves_of_one_text_with_a_persistent_cache(tmp_path):
    # Before: both callers became leaders while the SQLite lookup awaited; one got the other's id and
    # the other waited forever with a slot leaked.
    cfg = small_config(cache={"size": 0, "dir": str(tmp_path / "cache")}, run={"max_in_flight": 4})
    backend = FakeBackend(delay_s=0.02)
    async with Pipeline(cfg, backend=backend) as p:
        got: dict[str, Result] = {}

        async def one(pid: str) -> None:
            got[pid] = await p.solve({"id": pid, "problem": "What is 20 + 22?"})

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for pid in ("a", "b", "c"):
                    tg.start_soon(one, pid)
        assert {pid: r.id for pid, r in got.items()} == {"a": "a", "b": "b", "c": "c"}
        assert all(r.answer == 42 for r in got.values())
        assert sum(len(c) for c in backend.calls) == 1  # one computation, shared
        assert p.runner.slots.value == 4  # every slot came back
        again = await p.solve({"id": "d", "problem": "What is 20 + 22?"})
        assert again.status == "cached" and again.id == "d"


async def test_a_caller_that_gives_up_cancels_its_requests_in_the_engine():
    backend = FakeBackend(lambda t, n: "word " * 10_000, step_s=0.01)
    cfg = small_config(generation={"samples": 3}, run={"max_in_flight": 4})
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(20):
            with anyio.move_on_after(0.3):
                await p.solve("Write forever")
            assert len(backend.requests) == 3
            steps_at_cancel = backend.steps
            while backend.scheduler.running:
                await anyio.sleep(0.001)
            assert backend.steps - steps_at_cancel <= 2  # left the batch within a decode step
            assert backend.scheduler.stats.aborted == 3
            while p.runner.inference.stats.in_flight:
                await anyio.sleep(0.001)
            # the slots came back and the pipeline still answers
            backend.responder = lambda t, n: "\\boxed{7}"
            r = await p.solve("What is 3 + 4?")
        assert r.answer == 7
        assert p.runner.slots.value == 4


async def test_results_leave_in_completion_order():
    def responder(text, nth):
        return "word " * 60 + "\\boxed{1}" if "slow" in text else "\\boxed{2}"

    backend = FakeBackend(responder, step_s=0.005, max_wait_s=0.05)
    async with Pipeline(small_config(), backend=backend) as p:
        items = [{"id": "slow", "problem": "slow one"}, {"id": "fast", "problem": "fast one"}]
        out = await collect(p, items)
    assert [r.id for r in out] == ["fast", "slow"]


async def test_each_result_counts_how_its_samples_finished():
    backend = FakeBackend(lambda t, n: "one two three four five \\boxed{5}" if "long" in t else "\\boxed{2}")
    cfg = small_config(generation={"samples": 2, "max_new_tokens": 3})
    async with Pipeline(cfg, backend=backend) as p:
        items = [{"id": "l", "problem": "long"}, {"id": "s", "problem": "x"}]
        out = {r.id: r for r in await collect(p, items)}
    assert out["l"].finish == {"length": 2} and out["l"].to_json()["finish"] == {"length": 2}
    assert out["s"].finish == {"answer": 2} and out["s"].answer == 2  # ended at its \\boxed{}


async def test_a_problem_deadline_votes_on_what_finished_and_falls_back_when_nothing_did():
    def responder(text, nth):  # the first sample of "partial" answers at once; every other one rambles
        return "\\boxed{6}" if "partial" in text and nth == 0 else "word " * 100_000

    backend = FakeBackend(responder, step_s=0.005)
    cfg = small_config(generation={"samples": 3})
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(20):
            none = await p.solve({"id": "n", "problem": "nothing finishes"}, timeout_s=0.3)
            part = await p.solve({"id": "p", "problem": "partial"}, timeout_s=0.3)
        assert p.runner.inference.stats.in_flight == 0
    assert none.status == "fallback" and none.answer == 0
    assert "time limit reached before any of 3 samples finished" in (none.error or "")
    assert none.finish == {"aborted": 3}
    assert part.status == "fallback" and part.answer == 6 and part.finish == {"answer": 1, "aborted": 2}
    assert "vote of the 1 of 3 samples that finished" in (part.error or "")


async def test_problem_timeout_from_the_config_caps_every_problem():
    backend = FakeBackend(lambda t, n: "word " * 100_000, step_s=0.005)
    async with Pipeline(small_config(run={"problem_timeout_s": 0.2}), backend=backend) as p:
        with anyio.fail_after(20):
            results = await collect(p, problems(3))
    assert [r.status for r in results] == ["fallback"] * 3


async def test_a_backend_that_cannot_start_is_a_pipeline_error_and_leaves_nothing_open():
    from pipeline.api import PipelineError

    class Broken(FakeBackend):
        async def serve(self, *, task_status):
            raise RuntimeError("no GPU memory left")

    with pytest.raises(PipelineError, match="failed to start: no GPU memory left"):
        async with Pipeline(small_config(), backend=Broken()):
            pass


async def test_a_follower_still_gets_its_answer_when_the_leader_gives_up(monkeypatch, tmp_path):
    from pipeline.cache import ResultCache

    original = ResultCache.get

    async def slow_get(self, problem, key):  # a disk lookup that cannot be interrupted
        await anyio.to_thread.run_sync(time.sleep, 0.3)
        return await original(self, problem, key)

    monkeypatch.setattr(ResultCache, "get", slow_get)
    cfg = small_config(cache={"size": 0, "dir": str(tmp_path / "c")}, run={"max_in_flight": 4})
    got: dict[str, Result] = {}
    async with Pipeline(cfg, backend=FakeBackend()) as p:

        async def leader() -> None:
            with anyio.move_on_after(0.1):  # gives up while its cache lookup is still running
                await p.solve({"id": "A", "problem": "What is 1 + 2?"})

        async def follower() -> None:
            await anyio.sleep(0.05)  # the same text while A's lookup runs: B follows A
            got["B"] = await p.solve({"id": "B", "problem": "What is 1 + 2?"})

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(leader)
                tg.start_soon(follower)
        assert p.runner.slots.value == 4  # every slot came back
    assert got["B"].id == "B" and got["B"].answer == 3 and got["B"].status != "error"


async def test_a_vote_cut_short_by_a_deadline_is_not_cached():
    def responder(text, nth):
        return "\\boxed{6}" if nth == 0 else "word " * 100_000

    backend = FakeBackend(responder, step_s=0.005)
    cfg = small_config(generation={"samples": 2}, cache={"size": 100})
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(20):
            cut = await p.solve({"id": "a", "problem": "partial"}, timeout_s=0.3)
            backend.responder = lambda t, n: "\\boxed{7}"
            again = await p.solve({"id": "b", "problem": "partial"})
    assert cut.answer == 6 and cut.finish == {"answer": 1, "aborted": 1}
    assert again.status == "ok" and again.answer == 7  # computed afresh, not the cut-short vote


async def test_an_admission_ticket_gives_its_slot_back_once_whatever_path_it_takes():
    from pipeline.admission import Admission, Route

    send, receive = anyio.create_memory_object_stream(4)
    admission = Admission(2)
    route = Route(send)
    ticket = await admission.admit(route)
    assert admission.value == 1 and route.outstanding == 1
    ticket.release()
    ticket.release()  # a second release cannot widen the limit
    ticket.close()
    assert admission.value == 2 and route.outstanding == 0
    assert admission.statistics().held == 0
    send.close()
    receive.close()


async def test_leaving_a_stream_block_gives_back_its_slots_without_the_garbage_collector():
    import gc

    cfg = small_config(run={"max_in_flight": 4, "verify_workers": 1})
    gc.disable()  # the old generator form needed the collector (asyncio's finalizer) for this
    try:
        async with Pipeline(cfg, backend=FakeBackend(delay_s=0.005)) as p:
            with anyio.fail_after(30):
                async with p.stream(problems(50)) as results:
                    async for _ in results:
                        break
                while p.runner.slots.value < 4:  # a result being routed meanwhile comes back too
                    await anyio.sleep(0.01)
                assert p.runner.slots.value == 4
                async with p.stream(problems(10, "n")) as results:
                    after = [r async for r in results]
    finally:
        gc.enable()
    assert len(after) == 10


async def test_a_prompt_too_long_for_the_model_reaches_every_caller_who_asked():
    # the tokenize stage sends it to the router directly; the second copy follows the first
    long = {"problem": "What is 1 + 2? " + "x" * 2000}
    items = [{"id": "long", **long}, {"id": "again", **long}, *problems(3)]
    cfg = small_config(generation={"max_new_tokens": 16}, cache={"size": 100})
    async with Pipeline(cfg, backend=FakeBackend(max_context=1000)) as p:
        results = await collect(p, items)
        again = await collect(p, [{"id": "later", **long}])
    by_id = {r.id: r for r in results}
    assert sorted(by_id) == ["again", "long", "p0", "p1", "p2"]
    for pid in ("long", "again"):
        assert by_id[pid].status == "error" and "exceeds the model's context" in (by_id[pid].error or "")
    assert all(by_id[f"p{i}"].answer == i + 2 for i in range(3))
    assert again[0].status == "error"  # an error is not cached: computed (and rejected) again
    assert not any(hasattr(r, "key") or hasattr(r, "serial") for r in [*results, *again])
