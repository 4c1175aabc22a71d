"""A synchronous ``predict()`` for Kaggle's evaluation gateway (AIMO 3; AIMO 2 was the same shape).

```python
from pipeline.kaggle import make_predict

predict = make_predict(config, total_budget_s=4.5 * 3600, expected_problems=50)
server = kaggle_evaluation.aimo_3_inference_server.AIMO3InferenceServer(predict)
server.serve()  # or server.run_local_gateway((test_csv,))
```

How the gateway calls: one worker thread (a gRPC server with one thread) calls ``predict(id_, problem)``
once per problem, each argument a single-row polars Series, and expects a one-row DataFrame with the
columns ``id`` and ``answer``. The thread is not the main thread, so nothing here uses signals.

What ``make_predict`` does: the model starts loading at once on a background event-loop thread (the
server must come up within minutes while a large model loads); each call waits for the model (within
its time share), submits its problem to the long-lived ``Pipeline`` (its result cache serves repeats),
blocks until the answer or its share of the time is spent, appends the result to a JSONL file, and
returns the frame. It never raises into the gateway: any failure is logged and the fallback answer is
returned. Importing this module loads nothing heavy (no torch, no model).

Time: with ``total_budget_s``, the clock starts at the first call; each call gets
``(time left - reserve) / problems still expected``, kept between ``min_share_s`` and ``max_share_s``
and never more than what is left, and passed to the pipeline as the problem's deadline (its unfinished
samples are cancelled and the vote taken on what finished), so the notebook cannot run out of time with
problems unanswered. Time a problem did not use stays in the pool for the ones after it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import structlog

from pipeline.budget import TimePlanner
from pipeline.config import Config
from pipeline.items import Problem, Result, encodable
from pipeline.portal import BackgroundPipeline
from stages.clock import now

log = structlog.get_logger("pipeline.kaggle")

ANSWER_MARGIN_S = 5.0
"""How long past a problem's deadline a call waits for the vote before answering the fallback."""


def scalar(value: Any, column: str | None = None) -> Any:
    """The single value in ``value``: a polars or pandas Series or DataFrame (first row; ``column``
    for a frame), a one-element list, or a plain value.

    Raises:
        ValueError: the value is empty, or a frame has no such column.
    """
    if hasattr(value, "columns") and hasattr(value, "shape"):  # a DataFrame, polars or pandas
        names = list(value.columns)
        if column is not None and column in names:
            value = value[column]
        elif len(names) == 1:
            value = value[names[0]]
        else:
            raise ValueError(f"expected a column {column!r} in a frame with columns {names}")
    if hasattr(value, "iloc"):  # pandas Series
        if len(value) == 0:
            raise ValueError("empty Series")
        return value.iloc[0]
    if hasattr(value, "item") and hasattr(value, "len"):  # polars Series
        if value.len() == 0:
            raise ValueError("empty Series")
        return value.item(0)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty sequence")
        return value[0]
    return value


def answer_frame(problem_id: Any, answer: int, like: Any = None) -> Any:
    """A one-row DataFrame ``id, answer``: polars unless the input was pandas (or polars is missing).

    Raises:
        ImportError: neither polars nor pandas is installed.
    """
    use_pandas = type(like).__module__.startswith("pandas")
    if not use_pandas:
        try:
            import polars as pl

            return pl.DataFrame({"id": [problem_id], "answer": [int(answer)]})
        except ImportError:
            pass
    import pandas as pd

    return pd.DataFrame({"id": [problem_id], "answer": [int(answer)]})


