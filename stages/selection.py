"""Selection rules: how much each sample's answer counts, from what the sample carries.

A rule answers one question per problem: the score of each answer, given the valid samples (their
answer, index, whether their code ran cleanly, their token log-probabilities and their per-token
entropies). Most rules are a weight per sample summed per answer; ``aimo3-second`` scores answers
as a whole. ``stages/vote.py`` ranks answers by these scores.

Token entropy here is over the top-k log-probabilities the backend returned (``top_logprobs`` k), in
bits, as the AIMO 3 recipe computes it: ``-sum(p * log2 p)`` over the k, not renormalised.

DeepConf (arXiv 2508.15260, "offline" weighted majority voting): a token's confidence is minus the mean
of its top-k log-probabilities (``token_confidence``); a group's the mean over a sliding window of
``vote.deepconf_window`` tokens (2048; a sample shorter than the window is one group); a sample's
``lowest`` the least group confidence, ``bottom10`` the mean of its lowest 10% groups (at least one),
``tail`` the mean over its last window of tokens (``deepconf_stats``). The rules ``deepconf-lowest``,
``deepconf-bottom10`` and ``deepconf-tail`` keep a problem's most confident samples (top-eta: those at or
above the ``(1 - vote.deepconf_keep)`` percentile of the problem's confidences, linear interpolation
as numpy's, so 0.9 drops about the least confident tenth and 0.1 keeps about the top tenth), then sum
each kept sample's confidence per answer. The token confidences come from ``generation.confidences``
when the generation carries them (a replayed record's, see ``pipeline/report.py``); a problem none of
whose samples has any is voted by majority.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from stages.items import Candidate
from stages.vote_config import VoteConfig

MAX_CONFIDENCE = 10.0  # 1 / (0 + 0.1): the most one sample's confidence can multiply its weight by
ENTROPY_FLOOR = 1e-9
Rule = Callable[[Sequence[Candidate], VoteConfig], dict[int, float]]


def token_entropy(top: Sequence[float]) -> float | None:
    """One token's entropy in bits over its top-k log-probabilities (natural log); ``None`` for a row
    with no finite value. A log-probability of ``-inf`` adds nothing, one above 0 (a broken server)
    counts as 0, so the entropy is never negative or NaN."""
    finite = [min(lp, 0.0) for lp in top if math.isfinite(lp)]
    if not finite:
        return None
    return max(0.0, -math.fsum(math.exp(lp) * lp for lp in finite) / math.log(2))


def sample_entropy(entropies: Sequence[float], last: int | None = None, stat: str = "mean") -> float | None:
    """A sample's entropy: the mean (or median) of its tokens' entropies, over its last ``last``
    tokens (``None``: all); ``None`` when it has none."""
    tail = [h for h in (entropies[-last:] if last else entropies) if math.isfinite(h)]
    if not tail:
        return None
    return statistics.median(tail) if stat == "median" else math.fsum(tail) / len(tail)


def confidence(logprobs: Sequence[float]) -> float:
    """1 / (mean surprisal + 0.1). The mean surprisal of the tokens a sample drew, minus their mean
    log-probability, is a sampled estimate of its mean token entropy: low when the model was sure."""
    finite = [lp for lp in logprobs if math.isfinite(lp)]
    if not finite:
        return 1.0
    surprisal = -sum(finite) / len(finite)
    return 1.0 / (max(0.0, surprisal) + 0.1)


LOGPROB_FLOOR = -1e4  # a finite log-probability below this (a broken server's) counts as this


def token_confidence(top: Sequence[float]) -> float | None:
    """DeepConf's token confidence: minus the mean of the token's finite top-k log-probabilities (each
    at most 0, at least ``LOGPROB_FLOOR``); ``None`` for a row with no finite value."""
    finite = [min(max(lp, LOGPROB_FLOOR), 0.0) for lp in top if math.isfinite(lp)]
    return -math.fsum(finite) / len(finite) if finite else None


def group_confidences(confidences: Sequence[float], window: int) -> list[float]:
    """The mean confidence of each ``window``-token sliding window (one group when shorter)."""
    c = [x for x in confidences if math.isfinite(x)]
    if not c:
        return []
    if len(c) <= window:
        return [math.fsum(c) / len(c)]
    out, run = [], math.fsum(c[:window])
    out.append(run / window)
    for i in range(window, len(c)):
        run += c[i] - c[i - window]
        out.append(run / window)
    return out


DEEPCONF_STATS = ("mean", "lowest", "bottom10", "tail")


_MEMO: dict[tuple[int, Any], tuple[object, Any]] | None = None  # on inside memoised() only


@contextlib.contextmanager
def memoised() -> Iterator[None]:
    """Inside: a sample's figures from its per-token rows are computed once per row sequence (by
    identity; the cache holds the sequence, so its id is not reused), for re-scoring a run thousands of
    times (``pipeline/report_data.py``). Outside (a live vote) nothing is kept. Not thread-safe."""
    global _MEMO
    outer = _MEMO
    _MEMO = {} if outer is None else outer
    try:
        yield
    finally:
        _MEMO = outer


def _memo(obj: object, key: Any, compute: Callable[[], Any]) -> Any:
    if _MEMO is None:
        return compute()
    k = (id(obj), key)
    hit = _MEMO.get(k)
    if hit is not None and hit[0] is obj:
        return hit[1]
    value = compute()
    _MEMO[k] = (obj, value)
    return value


def deepconf_stats(confidences: Sequence[float], window: int = 2048) -> dict[str, float] | None:
    """A sample's confidence figures (``DEEPCONF_STATS``) from its token confidences; ``None`` without any
    (inside ``memoised()``, once per sequence object)."""
    figures: dict[str, float] | None = _memo(
        confidences, ("deepconf", window), lambda: _deepconf_stats(confidences, window)
    )
    return figures


def _deepconf_stats(confidences: Sequence[float], window: int) -> dict[str, float] | None:
    groups = group_confidences(confidences, window)
    if not groups:
        return None
    c = [x for x in confidences if math.isfinite(x)]
    low = sorted(groups)[: max(1, len(groups) // 10)]
    tail = c[-window:]
    return {
        "mean": math.fsum(c) / len(c),
        "lowest": low[0],
        "bottom10": math.fsum(low) / len(low),
        "tail": math.fsum(tail) / len(tail),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation (numpy's default)."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def confidences_of(c: Candidate) -> Sequence[float] | None:
    """The sample's per-token DeepConf confidences, when its generation carries them."""
    return c.generation.confidences


