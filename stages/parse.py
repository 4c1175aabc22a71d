"""The parse stage: input lines to ``Problem``s, or to error ``Result``s that name the line.

Input is JSONL (one object a line: ``id``/``ID`` and ``problem``/``question``/``text``, optional
``answer``), or CSV with a header (Kaggle's ``test.csv``: ``id,problem[,answer]``), or ``-`` for
standard input. Files are read in chunks, so memory stays flat on any length. Standard input that is a
pipe, FIFO, socket or terminal is read without a blocking thread (wait until readable, then read what is
there), so cancelling the run (Ctrl-C) ends the read at once even when the producer keeps the pipe open
and idle; redirected from a regular file it is read in a worker thread. Blank lines are skipped;
a UTF-8 byte-order mark and CRLF line ends are accepted; every other bad line becomes an error result
and the rest of the input goes on.

Duplicate ids (applied by ``RecordConverter`` in ``Pipeline.stream``): the first occurrence is solved;
a later line with the same id gets an error result naming the line where the id was first seen.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiofiles
import anyio
import structlog

from stages.items import Problem, Result, encodable, error_result

CHUNK = 1 << 16
MAX_LINE_BYTES = 1 << 20
"""A line longer than this (1 MiB; a long competition problem is a few KiB) is an error result."""
_ID_IN_JSON = re.compile(rb'"(?:id|ID)"\s*:\s*(?:"((?:[^"\\]|\\.){1,200})"|(-?\d{1,30}))')
ID_FIELDS = ("id", "ID")
TEXT_FIELDS = ("problem", "question", "text")


class InputError(ValueError):
    """The input as a whole cannot be read (missing file, a directory, unknown format)."""


def _gold(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("field 'answer' must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip().replace(",", "")
        try:
            f = float(s)
        except ValueError:
            pass
        else:
            if f.is_integer():
                return int(f)
    raise ValueError(f"field 'answer' must be an integer, got {value!r}")


def record_to_problem(record: Any, line: int | None = None) -> Problem | Result:
    """Turn one decoded record (a dict) into a ``Problem``, or an error ``Result`` saying what is wrong."""
    where = f"line {line}: " if line is not None else ""
    if not isinstance(record, dict):
        return error_result(None, f"{where}expected a JSON object, got {type(record).__name__}", line=line)
    raw_id = next((record[k] for k in ID_FIELDS if k in record), None)
    pid: str | None
    if isinstance(raw_id, bool) or raw_id is None:
        pid = None
    elif isinstance(raw_id, (str, int)):
        pid = encodable(str(raw_id)).strip() or None  # a JSON escape can make a lone surrogate
    else:
        return error_result(
            None, f"{where}field 'id' must be a string or an integer, got {type(raw_id).__name__}", line=line
        )
    if pid is None:
        return error_result(None, f"{where}missing or empty field 'id'", line=line)
    text_field = next((k for k in TEXT_FIELDS if k in record), None)
    if text_field is None:
        return error_result(pid, f"{where}missing field 'problem' (or 'question' / 'text')", line=line)
    text = record[text_field]
    if not isinstance(text, str):
        return error_result(
            pid, f"{where}field '{text_field}' must be a string, got {type(text).__name__}", line=line
        )
    if not text.strip():
        return error_result(pid, f"{where}field '{text_field}' is empty", line=line)
    try:
        gold = _gold(record.get("answer"))
    except ValueError as e:
        return error_result(pid, f"{where}{e}", line=line)
    return Problem(id=pid, text=encodable(text), answer=gold, line=line)


def decode_line(raw: bytes, line: int) -> str:
    """UTF-8 text of a line; invalid bytes become U+FFFD (with a warning naming the line), so the id
    and the rest of the problem survive."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        structlog.get_logger("pipeline.parse").warning(
            "invalid UTF-8 replaced with U+FFFD", line=line, reason=e.reason, at_byte=e.start
        )
        return raw.decode("utf-8", errors="replace")


def parse_json_line(raw: bytes, line: int) -> Problem | Result | None:
    """One JSONL line; ``None`` for a blank line."""
    text = decode_line(raw, line)
    if line == 1:
        text = text.lstrip("\ufeff")
    text = text.strip()
    if not text:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        # the id is often still readable: keep it, so the id gets its row in the submission
        pid = id_from_prefix(raw[:65536])
        return error_result(pid, f"line {line}: invalid JSON ({e.msg} at column {e.colno})", line=line)
    return record_to_problem(record, line)


