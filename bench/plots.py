"""PNG plots for the reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_batch(rows: list[dict[str, Any]], path: Path) -> Path:
    """Problems/s against batch size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["batch_size"] for r in rows]
    ax.plot(sizes, [r["problems_per_s"] for r in rows], marker="o")
    ax.set_xlabel("max batch size")
    ax.set_ylabel("problems / s")
    ax.set_title("Pipeline throughput against batch size")
    ax.set_xticks(sizes)
    return _save(plt, fig, ax, path)


def latency_vs_rate(rows: list[dict[str, Any]], path: Path) -> Path:
    """Latency percentiles against arrival rate (the gateway run drawn as its own points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    poisson = [r for r in rows if r["rate"] is not None]
    for key, label in (("latency_p50_s", "p50"), ("latency_p95_s", "p95"), ("latency_p99_s", "p99")):
        ax.plot([r["rate"] for r in poisson], [r[key] for r in poisson], marker="o", label=label)
    gateway = [r for r in rows if r["rate"] is None]
    for r in gateway:
        ax.axhline(r["latency_p50_s"], linestyle="--", color="grey", label="gateway p50 (one at a time)")
    ax.set_xlabel("arrival rate (problems / s, Poisson)")
    ax.set_ylabel("latency (s)")
    ax.set_title("Latency against arrival rate")
    ax.legend()
    return _save(plt, fig, ax, path)


def memory_over_time(samples: list[list[Any]], path: Path) -> Path:
    """RSS (and GPU memory where sampled) over the run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s[0] for s in samples], [s[1] for s in samples], label="host RSS")
    if any(s[2] is not None for s in samples):
        ax.plot([s[0] for s in samples], [s[2] or 0 for s in samples], label="GPU allocated")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory over a long stream")
    ax.legend()
    return _save(plt, fig, ax, path)


def for_report(kind: str, report: dict[str, Any], out: Path) -> list[Path]:
    """The plots that belong to a scenario's report (none for most)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    if kind == "batch":
        return [throughput_vs_batch(rows, out / "throughput_vs_batch.png")]
    if kind == "load" and any(r["rate"] is not None for r in rows):
        return [latency_vs_rate(rows, out / "latency_vs_rate.png")]
    if kind == "memory":
        return [memory_over_time(rows[0]["samples"], out / "memory_over_time.png")]
    return []
