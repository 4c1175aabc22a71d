"""A scripted backend: no model, answers from a script. For tests and for measuring the pipeline itself.

It follows the backend protocol exactly as the transformers adapter does: requests are micro-batched by
the same ``BatchScheduler`` and a batch runs in one thread, one "decode step" per word of the scripted
output (``step_s`` sleeps per step, so cancellation can be observed mid-generation), with stop strings,
``max_new_tokens``, per-row abort and early delivery of finished rows (with no ``step_s`` a batch's rows
are not stepped: each one's end is found directly, and they are delivered in the order stepping would
deliver them, so the pipeline's own cost is what ``bench overhead`` measures). The prompt "tokens" are
the code points of the user message, so a script can see the problem text. The n-th word of the output
is token id n (from 1), so ``stop_token_ids=(3,)`` ends a completion at its third word (left out of the
text, as vLLM leaves a stop token out); ``top_logprobs`` k gives each token -0.5, -1.0, ... (k values;
DeepConf confidence 0.25 (k + 1)), and a word ending in ``?`` -0.1, -0.2, ... (a hesitant token:
confidence 0.05 (k + 1)), so a script can hold a low-confidence stretch for a request's ``watch`` to
stop at.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import anyio
from anyio.abc import TaskStatus

from stages.backends.base import BackendBase, Completion, MemoryProfile, Request
from stages.backends.scheduler import BatchScheduler, Row
from stages.prompting import answer_end, finish_text

Responder = Callable[[str, int], str]
"""``(problem_text, nth_time_this_text_was_generated) -> model output text``."""

_WORD = re.compile(r"\S+\s*|\s+")


def boxed_sum_responder(text: str, nth: int) -> str:
    """Answers ``\\boxed{N}`` where N is the sum of the integers in the problem (0 when none)."""
    total = 0
    number = ""
    for ch in [*text, " "]:
        if ch.isdigit():
            number += ch
        elif number:
            total += int(number)
            number = ""
    return f"Adding the numbers gives \\boxed{{{total}}}."


class CodePoints:
    """A tokenizer for backends without a model: a token is a code point; a prompt is the user message."""

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The user message's code points."""
        user = [m["content"] for m in messages if m["role"] == "user"]
        return [ord(c) for c in user[-1]]

    def encode_text(self, text: str) -> list[int]:
        """The text's code points."""
        return [ord(c) for c in text]


