"""The vectorised per-row sampler: each row's temperature, min-p, top-p and seed, whatever its batch."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from stages.backends.base import SamplingParams
from stages.backends.token_rules import NUCLEUS_K, RowState, pick_tokens

torch = pytest.importorskip("torch")


def _rows(n: int, **params: object) -> list[RowState]:
    made = (SamplingParams(max_new_tokens=4, greedy=False, seed=s, **params) for s in range(n))  # type: ignore[arg-type]
    return [RowState(p, "cpu") for p in made]


def _draw(logits: list[float], n: int, **params: object) -> Counter[int]:
    scores = torch.tensor([logits] * n)
    return Counter(pick_tokens(scores, _rows(n, **params)))


def _expected(logits: list[float], temperature: float, top_p: float = 1.0, min_p: float = 0.0) -> list[float]:
    p = torch.softmax(torch.tensor(logits) / temperature, dim=-1)
    if min_p > 0:
        p = torch.where(p < min_p * p.max(), 0.0, p)
        p = p / p.sum()
    order = torch.argsort(p, descending=True)
    sorted_p = p[order]
    kept = torch.where(torch.cumsum(sorted_p, 0) - sorted_p > top_p, 0.0, sorted_p)
    out = torch.zeros_like(p)
    out[order] = kept / kept.sum()
    return out.tolist()


def _close(counts: Counter[int], expected: list[float], n: int) -> None:
    for token, prob in enumerate(expected):
        if prob == 0:
            assert counts[token] == 0, token
        else:  # within 5 standard deviations of a binomial count
            assert abs(counts[token] - n * prob) <= 5 * math.sqrt(n * prob * (1 - prob)) + 1, token


def test_top_p_inside_the_first_k_tokens_draws_the_nucleus_in_proportion():
    logits = [4.0, 3.0, 2.5, 2.0, 1.0] + [-5.0] * 200
    counts = _draw(logits, 4000, temperature=1.0, top_p=0.8)
    _close(counts, _expected(logits, 1.0, top_p=0.8), 4000)


def test_a_nucleus_wider_than_k_tokens_is_sorted_whole():
    logits = [0.0] * (3 * NUCLEUS_K)  # flat: the 0.9 nucleus holds about 173 tokens, beyond the first 64
    counts = _draw(logits, 6000, temperature=1.0, top_p=0.9)
    nucleus = math.floor(0.9 * 3 * NUCLEUS_K) + 1  # kept while the mass before a token is <= 0.9
    assert NUCLEUS_K + 40 < len(counts) <= nucleus


def test_min_p_then_temperature_and_no_nucleus():
    logits = [2.0, 1.5, 1.0, -1.0, -3.0]
    counts = _draw(logits, 4000, temperature=0.7, min_p=0.1)
    _close(counts, _expected(logits, 0.7, min_p=0.1), 4000)


def test_a_seeded_row_draws_the_same_token_alone_or_batched_with_other_settings():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(3))
    alone = [RowState(SamplingParams(max_new_tokens=9, greedy=False, seed=7, top_p=0.9), "cpu")]
    mine = [pick_tokens(logits, alone)[0] for _ in range(8)]
    again = RowState(SamplingParams(max_new_tokens=9, greedy=False, seed=7, top_p=0.9), "cpu")
    others = [
        RowState(SamplingParams(max_new_tokens=9), "cpu"),  # greedy
        RowState(SamplingParams(max_new_tokens=9, greedy=False, seed=1, temperature=2.0, min_p=0.2), "cpu"),
        again,
    ]
    batched = torch.cat([torch.randn(2, 500), logits])
    seen = [pick_tokens(batched, others)[2] for _ in range(8)]
    assert seen == mine and again.new == mine


def test_finished_and_absent_rows_take_the_arg_max_and_record_nothing():
    scores = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    done = _rows(1, temperature=1.0)[0]
    done.finished = True
    assert pick_tokens(scores, [None, done]) == [1, 0]
    assert done.new == []
