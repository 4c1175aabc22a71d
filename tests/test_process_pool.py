import functools
import os
import subprocess
import sys
from pathlib import Path

import anyio
import psutil
import pytest

from stages.process_pool import WorkerDied, WorkerPool
from tests import helpers


def live_children() -> set[int]:
    return {c.pid for c in psutil.Process().children() if c.is_running() and c.status() != "zombie"}


async def test_results_errors_deaths_and_timeouts():
    before = live_children()
    pool = WorkerPool(2)
    try:
        with anyio.fail_after(60):
            await pool.start()
            assert pool.started == 2
            assert await pool.run(helpers.double, 21, limit_s=10) == 42
            with pytest.raises(ValueError, match="bad input"):
                await pool.run(helpers.fail, "bad input", limit_s=10)
            first = await pool.run(helpers.pid, limit_s=10)
            assert first != os.getpid()
            with pytest.raises(WorkerDied, match="exited with code 3"):
                await pool.run(helpers.die, limit_s=10)
            with pytest.raises(TimeoutError):
                await pool.run(helpers.sleep, 30, limit_s=0.5)
            assert pool.deaths == 1
            # the pool replaced what it lost and still works, in parallel
            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(functools.partial(pool.run, helpers.double, i, limit_s=10))
            assert await pool.run(helpers.double, 5, limit_s=10) == 10
    finally:
        await pool.aclose()
    assert not live_children() - before


async def test_cancelling_a_call_kills_that_worker():
    pool = WorkerPool(1)
    try:
        with anyio.move_on_after(0.5):
            await pool.run(helpers.sleep, 30, limit_s=60)
        assert pool._all == set()
        assert await pool.run(helpers.double, 1, limit_s=10) == 2
    finally:
        await pool.aclose()


def test_a_user_script_without_a_main_guard_works(tmp_path: Path):
    script = tmp_path / "solve.py"
    script.write_text(
        "import anyio\n"
        "from pipeline import Pipeline\n"
        "from stages.backends.fake import FakeBackend\n"
        "async def main():\n"
        "    async with Pipeline(backend=FakeBackend()) as p:\n"
        "        r = await p.solve('What is 40 + 2?')\n"
        "        print('ANSWER', r.answer)\n"
        "anyio.run(main)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ANSWER 42"
