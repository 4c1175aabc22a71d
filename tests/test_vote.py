"""The vote: weights, confidence, deterministic ties, early-stop decisions; the time planner; the
prompt styles' text rules."""

from __future__ import annotations

import pytest

from pipeline.budget import TimePlanner
from pipeline.config import VoteConfig
from pipeline.items import Candidate, Encoded, Generation, Job, Problem
from stages.prompting import Tir, answer_end
from stages.vote import confidence, decided, tally, vote

ENC = Encoded(job=Job(problem=Problem(id="p", text="x"), key="k", serial=1), prompt_ids=(1,))


def cand(index: int, answer: int | None, *, cells: int = 0, clean: int = 0, logprobs=None, of: int = 8):
    g = Generation(
        encoded=ENC,
        index=index,
        text="",
        new_tokens=1,
        cells=cells,
        clean_cells=clean,
        logprobs=logprobs,
        of=of,
    )
    return Candidate(generation=g, answer=answer, extracted=None)


def test_ties_break_by_samples_then_the_lowest_first_index_whatever_the_arrival_order():
    a = [cand(3, 7), cand(1, 9), cand(2, 7), cand(0, 9)]
    assert vote(a) == vote(list(reversed(a))) == (9, {9: 2, 7: 2})


def test_clean_code_outweighs_plain_reasoning_and_code_with_errors_does_not():
    cfg = VoteConfig(code_weight=2.0)
    votes = [cand(0, 1), cand(1, 1), cand(2, 5, cells=2, clean=2)]
    assert tally(votes, cfg).weights == {1: 2.0, 5: 2.0}
    assert vote(votes, cfg)[0] == 1  # equal weight: more samples win
    votes.append(cand(3, 5, cells=1, clean=1))
    assert vote(votes, cfg)[0] == 5
    failing = [cand(0, 1), cand(1, 1), cand(2, 5, cells=2, clean=1), cand(3, 5, cells=1, clean=0)]
    assert vote(failing, cfg)[0] == 1  # a cell raised: plain weight


def test_confidence_weights_follow_the_mean_surprisal():
    sure, unsure = confidence([-0.01, -0.01]), confidence([-2.0, -3.0])
    assert sure > 9 and unsure < 0.5 and confidence([]) == 1.0
    cfg = VoteConfig(confidence=True)
    votes = [
        cand(0, 1, logprobs=(-2.5, -2.5)),
        cand(1, 1, logprobs=(-2.5, -2.5)),
        cand(2, 4, logprobs=(-0.05,)),
    ]
    assert vote(votes, cfg)[0] == 4
    assert vote(votes, VoteConfig())[0] == 1


def test_early_stop_at_k_agreeing_samples():
    cfg = VoteConfig(early_stop=3)
    assert not decided([cand(0, 5), cand(1, 5)], 8, cfg)
    assert decided([cand(0, 5), cand(1, 6), cand(2, 5), cand(3, 5)], 8, cfg)
    assert not decided([cand(0, 5)] * 3, 8, VoteConfig())  # off without early_stop


def test_early_stop_once_the_leader_cannot_be_overtaken():
    cfg = VoteConfig(early_stop=8, code_weight=1.0)
    # 4 samples of 5 against none, 3 still running: 4 - 0 > 3
    assert decided([cand(i, 5) for i in range(4)] + [cand(4, None)], 8, cfg)
    # 3 against 1 with 4 running: could still tie or lose
    assert not decided([cand(0, 5), cand(1, 5), cand(2, 5), cand(3, 6)], 8, cfg)
    # heavier possible weights need a bigger lead
    heavy = VoteConfig(early_stop=8, code_weight=2.0)
    assert not decided([cand(i, 5) for i in range(4)] + [cand(4, None)], 8, heavy)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def planner(clock: Clock, **kw) -> TimePlanner:
    args = {"budget_s": 100.0, "expected": 10, "parallel": 1, "samples": 4, "greedy": False, "margin_s": 0.0}
    return TimePlanner(**{**args, **kw}, clock=clock)