def _waitable(fd: int) -> bool:
    """Whether ``fd`` can be waited on for readability: a pipe, FIFO, socket or terminal."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def _fd_chunks(fd: int) -> AsyncIterator[bytes]:
    """Read a pipe, socket or terminal as it becomes readable; cancellation ends the wait at once.

    A pipe or socket is made non-blocking while it is read (a spurious wake-up then waits again instead
    of blocking the event loop) and its flags are restored at the end. A terminal is left blocking: its
    file description is usually shared with standard output, which must not turn non-blocking; once
    readable it holds a whole line (or end of input), so the read returns at once.
    """
    nonblocking = not os.isatty(fd)
    was_blocking = os.get_blocking(fd)
    if nonblocking:
        os.set_blocking(fd, False)
    try:
        while True:
            await anyio.wait_readable(fd)
            try:
                chunk = os.read(fd, CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                return
            yield chunk
    finally:
        if nonblocking:
            os.set_blocking(fd, was_blocking)


async def _chunks(source: str | Path) -> AsyncIterator[bytes]:
    if str(source) == "-":
        stdin = sys.stdin.buffer
        fd = stdin.fileno()
        if _waitable(fd):
            async for chunk in _fd_chunks(fd):
                yield chunk
            return
        # a regular file (``< input.jsonl``) never blocks for long: a worker thread reads it
        read = getattr(stdin, "read1", stdin.read)
        while True:
            chunk = await anyio.to_thread.run_sync(read, CHUNK)
            if not chunk:
                return
            yield chunk
    else:
        async with aiofiles.open(source, "rb") as f:
            while True:
                chunk = await f.read(CHUNK)
                if not chunk:
                    return
                yield chunk


class LineTooLong(ValueError):
    """A line over ``MAX_LINE_BYTES``: ``prefix`` holds its first bytes (to recover the id from),
    ``quotes`` how many double quotes the whole line had (so a CSV reader keeps its quote state)."""

    def __init__(self, line: int, prefix: bytes, limit: int) -> None:
        super().__init__(f"line {line}: longer than {limit:,} bytes; skipped")
        self.line = line
        self.prefix = prefix
        self.quotes = 0


async def read_lines(
    source: str | Path, *, max_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[tuple[int, bytes | LineTooLong]]:
    """``(line_number, raw_bytes)`` for each physical line, without its line end, in linear time.

    A line longer than ``max_bytes`` comes as ``(line_number, LineTooLong)``; the rest of it is skipped
    without being kept, so memory stays bounded whatever the input.
    """
    parts: list[bytes] = []
    size = 0
    number = 0
    too_long: LineTooLong | None = None
    async for chunk in _chunks(source):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if too_long is None:
                if size + len(piece) > max_bytes:
                    head = b"".join(parts)  # bounded: at most max_bytes
                    too_long = LineTooLong(number + 1, (head + piece[:65536])[:65536], max_bytes)
                    too_long.quotes = head.count(b'"') + piece.count(b'"')
                    parts, size = [], 0
                else:
                    parts.append(piece)
                    size += len(piece)
            else:
                too_long.quotes += piece.count(b'"')
            if end < 0:
                break
            number += 1
            if too_long is not None:
                yield number, too_long
                too_long = None
            else:
                yield number, b"".join(parts).rstrip(b"\r")
            parts, size = [], 0
            start = end + 1
    if too_long is not None:
        yield number + 1, too_long
    elif size:
        yield number + 1, b"".join(parts).rstrip(b"\r")


def id_from_prefix(prefix: bytes) -> str | None:
    """The id of a JSONL line from its first bytes (for a line too long to parse), or ``None``."""
    m = _ID_IN_JSON.search(prefix)
    if m is None:
        return None
    if m.group(2) is not None:
        return m.group(2).decode()
    try:
        value = json.loads(b'"' + m.group(1) + b'"')
    except ValueError:
        return None
    return str(value).strip() or None


def _too_long(err: LineTooLong, pid: str | None) -> Result:
    structlog.get_logger("pipeline.parse").warning("line too long; skipped", line=err.line, id=pid)
    return error_result(pid, str(err), line=err.line)


def check_source(source: str | Path) -> str:
    """Validate an input path before any work starts; return its format (``jsonl`` or ``csv``).

    Raises:
        InputError: the file does not exist or is a directory.
    """
    if str(source) == "-":
        return "jsonl"
    p = Path(source)
    if not p.exists():
        raise InputError(f"input file {p} does not exist")
    if p.is_dir():
        raise InputError(f"input {p} is a directory, not a file")
    return "csv" if p.suffix.lower() == ".csv" else "jsonl"


def _too_long_record(
    err: LineTooLong, start: int, first: str, header: list[str] | None, usable: bool, id_column: int
) -> Result:
    """The error for a CSV record with an over-long line, under the record's first line and its id."""
    pid = None
    if usable and header is not None:
        row = next(csv.reader(io.StringIO(first)), [])
        if len(row) > id_column + 1:  # the id field ended before the cut
            pid = row[id_column].strip() or None
    reason = f"line {start}: CSV record skipped: {err}"
    structlog.get_logger("pipeline.parse").warning("CSV record too long; skipped", line=start, id=pid)
    return error_result(pid, reason, line=start)


def _open_quote(text: str, quoted: bool = False) -> bool:
    """Whether a CSV record is still inside a quoted field at the end of ``text`` (the ``csv`` module's
    rules: a quote opens a quoted field only at the start of a field; inside one, ``""`` is a quote;
    a quote inside an unquoted field is just a character). ``quoted``: the text starts inside one."""
    at_start = not quoted
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == '"':
                if i + 1 < n and text[i + 1] == '"':
                    i += 1
                else:
                    quoted = False
        elif c == '"' and at_start:
            quoted = True
        at_start = c in ",\n" and not quoted
        i += 1
    return quoted


