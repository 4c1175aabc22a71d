"""Admission: the one owner of the limit on problems in flight.

A problem takes a slot (``Admission.admit``) before anything is done for it and holds it until its
caller has read its result, or has gone. What it holds is a ``Ticket``, which travels with the problem
(as its waiter in the engine) and then with its result through the stream's channel. A ticket is given
back in two steps, each at most once whatever path it takes: ``delivered`` when its result is in the
route's channel (the stream can then end), ``release`` when the caller has read it (the slot frees).
A double release therefore cannot widen the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.items import Result
from stages.clock import now


class Route:
    """Where one ``stream()`` call's results go, and when that stream is complete."""

    def __init__(self, channel: MemoryObjectSendStream[tuple[Result, Ticket]]) -> None:
        self.channel = channel
        self.outstanding = 0
        self.fed_all = False
        self.error: BaseException | None = None

    def finish_if_done(self) -> None:
        """Close the channel once the input is exhausted and every result has been handed over."""
        if self.fed_all and self.outstanding == 0:
            self.channel.close()


class Ticket:
    """One admitted problem's hold on a slot and on its route."""

    __slots__ = ("_admission", "_delivered", "_released", "route")

    def __init__(self, admission: Admission, route: Route) -> None:
        self._admission = admission
        self.route = route
        self._delivered = False
        self._released = False

    def delivered(self) -> None:
        """Its result is in the route's channel (or nobody will read it): the route may finish."""
        if not self._delivered:
            self._delivered = True
            self.route.outstanding -= 1
            self.route.finish_if_done()

    def release(self) -> None:
        """Its caller has read the result, or gone: the slot frees."""
        if not self._released:
            self._released = True
            self._admission._free()

    def close(self) -> None:
        """Both at once: the problem leaves without a result for its caller."""
        self.delivered()
        self.release()


@dataclass(frozen=True)
class AdmissionStatistics:
    """A snapshot: slots free, problems holding one, and the time callers waited for a slot."""

    free: int
    held: int
    wait_s: float


class Admission:
    """``limit`` slots, taken by ``admit`` and given back through the ``Ticket`` it returns."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = anyio.Semaphore(limit, fast_acquire=True)  # a free slot: no trip through the loop
        self.wait_s = 0.0

    async def admit(self, route: Route) -> Ticket:
        """Wait for a slot (this wait is the pipeline's backpressure on its input) and hold it."""
        waited = now()
        await self._semaphore.acquire()
        self.wait_s += now() - waited
        route.outstanding += 1
        return Ticket(self, route)

    def _free(self) -> None:
        self._semaphore.release()

    @property
    def value(self) -> int:
        """Slots free now."""
        return self._semaphore.value

    def statistics(self) -> AdmissionStatistics:
        """Slots free and held, and the total wait for one."""
        free = self._semaphore.value
        return AdmissionStatistics(free=free, held=self.limit - free, wait_s=self.wait_s)
