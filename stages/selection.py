"""Selection rules: how much each sample's answer counts, from what the sample carries.

A rule answers one question per problem: the score of each answer, given the valid samples (their
answer, index, whether their code ran cleanly, their token log-probabilities and their per-token
entropies). Most rules are a weight per sample summed per answer; ``aimo3-second`` scores answers
as a whole. ``stages/vote.py`` ranks answers by these scores.

Token entropy here is over the top-k log-probabilities the backend returned (``top_logprobs`` k), in
bits, as the AIMO 3 recipe computes it: ``-sum(p * log2 p)`` over the k, not renormalised.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from stages.items import Candidate
from stages.vote_config import VoteConfig

MAX_CONFIDENCE = 10.0  # 1 / (0 + 0.1): the most one sample's confidence can multiply its weight by
ENTROPY_FLOOR = 1e-9


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


def _entropy_of(c: Candidate, cfg: VoteConfig, stat: str) -> float | None:
    e = c.generation.entropies
    return sample_entropy(e, cfg.entropy_tokens, stat) if e else None


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


Rule = Callable[[Sequence[Candidate], VoteConfig], dict[int, float]]
RULES: dict[str, Rule] = {
    "code": _summed,
    "majority": _summed,
    "entropy": _summed,
    "aimo3-second": _aimo3_second,
}


def scores(candidates: Sequence[Candidate], cfg: VoteConfig) -> dict[int, float]:
    """Each valid answer's score under ``cfg.rule``."""
    return RULES[cfg.rule](candidates, cfg)
