"""Recorded completions: the ``replay`` backend, and the recorder that writes its files.

A replay file is JSON lines, one completion each:
``{"id": "p1", "sample": 0, "round": 0, "text": "...", "finish_reason": "stop", "stop_string": "```\\n",
"logprobs": [...], "seconds": 0.8}``. ``id`` is the problem's id, ``sample`` its sample index (leave it
out to answer every sample), ``round`` the round of tool use (0 first). ``finish_reason``,
``stop_string``, ``logprobs`` and ``seconds`` (how long the replay waits before answering, cancellably)
are optional: without a finish reason the text is cut at the request's stop strings and answer as a
model's would be. So are ``token_ids`` (the completion's real ids, for a prompt style that parses ids:
without a finish reason they end at the request's first stop token id, which is then ``stop_token``,
or at ``max_new_tokens``; the text stays the record's, cut only by stop strings and the answer),
``stop_token`` and ``top_logprobs`` (one list per token, highest first). ``--record FILE`` writes this
format from a real run (``token_ids`` when the request asked for stop token ids), so a run can be
re-scored under other voting settings without the model; tests write it by hand to script code and
attacks through the real pipeline.

Without ``token_ids``, token counts are words (as in the fake backend): the replay needs no tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from stages.backends.base import (
    Backend,
    BackendBase,
    BackendError,
    Completion,
    FinishReason,
    MemoryProfile,
    Request,
    SamplingParams,
)
from stages.backends.fake import CodePoints
from stages.clock import now
from stages.confidence_stop import stop_in
from stages.prompting import finish_text

_WORD = re.compile(r"\S+\s*|\s+")
_REASONS = ("eos", "length", "stop", "answer", "aborted", "confidence")
Key = tuple[str, int | None, int]


class ReplayBackend(BackendBase, CodePoints):
    """A ``Backend`` that answers each request with the completion recorded for its problem, sample
    and round. A request with no recording fails (that sample's failure, naming what is missing).
    ``speed`` scales the recorded ``seconds``: 1 waits them, 2 half of them, 0 answers at once."""

    def __init__(
        self,
        records: dict[Key, dict[str, Any]],
        *,
        model_id: str = "replay",
        keep_requests: bool = False,
        speed: float = 1.0,
    ) -> None:
        self.records = records
        self.speed = speed
        self.model_id = model_id
        self.max_context = 1_000_000
        self.served = 0
        self.requests: list[Request] | None = [] if keep_requests else None

    @classmethod
    def load(cls, path: str | Path, *, keep_requests: bool = False, speed: float = 1.0) -> ReplayBackend:
        """Read a replay file.

        Raises:
            BackendError: the file cannot be read, or a line is not a valid record (named by number).
        """
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read the replay file {p}: {e.strerror or e}") from e
        records: dict[Key, dict[str, Any]] = {}
        for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                pid, text = rec["id"], rec["text"]
                if not isinstance(text, str):
                    raise ValueError('"text" must be a string')
                sample = rec.get("sample")
                round_ = int(rec.get("round", 0))
                if sample is not None:
                    sample = int(sample)
                reason = rec.get("finish_reason")
                if reason is not None and reason not in _REASONS:
                    raise ValueError(f'"finish_reason" must be one of {", ".join(_REASONS)}')
                ids = rec.get("token_ids")
                if ids is not None and not (
                    isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids)
                ):
                    raise ValueError('"token_ids" must be a list of non-negative integers')
            except KeyError as e:
                raise BackendError(f"{p} line {n}: missing field {e}") from e
            except (ValueError, TypeError) as e:
                raise BackendError(f"{p} line {n}: {e}") from e
            records[(str(pid), sample, round_)] = rec
        digest = hashlib.sha256(raw).hexdigest()[:12]
        return cls(records, model_id=f"replay:{digest}", keep_requests=keep_requests, speed=speed)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Nothing runs in the background."""
        task_status.started()
        await anyio.sleep_forever()

    def lookup(self, request: Request) -> dict[str, Any]:
        """The record for a request: its sample's, else the one recorded for every sample.

        Raises:
            LookupError: nothing was recorded for it.
        """
        pid = request.problem_id or ""
        for key in ((pid, request.sample, request.round), (pid, None, request.round)):
            if key in self.records:
                return self.records[key]
        raise LookupError(
            f"the replay file has no completion for problem {pid!r} sample {request.sample} "
            f"round {request.round}"
        )

    async def generate(self, request: Request) -> Completion:
        """The recorded completion, after its recorded ``seconds`` (cancellable).

        Raises:
            LookupError: nothing was recorded for this problem, sample and round.
        """
        if self.requests is not None:
            self.requests.append(request)
        rec = self.lookup(request)
        seconds = float(rec.get("seconds", 0.0))
        if seconds > 0 and self.speed > 0:
            await anyio.sleep(seconds / self.speed)
        else:
            await anyio.lowlevel.checkpoint()
        self.served += 1
        c = _completion(rec, request)
        if request.params.watch is None:
            return c
        if rec.get("token_ids") is not None:  # real ids: the text stays whole
            return stop_in(c, request.params.watch)
        return stop_in(c, request.params.watch, lambda n: "".join(_WORD.findall(c.text)[:n]))

    def memory_profile(self) -> MemoryProfile | None:
        """No model, no memory to budget."""
        return None

    def close(self) -> None:
        """Nothing to release."""


def _completion(rec: dict[str, Any], request: Request) -> Completion:
    p = request.params
    text: str = rec["text"]
    logprobs = tuple(float(x) for x in rec["logprobs"]) if p.logprobs and rec.get("logprobs") else None
    top = None
    if p.top_logprobs and rec.get("top_logprobs"):
        top = tuple(tuple(float(x) for x in row[: p.top_logprobs]) for row in rec["top_logprobs"])
    reason: FinishReason | None = rec.get("finish_reason")
    recorded_ids = rec.get("token_ids")
    if reason is not None:
        words = _WORD.findall(text)
        ids = tuple(recorded_ids) if recorded_ids is not None else tuple(range(len(words)))
        stop_token = rec.get("stop_token")
        return Completion(ids, text, reason, rec.get("stop_string"), logprobs, stop_token, top)
    if recorded_ids is not None:
        return _by_token_ids(recorded_ids, text, p, logprobs, top)
    words = _WORD.findall(text)[: p.max_new_tokens]
    cut = "".join(words)
    cut, how, stop_string = finish_text(cut, p.stop, p.stop_at_answer)
    if how is not None:
        reason = how
    elif len(words) < len(_WORD.findall(text)):
        reason = "length"
    else:
        reason = "eos"
    n = len(_WORD.findall(cut))
    return Completion(
        tuple(range(n)),
        cut,
        reason,
        stop_string,
        logprobs[:n] if logprobs else None,
        None,
        top[:n] if top else None,
    )


def _by_token_ids(
    recorded: list[int],
    text: str,
    p: SamplingParams,
    logprobs: tuple[float, ...] | None,
    top: tuple[tuple[float, ...], ...] | None,
) -> Completion:
    """A completion from recorded token ids: they end at the first stop token id (inclusive) or at
    ``max_new_tokens``; the text is the record's, cut by stop strings and the answer."""
    ends = set(p.stop_token_ids)
    n = next((i + 1 for i, t in enumerate(recorded) if t in ends), len(recorded))
    n = min(n, p.max_new_tokens)
    ids = tuple(recorded[:n])
    lp = logprobs[:n] if logprobs else None
    tp = top[:n] if top else None
    if ids and ids[-1] in ends:
        return Completion(ids, text, "stop", logprobs=lp, stop_token=ids[-1], top_logprobs=tp)
    cut, how, stop_string = finish_text(text, p.stop, p.stop_at_answer)
    if how is not None:
        return Completion(ids, cut, how, stop_string, lp, top_logprobs=tp)
    reason: FinishReason = "length" if n < len(recorded) else "eos"
    return Completion(ids, text, reason, logprobs=lp, top_logprobs=tp)


class RecordingBackend(BackendBase):
    """Wraps a backend and writes every completion it returns to a replay file (``--record FILE``)."""

    def __init__(self, inner: Backend, path: str | Path) -> None:
        self.inner = inner
        self.path = Path(path)
        self.model_id = inner.model_id
        self.max_context = inner.max_context
        self.device = inner.device
        try:
            self._file = self.path.open("w", encoding="utf-8")
        except OSError as e:
            raise BackendError(f"cannot write the record file {self.path}: {e.strerror or e}") from e
        self.written = 0

    def configure(self, *, max_batch_size: int, max_wait_s: float, max_batch_tokens: int | None) -> None:
        """As the wrapped backend."""
        self.inner.configure(
            max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_batch_tokens=max_batch_tokens
        )

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """As the wrapped backend."""
        return self.inner.encode(messages)

    def encode_text(self, text: str) -> list[int]:
        """As the wrapped backend."""
        return self.inner.encode_text(text)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """As the wrapped backend."""
        await self.inner.serve(task_status=task_status)

    async def generate(self, request: Request) -> Completion:
        """The wrapped backend's completion, written to the record file first (one line, flushed)."""
        started = now()
        c = await self.inner.generate(request)
        rec: dict[str, Any] = {
            "id": request.problem_id,
            "sample": request.sample,
            "round": request.round,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "seconds": round(now() - started, 4),
        }
        if c.stop_string is not None:
            rec["stop_string"] = c.stop_string
        if c.logprobs is not None:
            rec["logprobs"] = [round(x, 5) for x in c.logprobs]
        if c.stop_token is not None:
            rec["stop_token"] = c.stop_token
        if c.top_logprobs is not None:
            rec["top_logprobs"] = [[round(x, 5) for x in row] for row in c.top_logprobs]
        if request.params.stop_token_ids:  # a prompt style that parses ids needs them back
            rec["token_ids"] = list(c.token_ids)
        self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._file.flush()
        self.written += 1
        return c

    def memory_profile(self) -> MemoryProfile | None:
        """As the wrapped backend."""
        return self.inner.memory_profile()

    def statistics(self) -> dict[str, Any] | None:
        """As the wrapped backend."""
        return self.inner.statistics()

    def close_file(self) -> None:
        """Close the record file (the wrapped backend stays open)."""
        self._file.close()

    def close(self) -> None:
        """Close the record file and the wrapped backend."""
        self._file.close()
        self.inner.close()
