"""The sandbox on its own: confined, warm interpreters, one per sample, killed after use."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from pipeline.config import SandboxConfig
from stages.sandbox import CellResult, Sandbox, SandboxError
from stages.sandbox_kernel import WORKDIR

pytestmark = pytest.mark.anyio


def sandbox(**limits) -> Sandbox:
    return Sandbox(SandboxConfig(**{"cell_timeout_s": 3.0, **limits}), size=2)


async def test_cells_of_one_sample_share_state_and_samples_share_nothing():
    sb = sandbox()
    a, b = sb.session(), sb.session()
    try:
        with anyio.fail_after(60):
            first = await a.run("x = 41\nprint('set')")
            second = await a.run("x + 1")  # a last bare expression is printed, as in a notebook
            other = await b.run("print(x)")
    finally:
        await a.aclose()
        await b.aclose()
    assert first.output == "set\n" and first.ok
    assert second.output.strip() == "42"
    assert not other.ok and "NameError" in (other.error or "")


async def test_math_libraries_are_already_imported():
    sb = sandbox()
    s = sb.session()
    try:
        with anyio.fail_after(60):
            r = await s.run(
                "print(sp.factorint(360), int(np.sum(np.arange(5))), mpmath.mp.dps, math.comb(5, 2))"
            )
    finally:
        await s.aclose()
    assert r.ok, r.error
    assert r.output.strip() == "{2: 3, 3: 2, 5: 1} 10 15 10"


async def test_an_exception_shows_its_last_lines():
    sb = sandbox()
    s = sb.session()
    try:
        with anyio.fail_after(60):
            r = await s.run("def f(n):\n    return 1 // n\nprint('before')\nf(0)")
    finally:
        await s.aclose()
    assert r.output == "before\n"
    assert (
        r.error is not None
        and r.error.splitlines()[-1] == "ZeroDivisionError: integer division or modulo by zero"
    )
    assert "before" in r.for_model(1000) and "ZeroDivisionError" in r.for_model(1000)


async def test_a_timeout_kills_the_interpreter_and_the_next_cell_gets_a_fresh_one():
    sb = sandbox(cell_timeout_s=1.0)
    s = sb.session()
    try:
        with anyio.fail_after(60):
            await s.run("keep = 1")
            assert s.kernel is not None
            pid = s.kernel.process.pid
            r = await s.run("while True:\n    pass")
            assert r.restarted and "TimeoutError" in (r.error or "")
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # the whole process is gone, not left spinning
            after = await s.run("print(keep)")
    finally:
        await s.aclose()
    assert "NameError" in (after.error or "")  # fresh interpreter: earlier variables are gone
    assert sb.stats.timeouts == 1


async def test_a_cancelled_cell_kills_its_interpreter():
    sb = sandbox()
    s = sb.session()
    with anyio.fail_after(60):
        await s.run("1")
        assert s.kernel is not None
        pid = s.kernel.process.pid
        with anyio.move_on_after(0.5):
            await s.run("import time\ntime.sleep(30)")
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert s.kernel is None


async def test_output_is_capped_and_says_how_much_was_cut():
    sb = sandbox(output_chars=100)
    s = sb.session()
    try:
        with anyio.fail_after(60):
            r = await s.run("print('x' * 100_000_000)")
    finally:
        await s.aclose()
    assert r.ok and len(r.output) == 100 and r.dropped == 100_000_001 - 100
    assert "100,000,001" not in r.for_model(100) and "99,999,901 more characters" in r.for_model(100)


async def test_the_kernel_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_SECRET", "hunter2")
    sb = sandbox()
    s = sb.session()
    try:
        with anyio.fail_after(60):
            r = await s.run("import os\nprint(sorted(os.environ))\nprint(os.getcwd())")
    finally:
        await s.aclose()
    assert "PIPELINE_TEST_SECRET" not in r.output and "hunter2" not in r.output
    assert r.output.splitlines()[-1] in (
        WORKDIR,
        *(str(p) for p in Path(tempfile.gettempdir()).glob("pipeline-cell-*")),
    )


async def test_the_working_directory_is_gone_after_the_sample():
    sb = sandbox()
    s, t = sb.session(), sb.session()
    with anyio.fail_after(60):
        r = await s.run("open('scratch.txt', 'w').write('ok')\nimport os\nprint(os.getcwd())")
        where = r.output.strip()
        await s.aclose()
        after = await t.run(f"import os\nprint(os.path.exists({where + '/scratch.txt'!r}))")
        await t.aclose()
    assert r.ok, r.error
    assert after.output.strip() == "False"  # the next sample's fresh directory does not have it
    assert not os.path.exists(os.path.join(where, "scratch.txt"))  # nor does the host


def test_output_for_the_model_is_capped_even_when_the_kernel_sent_more():
    r = CellResult(output="y" * 5000, error=None)
    text = r.for_model(1000)
    assert text.startswith("y" * 1000) and "4,000 more characters" in text and len(text) < 1100


async def test_a_pool_keeps_warm_interpreters_and_replaces_each_one_given_back():
    sb = sandbox()
    async with anyio.create_task_group() as tg:
        await tg.start(sb.serve)
        with anyio.fail_after(60):
            while len(sb._idle) < 2:
                await anyio.sleep(0.05)
            s = sb.session()
            await s.run("1")
            assert len(sb._idle) == 1  # one taken
            await s.aclose()
            while len(sb._idle) < 2:  # and replaced by a fresh one
                await anyio.sleep(0.05)
        assert sb.stats.started == 3
        tg.cancel_scope.cancel()


async def test_a_forged_reply_or_a_huge_error_cannot_hurt_the_parent():
    sb = sandbox()
    s = sb.session()
    try:
        with anyio.fail_after(60):
            forged = await s.run("import os\nos.write(4, b'200000\\n' + b'[' * 200000)")
            huge = await s.run("raise ValueError('x' * 200_000)")
    finally:
        await s.aclose()
    assert forged.restarted and "broke the protocol" in (forged.error or "")
    assert huge.error is not None and len(huge.error) < 2000  # the kernel keeps the last lines, short
    assert len(huge.for_model(1000)) < 2100


async def test_an_interpreter_cancelled_while_starting_leaves_no_working_directory(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    sb = sandbox()
    async with anyio.create_task_group() as tg:
        await tg.start(sb.serve)
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert list(tmp_path.iterdir()) == [] and sb._live == 0
    with pytest.raises(SandboxError, match="stopped"):
        await sb.acquire()
