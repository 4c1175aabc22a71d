"""The verification workers and the standard-input reader: a checker exception is one sample's
failure, a worker's stray output cannot corrupt the pipe protocol, an idle standard input ends at
once on Ctrl-C, and the verification copies share the queued work."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import anyio
import psutil
import pytest

from pipeline.items import Candidate, Encoded, Generation, Job, Problem, Result
from stages.parse import read_problems
from stages.process_pool import WorkerDied, WorkerPool, _Worker
from stages.verification import Verification
from tests import helpers
from tests.conftest import small_config

# --- functions sent to worker processes (module level, so they pickle by reference) -------------------


def noisy() -> int:
    """Writes below Python's ``sys.stdout``, as a C extension's ``printf`` would."""
    os.write(1, b"garbage\n12\n")
    return 7


def reads_stdin() -> bytes:
    """Reads the process's standard input at the file-descriptor level."""
    return os.read(0, 100)


# --- helpers -----------------------------------------------------------------------------------------


def encoded(i: int = 1) -> Encoded:
    problem = Problem(id=f"p{i}", text=f"What is {i} + 1?")
    return Encoded(job=Job(problem=problem, key=f"k{i}", serial=i), prompt_ids=(1, 2, 3))


def generation(text: str, index: int = 0, i: int = 1) -> Generation:
    return Generation(encoded=encoded(i), index=index, text=text, new_tokens=1)


def live_children() -> set[int]:
    return {c.pid for c in psutil.Process().children() if c.is_running() and c.status() != "zombie"}


HUGE = "\\boxed{" + "9" * 5000 + "}"  # int() refuses more than 4300 digits: it used to raise in the checker


# --- 1. an exception while checking one sample is that sample's failure ------------------------------


async def test_a_checker_exception_fails_only_that_sample():
    v = Verification(small_config(answer={"max": 100}))
    try:
        with anyio.fail_after(60):
            out = await v._check([generation(HUGE, 0), generation("\\boxed{42}", 1)])
    finally:
        await v.aclose()
    assert [c.generation.index for c in out] == [0, 1]
    assert out[0].answer is None
    assert out[0].reason is not None
    assert "too long to be an answer" in out[0].reason
    assert out[1].answer == 42 and out[1].reason is None


def test_check_batch_turns_a_checker_exception_into_that_texts_reason(monkeypatch: pytest.MonkeyPatch):
    from stages import verification

    def check(text, **kw):
        if "boom" in text:
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
        return 42, "42", None

    monkeypatch.setattr(verification, "check_answer", check)
    out = verification.check_batch(["boom", "\\boxed{42}"], None, 0, 100)
    assert out[0][0] is None and (out[0][2] or "").startswith("cannot check the answer: ValueError: ")
    assert "digits" in (out[0][2] or "")
    assert out[1] == (42, "42", None)


async def test_the_stage_survives_a_checker_exception():
    v = Verification(small_config(answer={"max": 100}))
    in_send, in_receive = anyio.create_memory_object_stream[Generation | Result](10)
    out_send, out_receive = anyio.create_memory_object_stream[Candidate | Result](10)
    async with in_send:
        await in_send.send(generation(HUGE, 0))
        await in_send.send(generation("\\boxed{42}", 1))
    try:
        with anyio.fail_after(60):
            await v.run(in_receive, out_send)
            async with out_receive:
                out = [c async for c in out_receive]
    finally:
        await v.aclose()
    assert all(isinstance(c, Candidate) for c in out)
    by_index = {c.generation.index: c for c in out if isinstance(c, Candidate)}
    assert by_index[0].answer is None and "too long" in (by_index[0].reason or "")
    assert by_index[1].answer == 42


async def test_any_exception_from_the_pool_is_a_per_sample_failure(monkeypatch: pytest.MonkeyPatch):
    v = Verification(small_config(answer={"max": 100}))
    calls: list[list[str]] = []

    async def run(func, texts, modulus, lo, hi, *, limit_s):
        calls.append(list(texts))
        if any("poison" in t for t in texts):
            raise RuntimeError("the checker blew up")
        return func(texts, modulus, lo, hi)  # in-process: the real check_batch

    monkeypatch.setattr(v.pool, "run", run)
    gens = [generation("\\boxed{1}", 0), generation("poison \\boxed{2}", 1), generation("\\boxed{3}", 2)]
    with anyio.fail_after(30):
        out = await v._check(gens)
    assert [(c.generation.index, c.answer) for c in out] == [(0, 1), (1, None), (2, 3)]
    assert out[1].reason == "cannot check the answer: RuntimeError: the checker blew up"
    assert len(calls) == 4  # the batch, then each sample alone
    assert v.worker_failures == 2


# --- 2. a worker's stray output cannot corrupt the protocol; a corrupt reply kills the worker ---------


@pytest.mark.timeout(60)
async def test_fd_level_output_in_a_worker_does_not_reach_the_protocol():
    pool = WorkerPool(1)
    try:
        with anyio.fail_after(30):
            first = await pool.run(helpers.pid, limit_s=10)
            assert await pool.run(noisy, limit_s=10) == 7
            assert await pool.run(reads_stdin, limit_s=10) == b""
            assert await pool.run(helpers.double, 4, limit_s=10) == 8
            assert await pool.run(helpers.pid, limit_s=10) == first  # the same worker throughout
            assert pool.deaths == 0
    finally:
        await pool.aclose()


