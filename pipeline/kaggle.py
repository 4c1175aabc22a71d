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
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import structlog

from pipeline.budget import share_of
from pipeline.config import Config
from pipeline.items import Problem, Result, encodable

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


class TimeBudget:
    """Shares of a total time budget, measured from the first call.

    ``share()`` is what the next problem may use: ``(left - reserve_s) / problems still expected``,
    between ``min_share_s`` and ``max_share_s``, and never past what is left minus ``reserve_s``.
    Without ``total_s`` every share is ``max_share_s``.
    """

    def __init__(
        self,
        total_s: float | None,
        expected: int,
        *,
        min_share_s: float = 5.0,
        max_share_s: float = 900.0,
        reserve_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_s = total_s
        self.expected = max(1, expected)
        self.min_share_s = min_share_s
        self.max_share_s = max_share_s
        self.reserve_s = reserve_s
        self.clock = clock
        self.started: float | None = None
        self.done = 0

    def start(self) -> None:
        """Start the clock (at the first call)."""
        if self.started is None:
            self.started = self.clock()

    def left(self) -> float:
        """Seconds left of the budget (infinite without one)."""
        if self.total_s is None:
            return math.inf
        self.start()
        assert self.started is not None
        return self.total_s - (self.clock() - self.started)

    def share(self) -> float:
        """Seconds the next problem may take."""
        if self.total_s is None:
            return self.max_share_s
        share, _ = share_of(
            self.left() - self.reserve_s,
            self.expected - self.done,
            base_s=self.min_share_s,
            ceiling_s=self.max_share_s,
        )
        return share

    def finished_one(self) -> None:
        """One more problem answered (what it did not use stays in the pool)."""
        self.done += 1


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
        self.budget = TimeBudget(
            total_budget_s,
            expected_problems,
            min_share_s=min_share_s,
            max_share_s=max_share_s,
            reserve_s=reserve_s,
        )
        self.results_path = Path(results_path) if results_path is not None else None
        self.fallback = fallback if fallback is not None else (self.config.answer.fallback or 0)
        self.load_timeout_s = load_timeout_s
        self.calls = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._pipeline: Any = None
        self._portal_cm: AbstractContextManager[Any] | None = None
        self._portal: Any = None
        self._stopped: Any = None
        self._serve_future: Future[None] | None = None
        self._start(backend)

    # --- the background event loop ---------------------------------------------------------------

    def _start(self, backend: Any) -> None:
        import anyio
        from anyio.from_thread import start_blocking_portal

        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._stopped = self._portal.call(anyio.Event)  # before any close() can look for it
        self._serve_future = self._portal.start_task_soon(self._serve, backend)

    async def _serve(self, backend: Any) -> None:

        from pipeline.api import Pipeline

        try:
            async with Pipeline(self.config, backend=backend) as p:
                self._pipeline = p
                self._ready.set()
                log.info("model loaded", model=p.backend.model_id)
                await self._stopped.wait()
        except BaseException as e:
            self._load_error = e
            log.error("the pipeline stopped", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            self._pipeline = None
            self._ready.set()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the model is loaded (or failed to load); ``True`` once it can take problems."""
        self._ready.wait(timeout_s)
        return self._pipeline is not None

    # --- the gateway's call ----------------------------------------------------------------------

    def __call__(self, id_: Any, problem: Any = None, *rest: Any) -> Any:
        """Answer one problem; returns a one-row ``id, answer`` DataFrame. Never raises: a failure is
        logged and the fallback answer returned (unless the id itself cannot be read)."""
        with self._lock:  # the gateway calls one at a time; a second caller waits its turn
            self.budget.start()
            started = time.monotonic()
            share = self.budget.share()
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
            finally:
                self.budget.finished_one()
            self._record(result, problem_id, answer, time.monotonic() - started, share)
            return answer_frame(problem_id, answer, like=id_)

    def _solve(self, problem_id: str, text: str, share: float, started: float) -> Result:
        left = share - (time.monotonic() - started)
        if not self._ready.is_set():
            log.info("waiting for the model to load", id=problem_id)
            self._ready.wait(max(0.0, min(left, self.load_timeout_s)))
        pipeline = self._pipeline
        if pipeline is None:
            reason = "the model is still loading"
            if self._load_error is not None:
                reason = f"the model failed to load: {self._load_error}"
            return Result(id=problem_id, answer=None, status="error", error=reason)
        left = share - (time.monotonic() - started)
        if left <= 0:
            return Result(id=problem_id, answer=None, status="error", error="no time left for this problem")
        item = Problem(id=problem_id, text=text)
        future = self._portal.start_task_soon(functools.partial(pipeline.solve, item, timeout_s=left))
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
        if self._portal is None:
            return
        if self._stopped is not None:
            self._portal.call(self._stopped.set)
        if self._serve_future is not None:
            try:
                self._serve_future.result(timeout=60)
            except BaseException as e:  # a failed load was logged already
                log.debug("pipeline ended", error=str(e))
        assert self._portal_cm is not None
        self._portal_cm.__exit__(None, None, None)
        self._portal = None

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
