"""``predict()`` driven the way Kaggle's gateway drives it: one worker thread, one call at a time,
single-row polars Series, many calls in a row."""

import json
import os
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import polars as pl
import pytest

from pipeline.budget import TimePlanner
from pipeline.kaggle import make_predict, run_aimo1, scalar
from stages.backends.fake import FakeBackend
from tests.conftest import small_config

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def predicting(cfg, **options):
    predict = make_predict(cfg, **options)
    try:
        yield predict
    finally:
        predict.close()


def gateway_calls(predict, rows):
    """What the gateway does: for each test row (a one-row frame), predict(*row) on its one thread."""
    test = pl.DataFrame({"id": [r[0] for r in rows], "problem": [r[1] for r in rows]})
    with ThreadPoolExecutor(max_workers=1) as gateway_thread:
        return [gateway_thread.submit(predict, *row).result() for row in test.iter_slices(n_rows=1)]


def check_frame(frame, problem_id):
    assert isinstance(frame, pl.DataFrame) and frame.shape == (1, 2)
    assert frame.columns == ["id", "answer"]
    assert frame["id"].item(0) == problem_id and isinstance(frame["answer"].item(0), int)
    return frame["answer"].item(0)


def test_the_gateway_way_many_calls_with_polars_series(tmp_path: Path):
    results = tmp_path / "results.jsonl"
    rows = [(f"q{i}", f"What is {i} + 3?") for i in range(6)] + [("q6", "What is 0 + 3?")]
    with predicting(
        small_config(cache={"size": 100}), backend=FakeBackend(), results_path=results
    ) as predict:
        # the gateway accepts only a plain named function (types.FunctionType), the name being the endpoint
        assert isinstance(predict, types.FunctionType) and predict.__name__ == "predict"
        frames = gateway_calls(predict, rows)
    assert [check_frame(f, pid) for f, (pid, _) in zip(frames, rows, strict=True)] == [3, 4, 5, 6, 7, 8, 3]
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r[0] for r in rows]
    assert lines[-1]["status"] == "cached"  # the repeated text came from the result cache
    assert all(x["submitted_answer"] == x["answer"] for x in lines)


def test_pandas_frames_plain_strings_and_one_frame_with_both_columns(tmp_path: Path):
    with predicting(small_config(), backend=FakeBackend(), results_path=None) as predict:
        out = predict(pd.Series(["p1"], name="id"), pd.Series(["2 + 2"], name="problem"))
        assert isinstance(out, pd.DataFrame) and out.to_dict("list") == {"id": ["p1"], "answer": [4]}
        plain = predict("p2", "5 + 5")
        assert plain.to_dicts() == [{"id": "p2", "answer": 10}]
        both = predict(pl.DataFrame({"id": ["p3"], "problem": ["1 + 6"]}))
        assert both.to_dicts() == [{"id": "p3", "answer": 7}]


def test_a_failing_backend_answers_the_fallback_and_never_raises(tmp_path: Path):
    def fail(texts):
        raise RuntimeError("CUDA error: device-side assert triggered")

    results = tmp_path / "r.jsonl"
    with predicting(small_config(), backend=FakeBackend(fail=fail), results_path=results, fallback=7) as p:
        frames = gateway_calls(p, [("a", "1 + 1"), ("b", "2 + 2")])
        bad = p(None, None)  # not even an id: still a frame, with the fallback
    assert [check_frame(f, pid) for f, pid in zip(frames, ["a", "b"], strict=True)] == [7, 7]
    assert bad["answer"].item(0) == 7
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert all(x["status"] == "error" for x in lines) and "device-side assert" in lines[0]["error"]


def test_a_model_that_fails_to_load_answers_the_fallback(tmp_path: Path):
    class Broken(FakeBackend):
        async def serve(self, *, task_status):
            raise RuntimeError("no GPU memory left")

    with predicting(small_config(), backend=Broken(), results_path=None) as p:
        frame = p("x", "1 + 1")
    assert frame.to_dicts() == [{"id": "x", "answer": 0}]


def test_a_budget_smaller_than_the_work_still_answers_every_call_in_time(tmp_path: Path):
    backend = FakeBackend(lambda t, n: "word " * 1_000_000, step_s=0.005)  # never finishes by itself
    budget, n = 4.0, 5
    with predicting(
        small_config(),
        backend=backend,
        total_budget_s=budget,
        expected_problems=n,
        min_share_s=0.1,
        reserve_s=0.5,
        results_path=tmp_path / "r.jsonl",
    ) as predict:
        assert predict.wait_ready(30)
        started = time.monotonic()
        frames = gateway_calls(predict, [(f"t{i}", f"problem {i}") for i in range(n)])
        took = time.monotonic() - started
    assert [check_frame(f, f"t{i}") for i, f in enumerate(frames)] == [0] * n
    assert took < budget + 2.0  # every call inside the budget (plus the vote's hand-over)
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert all(x["status"] == "fallback" and "time limit" in x["error"] for x in lines)
    shares = [x["share_s"] for x in lines]
    assert sum(shares) <= budget + 0.001 * n, shares  # the shares never promise more than the budget


