"""The values that travel between stages.

Every item is a frozen dataclass: a stage never mutates what it receives, it sends a new value on.
A ``Problem`` enters, a ``Result`` leaves; in between a problem becomes one ``Encoded`` prompt, ``n``
``Generation`` samples and ``n`` ``Candidate`` answers, and its ``Result`` travels to the runner's
router inside a ``Routed`` envelope that names the job it answers.

``Result.to_json()`` and ``Result.from_json()`` are the one place that knows a result's JSON shape:
the results files, the cache rows and the Ray transport all go through them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Status = Literal["ok", "fallback", "cached", "error"]
_STATUSES: tuple[str, ...] = get_args(Status)

SCHEMA_VERSION = 2
"""Version of a result's JSON shape (``Result.to_json``), carried as ``"schema"``; bump it when a field
changes meaning. Version 1 is the shape results lines had before the field existed (the same fields):
a record without ``"schema"`` reads as version 1. The results files people read leave the field out
while their fields are version 1's."""
_READS = (1, SCHEMA_VERSION)


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
    ``entropies``: each generated token's entropy in bits over its top-k log-probabilities, when the
    requests asked for them (``generation.top_logprobs``); ``confidences`` each token's DeepConf
    confidence from the same rows (minus their mean).
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
    entropies: tuple[float, ...] | None = field(default=None, repr=False)
    confidences: tuple[float, ...] | None = field(default=None, repr=False)

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

    def to_json(self, *, schema: bool = True) -> dict[str, Any]:
        """The result as a JSON object (every text in it encodable as UTF-8): timings in milliseconds,
        vote keys as strings, the optional fields only when set. ``schema=False`` leaves out the
        ``"schema"`` field (the results lines people read)."""
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
        if schema:
            out["schema"] = SCHEMA_VERSION
        clean: dict[str, Any] = _encodable_json(out)
        return clean

    @classmethod
    def from_json(cls, obj: Any) -> Result:
        """The result a ``to_json()`` object (of this version, or of version 1: no ``"schema"``)
        describes. ``id``, ``answer`` and ``status`` are required; the other fields default as in
        ``Result``; fields it does not know (``correct``, a Kaggle record's extras) are ignored.

        Raises:
            ValueError: ``obj`` is not such an object; the message names the field at fault.
        """
        if not isinstance(obj, dict):
            raise ValueError(f"a result record must be a JSON object, not {type(obj).__name__}")
        version = obj.get("schema", 1)
        if version not in _READS or isinstance(version, bool):
            reads = " and ".join(map(str, _READS))
            raise ValueError(f"result record: field 'schema' is {_show(version)}; this release reads {reads}")
        for name in ("id", "answer", "status"):
            if name not in obj:
                raise ValueError(f"result record: field {name!r} is missing")
        status = obj["status"]
        if status not in _STATUSES:
            raise ValueError(f"result record: field 'status' is {_show(status)}, not one of {_STATUSES}")
        try:
            votes = {int(k): v for k, v in _field(obj, "votes", dict, {}).items()}
        except ValueError:
            raise ValueError("result record: field 'votes' has a key that is not an integer") from None
        timings = _field(obj, "timings_ms", dict, {})
        code_errors = _field(obj, "code_errors", list, [])
        return cls(
            id=_field(obj, "id", str, None),
            answer=_field(obj, "answer", int, None),
            status=status,
            error=_field(obj, "error", str, None),
            line=_field(obj, "line", int, None),
            votes=_each(votes, int, "votes"),
            samples=_field(obj, "samples", int, 0),
            prompt_tokens=_field(obj, "prompt_tokens", int, 0),
            new_tokens=_field(obj, "new_tokens", int, 0),
            timings={k: v / 1000.0 for k, v in _each(timings, float, "timings_ms").items()},
            finish=_each(_field(obj, "finish", dict, {}), int, "finish"),
            gold=_field(obj, "gold", int, None),
            duplicate=_field(obj, "duplicate", bool, False),
            early_stop=_field(obj, "early_stop", bool, False),
            cells=_field(obj, "cells", int, 0),
            code_errors=tuple(_each(dict(enumerate(code_errors)), str, "code_errors").values()),
        )


_KINDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # JSON's true is no number
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _field(obj: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """``obj[name]``, which must be a ``kind``; ``default`` when it is absent or ``null``."""
    value = obj.get(name)
    if value is None:
        return default
    if not _is(value, kind):
        raise ValueError(f"result record: field {name!r} is {_show(value)}, not {_KINDS[kind]}")
    return value


def _each(d: dict[Any, Any], kind: type, name: str) -> dict[Any, Any]:
    """``d``, once every value in it is a ``kind``."""
    for k, v in d.items():
        if not _is(v, kind):
            raise ValueError(f"result record: field {name!r} holds {_show(v)} at {k!r}, not {_KINDS[kind]}")
    return d


@dataclass(frozen=True)
class Routed:
    """A result on its way to the runner's router with the job it answers: ``key`` (its cache key)
    and ``serial`` (whose waiters get it). The vote stage, and the tokenize stage for a prompt it
    rejects, send these; the router unwraps them, so callers only ever see the ``result``."""

    result: Result
    key: str
    serial: int


def error_result(
    problem_id: str | None,
    reason: str,
    *,
    line: int | None = None,
    gold: int | None = None,
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
        duplicate=duplicate,
    )
