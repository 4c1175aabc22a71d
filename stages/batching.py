"""The micro-batch collector.

Wait for one item; then take what is already queued (up to a look-ahead window) and, while the batch is
short, wait for more until ``max_wait`` has passed since that first item. From what is pending, the
batch is the oldest item plus the items closest to it in length, within ``max_size`` and the token cap:
similar lengths cut left padding, and the oldest item always goes so nothing starves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from stages.clock import now

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Forms batches from a receive stream. ``next_batch`` returns ``None`` once the stream is closed
    and drained.

    ``length(item)`` is the item's prompt length; a batch of ``n`` items of width ``w`` costs
    ``n * (w + r)`` tokens, ``r`` the largest ``reserve`` in it (the tokens a row may still generate:
    a number, or a function of the item), which must stay within ``max_tokens``. A single item over
    the cap is still returned alone: the caller decides.
    ``drop(item)`` discards items that are no longer wanted (their problem finished early).
    """

    def __init__(
        self,
        receive: MemoryObjectReceiveStream[T],
        *,
        max_size: int,
        max_wait_s: float,
        length: Callable[[T], int] = lambda _: 0,
        reserve: int | Callable[[T], int] = 0,
        max_tokens: int | None = None,
        lookahead: int | None = None,
        drop: Callable[[T], bool] | None = None,
    ) -> None:
        self.receive = receive
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.length = length
        if callable(reserve):
            self.reserve = reserve
        else:
            fixed = reserve
            self.reserve = lambda _: fixed
        self.max_tokens = max_tokens if max_tokens is not None else math.inf
        self.lookahead = max(lookahead or 4 * max_size, max_size)
        self.drop = drop
        self.pending: list[T] = []
        self.closed = False

    def _take(self, item: T) -> None:
        if self.drop is None or not self.drop(item):
            self.pending.append(item)

    def _drain_nowait(self) -> None:
        while not self.closed and len(self.pending) < self.lookahead:
            try:
                self._take(self.receive.receive_nowait())
            except anyio.WouldBlock:
                return
            except anyio.EndOfStream:
                self.closed = True

    async def _fill(self) -> None:
        while not self.pending and not self.closed:
            try:
                self._take(await self.receive.receive())
            except anyio.EndOfStream:
                self.closed = True
        first_seen = now()
        self._drain_nowait()
        deadline = first_seen + self.max_wait_s
        while not self.closed and len(self.pending) < self.max_size:
            remaining = deadline - now()
            if remaining <= 0:
                break
            with anyio.move_on_after(remaining):
                try:
                    self._take(await self.receive.receive())
                except anyio.EndOfStream:
                    self.closed = True
            self._drain_nowait()

    def _select(self) -> list[T]:
        if self.drop is not None:
            self.pending = [p for p in self.pending if not self.drop(p)]
        if not self.pending:
            return []
        anchor = self.pending[0]
        anchor_len = self.length(anchor)
        order = sorted(
            range(1, len(self.pending)), key=lambda i: abs(self.length(self.pending[i]) - anchor_len)
        )
        chosen = [0]
        width = anchor_len
        reserve = self.reserve(anchor)
        for i in order:
            if len(chosen) >= self.max_size:
                break
            w = max(width, self.length(self.pending[i]))
            r = max(reserve, self.reserve(self.pending[i]))
            if (len(chosen) + 1) * (w + r) > self.max_tokens:
                continue
            chosen.append(i)
            width, reserve = w, r
        picked = set(chosen)
        batch = [self.pending[i] for i in sorted(chosen)]
        self.pending = [p for i, p in enumerate(self.pending) if i not in picked]
        return batch

    async def next_batch(self) -> list[T] | None:
        """The next batch, or ``None`` when the input is closed and nothing is pending."""
        while True:
            if not self.pending:
                await self._fill()
            elif len(self.pending) < self.max_size:
                self._drain_nowait()
            batch = self._select()
            if batch:
                return batch
            if self.closed and not self.pending:
                return None
