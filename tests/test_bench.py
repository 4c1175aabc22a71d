"""Smoke tests of every benchmark scenario on a few problems (figures are printed, never asserted on)."""

import json
from pathlib import Path

import pytest

from bench.cli import main
from bench.data import gsm8k


def run(tmp_path: Path, *args: str) -> dict:
    assert main([*args, "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*.json")
    name = json_path.stem
    assert name == args[0] or name.startswith("compare-")
    report = json.loads(json_path.read_text())
    assert (tmp_path / f"{name}.md").read_text().startswith(f"# {name}")
    assert report["rows"] and report["environment"]["torch"]
    return report


def test_gsm8k_problems_have_integer_gold_answers():
    problems = gsm8k(100)
    assert len(problems) == 100
    assert all(isinstance(p.answer, int) for p in problems)
    assert problems[0].text.startswith("Benny saw a 10-foot shark")
    assert problems[0].answer == 10


@pytest.mark.parametrize("scenario", ["engine", "sequential", "pipeline"])
def test_model_loop_scenarios_with_the_fake_backend(tmp_path: Path, scenario: str):
    report = run(tmp_path, scenario, "--fake", "--problems", "3")
    assert report["rows"][0]["problems"] == 3


def test_overhead(tmp_path: Path):
    report = run(tmp_path, "overhead", "--overhead-problems", "200")
    assert report["rows"][0]["problems"] == 200 and report["rows"][0]["accuracy"] == 1.0


def test_batch_sweep_draws_its_plot(tmp_path: Path):
    report = run(tmp_path, "batch", "--fake", "--problems", "4", "--batch-sizes", "1", "2")
    assert [r["batch_size"] for r in report["rows"]] == [1, 2]
    assert (tmp_path / "throughput_vs_batch.png").stat().st_size > 1000


def test_load_with_poisson_arrivals_and_the_gateway(tmp_path: Path):
    report = run(tmp_path, "load", "--fake", "--fake-delay-ms", "50", "--problems", "4", "--rates", "40")
    assert [r["arrival"] for r in report["rows"]] == ["poisson 40/s", "gateway (one at a time)"]
    for row in report["rows"]:  # every problem waits at least for one 50 ms batch, and not for ages
        assert 0.05 <= row["latency_p50_s"] <= row["latency_p99_s"] < 10
    gateway = report["rows"][1]
    assert gateway["seconds"] >= 4 * 0.05  # one at a time: four batches back to back
    assert (tmp_path / "latency_vs_rate.png").exists()


def test_memory_samples_rss(tmp_path: Path):
    report = run(tmp_path, "memory", "--fake", "--problems", "300")
    row = report["rows"][0]
    assert row["problems"] == 300 and len(row["samples"]) >= 1
    assert row["rss_growth_second_half_mb"] < 50  # flat: 300 problems must not grow the process
    assert (tmp_path / "memory_over_time.png").exists()


def test_accuracy_greedy_and_majority(tmp_path: Path):
    report = run(tmp_path, "accuracy", "--fake", "--problems", "3", "--dtypes", "float32", "--k", "3")
    assert [r["scenario"] for r in report["rows"]] == ["greedy float32", "majority of 3"]


@pytest.mark.model
def test_compare_with_the_real_model_reports_ratios(tmp_path: Path):
    report = run(
        tmp_path,
        "compare",
        "engine",
        "sequential",
        "pipeline",
        "--problems",
        "2",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--dtype",
        "float32",
    )
    assert set(report["ratios"]) == {"pipeline / engine", "pipeline / sequential", "engine / sequential"}
    assert report["environment"]["model"].startswith("SmolLM2-135M-Instruct")


def test_the_sampling_benchmark_compares_like_with_like():
    import argparse

    from bench.sampling import config, markdown, offline_sampling

    args = argparse.Namespace(samples=4, max_new_tokens=96, batch_size=16, problems=8)
    greedy, sampled = config(args, "vllm", "greedy"), config(args, "vllm", "sampled")
    assert offline_sampling(greedy, 3) == {"max_tokens": 96, "temperature": 0.0}
    kw = offline_sampling(sampled, 3)
    g = sampled.generation
    assert (kw["temperature"], kw["top_p"], kw["min_p"], kw["seed"]) == (0.7, g.top_p, g.min_p, 3)
    assert g.top_p < 1  # the pipeline samples with top-p: so must the offline reference
    page = markdown({"settings": {}, "rows": [{"scenario": "x", "samples": 1, "new_tokens": 2,
                                               "seconds": 1.0, "tokens_per_s": 2.0, "correct": None}],
                     "ratios": {"x / y": 1.5}})  # fmt: skip
    assert "| x | 1 | 2 | 1.0 | 2.0 | - |" in page and "- x / y: **1.5**" in page
