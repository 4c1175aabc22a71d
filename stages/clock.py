"""The pipeline's one clock.

Every deadline and every duration the pipeline keeps is read from :func:`now` (monotonic seconds,
``time.perf_counter``). A caller's relative timeout becomes a deadline once, at the API edge
(``deadline = now() + timeout_s``); the only other clock, the event loop's, which anyio cancel scopes
need, is reached through :func:`scope_deadline` and nowhere else.
"""

from __future__ import annotations

import math
import time

import anyio

now = time.perf_counter
"""Monotonic seconds: the clock of every ``deadline`` field and every measured duration."""


def scope_deadline(deadline: float | None) -> float:
    """A :func:`now` deadline on the event loop's clock, for an anyio cancel scope (``inf`` for none).

    Must be called from inside the event loop.
    """
    if deadline is None:
        return math.inf
    return anyio.current_time() + (deadline - now())
