"""The estimators against brute force on small cases."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from stages import estimators
from stages.estimators import majority_at_k, mean_spread, pass_at_1_averaged, pass_at_k, vote_of


def brute_pass(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def brute_majority(answers: list[int | None], gold: int, k: int) -> float:
    subsets = list(itertools.combinations(range(len(answers)), k))
    hits = 0
    for s in subsets:
        sub = [answers[i] for i in s]
        valid = [a for a in sub if a is not None]
        if not valid:
            continue
        best = max(valid.count(a) for a in set(valid))
        winner = next(a for a in sub if a is not None and valid.count(a) == best)  # earliest of the best
        hits += winner == gold
    return hits / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_is_brute_force(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass(correct, k))


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_majority_at_k_is_brute_force_on_random_small_cases():
    rng = random.Random(7)
    for _ in range(150):
        n = rng.randint(1, 7)
        answers = [rng.choice([1, 2, 3, None]) for _ in range(n)]
        for k in range(1, n + 1):
            assert majority_at_k(answers, 1, k) == pytest.approx(brute_majority(answers, 1, k)), (answers, k)


def test_majority_ties_go_to_the_earliest_sample_as_the_vote_does():
    assert vote_of([2, 1, 1, 2]) == 2
    assert vote_of([None, 1, 2]) == 1
    assert vote_of([None, None]) is None
    # k=2 of [1, 2]: the only subset ties 1-1, the earlier sample (answer 1) wins
    assert majority_at_k([1, 2], 1, 2) == 1.0
    assert majority_at_k([1, 2], 2, 2) == 0.0
    assert majority_at_k([1, 2], 2, 1) == 0.5


def test_majority_at_k_past_the_cap_is_a_fixed_seed_estimate_close_to_exact(monkeypatch):
    answers = [1, 2, 1, 3, 2, 1, None, 2, 1, 3]
    exact = majority_at_k(answers, 1, 5)
    monkeypatch.setattr(estimators, "ENUMERATION_CAP", 10)
    estimate = majority_at_k(answers, 1, 5)
    assert estimate == majority_at_k(answers, 1, 5)  # the same on every call
    assert abs(estimate - exact) < 0.04


def test_majority_without_gold_or_without_the_gold_answer_is_zero():
    assert majority_at_k([1, 1], None, 1) == 0.0
    assert majority_at_k([1, 1], 5, 2) == 0.0
    assert majority_at_k([5, 5, 5], 5, 2) == 1.0


def test_spread_and_pass_at_1_averaged():
    s = mean_spread([1.0, 0.0, 1.0, 0.0])
    assert s.mean == 0.5
    assert s.std == pytest.approx(math.sqrt(1 / 3))
    assert 0.0 <= s.lo <= s.mean <= s.hi <= 1.0
    assert mean_spread([0.25]).std == 0.0
    assert math.isnan(mean_spread([]).mean)
    assert pass_at_1_averaged([(4, 1), (4, 3)]).mean == pytest.approx(0.5)
