"""The budgets: how many tokens a batch may hold (memory), and each problem's share of the run's time.

After the model loads, its weights are measured; the KV cache costs
``2 x layers x kv_heads x head_dim x dtype bytes`` per token; the batch token cap is what fits in the
rest of the budget after a safety margin for activations and fragmentation. On CPU the budget is also
capped by the host memory actually available.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from stages.backends.base import MemoryProfile, kv_bytes_per_token
from stages.clock import now

if TYPE_CHECKING:
    from stages.config import Config

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


def share_of(
    left_s: float,
    to_come: int,
    *,
    base_s: float = 0.0,
    ceiling_s: float = math.inf,
    parallel: int = 1,
    reserve_s: float | None = None,
) -> tuple[float, float]:
    """``(share, fair)``: the fair share is ``left_s`` spread over the problems to come in waves of
    ``parallel`` or, with ``reserve_s``, what is left after keeping ``reserve_s`` for each wave after
    this one (the AIMO 3 winners' rule: clamp(left - problems after this one x 300 s, 300 s, 900 s));
    the share keeps it between ``base_s`` and ``ceiling_s`` and never past ``left_s``.
    Used by ``TimePlanner``, for a run and for the Kaggle ``predict()``."""
    left_s = max(0.0, left_s)
    waves = math.ceil(max(1, to_come) / max(1, parallel))
    fair = left_s / waves
    if reserve_s is not None:  # never below the even split: a reserve too big for the budget is one
        fair = max(fair, left_s - (waves - 1) * reserve_s)
    return min(max(min(fair, ceiling_s), min(base_s, left_s)), left_s), fair


@dataclass(frozen=True)
class TimePlan:
    """One problem's share of the run's time: its deadline (a ``now()`` value, ``None``
    for none) and how many samples it gets."""

    deadline: float | None
    samples: int
    share_s: float | None = None


class TimePlanner:
    """Spreads a run's time budget over its problems as they start (see ``TimeConfig``).

    ``plan()`` is called when a problem's samples start: the time left (minus the margin) spread over
    the problems still to come in waves of ``parallel``, kept between the base and the ceiling; time a
    problem leaves unused is simply still there for the next ``plan()``. The samples follow the share
    against the even split of the whole budget.

    The clock starts at construction, or with ``started_now=False`` at the first ``start()``,
    ``plan()`` or ``left_s()`` (the Kaggle ``predict()``: its budget counts from the first problem).
    """

    def __init__(
        self,
        *,
        budget_s: float | None,
        expected: int | None,
        parallel: int,
        samples: int,
        greedy: bool,
        base_s: float = 0.0,
        ceiling_s: float | None = None,
        margin_s: float = 1.0,
        min_samples: int = 1,
        max_samples: int | None = None,
        reserve_s: float | None = None,
        clock: Callable[[], float] = now,
        started_now: bool = True,
    ) -> None:
        self.budget_s = budget_s
        self.expected = expected
        self.parallel = max(1, parallel)
        self.samples = samples
        self.greedy = greedy
        self.base_s = base_s
        self.ceiling_s = ceiling_s
        self.margin_s = margin_s
        self.min_samples = min(min_samples, samples)
        self.max_samples = max_samples if max_samples is not None else 2 * samples
        self.reserve_s = reserve_s
        self.clock = clock
        self.started: float | None = None
        self.end: float | None = None
        self.planned = 0
        if started_now:
            self.start()

    def start(self) -> None:
        """Start the clock, if it has not started."""
        if self.started is None:
            self.started = self.clock()
            self.end = self.started + self.budget_s if self.budget_s is not None else None

    @classmethod
    def from_config(cls, cfg: Config, clock: Callable[[], float] = now) -> TimePlanner | None:
        """The planner of ``cfg``'s ``[time]`` section (ceiling ``run.problem_timeout_s``), or ``None``
        without a time budget; ``clock`` for tests."""
        t = cfg.time
        if t.budget_s is None:
            return None
        return cls(
            budget_s=t.budget_s,
            expected=t.expected_problems,
            parallel=cfg.run.max_in_flight,
            samples=cfg.generation.samples,
            greedy=cfg.generation.greedy,
            base_s=t.base_s,
            ceiling_s=cfg.run.problem_timeout_s,
            margin_s=t.margin_s,
            min_samples=t.min_samples,
            max_samples=t.max_samples,
            reserve_s=t.reserve_per_problem_s,
            clock=clock,
        )

    def spent(self) -> bool:
        """True once the budget (less its margin) is used up: new problems get the fallback at once."""
        self.start()
        return self.end is not None and self.clock() >= self.end - self.margin_s

    def left_s(self) -> float | None:
        """Seconds left before the run's end less the margin (``None`` without a budget)."""
        self.start()
        if self.end is None:
            return None
        return max(0.0, self.end - self.margin_s - self.clock())

    def plan(self) -> TimePlan:
        """The share of the next problem to start."""
        self.start()
        now = self.clock()
        self.planned += 1
        ceiling = self.ceiling_s if self.ceiling_s is not None else math.inf
        if self.end is None:
            deadline = now + ceiling if self.ceiling_s is not None else None
            return TimePlan(deadline, self.samples, self.ceiling_s)
        left = max(0.0, self.end - self.margin_s - now)
        if self.expected is None:  # a stream of unknown length: the ceiling, within what is left
            share = min(ceiling, left)
            return TimePlan(now + share, self.samples, share)
        share, fair = share_of(
            left,
            self.expected - self.planned + 1,
            base_s=self.base_s,
            ceiling_s=ceiling,
            parallel=self.parallel,
            reserve_s=self.reserve_s,
        )
        samples = self.samples
        assert self.budget_s is not None
        even = self.budget_s / math.ceil(self.expected / self.parallel)
        if not self.greedy and even > 0 and self.reserve_s is None:  # the reserve rule keeps its samples
            wanted = round(self.samples * min(fair, ceiling) / even)
            samples = max(self.min_samples, min(self.max_samples, wanted))
        return TimePlan(now + share, samples, share)


def estimate_profile(folder: Path, dtype_bytes: int) -> MemoryProfile | None:
    """Weights and KV bytes per token of a Hugging Face folder without loading it: parameter counts
    from the safetensors headers (shapes only), KV from ``config.json``; ``None`` when unreadable."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        params = 0
        for f in sorted(folder.glob("*.safetensors")):
            with f.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            for name, info in header.items():
                if name != "__metadata__":
                    params += math.prod(info["shape"])
        kv = kv_bytes_per_token(config, dtype_bytes)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    if params == 0:
        return None
    return MemoryProfile(weights_bytes=params * dtype_bytes, kv_bytes_per_token=kv)


def memory_derivation(cfg: Config) -> str:
    """How the memory budget would be spent, estimated before loading (the run's summary shows the
    measured plan): weights from the model files' tensor shapes, KV cache from its config."""
    from stages.backends.base import DTYPE_BYTES, MemoryProfile
    from stages.backends.models import DEFAULT_MODEL_NAME, cache_root

    m = cfg.model
    budget = f"memory budget {m.memory_gb:g} GiB"
    if m.backend == "replay":
        return f"{budget}; the replay backend holds no model"
    if m.path is None:
        folder = cache_root() / "models" / DEFAULT_MODEL_NAME
    elif Path(m.path).expanduser().is_dir():
        folder = Path(m.path).expanduser()
    else:
        return f"{budget}; the split is derived once the model file is converted (at the first run)"
    from stages.backends.devices import choose_device_dtype

    quantized = {"fp16": "float16", "bf16": "bfloat16"}.get(m.quantize)
    try:
        device, dtype = choose_device_dtype(m.device, quantized or m.dtype)
    except Exception as e:  # e.g. --device cuda without CUDA: the run itself will say so
        return f"{budget}; the split cannot be estimated here: {e}"
    if m.quantize in ("int8", "int4") and device == "cpu":
        dtype = "float32"  # int8 on CPU quantises float32 linear layers
    size = DTYPE_BYTES[dtype]
    profile = estimate_profile(folder, size)
    if profile is not None and m.quantize in ("int8", "int4"):  # weights at 1 or half a byte a parameter
        per = 1.0 if m.quantize == "int8" else 0.5
        profile = MemoryProfile(int(profile.weights_bytes / size * per), profile.kv_bytes_per_token)
    if profile is None:
        return f"{budget}; the split is derived when the model loads ({folder} not readable yet)"
    try:
        plan = plan_memory(profile, m.memory_gb, device=device)
    except ValueError as e:
        return f"{budget}: {e}"
    assert plan is not None
    cap = cfg.batch.max_batch_tokens
    note = f" (batch.max_batch_tokens = {cap} overrides it)" if cap is not None else ""
    return (
        f"{plan.describe()}{note}. Estimated before loading ({device}, {dtype}): weights from the tensor "
        f"shapes; KV per token = 2 x layers x kv heads x head dim x {size} bytes; cap = 70% of what the "
        "budget (on CPU at most the available memory) leaves after the weights, per token of KV. "
        "The run's summary shows the measured plan."
    )
