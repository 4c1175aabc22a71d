"""Real runs of the command line, interrupted (SIGINT, SIGKILL) and resumed with the real model."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
N = 16


def write_input(path: Path) -> list[str]:
    ids = [f"q{i}" for i in range(N)]
    path.write_text(
        "".join(json.dumps({"id": i, "problem": f"What is {n} + {n}?"}) + "\n" for n, i in enumerate(ids))
    )
    return ids


def start(inp: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "stream",
        str(inp),
        "--output",
        str(out),
        "--max-new-tokens",
        "24",
        "--batch-size",
        "4",
        "--max-in-flight",
        "4",
        "--dtype",
        "float32",
        "--no-progress",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(out: Path, n: int, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} lines after {timeout} s")


def ids_in(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in out.read_text().splitlines()]  # every line must parse


def test_sigkill_midway_then_resume_gives_every_id_exactly_once(tmp_path: Path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp)
    proc = start(inp, out)
    wait_for_lines(out, 4, proc)
    proc.kill()
    proc.communicate(timeout=30)
    before = ids_in(out)
    assert 4 <= len(before) < N
    with out.open("a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"id": "q2", "answer": 4, "sta')
    resumed = start(inp, out, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    after = ids_in(out)
    assert sorted(after) == sorted(ids)
    assert after[: len(before)] == before  # finished answers were kept, not redone


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_reading_finishes_in_flight_and_says_how_to_resume(
    tmp_path: Path, sig: signal.Signals
):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_input(inp)
    proc = start(inp, out, "--grace-s", "60")
    wait_for_lines(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"interrupted by {sig.name}" in err and "--resume" in err
    first = ids_in(out)
    assert 2 <= len(first) < N
    # in-flight problems were allowed to finish: every line read got its result, none was dropped
    m = re.search(r"(\d+) results written of (\d+) input lines read", err)
    assert m is not None, err
    assert int(m.group(1)) == int(m.group(2)) == len(first)
    resumed = start(inp, out, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert sorted(ids_in(out)) == sorted(ids)


def test_a_failing_output_disk_exits_1_with_a_clear_message(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    write_input(inp)
    proc = start(inp, Path("/dev/full"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "error: writing results to /dev/full failed: No space left on device" in err


def test_a_second_signal_stops_a_long_batch_at_once(tmp_path: Path):
    # Before: generate held its thread for the whole static batch, and a second Ctrl-C had not stopped
    # a batch of 16 x 1,024 tokens after 120 s. Now the rows are aborted at the next decode step.
    inp, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.log"
    inp.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "problem": f"Write a very long story about dragon number {i}."}) + "\n"
            for i in range(16)
        )
    )
    cmd = [
        sys.executable, "-m", "pipeline", "stream", str(inp), "--output", str(out),
        "--max-new-tokens", "1024", "--batch-size", "16", "--dtype", "float32", "--no-progress",
        "--grace-s", "60",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + 120
        while "model loaded" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(3)  # the batch is generating
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        proc.wait(timeout=60)
        took = time.monotonic() - stopped
    assert proc.returncode == 130, log.read_text()
    assert took < 30, f"took {took:.1f} s to stop"  # 16 x 1,024 tokens would take minutes here
    assert "--resume" in log.read_text()