class _ScriptPool(WorkerPool):
    """A pool whose 'workers' run a script: answer the first request with ``reply``, then stay alive."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(1)
        self.reply = reply
        self.spawned: list[_Worker] = []

    async def _spawn(self) -> _Worker:
        script = (
            "import sys, time\n"
            "sys.stdin.buffer.readline()\n"
            f"sys.stdout.buffer.write({self.reply!r})\n"
            "sys.stdout.buffer.flush()\n"
            "time.sleep(600)\n"
        )
        process = await anyio.open_process([sys.executable, "-c", script])
        worker = _Worker(process)
        self._all.add(worker)
        self.spawned.append(worker)
        return worker


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reply", [b"garbage\n", b"x" * 100], ids=["bad-header", "no-line-end"])
async def test_a_worker_that_breaks_the_protocol_is_killed_at_once(reply: bytes):
    before = live_children()
    pool = _ScriptPool(reply)
    limit_s = 5.0
    try:
        with anyio.fail_after(limit_s + 10):
            with pytest.raises(WorkerDied, match="protocol"):
                await pool.run(helpers.double, 1, limit_s=limit_s)
        assert pool.deaths == 1
        assert pool.spawned[0].process.returncode is not None  # killed, not waited for
        assert pool._all == set()
    finally:
        await pool.aclose()
    assert not live_children() - before


# --- 3. reading standard input ends at once when cancelled --------------------------------------------


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, int]]:
    """``sys.stdin`` on the read end of a fresh pipe; yields ``(read_fd, write_fd)``."""
    r, w = os.pipe()
    stdin = open(r, closefd=False)  # closed below
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        yield r, w
    finally:
        stdin.close()
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def line(i: int) -> bytes:
    return json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?"}).encode() + b"\n"


@pytest.mark.timeout(60)
async def test_cancelling_an_idle_stdin_read_ends_it_at_once(stdin_pipe: tuple[int, int]):
    r, w = stdin_pipe
    os.write(w, line(1))
    # should the read not be cancellable, this frees it so the test fails instead of hanging
    rescue = threading.Timer(4.0, os.write, (w, line(2)))
    rescue.start()
    seen: list[Problem | Result] = []
    started = time.monotonic()
    try:
        with anyio.fail_after(10):
            with anyio.move_on_after(0.5) as scope:
                async for item in read_problems("-"):
                    seen.append(item)
    finally:
        rescue.cancel()
        rescue.join()
    elapsed = time.monotonic() - started
    assert scope.cancelled_caught
    assert [p.id for p in seen if isinstance(p, Problem)] == ["q1"]
    assert elapsed < 3.0, f"cancelling the read took {elapsed:.1f} s"
    # the descriptor's flags are restored (blocking again) once the read ends
    assert os.get_blocking(r)


async def test_stdin_pipe_lines_in_pieces_then_eof(stdin_pipe: tuple[int, int]):
    _, w = stdin_pipe
    data = line(1) + b"\n" + line(2) + b'{"id": "q3", "problem": "no line end"}'

    async def produce() -> None:
        for start in range(0, len(data), 7):
            os.write(w, data[start : start + 7])
            await anyio.sleep(0.001)
        os.close(w)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            items = [item async for item in read_problems("-")]
    assert [(p.id, p.line) for p in items if isinstance(p, Problem)] == [("q1", 1), ("q2", 3), ("q3", 4)]
    assert len(items) == 3


async def test_stdin_redirected_from_a_regular_file(tmp_path, monkeypatch: pytest.MonkeyPatch):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"".join(line(i) for i in range(3)))
    with f.open() as stdin:
        monkeypatch.setattr(sys, "stdin", stdin)
        with anyio.fail_after(20):
            items = [item async for item in read_problems("-")]
    assert [p.id for p in items if isinstance(p, Problem)] == ["q0", "q1", "q2"]


# --- 4. the verification copies share the queued work ------------------------------------------------


class _CountingVerification(Verification):
    """Checks without worker processes and records which copy (task) checked how many samples."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.per_copy: Counter[int] = Counter()

    async def _check(self, gens: list[Generation]) -> list[Candidate]:
        self.per_copy[anyio.get_current_task().id] += len(gens)
        await anyio.sleep(0.01)
        return [Candidate(generation=g, answer=1, extracted="1") for g in gens]


async def test_verification_copies_share_the_queued_work():
    cfg = small_config(run={"verify_workers": 2, "verify_batch": 64})
    v = _CountingVerification(cfg)
    total = 40
    in_send, in_receive = anyio.create_memory_object_stream[Generation](100)
    out_send, out_receive = anyio.create_memory_object_stream[Candidate](100)
    async with in_send:
        for i in range(total):
            await in_send.send(generation("\\boxed{\\frac{2}{2}}", 0, i))  # LaTeX: for the workers
    with anyio.fail_after(30):
        async with in_receive, out_send, anyio.create_task_group() as tg:
            for _ in range(cfg.run.verify_workers):
                tg.start_soon(v.run, in_receive.clone(), out_send.clone())
        async with out_receive:
            out = [c async for c in out_receive]
    assert len(out) == total
    assert sum(v.per_copy.values()) == total
    assert len(v.per_copy) == 2, f"one copy did all the work: {dict(v.per_copy)}"
    assert all(n >= total // 4 for n in v.per_copy.values()), dict(v.per_copy)
