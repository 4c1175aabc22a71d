"""The memory budget: the batch token cap from the weights, the KV cache per token and the budget."""

import pytest

from pipeline import budget
from pipeline.budget import GIB, plan_memory
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
