"""The result cache: an in-memory LRU (cachetools) in front of an optional SQLite store on disk.

Keys are the normalised problem text plus the configuration fingerprint (model, dtype, generation and
answer settings), so a cached answer is only reused under the settings that produced it. Only answers
(``ok`` and ``fallback``) are stored; errors are recomputed.

The cache never ends a run: a disk store that cannot be opened, read or written (disk full, read-only
folder, a corrupt file) is logged as a warning and the answers go on (from memory, or computed). A row
is ``Result.to_json()`` with its ``"schema"`` version; a row of another version (or none: the rows
earlier releases wrote) is a miss, logged once, not an error, and its problem is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sqlite3
import unicodedata
from pathlib import Path
from typing import Any

import anyio
import structlog
from cachetools import LRUCache

from pipeline.items import SCHEMA_VERSION, Problem, Result

_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """NFKC, whitespace collapsed, trimmed: texts that differ only in spacing share a key."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def cache_key(text: str, fingerprint: str) -> str:
    """The cache key of a problem text under a configuration fingerprint."""
    return hashlib.sha256(f"{fingerprint}\x00{normalise_text(text)}".encode()).hexdigest()


def _to_row(result: Result) -> str:
    return json.dumps(result.to_json())


class _OtherVersion(Exception):
    """A row written in another version of the result format."""


def _from_row(row: str) -> Result:
    """The stored result.

    Raises:
        _OtherVersion: the row is of another schema version (or of none).
        ValueError: the row cannot be read (the message names the field at fault).
    """
    data: Any = json.loads(row)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        raise _OtherVersion
    return Result.from_json(data)


class SQLiteStore:
    """Results on disk, one row per key. Blocking: call through ``ResultCache``, which uses a thread."""

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "results.sqlite"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, result TEXT NOT NULL)")
        self._told_other_version = False

    def get(self, key: str) -> Result | None:
        """The stored result for ``key``, or ``None`` (also for a row that cannot be used, with a
        warning: an unreadable one each time, those of another format version once)."""
        row = self._db.execute("SELECT result FROM results WHERE key = ?", (key,)).fetchone()
        if not row:
            return None
        try:
            return _from_row(row[0])
        except _OtherVersion:
            if not self._told_other_version:
                self._told_other_version = True
                structlog.get_logger("pipeline.cache").warning(
                    f"the result cache in {self.path.parent} holds rows of another format version "
                    f"(this release writes version {SCHEMA_VERSION}); their problems are recomputed"
                )
        except ValueError as e:
            _warn("an unreadable row in the result cache; computing instead", e)
        return None

    def put(self, key: str, result: Result) -> None:
        """Store (or replace) the result for ``key``."""
        self._db.execute("INSERT OR REPLACE INTO results VALUES (?, ?)", (key, _to_row(result)))

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def _warn(what: str, e: BaseException) -> None:
    structlog.get_logger("pipeline.cache").warning(what, error=f"{type(e).__name__}: {e}")


class ResultCache:
    """LRU in memory, SQLite on disk when ``directory`` is given (and can be opened)."""

    def __init__(self, size: int, directory: str | None = None) -> None:
        self._lru: LRUCache[str, Result] | None = LRUCache(maxsize=size) if size > 0 else None
        self._store: SQLiteStore | None = None
        if directory:
            try:
                self._store = SQLiteStore(directory)
            except (OSError, sqlite3.Error) as e:
                _warn(f"cannot open the result cache in {directory}; going on without it", e)
        # sqlite3 connections are not safe for concurrent use: one thread at a time.
        self._io = anyio.CapacityLimiter(1)

    async def get(self, problem: Problem, key: str) -> Result | None:
        """A cached result re-addressed to ``problem`` (status ``cached``), or ``None`` on a miss."""
        stored = self._lru.get(key) if self._lru is not None else None
        if stored is None and self._store is not None:
            try:
                stored = await anyio.to_thread.run_sync(self._store.get, key, limiter=self._io)
            except (OSError, sqlite3.Error) as e:
                _warn("cannot read the result cache; computing instead", e)
                stored = None
            if stored is not None and self._lru is not None:
                self._lru[key] = stored
        if stored is None:
            return None
        return dataclasses.replace(
            stored,
            id=problem.id,
            line=problem.line,
            gold=problem.answer,
            status="cached",
            timings={},
        )

    async def put(self, key: str, result: Result) -> None:
        """Remember an answered result (errors are not cached)."""
        if result.status not in ("ok", "fallback"):
            return
        if self._lru is not None:
            self._lru[key] = result
        if self._store is not None:
            try:
                await anyio.to_thread.run_sync(self._store.put, key, result, limiter=self._io)
            except (OSError, sqlite3.Error) as e:
                _warn("cannot write the result cache; the answer goes on", e)

    def close(self) -> None:
        """Close the disk store."""
        if self._store is not None:
            try:
                self._store.close()
            except sqlite3.Error as e:
                _warn("cannot close the result cache", e)
