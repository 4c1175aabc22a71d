"""Where work waits: queue depths per stream, batch fill, time waiting per stage, and memory.

A ``QueueGauge`` samples the ``statistics()`` of every stream between stages (anyio memory streams
report items buffered and tasks blocked sending) a few times a second, the way Ray Data reports
per-operator queues: where work piles up shows which stage is behind. By default every stream can hold
all admitted work, so producers are seldom blocked there and the overall bottleneck shows as time
waiting for admission slots; with ``run.queue_size`` smaller, ``producer_blocked`` shows it per
stream. Peak RSS is this process's (not the vLLM engine's or Ray actors' processes), from
``VmHWM`` (Linux) or ``getrusage``. ``Runner.metrics()`` puts these together with the stages' counters.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus


@dataclass
class _Depth:
    capacity: float
    peak: int = 0
    total: int = 0
    blocked: int = 0


class QueueGauge:
    """Samples the named streams every ``interval_s`` while ``run`` runs."""

    def __init__(self, streams: dict[str, Any], interval_s: float = 0.1) -> None:
        self.streams = streams
        self.interval_s = interval_s
        self.samples = 0
        self._depths = {name: _Depth(capacity=s.statistics().max_buffer_size) for name, s in streams.items()}

    def sample(self) -> None:
        """Record each stream's depth once."""
        self.samples += 1
        for name, stream in self.streams.items():
            st = stream.statistics()
            d = self._depths[name]
            d.peak = max(d.peak, st.current_buffer_used)
            d.total += st.current_buffer_used
            d.blocked += st.tasks_waiting_send > 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sample until cancelled."""
        task_status.started()
        while True:
            self.sample()
            await anyio.sleep(self.interval_s)

    def report(self) -> dict[str, dict[str, float]]:
        """Per stream: capacity, peak and mean depth, and the share of samples with a blocked producer."""
        n = max(1, self.samples)
        return {
            name: {
                "capacity": d.capacity,
                "peak": d.peak,
                "mean": round(d.total / n, 2),
                "producer_blocked": round(d.blocked / n, 3),
            }
            for name, d in self._depths.items()
        }


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` where Linux has it (``ru_maxrss`` carries
    the forking parent's peak over an exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_report() -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, the peak allocated by torch."""
    out = {"peak_rss_mib": round(peak_rss_kib() / 1024, 1)}
    torch = sys.modules.get("torch")  # only if the model already imported it
    if torch is not None and torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
