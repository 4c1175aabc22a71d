"""Fault injection: whatever breaks, every input id ends with exactly one result, and errors say why."""

import json
from pathlib import Path

import anyio
import pytest

import stages.verification
from pipeline import Pipeline
from pipeline.items import Result
from pipeline.sink import OutputError, ResultWriter, read_written
from stages.backends.fake import FakeBackend, boxed_sum_responder
from stages.parse import read_problems
from tests.conftest import small_config
from tests.faults import crashing_check


def problems(n: int) -> list[dict]:
    return [{"id": f"p{i}", "problem": f"What is {i} + 2?"} for i in range(n)]


async def run_all(p: Pipeline, items) -> list[Result]:
    with anyio.fail_after(120):
        return [r async for r in p.stream(items)]


def assert_one_result_per_id(results: list[Result], ids: list[str]) -> None:
    assert sorted(str(r.id) for r in results) == sorted(ids)
    for r in results:
        if r.status == "error":
            assert r.error, r


async def test_a_dying_verification_worker_is_replaced_and_only_its_sample_errors(monkeypatch):
    monkeypatch.setattr(stages.verification, "check_batch", crashing_check)

    def responder(text: str, nth: int) -> str:
        return "CRASH" if "7 + 2" in text else boxed_sum_responder(text, nth)

    async with Pipeline(small_config(), backend=FakeBackend(responder)) as p:
        results = await run_all(p, problems(12))
        assert p.runner.verification.worker_failures >= 1
    assert_one_result_per_id(results, [f"p{i}" for i in range(12)])
    by_id = {r.id: r for r in results}
    assert by_id["p7"].status == "fallback" and "verification worker died" in (by_id["p7"].error or "")
    assert all(by_id[f"p{i}"].status == "ok" for i in range(12) if i != 7)


async def test_out_of_memory_splits_batches_and_errors_what_cannot_fit_alone():
    def fail(texts):  # "memory" is the batch's total characters; the long problem cannot fit even alone
        if sum(len(t) for t in texts) > 60:
            raise MemoryError("simulated CUDA out of memory")

    items = [*problems(10), {"id": "huge", "problem": "What is 1 + 1? " + "really " * 20}]
    backend = FakeBackend(fail=fail)
    async with Pipeline(small_config(), backend=backend) as p:
        results = await run_all(p, items)
    assert backend.scheduler.stats.oom_splits >= 1
    assert_one_result_per_id(results, [*(f"p{i}" for i in range(10)), "huge"])
    by_id = {r.id: r for r in results}
    assert by_id["huge"].status == "error" and "out of memory even in a batch of one" in (
        by_id["huge"].error or ""
    )
    assert all(by_id[f"p{i}"].answer == i + 2 for i in range(10))


async def test_every_kind_of_bad_line_in_one_file(tmp_path: Path):
    lines = [
        b'{"id": "ok1", "problem": "What is 1 + 1?"}',
        b"{broken",
        b"[1, 2, 3]",
        b'{"problem": "no id"}',
        b'{"id": "noproblem"}',
        b'{"id": "empty", "problem": ""}',
        b'{"id": "typed", "problem": 42}',
        b"",
        b'{"id": "bytes", "problem": "\xff\xfe"}',
        b'{"id": "ok1", "problem": "duplicate id"}',
        b'{"id": "ok2", "question": "What is 2 + 2?"}',
    ]
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\r\n".join(lines))
    async with Pipeline(small_config(), backend=FakeBackend()) as p:
        results = await run_all(p, read_problems(f))
    assert len(results) == 10  # one per non-blank line
    errors = {r.line: r.error for r in results if r.status == "error"}
    assert set(errors) == {2, 3, 4, 5, 6, 7, 10}
    assert all(e and e.startswith(f"line {line}: ") for line, e in errors.items())
    # invalid UTF-8 is replaced, not an error: the "bytes" problem is solved under its id
    assert {r.id for r in results if r.status == "ok"} == {"ok1", "ok2", "bytes"}


async def test_a_hundred_thousand_line_file(tmp_path: Path):
    f = tmp_path / "big.jsonl"
    n = 100_000
    with f.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"id": f"p{i}", "problem": f"What is {i} + 2?", "answer": i + 2}) + "\n")
    cfg = small_config(batch={"max_batch_size": 64, "max_wait_ms": 1}, run={"max_in_flight": 256})
    seen: set[str] = set()
    async with Pipeline(cfg, backend=FakeBackend()) as p:
        with anyio.fail_after(240):
            async for r in p.stream(read_problems(f)):
                assert r.id not in seen
                seen.add(str(r.id))
        assert p.stats.summary()["accuracy"] == 1.0
    assert len(seen) == n


class FailingWriter(ResultWriter):
    """Writes two batches, then the disk fails."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = 0

    async def _write(self, batch, out, sub):
        if self.batches == 2:
            raise OSError(28, "No space left on device")
        self.batches += 1
        await super()._write(batch, out, sub)


async def test_output_disk_failure_is_a_clear_error_and_written_lines_stay_valid(tmp_path: Path):
    out = tmp_path / "results.jsonl"
    writer = FailingWriter(str(out))
    send, receive = anyio.create_memory_object_stream[Result](1)
    with pytest.RaisesGroup(pytest.RaisesExc(OutputError, match=r"results\.jsonl.*No space left on device")):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                for i in range(10):
                    await send.send(Result(id=f"p{i}", answer=i, status="ok"))
                    await anyio.sleep(0.01)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and [json.loads(x)["id"] for x in lines] == ["p0", "p1"]


def test_resume_repairs_a_half_written_last_line(tmp_path: Path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "a", "answer": 1}\n{"id": null, "line": 4, "status": "error"}\n{"id": "b", "ans')
    done = read_written(out)
    assert done.repaired and done.ids == {"a"} and done.lines == {4: None} and done.count == 2
    assert out.read_text().endswith('"error"}\n')
    assert done.has("a", 1) and not done.has("b", 2) and done.has(None, 4)
