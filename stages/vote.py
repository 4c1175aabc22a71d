"""The vote stage: a problem's checked samples become its one ``Result``.

Each valid answer gets its score under the vote rule (``VoteConfig.rule``, ``stages/selection.py``:
clean code above plain reasoning by default, optionally times the sample's confidence; majority; top-k
entropy weights; the AIMO 3 second place's score). The highest total wins;
ties go to more samples, then to the answer whose first sample has the lowest index, so the result does
not depend on the order samples finish in.

Each result leaves in a ``Routed`` envelope naming its job's key and serial, which the runner's router
unwraps. Early stop (``vote.early_stop = K``): a problem is decided once K samples agree, or once its
leader cannot be overtaken by the samples still running; its result leaves at once and
``on_decided(serial)`` cancels the rest (the runner wires it to ``Inference.cancel``). Their aborted
samples still arrive and are dropped here, so the bookkeeping of each problem ends when all its samples
are in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from stages.config import Config, VoteConfig
from stages.items import Candidate, Result, Routed
from stages.selection import confidence as confidence
from stages.selection import max_weight, scores
from stages.selection import weight as weight
from stages.streams import batches, put


@dataclass(frozen=True)
class Tally:
    """The vote so far: per answer, its total weight, its samples, its first sample's index."""

    weights: dict[int, float]
    counts: dict[int, int]
    first: dict[int, int]

    def ranked(self) -> list[int]:
        """Answers best first (weight, then samples, then the lowest first index)."""
        return sorted(self.weights, key=lambda a: (-self.weights[a], -self.counts[a], self.first[a]))

    @property
    def winner(self) -> int | None:
        """The winning answer, or ``None`` when no sample gave one."""
        ranked = self.ranked()
        return ranked[0] if ranked else None


def tally(candidates: Sequence[Candidate], cfg: VoteConfig | None = None) -> Tally:
    """Count the valid answers of ``candidates`` with their scores under ``cfg``'s rule (``majority``
    without ``cfg``); sums run in sample order, so totals do not depend on the order samples finished."""
    valid = [c for c in candidates if c.answer is not None]
    weights = scores(valid, cfg if cfg is not None else VoteConfig(rule="majority"))
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for c in valid:
        assert c.answer is not None
        counts[c.answer] = counts.get(c.answer, 0) + 1
        first[c.answer] = min(first.get(c.answer, c.generation.index), c.generation.index)
    return Tally(weights, counts, first)


def vote(candidates: Sequence[Candidate], cfg: VoteConfig | None = None) -> tuple[int | None, dict[int, int]]:
    """The winning answer and the samples per answer (most first)."""
    t = tally(candidates, cfg)
    ranked = t.ranked()
    return (ranked[0] if ranked else None), {a: t.counts[a] for a in ranked}


def decided(candidates: Sequence[Candidate], of: int, cfg: VoteConfig) -> bool:
    """Whether a problem with ``of`` samples can stop now: ``early_stop`` samples agree, or the
    leader's lead is more than the samples still running could bring the runner-up."""
    if cfg.early_stop is None or len(candidates) >= of:
        return False
    t = tally(candidates, cfg)
    ranked = t.ranked()
    if not ranked:
        return False
    if max(t.counts.values()) >= cfg.early_stop:  # K agree (the recipe's rule), whoever leads by weight
        return True
    best_one = max_weight(cfg)
    if best_one is None:  # unbounded weights: only agreement decides early
        return False
    runner_up = t.weights[ranked[1]] if len(ranked) > 1 else 0.0
    return t.weights[ranked[0]] - runner_up > (of - len(candidates)) * best_one


def build_result(candidates: list[Candidate], cfg: Config, *, early: bool = False) -> Result:
    """The one ``Result`` for a problem from its candidates (all of them, or those in when the vote was
    decided early)."""
    gen0 = candidates[0].generation
    encoded = gen0.encoded
    problem = encoded.problem
    answer, votes = vote(candidates, cfg.vote)
    of = gen0.of
    timings = {
        "tokenize": encoded.tokenize_s,
        "queue": max(c.generation.queue_s for c in candidates),
        "inference": max(c.generation.inference_s for c in candidates),
        "verify": max(c.verify_s for c in candidates),
        "total": time.perf_counter() - problem.submitted,
    }
    common: dict[str, Any] = {
        "id": problem.id,
        "line": problem.line,
        "gold": problem.answer,
        "votes": votes,
        "samples": len(candidates),
        "prompt_tokens": encoded.prompt_tokens,
        "new_tokens": sum(c.generation.new_tokens for c in candidates),
        "timings": timings,
        "finish": _finish(candidates, of, early),
        "early_stop": early,
        "cells": sum(c.generation.cells for c in candidates),
        "code_errors": tuple(
            f"sample {c.generation.index}: {e}" for c in candidates for e in c.generation.cell_errors
        )[:10],
        "partial": any(
            c.generation.outcome in ("timed_out", "cancelled") or c.generation.finish_reason == "aborted"
            for c in candidates
        ),
    }
    timed_out = [c for c in candidates if c.generation.outcome == "timed_out"]
    if answer is not None:
        if timed_out:
            done = len(candidates) - len(timed_out)
            return Result(
                answer=answer,
                status="fallback",
                error=f"time limit reached: the answer is the vote of the {done} of {len(candidates)} "
                "samples that finished",
                **common,
            )
        return Result(answer=answer, status="ok", **common)
    failed = [c for c in candidates if c.generation.error is not None]
    if timed_out and len(timed_out) == len(candidates):
        return Result(
            answer=cfg.answer.fallback,
            status="fallback",
            error=f"time limit reached before any of {len(candidates)} samples finished",
            **common,
        )
    if len(failed) == len(candidates):
        return Result(
            answer=None, status="error", error=f"generation failed: {failed[0].generation.error}", **common
        )
    reasons = "; ".join(sorted({c.reason or "no answer" for c in candidates}))
    return Result(
        answer=cfg.answer.fallback,
        status="fallback",
        error=f"no sample gave a valid answer ({reasons})",
        **common,
    )


def _finish(candidates: list[Candidate], of: int, early: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in candidates:
        counts[c.generation.finish_reason] = counts.get(c.generation.finish_reason, 0) + 1
    if early and of > len(candidates):  # the samples the early stop cancels
        counts["cancelled"] = of - len(candidates)
    return counts


class _Group:
    __slots__ = ("candidates", "done", "seen")

    def __init__(self) -> None:
        self.candidates: list[Candidate] = []
        self.seen = 0
        self.done = False


async def run(
    receive: MemoryObjectReceiveStream[Candidate],
    send: MemoryObjectSendStream[Routed],
    cfg: Config,
    on_decided: Callable[[int], Any] | None = None,
) -> None:
    """Gather each problem's candidates; send its ``Result``, routed to its job, when all are in or the
    vote is decided (a prompt the tokenize stage rejects goes to the router directly)."""
    groups: dict[int, _Group] = {}
    async with receive, send:
        async for items in batches(receive):
            for item in items:
                gen = item.generation
                job = gen.encoded.job
                serial = job.serial
                group = groups.setdefault(serial, _Group())
                group.seen += 1
                complete = group.seen >= gen.of
                if complete:
                    del groups[serial]
                if group.done:
                    continue
                group.candidates.append(item)
                if complete:
                    await put(send, Routed(build_result(group.candidates, cfg), job.key, serial))
                elif decided(group.candidates, gen.of, cfg.vote):
                    group.done = True
                    if on_decided is not None:
                        on_decided(serial)
                    await put(send, Routed(build_result(group.candidates, cfg, early=True), job.key, serial))