class KagglePredictor:
    """The object behind ``make_predict``: call it as ``predict(id_, problem)``.

    Starts a background thread that runs the event loop and loads the model (``Pipeline.__aenter__``)
    at once. ``backend`` replaces the configured model (tests). ``close()`` stops the pipeline.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        total_budget_s: float | None = None,
        expected_problems: int = 50,
        min_share_s: float = 5.0,
        max_share_s: float = 900.0,
        reserve_s: float = 10.0,
        results_path: str | os.PathLike[str] | None = "aimo_results.jsonl",
        fallback: int | None = None,
        load_timeout_s: float = 1800.0,
        backend: Any = None,
    ) -> None:
        self.config = config or Config()
        g = self.config.generation
        self.budget = TimePlanner(  # the run's planner, one problem at a time, from the first call
            budget_s=total_budget_s,
            expected=max(1, expected_problems),
            parallel=1,
            samples=g.samples,
            greedy=g.greedy,
            base_s=min_share_s,
            ceiling_s=max_share_s,
            margin_s=reserve_s,
            reserve_s=self.config.time.reserve_per_problem_s,
            started_now=False,
        )
        self.results_path = Path(results_path) if results_path is not None else None
        self.fallback = fallback if fallback is not None else (self.config.answer.fallback or 0)
        self.load_timeout_s = load_timeout_s
        self.calls = 0
        self._lock = threading.Lock()
        self._held = BackgroundPipeline(self.config, backend)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load); ``True`` once it can take problems."""
        return self._held.wait_ready(timeout_s)

    # --- the gateway's call ----------------------------------------------------------------------

    def __call__(self, id_: Any, problem: Any = None, *rest: Any) -> Any:
        """Answer one problem; returns a one-row ``id, answer`` DataFrame. Never raises: a failure is
        logged and the fallback answer returned (unless the id itself cannot be read)."""
        with self._lock:  # the gateway calls one at a time; a second caller waits its turn
            started = now()
            plan = self.budget.plan()
            share = plan.share_s if plan.share_s is not None else math.inf
            self.calls += 1
            problem_id: Any = None
            text: str | None = None
            try:
                if problem is None:  # one frame with both columns (AIMO 1 style)
                    problem_id, text = scalar(id_, "id"), str(scalar(id_, "problem"))
                else:
                    problem_id, text = scalar(id_, "id"), str(scalar(problem, "problem"))
                result = self._solve(str(problem_id), text, share, started)
                answer = result.answer if result.answer is not None else self.fallback
            except Exception as e:  # never into the gateway
                why = f"{type(e).__name__}: {e}"
                log.error("predict failed; answering the fallback", id=problem_id, error=why)
                result = Result(id=str(problem_id), answer=None, status="error", error=why)
                answer = self.fallback
            self._record(result, problem_id, answer, now() - started, share)
            return answer_frame(problem_id, answer, like=id_)

    def _solve(self, problem_id: str, text: str, share: float, started: float) -> Result:
        held = self._held
        left = share - (now() - started)
        if not held.ready:
            log.info("waiting for the model to load", id=problem_id)
            held.wait_ready(max(0.0, min(left, self.load_timeout_s)))
        pipeline = held.pipeline
        if pipeline is None:
            reason = "the model is still loading"
            if held.load_error is not None:
                reason = f"the model failed to load: {held.load_error}"
            return Result(id=problem_id, answer=None, status="error", error=reason)
        left = share - (now() - started)
        if left <= 0:
            return Result(id=problem_id, answer=None, status="error", error="no time left for this problem")
        item = Problem(id=problem_id, text=text)
        future = held.start_task_soon(functools.partial(pipeline.solve, item, timeout_s=left))
        try:
            # the pipeline answers at the deadline; the margin covers checking the finished samples'
            # answers and the vote (milliseconds, but a worker may have to be replaced)
            result: Result = future.result(timeout=left + ANSWER_MARGIN_S)
        except FutureTimeout:
            future.cancel()
            return Result(id=problem_id, answer=None, status="error", error=f"no answer within {share:.1f} s")
        return result

    def _record(self, result: Result, problem_id: Any, answer: int, seconds: float, share: float) -> None:
        if self.results_path is None:
            return
        row = result.to_json(schema=False)  # a results line, as the sink writes it
        row.update(id=encodable(str(problem_id)), submitted_answer=answer)
        row.update(seconds=round(seconds, 3), share_s=round(share, 3))
        try:
            with open(self.results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except (OSError, ValueError) as e:
            log.warning("cannot append to the results file", path=str(self.results_path), error=str(e))

    def close(self) -> None:
        """Stop the pipeline and the background thread (waits for the model to be released)."""
        self._held.close()

    def __enter__(self) -> KagglePredictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_predict(config: Config | None = None, **options: Any) -> Callable[..., Any]:
    """A ``predict(id_, problem)`` function for the evaluation gateway; the model starts loading now.

    The gateway accepts only a plain, named function (it checks ``types.FunctionType`` and uses the
    name as the endpoint), so this returns one, named ``predict``, that calls a ``KagglePredictor``;
    the predictor is ``predict.predictor``, and ``predict.close()`` / ``predict.wait_ready(s)`` reach
    it. ``options`` are ``KagglePredictor``'s: ``total_budget_s`` (e.g. ``4.5 * 3600``),
    ``expected_problems`` (50), ``min_share_s``, ``max_share_s``, ``reserve_s``, ``results_path``
    (``aimo_results.jsonl``; ``None`` for none), ``fallback``, ``load_timeout_s``, ``backend``.
    """
    predictor = KagglePredictor(config, **options)

    def predict(id_: Any, problem: Any = None, *rest: Any) -> Any:
        """Answer one problem: a one-row ``id, answer`` DataFrame; never raises."""
        return predictor(id_, problem, *rest)

    predict.predictor = predictor  # type: ignore[attr-defined]
    predict.close = predictor.close  # type: ignore[attr-defined]
    predict.wait_ready = predictor.wait_ready  # type: ignore[attr-defined]
    return predict


def run_aimo1(env: Any, predict: Callable[..., Any]) -> int:
    """The AIMO 1 loop: ``for test, sample_submission in env.iter_test()``, answer each row of
    ``test`` (``id``, ``problem``) with ``predict`` and hand ``sample_submission`` back through
    ``env.predict``. Returns the number of problems answered."""
    count = 0
    batches: Iterable[tuple[Any, Any]] = env.iter_test()
    for test, submission in batches:
        answers = []
        for i in range(len(test)):
            row = test.iloc[[i]] if hasattr(test, "iloc") else test.slice(i, 1)
            frame = predict(row)
            answers.append(int(scalar(frame, "answer")))
            count += 1
        if hasattr(submission, "iloc"):
            submission = submission.copy()
            submission["answer"] = answers
        else:
            import polars as pl

            submission = submission.with_columns(pl.Series("answer", answers))
        env.predict(submission)
    return count
