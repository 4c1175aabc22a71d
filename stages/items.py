"""The values that travel between stages.

Every item is a frozen dataclass: a stage never mutates what it receives, it sends a new value on.
A ``Problem`` enters, a ``Result`` leaves; in between a problem becomes one ``Encoded`` prompt, ``n``
``Generation`` samples and ``n`` ``Candidate`` answers.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "fallback", "cached", "error"]


_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with every lone surrogate (``'\\udcff'``, which UTF-8 cannot hold) replaced by U+FFFD.

    Model output, a kernel's output and an input line's JSON escapes can all carry one; every text
    written to a file (results, submission, Kaggle record, cache) passes through here first.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def _encodable_json(value: Any) -> Any:
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {encodable(str(k)): _encodable_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encodable_json(v) for v in value]
    return value


@dataclass(frozen=True)
class Problem:
    """One problem to solve.

    ``id`` is the caller's identifier (the output is keyed by it), ``text`` the problem statement,
    ``answer`` the gold answer when known (for accuracy figures), ``line`` the 1-based input line it
    came from (``None`` for problems given through the API). ``deadline`` (a ``time.perf_counter()``
    value) is when its samples are cut off and the vote taken on what finished.
    """

    id: str
    text: str
    answer: int | None = None
    line: int | None = None
    submitted: float = field(default_factory=time.perf_counter, compare=False)
    deadline: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id.strip():
            raise ValueError("problem id must be a non-empty string")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"problem {self.id!r}: the problem text must be a non-empty string")


@dataclass(frozen=True)
class Job:
    """A problem admitted for computation: ``key`` is its cache key, ``serial`` unique to this run."""

    problem: Problem
    key: str
    serial: int


@dataclass(frozen=True)
class Encoded:
    """A problem rendered through the chat template and tokenized."""

    job: Job
    prompt_ids: tuple[int, ...]
    tokenize_s: float = 0.0

    @property
    def problem(self) -> Problem:
        """The problem this prompt is for."""
        return self.job.problem

    @property
    def prompt_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.prompt_ids)


# How a sample ended: it finished (an answer or not), the model failed for it, the problem's time ran
# out, or it was cancelled (an early stop, a caller gone).
Outcome = Literal["finished", "failed", "timed_out", "cancelled"]


@dataclass(frozen=True)
class Generation:
    """The model's output for one sample.

    ``finish_reason`` is the backend's (``eos``, ``length``, ``stop``, ``aborted``); ``error`` is set
    when the model failed for this sample (the sample's failure, not the run's). ``queue_s`` is how long
    the sample waited for a request slot, ``inference_s`` how long its request took. ``of`` is how
    many samples its problem has; ``rounds`` how many requests the sample made (one per round of tool
    use), ``cells`` how many code cells it ran and ``clean_cells`` how many of them raised nothing;
    ``cell_errors`` the last line of each failed cell's error. ``outcome`` says how the sample ended,
    as a value the vote and the cache decide on (``error`` is only its text for people).
    """

    encoded: Encoded
    index: int
    text: str
    new_tokens: int
    queue_s: float = 0.0
    inference_s: float = 0.0
    error: str | None = None
    finish_reason: str = "eos"
    logprobs: tuple[float, ...] | None = field(default=None, repr=False)
    of: int = 1
    rounds: int = 1
    cells: int = 0
    clean_cells: int = 0
    cell_errors: tuple[str, ...] = ()
    outcome: Outcome = "finished"

    @property
    def clean_code(self) -> bool:
        """True when the sample ran code and every cell ran without an error."""
        return self.cells > 0 and self.clean_cells == self.cells


@dataclass(frozen=True)
class Candidate:
    """A checked answer for one sample: ``answer`` is ``None`` when no valid integer was found."""

    generation: Generation
    answer: int | None
    extracted: str | None
    reason: str | None = None
    verify_s: float = 0.0


@dataclass(frozen=True)
class Result:
    """The one output for one input: an answer, or an error with a reason a person understands.

    ``early_stop`` is set when the vote was decided before every sample finished (the rest were
    cancelled); ``cells`` counts the code cells its samples ran in the sandbox, ``code_errors`` says
    how the failed ones failed (``sample N: ...``, at most ten). ``partial``: a sample was cut short
    (timed out or cancelled), so the result is not stored in the cache.
    """

    id: str | None
    answer: int | None
    status: Status
    error: str | None = None
    line: int | None = None
    votes: dict[int, int] = field(default_factory=dict)
    samples: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    finish: dict[str, int] = field(default_factory=dict)
    gold: int | None = None
    key: str | None = field(default=None, compare=False, repr=False)
    serial: int | None = field(default=None, compare=False, repr=False)
    duplicate: bool = False
    early_stop: bool = False
    cells: int = 0
    code_errors: tuple[str, ...] = ()
    partial: bool = field(default=False, compare=False, repr=False)

    @property
    def correct(self) -> bool | None:
        """Whether the answer matches the gold answer (``None`` without a gold answer)."""
        if self.gold is None:
            return None
        return self.answer == self.gold

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as one output line; every text in it can be encoded as UTF-8."""
        out: dict[str, Any] = {
            "id": self.id,
            "answer": self.answer,
            "status": self.status,
            "error": self.error,
            "line": self.line,
            "votes": {str(k): v for k, v in self.votes.items()},
            "samples": self.samples,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "timings_ms": {k: round(v * 1000.0, 3) for k, v in self.timings.items()},
            "finish": self.finish,
        }
        if self.gold is not None:
            out["gold"] = self.gold
            out["correct"] = self.correct
        if self.duplicate:
            out["duplicate"] = True
        if self.early_stop:
            out["early_stop"] = True
        if self.cells:
            out["cells"] = self.cells
        if self.code_errors:
            out["code_errors"] = list(self.code_errors)
        clean: dict[str, Any] = _encodable_json(out)
        return clean


def error_result(
    problem_id: str | None,
    reason: str,
    *,
    line: int | None = None,
    gold: int | None = None,
    key: str | None = None,
    serial: int | None = None,
    duplicate: bool = False,
) -> Result:
    """A result for an item that could not be solved; ``reason`` is shown to the user."""
    return Result(
        id=problem_id,
        answer=None,
        status="error",
        error=reason,
        line=line,
        gold=gold,
        key=key,
        serial=serial,
        duplicate=duplicate,
    )
