"""The verification stage: a pool of worker processes checks each sample's answer.

An output whose last ``\\boxed{...}`` holds a plain number is read here, in time linear in its length
(``stages.extraction.quick_check``: the same answer ``check_answer`` gives); the rest go to the workers.
Workers are ``stages.process_pool.WorkerPool`` processes (a dead one is replaced); each call carries a
batch of outputs, so the cost of crossing a process boundary is paid once per batch. The worker
function imports only the light ``stages.extraction`` (and ``math-verify`` when an answer is not a
plain number), never torch.

A failure while checking one sample is that sample's failure, never the run's: an exception the
checker raises on one text becomes that sample's reason; a batch that fails as a whole (the worker
died, timed out, or the call raised) is retried one sample at a time, and what still fails gets a
reason of its own. The runner starts ``verify_workers`` copies of ``run`` on cloned streams; each copy
takes only its fair share of what is queued, so work that arrives at once is spread over the copies.
"""

from __future__ import annotations

import math

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stages.clock import now
from stages.confidence_stop import LOW_CONFIDENCE
from stages.config import Config
from stages.extraction import check_answer, quick_check
from stages.items import Candidate, Generation
from stages.process_pool import WorkerDied, WorkerPool
from stages.streams import drain, put

Checked = tuple[int | None, str | None, str | None]
MAX_REASON = 300


def _failure(e: BaseException) -> str:
    message = f"{type(e).__name__}: {e}"
    if len(message) > MAX_REASON:
        message = message[: MAX_REASON - 3] + "..."
    return f"cannot check the answer: {message}"


def check_batch(texts: list[str], modulus: int | None, lo: int, hi: int) -> list[Checked]:
    """Runs in a worker process: ``check_answer`` on each text; an exception on one text becomes that
    text's reason (``"cannot check the answer: ValueError: ..."``) and the others are still checked."""
    out: list[Checked] = []
    for text in texts:
        try:
            out.append(check_answer(text, modulus=modulus, lo=lo, hi=hi))
        except Exception as e:
            out.append((None, None, _failure(e)))
    return out


def warm_up() -> bool:
    """Runs in a worker process at start-up: check a plain answer, so the first real batch is quick.

    ``math-verify`` (half a second of imports) is left to the first answer that is not a plain number:
    at start-up the workers would take that CPU from the model's loading.
    """
    check_answer("\\boxed{42}", modulus=None, lo=0, hi=100)
    return True


class Verification:
    """Shared state of the stage's fan-out copies: the process limiter and counters."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.pool = WorkerPool(cfg.run.verify_workers)
        self.batches = 0
        self.quick = 0  # outputs read in process (a plain boxed number)
        self.worker_failures = 0
        self.busy_s = 0.0

    async def start(self) -> None:
        """Start the worker processes now, so the first batch does not pay for it."""
        await self.pool.start(warm_up)

    async def aclose(self) -> None:
        """Stop the worker processes."""
        await self.pool.aclose()

    async def _check(self, gens: list[Generation]) -> list[Candidate]:
        """Check a batch in a worker. A batch that fails as a whole is retried one sample at a time, so
        only the sample that causes the failure gets it as its reason."""
        a = self.cfg.answer
        texts = [g.text for g in gens]
        started = now()
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
        except Exception as e:  # the call itself failed (it raised, or its reply was unreadable)
            reason = _failure(e)
        self.batches += 1
        elapsed = now() - started
        self.busy_s += elapsed
        if checked is None:
            self.worker_failures += 1
            if len(gens) > 1:  # find the sample that causes the failure; the others still count
                return [c for g in gens for c in await self._check([g])]
            return [
                Candidate(generation=gens[0], answer=None, extracted=None, reason=reason, verify_s=elapsed)
            ]
        return [
            Candidate(generation=g, answer=ans, extracted=ext, reason=why, verify_s=elapsed)
            for g, (ans, ext, why) in zip(gens, checked, strict=True)
        ]

    async def _next_batch(self, receive: MemoryObjectReceiveStream[Generation]) -> list[Generation] | None:
        """Wait for one item, then take this copy's fair share of what is already queued, without
        waiting: at most ``min(verify_batch, ceil((1 + queued) / verify_workers))`` items in all.
        ``None`` once the stream is closed and drained."""
        try:
            batch = [await receive.receive()]
        except anyio.EndOfStream:
            return None
        queued = receive.statistics().current_buffer_used
        share = min(self.cfg.run.verify_batch, math.ceil((1 + queued) / self.cfg.run.verify_workers))
        return drain(receive, batch, share)

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Generation],
        send: MemoryObjectSendStream[Candidate],
    ) -> None:
        """One copy of the stage; the runner starts ``verify_workers`` copies on cloned streams.

        A generation that carries an error becomes a failed ``Candidate`` with that error as its
        reason, unchecked; so does one DeepConf online stopped (finish reason ``confidence``).
        """
        a = self.cfg.answer
        async with receive, send:
            while (batch := await self._next_batch(receive)) is not None:
                gens: list[Generation] = []
                for item in batch:
                    if item.error is not None or item.finish_reason == "confidence":
                        why = item.error or LOW_CONFIDENCE  # a stopped sample's answer does not count
                        await put(send, Candidate(generation=item, answer=None, extracted=None, reason=why))
                    elif (quick := quick_check(item.text, modulus=a.modulus, lo=a.min, hi=a.max)) is not None:
                        self.quick += 1  # a plain boxed number: no worker needed
                        await put(send, Candidate(item, *quick))
                    else:
                        gens.append(item)
                if gens:
                    for candidate in await self._check(gens):
                        await put(send, candidate)
