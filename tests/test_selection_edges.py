"""The selection rules against a buggy server's log-probabilities (NaN, -inf, positive values, empty
top-k rows) and against degenerate votes (no answer, one sample, ties): no exception, a deterministic
winner that does not depend on the order samples are listed in, and a value that is not a
probability never makes a sample count for more."""

from __future__ import annotations

import math

import anyio
import pytest

from pipeline.api import Pipeline
from pipeline.config import VoteConfig
from stages.selection import confidence, scores, token_entropy
from stages.vote import decided, vote
from tests.conftest import small_config, write_replay
from tests.test_selection import SURE, UNSURE, cand

NAN, INF = float("nan"), float("inf")


def test_a_zero_probability_in_the_top_k_adds_nothing_to_the_entropy():
    # vLLM can report -inf for a masked token (and this backend maps a missing log-prob to -inf)
    h = token_entropy([math.log(0.5), math.log(0.5), -INF])
    assert h == pytest.approx(1.0)  # today: nan (0 * -inf)


def test_a_token_entropy_is_never_negative_even_for_a_log_prob_above_zero():
    assert token_entropy([0.5, -1.0]) >= 0.0  # today: about -1.6 bits


def test_one_bogus_positive_log_prob_does_not_make_a_sample_outvote_all_the_others():
    unsure = token_entropy(UNSURE)
    bogus = [token_entropy([5.0, -1.0])] + [unsure] * 99  # one broken row among 99 unsure ones
    votes = [cand(0, 1, tuple(bogus))] + [cand(i, 2, (unsure,) * 100) for i in range(1, 4)]
    assert vote(votes, VoteConfig(rule="entropy"))[0] == 2  # today: 1 (weight 1e9)


@pytest.mark.parametrize("rule", ["entropy", "aimo3-second"])
def test_a_nan_entropy_never_wins_by_coming_first(rule):
    sure = token_entropy(SURE)
    nan_first = [cand(0, 1, (NAN, NAN)), cand(1, 2, (sure, sure))]
    nan_last = [cand(0, 2, (sure, sure)), cand(1, 1, (NAN, NAN))]
    cfg = VoteConfig(rule=rule)
    for votes in (nan_first, nan_last):
        s = scores(votes, cfg)
        assert all(not math.isnan(v) for v in s.values()), s
        assert vote(votes, cfg)[0] == 2, (votes, s)


def test_a_nan_log_prob_does_not_raise_a_samples_confidence():
    assert confidence([-0.5, NAN]) <= confidence([-0.5]) + 1e-9  # today: 10.0, the most there is


def test_no_answer_at_all_one_sample_and_a_single_answer_under_every_rule():
    for rule in ("code", "majority", "entropy", "aimo3-second"):
        cfg = VoteConfig(rule=rule, early_stop=2)
        assert vote([cand(0, None), cand(1, None, ())], cfg) == (None, {})
        assert not decided([cand(0, None)], 8, cfg)
        assert vote([cand(0, 5)], cfg) == (5, {5: 1})
        assert vote([cand(0, 5, ()), cand(1, 5, (0.3,))], cfg) == (5, {5: 2})


@pytest.mark.parametrize("rule", ["entropy", "aimo3-second"])
def test_ties_are_decided_by_samples_then_the_first_index_whatever_the_order(rule):
    e = (token_entropy(UNSURE),)
    votes = [cand(3, 9, e), cand(1, 4, e), cand(2, 9, e), cand(0, 4, e)]
    cfg = VoteConfig(rule=rule)
    assert vote(votes, cfg)[0] == vote(list(reversed(votes)), cfg)[0] == 4


def test_decided_with_an_entropy_rule_stops_on_agreement_only():
    sure = (token_entropy(SURE),)
    cfg = VoteConfig(rule="entropy", early_stop=3)
    assert not decided([cand(0, 1, sure), cand(1, 1, sure)], 8, cfg)  # a huge lead is not agreement
    assert decided([cand(0, 1, sure), cand(1, 1, (NAN,)), cand(2, 1, ())], 8, cfg)
    assert not decided([cand(i, 1, sure) for i in range(3)], 3, cfg)  # all in: not early


@pytest.mark.anyio
async def test_empty_top_k_rows_from_a_server_do_not_count_as_certainty(tmp_path):
    # a server that sends no top log-probs for its tokens (empty rows): that sample knows nothing of
    # its entropy and must not outweigh two samples whose entropy is known
    def rec(sample: int, answer: int, rows: list) -> dict:
        return {"id": "p", "sample": sample, "text": f"\\boxed{{{answer}}}", "top_logprobs": rows}

    records = [rec(0, 1, [[], [], []]), rec(1, 2, [list(UNSURE)] * 3), rec(2, 2, [list(UNSURE)] * 3)]
    cfg = small_config(
        generation={"samples": 3, "top_logprobs": 3}, vote={"rule": "entropy"}, cache={"size": 0}
    )
    from stages.backends.replay import ReplayBackend

    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(60):
            out = [r async for r in p.stream([{"id": "p", "problem": "?"}])]
    assert out[0].answer == 2, out[0]  # today: 1 (the empty rows are entropy 0, weight 1e9)
