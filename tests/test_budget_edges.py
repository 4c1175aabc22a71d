"""The per-problem time share under ``--time-reserve`` (the AIMO 3 rule) and the ``aimo3`` preset at the
edges: a budget smaller than problems x reserve, one expected problem, no time left."""

from __future__ import annotations

import pytest

from pipeline.presets import resolve
from stages.budget import TimePlanner, share_of


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def planner(cfg, clock: Clock, budget_s: float, expected: int) -> TimePlanner:
    timed = cfg.replace(time={"budget_s": budget_s, "expected_problems": expected})
    p = TimePlanner.from_config(timed, clock)
    assert p is not None
    return p


def aimo3():
    return resolve(preset="aimo3", flags={"run": {"max_in_flight": 1}})[0]


def test_the_aimo3_preset_under_a_budget_smaller_than_problems_times_reserve_answers_in_time():
    clock = Clock()
    p = planner(aimo3(), clock, budget_s=1000.0, expected=10)
    shares = []
    for _ in range(10):
        plan = p.plan()
        assert plan.samples == 8 and plan.share_s is not None and plan.share_s >= 0
        assert plan.deadline is not None and plan.deadline <= p.end  # never past the run's end
        shares.append(plan.share_s)
        clock.t += plan.share_s  # each problem uses all of its share
    assert sum(shares) <= 1000.0
    assert shares[0] == pytest.approx(300.0)  # clamp(left - 9 x 300, 300, 900): the base


def test_one_expected_problem_gets_the_ceiling_and_zero_time_left_gets_nothing():
    clock = Clock()
    p = planner(aimo3(), clock, budget_s=5000.0, expected=1)
    assert p.plan().share_s == pytest.approx(900.0)
    clock.t += 5000.0
    assert p.spent() and p.left_s() == 0.0
    assert p.plan().share_s == 0.0
    assert share_of(0.0, 1, base_s=300.0, ceiling_s=900.0, reserve_s=300.0) == (0.0, 0.0)
    assert share_of(-5.0, 3, base_s=300.0, ceiling_s=900.0, reserve_s=300.0)[0] == 0.0


def test_more_problems_than_expected_still_get_a_share():
    clock = Clock()
    p = planner(aimo3(), clock, budget_s=2000.0, expected=1)
    for _ in range(3):
        plan = p.plan()
        assert plan.share_s is not None and 0 < plan.share_s <= 900.0


def test_the_reserve_rule_without_a_base_does_not_give_a_problem_zero_time_while_most_of_the_budget_is_left():
    # --time-budget 1000 --time-reserve 300, 10 problems, no --time-base: the first six problems get
    # max(0, left - 9 x 300) = 0 s (answered at once with the fallback) and the last ones all the time.
    # A problem that starts with the whole budget left should get at least some of it.
    share, _ = share_of(1000.0, 10, ceiling_s=900.0, reserve_s=300.0)
    assert share > 0.0  # today: 0.0
