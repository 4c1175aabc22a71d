"""Recorded completions: the ``replay`` backend, and the recorder that writes its files.

A replay file is JSON lines, one completion each:
``{"id": "p1", "sample": 0, "round": 0, "text": "...", "finish_reason": "stop", "stop_string": "```\\n",
"logprobs": [...], "seconds": 0.8}``. ``id`` is the problem's id, ``sample`` its sample index (leave it
out to answer every sample), ``round`` the round of tool use (0 first). ``finish_reason``,
``stop_string``, ``logprobs`` and ``seconds`` (how long the replay waits before answering, cancellably)
are optional: without a finish reason the text is cut at the request's stop strings and answer as a
model's would be. ``--record FILE`` writes this format from a real run, so a run can be re-scored
under other voting settings without the model; tests write it by hand to script code and attacks
through the real pipeline.

Token counts are words (as in the fake backend): the replay needs no tokenizer.
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
)
from stages.backends.fake import CodePoints
from stages.clock import now
from stages.prompting import finish_text

_WORD = re.compile(r"\S+\s*|\s+")
_REASONS = ("eos", "length", "stop", "answer", "aborted")
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
        return _completion(rec, request)

    def memory_profile(self) -> MemoryProfile | None:
        """No model, no memory to budget."""
        return None

    def close(self) -> None:
        """Nothing to release."""


def _completion(rec: dict[str, Any], request: Request) -> Completion:
    p = request.params
    text: str = rec["text"]
    logprobs = tuple(float(x) for x in rec["logprobs"]) if p.logprobs and rec.get("logprobs") else None
    reason: FinishReason | None = rec.get("finish_reason")
    if reason is not None:
        words = _WORD.findall(text)
        return Completion(tuple(range(len(words))), text, reason, rec.get("stop_string"), logprobs)
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
    return Completion(tuple(range(n)), cut, reason, stop_string, logprobs[:n] if logprobs else None)


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