async def _csv_problems(
    lines: AsyncIterator[tuple[int, bytes | LineTooLong]],
) -> AsyncIterator[Problem | Result | None]:
    header: list[str] | None = None
    id_column = 0
    usable = False
    record: list[str] = []
    start = 0
    quoted = False
    oversized: LineTooLong | None = None
    async for number, raw in lines:
        if isinstance(raw, LineTooLong):
            if not record:  # the line starts a record: its id is in the first bytes
                start = number
                first = raw.prefix.decode("utf-8", errors="replace")
                # a quoted field opened on this line and not closed runs on (quote parity, as csv
                # counts them once the field is open)
                quoted = raw.quotes % 2 == 1
            else:
                first = record[0]
                quoted = quoted != (raw.quotes % 2 == 1)
            oversized = raw
            record = [first]
            if quoted:
                continue
            yield _too_long_record(oversized, start, first, header, usable, id_column)
            record, oversized = [], None
            continue
        text = decode_line(raw, number)
        if number == 1:
            text = text.lstrip("\ufeff")
        if not record:
            start = number
            if not text.strip():
                continue
        if oversized is not None:  # the rest of a record that had an over-long line: skip to its end
            quoted = _open_quote(text, quoted)
            if not quoted:
                yield _too_long_record(oversized, start, record[0], header, usable, id_column)
                record, oversized = [], None
            continue
        record.append(text)
        quoted = _open_quote(text, quoted)
        if quoted:  # a quoted field runs on to the next line
            continue
        joined = "\n".join(record)
        record = []
        row = next(csv.reader(io.StringIO(joined)), [])
        if header is None:
            header = [h.strip() for h in row]
            usable = any(h in header for h in ID_FIELDS) and any(h in header for h in TEXT_FIELDS)
            if usable:
                id_column = next(header.index(h) for h in ID_FIELDS if h in header)
            else:
                yield error_result(
                    None, f"line {start}: CSV header must name an 'id' and a 'problem' column", line=start
                )
            continue
        if not usable:
            yield error_result(None, f"line {start}: no usable CSV header (see line 1)", line=start)
            continue
        if len(row) != len(header):
            pid = row[id_column].strip() if len(row) > id_column else None
            yield error_result(
                pid or None, f"line {start}: expected {len(header)} CSV fields, got {len(row)}", line=start
            )
            continue
        yield record_to_problem(dict(zip(header, row, strict=True)), start)
    if oversized is not None:
        yield _too_long_record(oversized, start, record[0], header, usable, id_column)
    elif record:
        yield error_result(None, f"line {start}: unterminated quoted CSV field", line=start)


async def read_problems(source: str | Path) -> AsyncIterator[Problem | Result]:
    """Every non-blank input line as a ``Problem`` or an error ``Result``. Duplicate ids are left to
    ``RecordConverter``, which ``Pipeline.stream`` applies to whatever it is given.

    Raises:
        InputError: the source cannot be opened (see ``check_source``).
    """
    fmt = check_source(source)
    items: AsyncIterator[Problem | Result | None]
    if fmt == "csv":
        items = _csv_problems(read_lines(source))
    else:
        items = (
            _too_long(raw, id_from_prefix(raw.prefix))
            if isinstance(raw, LineTooLong)
            else parse_json_line(raw, n)
            async for n, raw in read_lines(source)
        )
    async for item in items:
        if item is not None:
            yield item


def dedupe(item: Problem | Result, seen: dict[str, int | None]) -> Problem | Result:
    """Apply the duplicate-id policy: the first line with an id owns it (even a bad line, whose error
    is then the id's answer); a later line with the same id becomes an error naming the first line,
    marked ``duplicate`` (it gets no submission row, and ``--resume`` does not count its id)."""
    if isinstance(item, Result):
        if item.id is not None and not item.duplicate:
            seen.setdefault(item.id, item.line)
        return item
    if isinstance(item, Problem):
        if item.id in seen:
            first = seen[item.id]
            where = f"line {item.line}: " if item.line is not None else ""
            at = f" at line {first}" if first is not None else ""
            return error_result(
                item.id,
                f"{where}duplicate id {item.id!r} (first seen{at}); this line was not solved",
                line=item.line,
                gold=item.answer,
                duplicate=True,
            )
        seen[item.id] = item.line
    return item


class RecordConverter:
    """Turns records given through the API (``Problem``s, ``Result``s, dicts, strings) into problems or
    error results, applying the duplicate-id policy across one stream. A string's id is its position."""

    def __init__(self) -> None:
        self.seen: dict[str, int | None] = {}
        self.position = 0

    def __call__(self, record: Any) -> Problem | Result:
        """Convert the next record of the stream."""
        item: Problem | Result
        if isinstance(record, (Problem, Result)):
            item = record
        elif isinstance(record, str):
            item = record_to_problem({"id": str(self.position), "problem": record})
        else:
            item = record_to_problem(record)
        self.position += 1
        return dedupe(item, self.seen)