class FakeBackend(BackendBase, CodePoints):
    """A ``Backend`` whose outputs come from ``responder``.

    ``delay_s`` is slept once per batch, ``step_s`` once per decode step (a word of output); ``fail``
    may raise for a batch of problem texts (fault injection; a ``MemoryError`` stands for an
    out-of-memory error). With ``record`` (the default), ``calls`` records each batch's problem texts
    and the responder is told how often it saw a text; benchmarks turn it off so the fake's own
    bookkeeping does not grow. ``requests`` records every request submitted (with ``record``).
    """

    def __init__(
        self,
        responder: Responder = boxed_sum_responder,
        *,
        delay_s: float = 0.0,
        step_s: float = 0.0,
        max_context: int = 1_000_000,
        fail: Callable[[list[str]], None] | None = None,
        model_id: str = "fake",
        record: bool = True,
        max_batch_size: int = 16,
        max_wait_s: float = 0.002,
    ) -> None:
        self.responder = responder
        self.delay_s = delay_s
        self.step_s = step_s
        self.max_context = max_context
        self.fail = fail
        self.model_id = model_id
        self.record = record
        self.calls: list[list[str]] = []
        self.requests: list[Request] = []
        self.steps = 0
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.closed = False
        self.scheduler = BatchScheduler(
            self._run_batch,
            is_out_of_memory=lambda e: isinstance(e, MemoryError),
            max_size=max_batch_size,
            max_wait_s=max_wait_s,
        )

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the batch loop until cancelled."""
        await self.scheduler.serve(task_status=task_status)

    async def generate(self, request: Request) -> Completion:
        """Queue the request for the next batch and wait for its completion."""
        if self.record:
            self.requests.append(request)
        return await self.scheduler.generate(request)

    def script(self, text: str) -> str:
        """The scripted output for prompt ``text`` (its ``nth`` repeat counted when recording)."""
        nth = 0
        if self.record:
            with self._lock:
                nth = self._seen[text]
                self._seen[text] += 1
        return self.responder(text, nth)

    def _run_batch(self, rows: list[Row]) -> None:
        texts = ["".join(map(chr, r.request.prompt_ids)) for r in rows]
        if self.record:
            with self._lock:
                self.calls.append(texts)
        if self.fail is not None:
            self.fail(texts)
        if self.delay_s:
            time.sleep(self.delay_s)
        words = [_WORD.findall(self.script(t)) for t in texts]
        if not self.step_s:  # nothing to watch between steps: each row's end, found directly
            self.steps += 1
            ended: list[tuple[int, int, Completion]] = []
            for i, (row, w) in enumerate(zip(rows, words, strict=True)):
                if row.aborted:
                    row.drop()
                else:
                    at, final = self._at_once(row, w)
                    ended.append((at, i, final))
            for _, i, final in sorted(ended, key=lambda e: (e[0], e[1])):  # as stepping delivers them
                rows[i].finish(final)
            return
        live = list(range(len(rows)))
        step = 0
        while live:
            if self.step_s:
                time.sleep(self.step_s)
            step += 1
            self.steps += 1
            still = []
            for i in live:
                row = rows[i]
                if row.aborted:
                    row.drop()
                    continue
                done = self._step(row, words[i], step)
                if done is None:
                    still.append(i)
                else:
                    row.finish(done)
            live = still

    @classmethod
    def _at_once(cls, row: Row, words: list[str]) -> tuple[int, Completion]:
        """The step and completion stepping would give (``_step`` at each step until one ends the row), found
        with a few checks: the first step at which a stop token, a stop string or the answer, the end
        of the words or ``max_new_tokens`` ends it (the text's stop and answer are found once it holds
        them, so by bisection), and the watch fed up to there."""
        p = row.request.params
        n = len(words)
        ends = [max(n, 1), p.max_new_tokens]
        ends += [t for t in p.stop_token_ids if 1 <= t <= n]
        if p.stop or p.stop_at_answer:  # the first prefix of words that holds a stop or the answer
            text = "".join(words)
            at = [text.find(s) + len(s) for s in p.stop if s in text]
            if p.stop_at_answer and (answer := answer_end(text)) is not None:
                at.append(answer)
            if at:  # a prefix holds it once it reaches its last character
                ends.append(bisect.bisect_left(list(accumulate(map(len, words))), min(at)) + 1)
        end = min(ends)
        if p.watch is not None and p.top_logprobs:
            for step in range(1, min(end, n) + 1):
                if p.watch.feed(_top_row(words[step - 1], p.top_logprobs)):
                    low = cls._step(row, words, step, low=True)
                    assert low is not None
                    return step, low
        done = cls._step(row, words, end, low=False)
        assert done is not None
        return end, done

    @staticmethod
    def _step(row: Row, words: list[str], step: int, low: bool | None = None) -> Completion | None:
        """The row's completion if it ends at this step, else ``None``; ``low``: whether the watch
        stops it here (``None``: feed the watch this step's token)."""
        p = row.request.params
        text = "".join(words[:step])
        ids = tuple(range(1, min(step, len(words)) + 1))
        lp = tuple(-0.5 for _ in ids) if p.logprobs else None
        k = p.top_logprobs
        top = tuple(_top_row(w, k) for w in words[: len(ids)]) if k else None
        if low is None:
            low = top is not None and p.watch is not None and step <= len(words) and p.watch.feed(top[-1])
        if low:
            return Completion(ids, text, "confidence", logprobs=lp, top_logprobs=top)
        if step <= len(words) and step in p.stop_token_ids:
            before = "".join(words[: step - 1])
            return Completion(ids, before, "stop", logprobs=lp, stop_token=step, top_logprobs=top)
        cut, reason, found = finish_text(text, p.stop, p.stop_at_answer)
        if reason is not None:
            return Completion(ids, cut, reason, stop_string=found, logprobs=lp, top_logprobs=top)
        if step >= len(words):
            return Completion(ids, text, "eos", logprobs=lp, top_logprobs=top)
        if step >= p.max_new_tokens:
            return Completion(ids, text, "length", logprobs=lp, top_logprobs=top)
        return None

    def memory_profile(self) -> MemoryProfile | None:
        """Unknown: the fake uses no memory worth budgeting."""
        return None

    def statistics(self) -> dict[str, Any] | None:
        """The micro-batcher's figures (``None`` before its first batch)."""
        return self.scheduler.statistics()

    def close(self) -> None:
        """Marks the backend closed."""
        self.closed = True


def _top_row(word: str, k: int) -> tuple[float, ...]:
    """A scripted token's top-k log-probabilities: a hesitant word (ending in ``?``) has them close."""
    step = 0.1 if word.rstrip().endswith("?") else 0.5
    return tuple(-step * (j + 1) for j in range(k))
