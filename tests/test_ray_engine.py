"""``--engine ray`` on a local Ray cluster (2 CPU replicas): every id exactly once, errors as results,
the local engine's answers, an actor killed midway, resume; and the real model on Ray."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import anyio
import pytest

from pipeline.cli import build_parser, config_from_args, main, run_stream
from stages.backends.fake import FakeBackend

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray not installed: bash scripts/setup.sh dev"
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    from pipeline.ray_engine import RayOptions, init_ray

    os.environ["PIPELINE_TEST_DIE_MARKER"] = str(tmp_path_factory.mktemp("ray") / "died")
    init_ray(RayOptions(replicas=2))
    yield ray
    ray.shutdown()


def write_input(path: Path, n: int = 12) -> Path:
    lines = [
        json.dumps({"id": f"p{i}", "problem": f"What is {i} + {i * 3}?", "answer": 4 * i}) for i in range(n)
    ]
    lines.insert(3, "{broken json")
    lines.append(json.dumps({"id": "p1", "problem": "a repeat"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp: Path, src: Path, *extra: str, backend_spec: str | None = None, local: FakeBackend | None = None):
    out = tmp / "out.jsonl"
    args = build_parser().parse_args(["stream", str(src), "-o", str(out), "--no-progress", *extra])
    cfg = config_from_args(args).replace(run={"verify_workers": 1})

    async def bounded() -> int:
        with anyio.fail_after(240):
            return await run_stream(args, cfg, backend=local, backend_spec=backend_spec)

    assert anyio.run(bounded) == 0
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_every_id_once_errors_as_results_and_the_local_engines_answers(cluster, tmp_path: Path):
    src = write_input(tmp_path / "in.jsonl")
    (tmp_path / "r").mkdir()
    (tmp_path / "l").mkdir()
    extra = ["--engine", "ray", "--replicas", "2", "--ray-batch-size", "3"]
    on_ray = run(tmp_path / "r", src, *extra, backend_spec="tests.ray_helpers:fake")
    local = run(tmp_path / "l", src, local=FakeBackend())
    key = lambda r: (r["line"], r["id"])  # noqa: E731
    assert sorted(map(key, on_ray)) == sorted(map(key, local))  # every input line once, same ids
    assert len(on_ray) == 14 and len({(r["id"], r["line"]) for r in on_ray}) == 14
    strip = lambda r: {k: v for k, v in r.items() if k not in ("timings_ms",)}  # noqa: E731
    assert sorted(map(strip, on_ray), key=key) == sorted(map(strip, local), key=key)
    errors = [r for r in on_ray if r["status"] == "error"]
    assert {r["line"] for r in errors} == {4, 14}  # the broken line and the repeated id
    assert all(r["correct"] for r in on_ray if "correct" in r)


def test_an_actor_killed_midway_loses_no_id(cluster, tmp_path: Path):
    src = write_input(tmp_path / "in.jsonl", n=20)
    rows = run(
        tmp_path,
        src,
        "--engine",
        "ray",
        "--replicas",
        "2",
        "--ray-batch-size",
        "4",
        backend_spec="tests.ray_helpers:dies_once",
    )
    assert Path(os.environ["PIPELINE_TEST_DIE_MARKER"]).exists()  # an actor did die
    solved = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["id"] for r in solved) == sorted(f"p{i}" for i in range(20))  # each once, answered
    assert len(rows) == 22


def test_resume_on_ray_skips_what_is_written(cluster, tmp_path: Path):
    src = write_input(tmp_path / "in.jsonl", n=6)
    out = tmp_path / "out.jsonl"
    first = src.read_text().splitlines()
    (tmp_path / "half.jsonl").write_text("\n".join(first[:4]) + "\n")
    run(tmp_path, tmp_path / "half.jsonl", "--engine", "ray", backend_spec="tests.ray_helpers:fake")
    before = out.read_text().splitlines()
    rows = run(tmp_path, src, "--engine", "ray", "--resume", backend_spec="tests.ray_helpers:fake")
    assert rows[: len(before)] == [json.loads(x) for x in before]
    assert sorted((r["line"], r["id"]) for r in rows) == sorted(
        (i + 1, json.loads(x).get("id") if x.startswith('{"') else None) for i, x in enumerate(first)
    )


def test_engine_ray_without_ray_exits_2_naming_the_install(monkeypatch, tmp_path: Path, capsys):
    import pipeline.ray_engine

    monkeypatch.setattr(pipeline.ray_engine, "ray_available", lambda: False)
    src = write_input(tmp_path / "in.jsonl", n=1)
    assert main(["stream", str(src), "--engine", "ray"]) == 2
    assert "pip install 'aimo-pipeline[ray]'" in capsys.readouterr().err


@pytest.mark.model
def test_the_real_model_on_two_replicas_gives_the_local_greedy_answers(cluster, tmp_path: Path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 2?"}) + "\n" for i in range(4))
    )
    flags = ["--max-new-tokens", "24", "--dtype", "float32"]
    (tmp_path / "r").mkdir()
    (tmp_path / "l").mkdir()
    on_ray = run(tmp_path / "r", src, *flags, "--engine", "ray", "--replicas", "2", "--ray-batch-size", "2")
    from stages.backends.transformers_backend import TransformersBackend

    local_backend = TransformersBackend.load(None, device="cpu", dtype="float32")
    try:
        local = run(tmp_path / "l", src, *flags, local=local_backend)
    finally:
        local_backend.close()
    assert {r["id"]: r["answer"] for r in on_ray} == {r["id"]: r["answer"] for r in local}
    assert len(on_ray) == 4


def test_a_problem_that_kills_every_actor_ends_as_error_results_not_a_hang(cluster, tmp_path: Path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {i} + 1?"} for i in range(6)]
    rows.insert(2, {"id": "bad", "problem": "poison"})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(
        tmp_path, src, "--engine", "ray", "--ray-batch-size", "1", backend_spec="tests.ray_helpers:poison"
    )
    by_id = {r["id"]: r for r in out}
    assert set(by_id) == {r["id"] for r in rows}  # every id once: nothing lost, nothing hung
    assert by_id["bad"]["status"] == "error" and "lost on the Ray cluster" in by_id["bad"]["error"]
