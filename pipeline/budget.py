"""The memory budget: how many tokens a batch may hold.

After the model loads, its weights are measured; the KV cache costs
``2 x layers x kv_heads x head_dim x dtype bytes`` per token; the batch token cap is what fits in the
rest of the budget after a safety margin for activations and fragmentation. On CPU the budget is also
capped by the host memory actually available.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from stages.backends.base import MemoryProfile

GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    """How the budget was spent; printed at start-up so a user can see why the cap is what it is."""

    budget_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    max_batch_tokens: int

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"memory budget {self.budget_bytes / GIB:.1f} GiB, weights {self.weights_bytes / GIB:.2f} GiB, "
            f"KV {self.kv_bytes_per_token / 1024:.1f} KiB/token -> max_batch_tokens {self.max_batch_tokens}"
        )


def plan_memory(
    profile: MemoryProfile | None,
    budget_gb: float,
    *,
    device: str = "cpu",
    margin: float = 0.3,
    floor_tokens: int = 512,
) -> MemoryPlan | None:
    """The batch token cap for a model in a budget, or ``None`` when the model's sizes are unknown.

    Raises:
        ValueError: the weights alone do not fit in the budget.
    """
    if profile is None:
        return None
    budget = int(budget_gb * GIB)
    if device == "cpu":
        budget = min(budget, int(psutil.virtual_memory().available) + profile.weights_bytes)
    free = budget - profile.weights_bytes
    if free <= 0:
        raise ValueError(
            f"the model's weights ({profile.weights_bytes / GIB:.2f} GiB) do not fit in the memory budget "
            f"of {budget / GIB:.2f} GiB"
        )
    tokens = int(free * (1.0 - margin)) // max(1, profile.kv_bytes_per_token)
    return MemoryPlan(
        budget_bytes=budget,
        weights_bytes=profile.weights_bytes,
        kv_bytes_per_token=profile.kv_bytes_per_token,
        max_batch_tokens=max(floor_tokens, tokens),
    )
