"""The inference stage: a micro-batcher in front of one model thread.

Each encoded problem becomes ``samples`` rows. The batcher (``pipeline.batching``) forms batches by
size, token cap and wait time; ``generate`` runs in one dedicated thread (a ``CapacityLimiter(1)``), so
the event loop keeps parsing, tokenizing and verifying while the model works.

Faults: an out-of-memory error splits the batch in halves and lowers the token cap; any other error
retries the rows one at a time; a row that still fails becomes a ``Generation`` with ``error`` set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.batching import MicroBatcher
from pipeline.config import Config
from pipeline.items import Encoded, Generation, Result, SampleRequest
from stages.backends.base import Backend, SamplingParams


class InferenceStats:
    """Counters the summary and the benchmarks read."""

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.padded_tokens = 0
        self.prompt_tokens = 0
        self.new_tokens = 0
        self.busy_s = 0.0
        self.oom_splits = 0


class Inference:
    """The stage's state: the model thread's limiter, the token cap, the counters."""

    def __init__(self, backend: Backend, cfg: Config, max_batch_tokens: int | None) -> None:
        self.backend = backend
        self.cfg = cfg
        self.max_batch_tokens = max_batch_tokens
        self.model_thread = anyio.CapacityLimiter(1)
        self.stats = InferenceStats()
        self._batch_no = 0

    def _params(self) -> SamplingParams:
        g = self.cfg.generation
        self._batch_no += 1
        return SamplingParams(
            max_new_tokens=g.max_new_tokens,
            greedy=g.greedy,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed + self._batch_no,
        )

    async def _generate(self, rows: Sequence[SampleRequest]) -> list[Generation]:
        prompts = [r.encoded.prompt_ids for r in rows]
        started = time.perf_counter()
        try:
            outputs = await anyio.to_thread.run_sync(
                self.backend.generate, prompts, self._params(), limiter=self.model_thread
            )
            if len(outputs) != len(rows):
                raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(rows)} prompts")
        except Exception as e:  # the model's failure is these rows' failure; the run goes on
            if self.backend.is_out_of_memory(e):
                if len(rows) == 1:
                    return [self._failed(rows[0], "out of memory even in a batch of one")]
                self.stats.oom_splits += 1
                width = max(len(p) for p in prompts) + self.cfg.generation.max_new_tokens
                self.max_batch_tokens = max(1, (len(rows) // 2) * width)
                half = len(rows) // 2
                return [*(await self._generate(rows[:half])), *(await self._generate(rows[half:]))]
            if len(rows) > 1:
                out: list[Generation] = []
                for r in rows:
                    out.extend(await self._generate([r]))
                return out
            return [self._failed(rows[0], f"{type(e).__name__}: {e}")]
        elapsed = time.perf_counter() - started
        width = max(len(p) for p in prompts)
        s = self.stats
        s.batches += 1
        s.rows += len(rows)
        s.padded_tokens += sum(width - len(p) for p in prompts)
        s.prompt_tokens += sum(len(p) for p in prompts)
        s.new_tokens += sum(o.new_tokens for o in outputs)
        s.busy_s += elapsed
        return [
            Generation(
                encoded=r.encoded,
                index=r.index,
                text=o.text,
                new_tokens=o.new_tokens,
                queue_s=started - r.enqueued,
                inference_s=elapsed,
            )
            for r, o in zip(rows, outputs, strict=True)
        ]

    @staticmethod
    def _failed(row: SampleRequest, reason: str) -> Generation:
        return Generation(encoded=row.encoded, index=row.index, text="", new_tokens=0, error=reason)

    async def run(
        self,
        receive: MemoryObjectReceiveStream[Encoded | Result],
        send: MemoryObjectSendStream[Generation | Result],
    ) -> None:
        """Expand problems into sample rows, batch them, generate, and send each sample on."""
        capacity = self.cfg.run.max_in_flight * self.cfg.generation.samples
        rows_send, rows_receive = anyio.create_memory_object_stream[SampleRequest](capacity)
        async with anyio.create_task_group() as tg, send:
            tg.start_soon(self._expand, receive, rows_send, send.clone())
            batcher = MicroBatcher(
                rows_receive,
                max_size=self.cfg.batch.max_batch_size,
                max_wait_s=self.cfg.batch.max_wait_ms / 1000.0,
                length=lambda r: r.encoded.prompt_tokens,
                reserve=self.cfg.generation.max_new_tokens,
                max_tokens=self.max_batch_tokens,
            )
            async with rows_receive:
                while (batch := await batcher.next_batch()) is not None:
                    for generation in await self._generate(batch):
                        await send.send(generation)
                    batcher.max_tokens = self.max_batch_tokens or batcher.max_tokens

    async def _expand(
        self,
        receive: MemoryObjectReceiveStream[Encoded | Result],
        rows: MemoryObjectSendStream[SampleRequest],
        passthrough: MemoryObjectSendStream[Generation | Result],
    ) -> None:
        async with receive, rows, passthrough:
            async for item in receive:
                if isinstance(item, Result):
                    await passthrough.send(item)
                    continue
                for index in range(self.cfg.generation.samples):
                    await rows.send(SampleRequest(encoded=item, index=index))