def test_time_shares_spread_what_is_left_and_bank_what_was_not_used():
    now = [0.0]

    def planner(total: float | None, expected: int, **kw: float) -> TimePlanner:
        """The Kaggle predictor's planner: one problem at a time, the clock from the first call."""
        return TimePlanner(
            budget_s=total,
            expected=expected,
            parallel=1,
            samples=1,
            greedy=True,
            clock=lambda: now[0],
            started_now=False,
            **kw,
        )

    b = planner(100.0, 4, base_s=1.0, ceiling_s=60.0, margin_s=4.0)
    now[0] = 7.0  # the budget counts from the first problem, not from construction
    assert b.plan().share_s == 24.0  # (100 - 4) / 4
    now[0] = 9.0  # the first problem took 2 s of its 24
    assert b.plan().share_s == pytest.approx((100 - 2 - 4) / 3)  # the unused 22 s went back to the pool
    now[0] = 102.0
    assert b.plan().share_s == 1.0  # behind: never past what is left (100 - 95 - 4)
    now[0] = 106.0
    assert b.plan().share_s == 0.0
    assert planner(None, 50, ceiling_s=600.0).plan().share_s == 600.0


def test_values_come_out_of_series_frames_and_plain_values():
    assert scalar(pl.Series("id", ["a"])) == "a"
    assert scalar(pd.Series([3], name="id")) == 3
    assert scalar(pl.DataFrame({"id": ["z"], "problem": ["t"]}), "problem") == "t"
    assert scalar("plain") == "plain" and scalar(["x"]) == "x"
    with pytest.raises(ValueError):
        scalar(pl.Series("id", []))


def test_the_aimo1_loop():
    class Env:
        def __init__(self):
            self.submitted = []

        def iter_test(self):
            for i in range(3):
                yield (
                    pd.DataFrame({"id": [f"e{i}"], "problem": [f"{i} + 10"]}),
                    pd.DataFrame({"id": [f"e{i}"], "answer": [0]}),
                )

        def predict(self, submission):
            self.submitted.append(submission)

    env = Env()
    with predicting(small_config(), backend=FakeBackend(), results_path=None) as predict:
        assert run_aimo1(env, predict) == 3
    assert [s.to_dict("list") for s in env.submitted] == [
        {"id": [f"e{i}"], "answer": [i + 10]} for i in range(3)
    ]


def test_importing_it_loads_nothing_heavy():
    heavy = "('torch', 'transformers', 'vllm', 'polars', 'pandas')"
    code = f"import sys, pipeline.kaggle; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.model
def test_predict_with_the_real_small_model(tmp_path: Path):
    cfg = small_config(
        generation={"max_new_tokens": 24}, model={"dtype": "float32", "device": "cpu"}, cache={"size": 100}
    )
    with predicting(cfg, results_path=tmp_path / "r.jsonl", total_budget_s=600, expected_problems=3) as p:
        frames = gateway_calls(
            p, [("k1", "What is 2 + 2?"), ("k2", "What is 3 + 5?"), ("k3", "What is 2 + 2?")]
        )
    answers = [check_frame(f, pid) for f, pid in zip(frames, ["k1", "k2", "k3"], strict=True)]
    assert all(0 <= a <= 99999 for a in answers) and answers[0] == answers[2]
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["status"] for x in lines][2] == "cached" and lines[0]["new_tokens"] > 0


@pytest.mark.model
def test_the_example_notebook_runs_offline_without_the_gateway(tmp_path: Path):
    csv = tmp_path / "test.csv"
    csv.write_text('id,problem\nk1,What is 2 + 2?\nk2,"A 5"" ruler, plus 3?"\n')
    env = {
        **os.environ,
        "AIMO_TEST_CSV": str(csv),
        "AIMO_MAX_NEW_TOKENS": "16",
        "AIMO_TIME_BUDGET_S": "300",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "kaggle_notebook.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    submission = pl.read_csv(tmp_path / "submission.csv")
    assert submission.columns == ["id", "answer"] and submission["id"].to_list() == ["k1", "k2"]
    assert len((tmp_path / "aimo_results.jsonl").read_text().splitlines()) == 2
