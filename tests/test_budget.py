"""The memory budget: the batch token cap from the weights, the KV cache per token and the budget."""

import pytest

from pipeline import budget
from pipeline.budget import GIB, TimePlanner, plan_memory, share_of
from stages.backends.base import MemoryProfile


def test_the_cap_is_what_the_budget_leaves_after_the_weights_with_a_margin():
    plan = plan_memory(MemoryProfile(weights_bytes=GIB, kv_bytes_per_token=1024), 2.0, device="cuda")
    assert plan is not None
    assert plan.budget_bytes == 2 * GIB and plan.weights_bytes == GIB
    assert plan.max_batch_tokens == int(GIB * 0.7) // 1024
    assert "max_batch_tokens" in plan.describe() and "2.0 GiB" in plan.describe()


def test_weights_that_do_not_fit_are_an_error_and_an_unknown_model_has_no_plan():
    with pytest.raises(ValueError, match="do not fit in the memory budget"):
        plan_memory(MemoryProfile(weights_bytes=3 * GIB, kv_bytes_per_token=1), 2.0, device="cuda")
    assert plan_memory(None, 16.0) is None


def test_on_cpu_the_budget_is_capped_by_available_memory(monkeypatch):
    class VM:
        available = GIB // 2

    monkeypatch.setattr(budget.psutil, "virtual_memory", lambda: VM())
    plan = plan_memory(MemoryProfile(weights_bytes=GIB // 4, kv_bytes_per_token=100), 16.0, device="cpu")
    assert plan is not None and plan.budget_bytes == GIB // 2 + GIB // 4
    assert plan.max_batch_tokens == int((GIB // 2) * 0.7) // 100


def test_a_tiny_remainder_still_allows_the_floor():
    plan = plan_memory(MemoryProfile(weights_bytes=GIB - 1000, kv_bytes_per_token=10**6), 1.0, device="cuda")
    assert plan is not None and plan.max_batch_tokens == 512


def test_the_reserve_rule_keeps_time_for_each_problem_after_this_one():
    # the AIMO 3 winners: clamp(time left - problems after this one x 300 s, 300 s, 900 s)
    rule = {"base_s": 300.0, "ceiling_s": 900.0, "reserve_s": 300.0}
    assert share_of(5 * 3600, 50, **rule)[0] == 900.0  # 18000 - 49 x 300 = 3300: the ceiling
    assert share_of(49 * 300 + 500, 50, **rule)[0] == 500.0  # behind: what the others leave
    assert share_of(49 * 300 + 100, 50, **rule)[0] == 300.0  # never below the base while time is left
    assert share_of(200, 1, **rule)[0] == 200.0  # nor past what is left
    assert share_of(5 * 3600, 50, base_s=300.0, ceiling_s=900.0)[0] == 360.0  # the even split, for contrast
    now = [0.0]
    planner = TimePlanner(
        budget_s=3600.0,
        expected=10,
        parallel=1,
        samples=8,
        greedy=False,
        base_s=300.0,
        ceiling_s=900.0,
        margin_s=0.0,
        reserve_s=300.0,
        clock=lambda: now[0],
    )
    first = planner.plan()
    assert first.share_s == 900.0 and first.samples == 8  # the rule keeps its samples
    now[0] = 3000.0
    assert planner.plan().share_s == 300.0  # 600 left, 8 to come after: the base, within what is left
