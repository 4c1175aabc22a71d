"""The verification stage: a pool of worker processes checks each sample's answer.

Workers are ``stages.workers.WorkerPool`` processes (a dead one is replaced); each call carries a
batch of outputs, so the cost of crossing a process boundary is paid once per batch. The worker
function imports only the light ``stages.extraction`` (and ``math-verify`` when an answer is not a
plain number), never torch.
"""

from __future__ import annotations

import time

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.batching import MicroBatcher
from pipeline.config import Config
from pipeline.items import Candidate, Generation, Result
from stages.extraction import check_answer
from stages.workers import WorkerDied, WorkerPool

Checked = tuple[int | None, str | None, str | None]


def check_batch(texts: list[str], modulus: int | None, lo: int, hi: int) -> list[Checked]:
    """Runs in a worker process: ``check_answer`` on each text."""
    return [check_answer(t, modulus=modulus, lo=lo, hi=hi) for t in texts]


def warm_up() -> bool:
    """Runs in a worker process at start-up: import what checking needs before the first real batch."""
    import math_verify  # noqa: F401

    check_answer("\\boxed{\\frac{8}{2}}", modulus=None, lo=0, hi=10)
    return True


class Verification:
    """Shared state of the stage's fan-out copies: the process limiter and counters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pool = WorkerPool(cfg.run.verify_workers)
        self.batches = 0
        self.worker_failures = 0

    async def start(self) -> None:
        """Start the worker processes now, so the first batch does not pay for it."""
        await self.pool.start(warm_up)

    async def aclose(self) -> None:
        """Stop the worker processes."""
        await self.pool.aclose()

    async def _check(self, gens: list[Generation]) -> list[Candidate]:
        a = self.cfg.answer
        texts = [g.text for g in gens]
        started = time.perf_counter()
        reason: str | None = None
        checked: list[Checked] | None = None
        try:
            checked = await self.pool.run(
                check_batch, texts, a.modulus, a.min, a.max, limit_s=self.cfg.run.verify_timeout_s
            )
        except TimeoutError:
            reason = f"verification took longer than {self.cfg.run.verify_timeout_s:g} s"
        except WorkerDied as e:
            reason = f"verification worker died: {e}"
        self.batches += 1
        elapsed = time.perf_counter() - started
        if checked is None:
            self.worker_failures += 1
            if len(gens) > 1:  # find the sample that kills the worker; the others still count
                return [c for g in gens for c in await self._check([g])]
            return [
                Candidate(generation=gens[0], answer=None, extracted=None, reason=reason, verify_s=elapsed)
            ]
        return [
            Candidate(generation=g, answer=ans, extracted=ext, reason=why, verify_s=elapsed)
            for g, (ans, ext, why) in zip(gens, checked, strict=True)
        ]

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Generation | Result],
        send: MemoryObjectSendStream[Candidate | Result],
    ) -> None:
        """One copy of the stage; the runner starts ``verify_workers`` copies on cloned streams."""
        batcher = MicroBatcher(receive, max_size=self.cfg.run.verify_batch, max_wait_s=0.0)
        async with receive, send:
            while (batch := await batcher.next_batch()) is not None:
                gens: list[Generation] = []
                for item in batch:
                    if isinstance(item, Result):
                        await send.send(item)
                    elif item.error is not None:
                        await send.send(
                            Candidate(generation=item, answer=None, extracted=None, reason=item.error)
                        )
                    else:
                        gens.append(item)
                if gens:
                    for candidate in await self._check(gens):
                        await send.send(candidate)
