"""Hand-offs between stages that pay for a trip through the event loop once per batch, not per item.

An anyio memory stream's ``receive`` and ``send`` each yield to the event loop even when the item is
already there (or there is room): a checkpoint per item per stream, which is most of what a problem
costs the pipeline when the model costs nothing. A stage reads with ``batches`` (wait for one item,
then take what is already queued, without waiting) and writes with ``put`` (hand the item over at once
while the buffer has room; wait, as ``send`` does, only when it is full). Backpressure is unchanged:
a full stream still blocks its producer, and every stage still yields once per batch it reads, so
no stage holds the loop for long.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")

BATCH = 64  # the most items one wake-up takes: a bound on how long a stage holds the loop


async def batches(receive: MemoryObjectReceiveStream[T], limit: int = BATCH) -> AsyncIterator[list[T]]:
    """Each time: wait for one item, then add what is already queued (at most ``limit`` in all).
    Ends when the stream is closed and drained."""
    while True:
        try:
            batch = [await receive.receive()]
        except anyio.EndOfStream:
            return
        yield drain(receive, batch, limit)


def drain(receive: MemoryObjectReceiveStream[T], batch: list[T], limit: int) -> list[T]:
    """Add to ``batch`` what ``receive`` holds now, without waiting, until it has ``limit`` items."""
    while len(batch) < limit:
        try:
            batch.append(receive.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return batch


async def put(send: MemoryObjectSendStream[T], item: T) -> None:
    """Send ``item``: at once while the stream has room (or a reader waits), else wait as ``send`` does.

    Raises:
        anyio.BrokenResourceError: every reader has gone.
        anyio.ClosedResourceError: this end was closed.
    """
    try:
        send.send_nowait(item)
    except anyio.WouldBlock:
        await send.send(item)
