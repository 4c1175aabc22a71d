"""The sink: results to ``results.jsonl`` (one line per input, appended and flushed as each arrives) and
to Kaggle's ``submission.csv``; and ``--resume``'s reading of what an earlier run wrote.

The submission follows from the results: one row per id (a repeated id's error line gets none), rows
appended as results are written, and the whole file rebuilt from the results file when a run starts and
when it ends (atomically), so a kill between the two writes cannot leave them disagreeing.

A line is ``Result.to_json(schema=False)``. ``--resume`` and the submission read only the few fields
they need (``id``, ``line``, ``duplicate``, ``answer``, ``status``) from each line, and take any JSON
object, not only a whole result: a line an earlier release (or a person) wrote still counts.

Writes happen in a writer task that takes every result already waiting and writes them in one call, so
a fast stream does not pay a thread hop per line, and a crash loses nothing that was handed over.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiofiles
import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.items import Result, encodable


class OutputError(OSError):
    """An output file cannot be written; the message names it."""


@dataclass
class Written:
    """What an earlier run's output file already holds (for ``--resume``).

    ``lines``: every input line that has its result line (line to the id written for it).
    ``first_lines``: each id whose first
    occurrence has its result (id to that line; a repeated id's duplicate line does not count), so
    the resumed run can still mark later repeats as duplicates.
    """

    lines: dict[int, str | None] = field(default_factory=dict)
    first_lines: dict[str, int | None] = field(default_factory=dict)
    count: int = 0
    repaired: bool = False

    @property
    def ids(self) -> set[str]:
        """Ids whose first occurrence is finished."""
        return set(self.first_lines)

    def has(self, problem_id: str | None, line: int | None) -> bool:
        """Whether an input already has its result: its line was written for the same id (an input
        that changed since is not skipped), or, where the line is unknown, its id's first occurrence."""
        if line is not None and line in self.lines:
            written = self.lines[line]
            return written is None or problem_id is None or written == problem_id
        if problem_id is not None and problem_id in self.first_lines:
            first = self.first_lines[problem_id]
            return first is None or line is None or first == line
        return False


def read_written(path: str | Path) -> Written:
    """Read an existing output file; a half-written last line (from a hard kill) is cut off the file.

    Raises:
        OutputError: the file exists but cannot be read or repaired.
    """
    p = Path(path)
    done = Written()
    if not p.exists():
        return done
    try:
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(p, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
            done.repaired = True
    except OSError as e:
        raise OutputError(f"cannot read {p} to resume: {e.strerror or e}") from e
    for raw in data.splitlines():
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        done.count += 1
        line = obj.get("line") if isinstance(obj.get("line"), int) else None
        if line is not None:
            done.lines[line] = str(obj["id"]) if obj.get("id") is not None else None
        if obj.get("id") is not None and obj.get("duplicate") is not True:
            done.first_lines.setdefault(str(obj["id"]), line)
    return done


def submission_rows(results: str | Path, fallback: int) -> dict[str, int]:
    """One answer per id from a results file: the last answered line of each id (so a later run
    appended to the same file wins), an error line only when the id has no answered one; duplicates
    and id-less lines left out. Unreadable lines are skipped."""
    rows: dict[str, int] = {}
    answered: set[str] = set()
    with open(results, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict) or obj.get("id") is None or obj.get("duplicate") is True:
                continue
            pid = str(obj["id"])
            answer = obj.get("answer")
            value = answer if isinstance(answer, int) and not isinstance(answer, bool) else fallback
            if obj.get("status") != "error":
                rows[pid] = value
                answered.add(pid)
            elif pid not in answered:
                rows[pid] = value
    return rows


def rebuild_submission(results: str | Path, submission: str | Path, fallback: int) -> dict[str, int]:
    """Write ``submission`` afresh from ``results`` (atomically: a temporary file, then a rename).

    Returns the rows written (id to answer). Raises:
        OSError: a file cannot be read or written.
    """
    rows = submission_rows(results, fallback) if Path(results).exists() else {}
    target = Path(submission)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("id", "answer"))
        w.writerows(rows.items())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return rows


def check_writable(path: str | Path) -> None:
    """Fail before any work when ``path`` cannot be written.

    Raises:
        OutputError: the folder does not exist, or the file cannot be opened for appending.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"output {p} is a directory")
    if not p.parent.exists():
        raise OutputError(f"cannot write {p}: folder {p.parent} does not exist")
    try:
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {p}: {e.strerror or e}") from e


def _empty_or_missing(path: str) -> bool:
    return not os.path.exists(path) or os.path.getsize(path) == 0


def submission_answer(result: Result, fallback: int) -> int:
    """The integer Kaggle gets for a result: its answer, else the fallback."""
    return result.answer if result.answer is not None else fallback


class ResultWriter:
    """Writes results to a JSONL file (appending) or standard output, and optionally a submission CSV."""

    def __init__(
        self,
        output: str | None,
        submission: str | None = None,
        *,
        fallback: int = 0,
        stdout: TextIO | None = None,
    ) -> None:
        self.output = output
        self.submission = submission
        self.fallback = fallback
        self.stdout = stdout or sys.stdout
        self.written = 0
        self._in_submission: set[str] = set()

    async def run(self, receive: MemoryObjectReceiveStream[Result]) -> None:
        """Write everything received until the stream closes.

        Raises:
            OutputError: a write failed; lines written before it stay valid.
        """
        out: Any = None
        sub: Any = None
        try:
            if self.output is not None:
                out = await aiofiles.open(self.output, "a", encoding="utf-8")
            if self.submission is not None:
                if self.output is not None:  # the submission follows from the results file
                    await self._rebuild()
                else:
                    new = await anyio.to_thread.run_sync(_empty_or_missing, self.submission)
                    if not new:
                        await anyio.to_thread.run_sync(self._read_submission_ids)
                sub = await aiofiles.open(self.submission, "a", encoding="utf-8")
                if self.output is None and new:
                    await sub.write("id,answer\n")
                    await sub.flush()
            async with receive:
                async for first in receive:
                    batch = [first]
                    while True:
                        try:
                            batch.append(receive.receive_nowait())
                        except (anyio.WouldBlock, anyio.EndOfStream):
                            break
                    await self._write(batch, out, sub)
        except OSError as e:
            target = " and ".join(f for f in (self.output or "standard output", self.submission) if f)
            raise OutputError(f"writing results to {target} failed: {e.strerror or e}") from e
        finally:
            # shielded: the run's other tasks fail as soon as the writer closes its stream, and a
            # cancellation here would replace the write error with itself
            with anyio.CancelScope(shield=True):
                for f in (out, sub):
                    if f is not None:
                        with contextlib.suppress(OSError):  # the write error above is the one to report
                            await f.close()
        if self.submission is not None and self.output is not None:
            try:
                with anyio.CancelScope(shield=True):
                    await self._rebuild()
            except OSError as e:
                raise OutputError(
                    f"writing the submission {self.submission} failed: {e.strerror or e}"
                ) from e

    async def _rebuild(self) -> None:
        assert self.output is not None and self.submission is not None
        rows = await anyio.to_thread.run_sync(rebuild_submission, self.output, self.submission, self.fallback)
        self._in_submission = set(rows)

    def _read_submission_ids(self) -> None:
        assert self.submission is not None
        with open(self.submission, encoding="utf-8", newline="") as f:
            self._in_submission = {row[0] for row in list(csv.reader(f))[1:] if row}

    async def _write(self, batch: list[Result], out: Any, sub: Any) -> None:
        # the lines people read keep the fields they have always had: no "schema" (they read as version 1)
        text = "".join(json.dumps(r.to_json(schema=False), ensure_ascii=False) + "\n" for r in batch)
        if out is not None:
            await out.write(text)
            await out.flush()
        else:
            await anyio.to_thread.run_sync(self._to_stdout, text)
        if sub is not None:
            buf = io.StringIO()
            rows = []
            for r in batch:
                if r.id is None or r.duplicate or r.id in self._in_submission:
                    continue  # one row per id; the solved line of a repeated id has it
                self._in_submission.add(r.id)
                rows.append((encodable(r.id), submission_answer(r, self.fallback)))
            csv.writer(buf, lineterminator="\n").writerows(rows)
            text_rows = buf.getvalue()
            if text_rows:
                await sub.write(text_rows)
                await sub.flush()
        self.written += len(batch)

    def _to_stdout(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