def _deepconf(stat: str) -> Rule:
    def rule(candidates: Sequence[Candidate], cfg: VoteConfig) -> dict[int, float]:
        scored: list[tuple[Candidate, float]] = []
        for c in candidates:
            conf = confidences_of(c)
            figures = deepconf_stats(conf, cfg.deepconf_window) if conf else None
            if c.answer is not None and figures is not None:
                scored.append((c, figures[stat]))
        if not scored:
            return _summed(candidates, VoteConfig(rule="majority"))
        threshold = percentile([w for _, w in scored], (1.0 - cfg.deepconf_keep) * 100.0)
        kept = [(c, w) for c, w in scored if w >= threshold]
        totals: dict[int, list[float]] = {}
        for c, w in sorted(kept, key=lambda cw: cw[0].generation.index):
            assert c.answer is not None
            totals.setdefault(c.answer, []).append(w)
        return {a: math.fsum(ws) for a, ws in totals.items()}

    return rule


def _entropy_of(c: Candidate, cfg: VoteConfig, stat: str) -> float | None:
    e = c.generation.entropies
    if not e:
        return None
    h: float | None = _memo(
        e, ("entropy", cfg.entropy_tokens, stat), lambda: sample_entropy(e, cfg.entropy_tokens, stat)
    )
    return h


def weight(c: Candidate, cfg: VoteConfig) -> float:
    """The weight of one sample's answer under the weight rules (``code``, ``majority``, ``entropy``)."""
    if cfg.rule == "majority":
        return 1.0
    if cfg.rule == "entropy":
        h = _entropy_of(c, cfg, cfg.entropy_stat)
        return 1.0 if h is None else 1.0 / max(h, ENTROPY_FLOOR)
    g = c.generation
    w = cfg.code_weight if g.clean_code else 1.0
    if cfg.confidence and g.logprobs:
        w *= confidence(g.logprobs)
    return w


def max_weight(cfg: VoteConfig) -> float | None:
    """The most one more sample can add to an answer's score, or ``None`` when unbounded."""
    if cfg.rule == "majority":
        return 1.0
    if cfg.rule == "code":
        return max(1.0, cfg.code_weight) * (MAX_CONFIDENCE if cfg.confidence else 1.0)
    return None


def _by_answer(candidates: Sequence[Candidate]) -> dict[int, list[Candidate]]:
    groups: dict[int, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: c.generation.index):  # sums in sample order
        if c.answer is not None:
            groups.setdefault(c.answer, []).append(c)
    return groups


def _summed(candidates: Sequence[Candidate], cfg: VoteConfig) -> dict[int, float]:
    return {a: math.fsum(weight(c, cfg) for c in cs) for a, cs in _by_answer(candidates).items()}


def _aimo3_second(candidates: Sequence[Candidate], cfg: VoteConfig) -> dict[int, float]:
    groups = _by_answer(candidates)
    total = sum(len(cs) for cs in groups.values())
    scores = {}
    for a, cs in groups.items():
        share = len(cs) / total
        hs = [h for c in cs if (h := _entropy_of(c, cfg, "mean")) is not None]
        confident = 1.0 / max(statistics.median(hs), ENTROPY_FLOOR) if hs else 0.0
        scores[a] = share * 3.0 + confident * 0.1 + (0.3 if share > 0.5 else 0.0)
    return scores


RULES: dict[str, Rule] = {
    "code": _summed,
    "majority": _summed,
    "entropy": _summed,
    "aimo3-second": _aimo3_second,
    "deepconf-lowest": _deepconf("lowest"),
    "deepconf-bottom10": _deepconf("bottom10"),
    "deepconf-tail": _deepconf("tail"),
}


def scores(candidates: Sequence[Candidate], cfg: VoteConfig) -> dict[int, float]:
    """Each valid answer's score under ``cfg.rule``."""
    return RULES[cfg.rule](candidates, cfg)
