"""Unbiased accuracy estimators over a problem's ``n`` samples: pass@k, majority@k, pass@1 averaged.

``pass_at_k(n, c, k)`` is Chen et al. (2021)'s unbiased estimator of the chance that at least one of
``k`` samples drawn without replacement from the ``n`` is correct: ``1 - C(n-c, k) / C(n, k)``.

``majority_at_k(answers, gold, k)`` is the expected accuracy of the majority vote over a uniformly
drawn size-``k`` subset of the ``n`` samples (``None`` answers never win; a subset with no answer is
wrong). Ties break as ``stages/vote.py`` breaks them under the ``majority`` rule: more samples first,
then the answer whose first sample (lowest sample index within the subset) comes first. Exact: every
subset is enumerated while there are at most ``ENUMERATION_CAP`` of them; past that the estimate is
the mean over ``MC_DRAWS`` uniformly drawn subsets from a generator with a fixed seed (an unbiased
estimate, the same on every call). ``answers`` are in sample-index order.

Across problems: ``mean_spread`` gives the mean, the standard deviation over problems and a
percentile bootstrap 95% interval of the mean (fixed seed).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ENUMERATION_CAP = 5000  # subsets enumerated exactly per (problem, k); above: Monte-Carlo
MC_DRAWS = 2000
SEED = 0
BOOTSTRAP = 1000


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that some of ``k`` of the ``n`` samples (``c`` correct) is.

    Raises:
        ValueError: not ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # the product form of C(n-c, k) / C(n, k), stable for large n
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def vote_of(answers: Sequence[int | None]) -> int | None:
    """The majority answer of ``answers`` (in sample order): most samples, then the earliest first."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for i, a in enumerate(answers):
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
            first.setdefault(a, i)
    if not counts:
        return None
    return min(counts, key=lambda a: (-counts[a], first[a]))


def majority_at_k(answers: Sequence[int | None], gold: int | None, k: int) -> float:
    """The expected accuracy of the majority vote of ``k`` of the samples' ``answers`` (see module).

    Raises:
        ValueError: not ``1 <= k <= len(answers)``.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"majority@k needs 1 <= k <= n (n={n}, k={k})")
    if gold is None or gold not in answers:
        return 0.0
    if all(a == gold for a in answers):
        return 1.0
    subsets: Iterable[Sequence[int]]
    if math.comb(n, k) <= ENUMERATION_CAP:
        subsets, total = itertools.combinations(range(n), k), math.comb(n, k)
    else:
        rng = random.Random(SEED)
        subsets, total = (sorted(rng.sample(range(n), k)) for _ in range(MC_DRAWS)), MC_DRAWS
    right = sum(1 for s in subsets if vote_of([answers[i] for i in s]) == gold)
    return right / total


@dataclass(frozen=True)
class Spread:
    """A mean over problems with its spread: standard deviation over problems, bootstrap 95% interval."""

    mean: float
    std: float
    lo: float
    hi: float

    def to_json(self) -> dict[str, float]:
        """As a JSON object, rounded to 6 places."""
        return {k: round(v, 6) for k, v in vars(self).items()}


def mean_spread(values: Sequence[float], *, resamples: int = BOOTSTRAP, seed: int = SEED) -> Spread:
    """The mean of per-problem ``values``, their standard deviation (0 for one value) and a percentile
    bootstrap 95% interval of the mean (``resamples`` resamples, fixed ``seed``)."""
    if not values:
        return Spread(math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    rng = random.Random(seed)
    n = len(values)
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    lo = means[int(0.025 * (resamples - 1))]
    hi = means[math.ceil(0.975 * (resamples - 1))]
    return Spread(mean, std, lo, hi)


def pass_at_1_averaged(n_correct: Sequence[tuple[int, int]]) -> Spread:
    """The mean over problems of each problem's share of correct samples (``(n, c)`` per problem)."""
    return mean_spread([c / n for n, c in n_correct if n > 0])
