"""DeepConf online: stop a sample as soon as its sliding-window confidence falls below a threshold.

DeepConf (arXiv 2508.15260, "online") watches each trace as it is generated: a token's confidence is
minus the mean of its top-k log-probabilities (``stages.selection.token_confidence``), a group's the mean
over the last ``vote.deepconf_window`` tokens, and a trace whose group confidence falls below the
threshold is stopped there and left out of the vote. The threshold is a fixed value
(``vote.deepconf_stop``), or set per problem from its first ``vote.deepconf_warmup`` finished samples:
the ``(1 - vote.deepconf_keep)`` percentile of their lowest group confidence (keep 0.9: about the least
confident tenth would have fallen below it; 0.1: all but the top tenth).

The parts, one job each:

- ``ConfidenceTrack``: a sample's running figures (the last window of token confidences, the lowest
  full-window mean so far) carried across its rounds. A full window's mean is computed exactly as
  ``stages.selection.group_confidences`` computes it offline (the first window's ``fsum``, then a running
  sum), so a sample is stopped exactly when the offline ``lowest`` of what it wrote so far is below the
  threshold; a sample shorter than the window is never stopped (offline it is one group).
- ``ConfidenceGate``: one problem's threshold (fixed, or unknown until its warmup samples are in).
- ``ConfidenceWatch``: what one request carries (``SamplingParams.watch``): the backend feeds it each
  generated token's top-k row as it decodes and ends the completion (finish reason ``confidence``) at the
  first token for which ``feed`` says so, whatever else ends at that token (an end of text, a code
  block's close: the sample stops there, exactly when the offline ``lowest`` of what it wrote is below
  the threshold). It starts each round from the sample's track; ``reset`` starts it again (a retried
  request or batch).
- ``stop_in(completion, watch, cut)``: the same check over a completion that arrives whole (the scripted
  and replay backends).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from stages.backends.base import Completion, TokenWatch
from stages.selection import percentile, token_confidence

LOW_CONFIDENCE = "stopped early: its confidence fell below the DeepConf threshold"


class ConfidenceTrack:
    """A sample's running confidence figures: fed one top-k row per generated token."""

    __slots__ = ("_run", "lowest", "recent", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.recent: deque[float] = deque()
        self._run = 0.0
        self.lowest: float | None = None  # the least full-window mean so far

    def copy(self) -> ConfidenceTrack:
        """An independent copy (a round's watch starts from one)."""
        other = ConfidenceTrack(self.window)
        other.recent = deque(self.recent)
        other._run = self._run
        other.lowest = self.lowest
        return other

    def feed(self, top: Sequence[float]) -> None:
        """Take one token's top-k log-probabilities (a row with no finite value counts for nothing)."""
        c = token_confidence(top)
        if c is not None:
            self.add(c)

    def add(self, c: float) -> None:
        """Take one token's confidence."""
        self.recent.append(c)
        if len(self.recent) < self.window:
            return
        if len(self.recent) == self.window and self.lowest is None:
            self._run = math.fsum(self.recent)
        else:
            self._run += c - self.recent.popleft()
        mean = self._run / self.window
        self.lowest = mean if self.lowest is None else min(self.lowest, mean)

    def summary(self) -> float | None:
        """The sample's offline ``lowest``: its least full-window mean, or the mean of all its tokens'
        confidences when it is shorter than a window (``None`` without any)."""
        if self.lowest is not None:
            return self.lowest
        return math.fsum(self.recent) / len(self.recent) if self.recent else None


class ConfidenceGate:
    """One problem's threshold: ``fixed``, or the ``(1 - keep)`` percentile of the lowest group
    confidence of its first ``warmup`` finished samples (``None`` until they are in)."""

    def __init__(self, *, fixed: float | None = None, warmup: int | None = None, keep: float = 0.9) -> None:
        self.threshold = fixed
        self.warmup = warmup
        self.keep = keep
        self.seen: list[float] = []

    def finished(self, track: ConfidenceTrack) -> None:
        """A sample of the problem finished (not stopped): with a warmup, its lowest group confidence
        counts towards the threshold until ``warmup`` samples are in."""
        if self.warmup is None or self.threshold is not None:
            return
        figure = track.summary()
        if figure is None:
            return
        self.seen.append(figure)
        if len(self.seen) >= self.warmup:
            self.threshold = percentile(self.seen, (1.0 - self.keep) * 100.0)


class ConfidenceWatch:
    """A request's check, fed by the backend one generated token at a time (in whatever thread the
    backend decodes in; it reads the gate's threshold, a float, as it goes)."""

    __slots__ = ("_start", "gate", "stopped", "track")

    def __init__(self, track: ConfidenceTrack, gate: ConfidenceGate) -> None:
        self._start = track
        self.gate = gate
        self.track = track.copy()
        self.stopped = False

    def reset(self) -> None:
        """Start again from the round's beginning (a backend that retries a request calls it)."""
        self.track = self._start.copy()
        self.stopped = False

    def feed(self, top: Sequence[float]) -> bool:
        """Take the next generated token's top-k row; ``True`` when the sample must stop after it."""
        if self.stopped:
            return True
        self.track.feed(top)
        t = self.gate.threshold
        low = self.track.lowest
        self.stopped = t is not None and low is not None and low < t
        return self.stopped


def stop_in(
    completion: Completion, watch: TokenWatch | None, cut: Callable[[int], str] | None = None
) -> Completion:
    """``completion`` as a backend that checks ``watch`` at every token would have returned it: cut
    after the first token the watch stops at (finish reason ``confidence``; ``cut(n)`` gives the text of
    the first ``n`` tokens, else the text stays whole), or unchanged."""
    top = completion.top_logprobs
    if watch is None or top is None:
        return completion
    for i, row in enumerate(top):
        if watch.feed(row):
            n = i + 1
            lp = completion.logprobs[:n] if completion.logprobs is not None else None
            text = cut(n) if cut is not None else completion.text
            return replace(
                completion,
                token_ids=completion.token_ids[:n],
                text=text,
                finish_reason="confidence",
                stop_string=None,
                stop_token=None,
                logprobs=lp,
                top_logprobs=top[:n],
            )
    return completion