def test_each_problem_gets_its_share_and_unused_time_goes_back_to_the_pool():
    clock = Clock()
    p = planner(clock)
    first = p.plan()
    assert first.share_s == pytest.approx(10.0) and first.samples == 4
    clock.now = 2.0  # the first problem took 2 s of its 10
    second = p.plan()
    assert second.share_s == pytest.approx(98.0 / 9)
    assert second.samples == 4


def test_behind_means_fewer_samples_and_ahead_means_more_within_bounds():
    clock = Clock()
    p = planner(clock, max_samples=6)
    p.plan()
    clock.now = 60.0  # the first problem took 60 s: 40 left for 9
    behind = p.plan()
    assert behind.share_s == pytest.approx(40.0 / 9) and behind.samples == 2
    clock = Clock()
    p = planner(clock, max_samples=6)
    p.plan()
    clock.now = 0.5
    for _ in range(7):
        p.plan()
    ahead = p.plan()  # 99.5 s for the last two
    assert ahead.samples == 6  # capped at max_samples
    greedy = planner(Clock(), samples=1, greedy=True).plan()
    assert greedy.samples == 1


def test_the_ceiling_base_and_the_end_of_the_budget_bound_a_share():
    clock = Clock()
    p = planner(clock, ceiling_s=5.0)
    assert p.plan().share_s == pytest.approx(5.0)
    p = planner(clock, base_s=30.0)
    assert p.plan().share_s == pytest.approx(30.0)
    clock.now = 99.0
    last = p.plan()
    assert last.share_s == pytest.approx(1.0) and last.deadline == pytest.approx(100.0)  # never past the end
    clock.now = 100.0
    assert p.spent()


def test_a_stream_of_unknown_length_gets_the_ceiling_within_what_is_left():
    clock = Clock()
    p = planner(clock, expected=None, ceiling_s=30.0)
    assert p.plan().share_s == pytest.approx(30.0)
    clock.now = 90.0
    assert p.plan().share_s == pytest.approx(10.0)


def test_tir_finds_an_open_code_block_and_nothing_else():
    tir = Tir()
    assert tir.next_cell("Compute:\n```python\nx = 1\nprint(x)\n") == "x = 1\nprint(x)\n"
    assert tir.next_cell("Compute:\n```python\nx = 1\n```\nthen a stray fence\n") is None
    assert tir.next_cell("no code at all\n") is None
    assert tir.feedback("```\n", "1") == "```\n```output\n1\n```\n"


def test_the_answer_is_final_only_outside_code():
    text = "```python\nprint('\\\\boxed{1}')\n```\n```output\n\\boxed{1}\n```\nSo \\boxed{2} and more"
    end = answer_end(text)
    assert end is not None and text[:end].endswith("\\boxed{2}")
    assert answer_end("\\boxed{\\frac{1}{2}") is None  # not closed yet
    assert answer_end("x \\boxed{\\frac{1}{2}} y") == len("x \\boxed{\\frac{1}{2}}")


def test_the_vote_and_the_cache_read_a_samples_outcome_not_its_error_text():
    from dataclasses import replace

    from pipeline.config import Config
    from stages.vote import build_result

    cfg = Config()
    done = cand(0, 7, of=2)
    late = cand(1, None, of=2)
    late = replace(late, generation=replace(late.generation, outcome="timed_out", error="whatever it says"))
    r = build_result([done, late], cfg)
    assert r.status == "fallback" and r.answer == 7 and "time limit reached" in (r.error or "")
    assert r.partial  # cut short: the cache does not keep it
    failed = replace(late, generation=replace(late.generation, outcome="failed", error="time limit reached"))
    r = build_result([done, failed], cfg)
    assert r.status == "ok" and not r.partial  # a failure that happens to say "time limit" is a failure
