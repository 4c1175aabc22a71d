"""A scripted backend: no model, answers from a script. For tests and for measuring the pipeline itself.

The prompt "tokens" are the code points of the user message, so a script can see the problem text.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from stages.backends.base import MemoryProfile, Output, SamplingParams

Responder = Callable[[str, int], str]
"""``(problem_text, nth_time_this_text_was_generated) -> model output text``."""


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


class FakeBackend:
    """A ``Backend`` whose outputs come from ``responder``.

    ``delay_s`` is slept per ``generate`` call (a model's cost, without using the CPU); ``fail`` may
    raise for a batch of problem texts (fault injection). With ``record`` (the default), ``calls``
    records each batch's problem texts and the responder is told how often it saw a text; benchmarks
    turn it off so the fake's own bookkeeping does not grow.
    """

    def __init__(
        self,
        responder: Responder = boxed_sum_responder,
        *,
        delay_s: float = 0.0,
        max_context: int = 1_000_000,
        fail: Callable[[list[str]], None] | None = None,
        model_id: str = "fake",
        record: bool = True,
    ) -> None:
        self.responder = responder
        self.delay_s = delay_s
        self.max_context = max_context
        self.fail = fail
        self.model_id = model_id
        self.record = record
        self.calls: list[list[str]] = []
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.closed = False

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The user message's code points."""
        user = [m["content"] for m in messages if m["role"] == "user"]
        return [ord(c) for c in user[-1]]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Output]:
        """Calls the responder once per prompt."""
        texts = ["".join(map(chr, p)) for p in prompts]
        if self.record:
            with self._lock:
                self.calls.append(texts)
        if self.fail is not None:
            self.fail(texts)
        if self.delay_s:
            time.sleep(self.delay_s)
        outputs = []
        for t in texts:
            nth = 0
            if self.record:
                with self._lock:
                    nth = self._seen[t]
                    self._seen[t] += 1
            out = self.responder(t, nth)
            outputs.append(Output(text=out, new_tokens=max(1, len(out.split()))))
        return outputs

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """A ``MemoryError`` stands for an accelerator out-of-memory error."""
        return isinstance(exc, MemoryError)

    def memory_profile(self) -> MemoryProfile | None:
        """Unknown: the fake uses no memory worth budgeting."""
        return None

    def close(self) -> None:
        """Marks the backend closed."""
        self.closed = True
