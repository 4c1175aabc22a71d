"""The sink: results to ``results.jsonl`` (one line per input, appended and flushed as each arrives) and
to Kaggle's ``submission.csv``; and ``--resume``'s reading of what an earlier run wrote.

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

from pipeline.items import Result


class OutputError(OSError):
    """An output file cannot be written; the message names it."""


@dataclass
class Written:
    """What an earlier run's output file already holds (for ``--resume``)."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    count: int = 0
    repaired: bool = False

    def has(self, problem_id: str | None, line: int | None) -> bool:
        """Whether an input (by id, or by line for inputs without one) already has its result."""
        if problem_id is not None:
            return problem_id in self.ids
        return line is not None and line in self.lines


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
        if obj.get("id") is not None:
            done.ids.add(str(obj["id"]))
        elif isinstance(obj.get("line"), int):
            done.lines.add(obj["line"])
    return done


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
                new = await anyio.to_thread.run_sync(_empty_or_missing, self.submission)
                sub = await aiofiles.open(self.submission, "a", encoding="utf-8")
                if new:
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
            for f in (out, sub):
                if f is not None:
                    with contextlib.suppress(OSError):  # the write error above is the one to report
                        await f.close()

    async def _write(self, batch: list[Result], out: Any, sub: Any) -> None:
        text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in batch)
        if out is not None:
            await out.write(text)
            await out.flush()
        else:
            await anyio.to_thread.run_sync(self._to_stdout, text)
        if sub is not None:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(
                (r.id, submission_answer(r, self.fallback)) for r in batch if r.id is not None
            )
            rows = buf.getvalue()
            if rows:
                await sub.write(rows)
                await sub.flush()
        self.written += len(batch)

    def _to_stdout(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
