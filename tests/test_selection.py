"""The selection rules: top-k token entropy, the entropy weight of the AIMO 3 winners, the second
place's score; each on candidates whose right answer is worked out by hand, and the entropy rule
through the whole pipeline on recorded top-k log-probabilities."""

from __future__ import annotations

import json
import math

import anyio
import pytest

from pipeline.api import Pipeline
from pipeline.config import Config, ConfigError, VoteConfig
from pipeline.items import Candidate, Encoded, Generation, Job, Problem
from stages.backends.replay import ReplayBackend
from stages.selection import sample_entropy, scores, token_entropy
from stages.vote import decided, vote
from tests.conftest import small_config

ENC = Encoded(job=Job(problem=Problem(id="p", text="x"), key="k", serial=1), prompt_ids=(1,))
SURE = (math.log(0.97), math.log(0.01), math.log(0.01))  # a confident token
UNSURE = (math.log(0.3), math.log(0.3), math.log(0.2))


def cand(index: int, answer: int | None, entropies=None, of: int = 8) -> Candidate:
    g = Generation(encoded=ENC, index=index, text="", new_tokens=1, of=of, entropies=entropies)
    return Candidate(generation=g, answer=answer, extracted=None)


def test_token_entropy_is_in_bits_over_the_top_k_unrenormalised():
    assert token_entropy([math.log(0.5), math.log(0.5)]) == pytest.approx(1.0)
    assert token_entropy([0.0]) == pytest.approx(0.0)
    by_hand = -(0.3 * math.log2(0.3) * 2 + 0.2 * math.log2(0.2))
    assert token_entropy(UNSURE) == pytest.approx(by_hand)


def test_a_samples_entropy_over_its_tail_mean_or_median():
    e = [4.0, 4.0, 1.0, 2.0, 9.0]
    assert sample_entropy(e) == pytest.approx(4.0)
    assert sample_entropy(e, last=3) == pytest.approx(4.0)
    assert sample_entropy(e, last=2) == pytest.approx(5.5)
    assert sample_entropy(e, stat="median") == 4.0 and sample_entropy(e, last=3, stat="median") == 2.0
    assert sample_entropy([]) is None


def test_the_entropy_weight_lets_one_sure_sample_beat_two_unsure_ones():
    sure, unsure = token_entropy(SURE), token_entropy(UNSURE)
    votes = [cand(0, 1, (unsure,) * 4), cand(1, 1, (unsure,) * 4), cand(2, 7, (sure,) * 4)]
    cfg = VoteConfig(rule="entropy")
    s = scores(votes, cfg)
    assert s[1] == pytest.approx(2 / unsure) and s[7] == pytest.approx(1 / sure)
    assert vote(votes, cfg)[0] == 7  # 1/0.22 bits > 2/1.57 bits
    assert vote(votes, VoteConfig(rule="majority"))[0] == 1
    # over the last token only, the sure sample ends unsure: the two agreeing samples win again
    tail = [cand(0, 1, (unsure,) * 4), cand(1, 1, (unsure,) * 4), cand(2, 7, (sure, sure, sure, unsure))]
    assert vote(tail, VoteConfig(rule="entropy", entropy_tokens=1))[0] == 1
    assert vote(tail, VoteConfig(rule="entropy"))[0] == 7


def test_the_second_places_score_by_hand():
    h1, h7 = 2.0, 0.5
    votes = [cand(0, 1, (h1,)), cand(1, 1, (h1,)), cand(2, 1, (h1,)), cand(3, 7, (h7,)), cand(4, 7, (h7,))]
    s = scores(votes, VoteConfig(rule="aimo3-second"))
    assert s[1] == pytest.approx(3 / 5 * 3.0 + (1 / h1) * 0.1 + 0.3)  # 2.15: the majority bonus
    assert s[7] == pytest.approx(2 / 5 * 3.0 + (1 / h7) * 0.1)  # 1.40
    assert vote(votes, VoteConfig(rule="aimo3-second"))[0] == 1


def test_unbounded_weights_decide_early_only_by_agreement():
    sure = (token_entropy(SURE),)
    votes = [cand(0, 3, sure), cand(1, 3, sure), cand(2, 3, sure)]
    assert not decided(votes, 8, VoteConfig(rule="entropy", early_stop=4))  # a lead proves nothing
    assert decided([*votes, cand(3, 3, sure)], 8, VoteConfig(rule="entropy", early_stop=4))
    assert decided(votes, 4, VoteConfig(rule="majority", early_stop=None)) is False
    assert decided(votes, 4, VoteConfig(rule="majority", early_stop=8))  # 3 - 0 > 1 sample left


def test_an_entropy_rule_without_top_logprobs_is_a_clear_error():
    with pytest.raises(ConfigError, match="top_logprobs"):
        Config.from_dict({"vote": {"rule": "entropy"}})
    Config.from_dict({"vote": {"rule": "entropy"}, "generation": {"top_logprobs": 5}})


@pytest.mark.anyio
async def test_the_entropy_rule_reads_the_recorded_top_k_through_the_pipeline(tmp_path):
    def rec(sample: int, answer: int, top) -> dict:
        text = f"so \\boxed{{{answer}}}"
        n = len(text.split())
        return {"id": "p", "sample": sample, "text": text, "top_logprobs": [list(top)] * n}

    records = [rec(0, 1, UNSURE), rec(1, 1, UNSURE), rec(2, 7, SURE)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    answers = {}
    for rule in ("majority", "entropy"):
        cfg = small_config(
            generation={"samples": 3, "top_logprobs": 3}, vote={"rule": rule}, cache={"size": 0}
        )
        async with Pipeline(cfg, backend=ReplayBackend.load(path)) as p:
            with anyio.fail_after(60):
                answers[rule] = (await p.solve({"id": "p", "problem": "?"})).answer
    assert answers == {"majority": 1, "entropy": 7}
