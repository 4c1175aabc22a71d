"""The options of the optimisation issue: the memory budget with units, metrics, cleanup, invalid values."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from pipeline.cli import EXIT_USAGE, build_parser, config_from_args, main, run_stream, size_gib
from stages.backends.fake import FakeBackend


@pytest.mark.parametrize(
    ("text", "gib"), [("16GiB", 16.0), ("512MiB", 0.5), ("8GB", 8e9 / 2**30), ("2", 2.0), ("1.5 TiB", 1536.0)]
)
def test_memory_budget_units(text, gib):
    cfg = config_from_args(build_parser().parse_args(["stream", "x.jsonl", "--memory-budget", text]))
    assert cfg.model.memory_gb == pytest.approx(gib) == size_gib(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--memory-budget", "lots"], "is not a size"),
        (["--memory-budget", "0GiB"], "must be positive"),
        (["--batch-size", "-4"], "batch.max_batch_size: must be at least 1"),
        (["--cleanup-every", "0"], "run.cleanup_every: must be at least 1"),
        (["--preset", "fastest"], "invalid choice: 'fastest'"),
    ],
)
def test_each_invalid_option_exits_2_naming_it(argv, message, tmp_path: Path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "problem": "1+1"}\n')
    try:
        code = main(["stream", str(src), *argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_print_config_shows_the_memory_derivation_and_a_budget_below_the_weights(capsys):
    # 2 GiB: on CPU the budget is also capped by the memory available, which varies by machine
    assert main(["stream", "x.jsonl", "--print-config", "--dtype", "float32", "--memory-budget", "2GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory budget 2.0 GiB, weights 0.50 GiB" in out and "KV per token = 2 x layers" in out
    assert main(["stream", "x.jsonl", "--print-config", "--quantize", "int8", "--memory-budget", "2GiB"]) == 0
    assert "weights 0.13 GiB" in capsys.readouterr().out  # int8: a byte a parameter
    assert (
        main(["stream", "x.jsonl", "--print-config", "--memory-budget", "100MiB", "--dtype", "float32"]) == 0
    )
    out = capsys.readouterr().out
    assert "do not fit in the memory budget of 0.10 GiB" in out and "weights (0.50 GiB)" in out


def run(tmp: Path, *extra: str) -> tuple[int, str]:
    src = tmp / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"p{i}", "problem": f"What is {i} + 1?"}) + "\n" for i in range(10))
    )
    argv = ["stream", str(src), "-o", str(tmp / "out.jsonl"), "--no-progress", *extra]
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args).replace(run={"verify_workers": 1})

    async def bounded() -> int:
        with anyio.fail_after(60):
            return await run_stream(args, cfg, FakeBackend(step_s=0.001))

    return anyio.run(bounded), str(tmp / "out.jsonl")


def test_metrics_json_has_queues_stage_waits_batch_fill_and_memory(tmp_path: Path, capsys):
    code, _ = run(tmp_path, "--metrics-json", str(tmp_path / "m.json"), "--max-in-flight", "4")
    assert code == 0
    data = json.loads((tmp_path / "m.json").read_text())
    m = data["metrics"]
    assert set(m["queues"]) == {"jobs", "encoded", "generations", "candidates", "results"}
    assert all(q["capacity"] == 4 and 0 <= q["peak"] <= 4 for q in m["queues"].values())
    assert m["batches"]["rows"] == 10 and 0 < m["batches"]["prompt_fill"] <= 1
    assert m["memory"]["peak_rss_mib"] > 10 and m["inference"]["completed"] == 10
    assert set(m["waits_s"]) >= {"admission_slot", "request_slot", "verification_busy"}
    assert data["summary"]["problems"] == 10 and data["config"]["run"]["max_in_flight"] == 4
    err = capsys.readouterr().err
    assert "queue peaks" in err and "peak rss mib" in err and "batch fill" in err


def test_cleanup_every_n_results_runs_that_often(tmp_path: Path, capsys):
    code, _ = run(tmp_path, "--cleanup-every", "3")
    assert code == 0
    assert "cleanups          3 (" in capsys.readouterr().err  # after results 3, 6 and 9 of 10
