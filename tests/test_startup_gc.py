"""``python -m pipeline`` starts with the cyclic collector off and turns it back on, with start-up's
objects frozen, once the model is loaded; every other way out of the command turns it back on too."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from pipeline import startup
from pipeline.cli import EXIT_USAGE, build_parser, config_from_args, main, run_stream
from stages.backends.fake import FakeBackend

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def paused() -> Iterator[None]:
    assert gc.isenabled()
    startup.pause_gc()
    try:
        yield
    finally:  # whatever the test did, leave the collector as it was
        gc.unfreeze()
        gc.enable()
        startup._paused = False


def test_the_stream_command_turns_the_collector_back_on_once_the_model_is_loaded(
    tmp_path: Path, paused: None
):
    assert not gc.isenabled()
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"p{i}", "problem": f"What is {i} + 1?"}) + "\n" for i in range(5))
    )
    args = build_parser().parse_args(["stream", str(src), "-o", str(tmp_path / "out.jsonl"), "--no-progress"])
    cfg = config_from_args(args).replace(run={"verify_workers": 1})
    seen: list[bool] = []

    class Watching(FakeBackend):
        async def generate(self, request):  # type: ignore[no-untyped-def]
            seen.append(gc.isenabled())
            return await super().generate(request)

    async def bounded() -> int:
        with anyio.fail_after(60):
            return await run_stream(args, cfg, Watching())

    assert anyio.run(bounded) == 0
    assert seen and all(seen)  # on for the whole run, not only at its end
    assert gc.get_freeze_count() > 0  # start-up's objects were frozen
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


def test_a_usage_error_turns_the_collector_back_on(tmp_path: Path, paused: None):
    assert main(["stream", str(tmp_path / "nope.jsonl")]) == EXIT_USAGE
    assert gc.isenabled()


def test_resume_is_a_no_op_when_pause_did_not_turn_it_off():
    gc.disable()
    try:
        startup.pause_gc()  # already off: not ours to turn on
        startup.resume_gc()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_python_m_pipeline_runs_with_the_collector_off_until_it_starts_streaming(tmp_path: Path):
    """The real entry point, in a child process: the collector is off while the command starts and on
    afterwards (``PIPELINE_STARTUP_GC=1`` keeps it on throughout)."""
    probe = (
        "import atexit, gc, runpy, sys\n"
        "import pipeline.cli as cli\n"
        "real = cli._main\n"
        "def spy(argv):\n"
        "    print('at start', gc.isenabled(), file=sys.stderr)\n"
        "    return real(argv)\n"
        "cli._main = spy\n"
        "atexit.register(lambda: print('at end', gc.isenabled(), file=sys.stderr))\n"
        "sys.argv = ['pipeline', 'stream', sys.argv[1]]\n"
        "runpy.run_module('pipeline', run_name='__main__')\n"
    )
    for env_value, start in (("0", "False"), ("1", "True")):
        out = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path / "missing.jsonl")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "PIPELINE_STARTUP_GC": env_value, "HF_HUB_OFFLINE": "1"},
            timeout=120,
        )
        assert out.returncode == EXIT_USAGE, out.stderr
        assert f"at start {start}" in out.stderr and "at end True" in out.stderr, out.stderr
