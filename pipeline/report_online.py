"""DeepConf online, replayed on a record: the tokens a threshold would have saved, against accuracy.

A recorded sample's token confidences say where a DeepConf online stop (``stages/confidence_stop.py``)
would have ended it: at the first full window whose mean falls below the threshold. With seeded
sampling the tokens before that point are the ones the sample wrote, so the tokens kept and the vote
over the samples left are what an online run would have given, without running the model.

For each keep share (0.9, 0.5, 0.1 and the run's ``vote.deepconf_keep``) a problem's threshold is set
from its first ``warmup`` samples by index (the run's ``vote.deepconf_warmup``, else a quarter of the
samples, at least one; a live run takes the first to finish), and with ``vote.deepconf_stop`` set, a
row for that fixed threshold too (which a live run reproduces exactly). Each row: the accuracy of the
run's rule over the samples not stopped, the tokens kept, the share saved and the samples stopped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from stages.confidence_stop import LOW_CONFIDENCE, ConfidenceGate, ConfidenceTrack, ConfidenceWatch
from stages.config import Config
from stages.items import Candidate, Result
from stages.vote import tally

KEEPS = (0.9, 0.5, 0.1)


def stop_point(rows: Sequence[Sequence[float]], window: int, threshold: float) -> int | None:
    """How many tokens a sample keeps under ``threshold``, from its recorded top-k rows, counted as a
    backend's watch counts them (``None``: it is not stopped)."""
    watch = ConfidenceWatch(ConfidenceTrack(window), ConfidenceGate(fixed=threshold))
    for i, row in enumerate(rows):
        if watch.feed(row):
            return i + 1
    return None


def _stopped(c: Candidate, keep: int) -> Candidate:
    g = c.generation
    return Candidate(replace(g, new_tokens=keep, finish_reason="confidence"), None, None, LOW_CONFIDENCE)


def simulate(
    cands: Sequence[Candidate],
    rows_of: dict[int, Sequence[Sequence[float]]],
    cfg: Config,
    threshold: float | None,
    warmup: int,
    keep: float,
) -> tuple[list[Candidate], int, int]:
    """One problem's samples as an online stop would have left them (stopped ones without an answer),
    the tokens kept and the samples stopped; ``rows_of`` each sample's recorded top-k rows by index.
    ``threshold`` ``None``: set from the first ``warmup``."""
    window = cfg.vote.deepconf_window
    order = sorted(cands, key=lambda c: c.generation.index)
    first: set[int] = set()
    if threshold is None:
        gate = ConfidenceGate(warmup=warmup, keep=keep)
        for c in order[:warmup]:
            track = ConfidenceTrack(window)
            for row in rows_of.get(c.generation.index, ()):
                track.feed(row)
            gate.finished(track)
            first.add(c.generation.index)
        threshold = gate.threshold
    out, tokens, stopped = [], 0, 0
    for c in order:
        rows = rows_of.get(c.generation.index)
        n = None
        if threshold is not None and rows and c.generation.index not in first:
            n = stop_point(rows, window, threshold)
        if n is None:
            out.append(c)
            tokens += c.generation.new_tokens
        else:
            out.append(_stopped(c, n))
            tokens += n
            stopped += 1
    return out, tokens, stopped


def sweep(
    results: Sequence[Result],
    cands_of: dict[str, list[Candidate]],
    rows_of: dict[str, dict[int, Sequence[Sequence[float]]]],
    cfg: Config,
) -> dict[str, Any]:
    """The online stop's rows (see the module), or what is missing; ``rows_of`` the recorded top-k rows
    by problem and sample index."""
    if not any(c.generation.confidences for cs in cands_of.values() for c in cs):
        return {"needs": "--record with --top-logprobs (the token confidences)"}
    n = max((len(cs) for cs in cands_of.values()), default=0)
    v = cfg.vote
    warmup = v.deepconf_warmup or max(1, math.ceil(n / 4))
    settings: list[tuple[str, float | None, float]] = [
        (f"keep {k:g}, warmup {warmup}", None, k) for k in sorted({*KEEPS, v.deepconf_keep}, reverse=True)
    ]
    if v.deepconf_stop is not None:
        settings.append((f"fixed {v.deepconf_stop:g}", v.deepconf_stop, v.deepconf_keep))
    full = sum(c.generation.new_tokens for cs in cands_of.values() for c in cs)
    rows = [_row("no online stop", results, cands_of, rows_of, cfg, None, 0, 1.0, full)]
    rows += [_row(name, results, cands_of, rows_of, cfg, t, warmup, k, full) for name, t, k in settings]
    return {"window": v.deepconf_window, "warmup": warmup, "rule": v.rule, "rows": rows}


def _row(
    name: str,
    results: Sequence[Result],
    cands_of: dict[str, list[Candidate]],
    rows_of: dict[str, dict[int, Sequence[Sequence[float]]]],
    cfg: Config,
    threshold: float | None,
    warmup: int,
    keep: float,
    full: int,
) -> dict[str, Any]:
    hits: list[float] = []
    tokens = stopped = 0
    answers: dict[str, int | None] = {}
    for r in results:
        cs = cands_of.get(r.id or "")
        if not cs:
            continue
        if name == "no online stop":
            left, used, cut = list(cs), sum(c.generation.new_tokens for c in cs), 0
        else:
            left, used, cut = simulate(cs, rows_of.get(r.id or "", {}), cfg, threshold, warmup, keep)
        tokens += used
        stopped += cut
        winner = tally(left, cfg.vote).winner
        answers[r.id or ""] = winner if winner is not None else cfg.answer.fallback
        if r.gold is not None:
            hits.append(float(answers[r.id or ""] == r.gold))
    return {
        "setting": name,
        "keep": keep if name != "no online stop" else None,
        "threshold": threshold,
        "accuracy": round(math.fsum(hits) / len(hits), 6) if hits else None,
        "tokens": tokens,
        "saved": round(1 - tokens / full, 6) if full else None,
        "stopped": stopped,
        "answers": answers,
    }
