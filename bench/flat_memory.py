"""``python -m bench.flat_memory``: host memory stays flat however long the input is.

Streams N problems through the whole ``stream`` command (file in, results file out, the zero-cost
fake backend, so only the pipeline's own memory shows) in a fresh process per size, and reports each
process's peak RSS. The ratio of the largest run to the smallest is the figure (target: within 10%).
The one structure allowed to grow is the set of ids seen (the duplicate policy); its cost per id is
measured on its own with ``tracemalloc``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

CHILD = """
import anyio, json, resource, sys, time
from pipeline.cli import build_parser, config_from_args
from pipeline.run_file import run_file
from stages.backends.fake import FakeBackend
src, out = sys.argv[1], sys.argv[2]
args = build_parser().parse_args(["stream", src, "-o", out, "--no-progress", "--log-level", "warning",
                                  "--cache-size", "0"])
cfg = config_from_args(args)
started = time.perf_counter()
code = anyio.run(run_file, args, cfg, FakeBackend(record=False))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"code": code, "seconds": time.perf_counter() - started, "peak_rss_mib": hwm / 1024}))
"""


def run_size(n: int, folder: Path) -> dict[str, Any]:
    """One fresh process streaming ``n`` problems; its peak RSS and time."""
    src, out = folder / f"in-{n}.jsonl", folder / f"out-{n}.jsonl"
    with src.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"problem-{i:07d}", "problem": f"What is {i} + {i % 97}?"}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True, env=env, check=True
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    lines = sum(1 for _ in out.open())
    src.unlink()
    out.unlink()
    return {
        "problems": n,
        "results": lines,
        "seconds": round(figures["seconds"], 1),
        "problems_per_s": round(n / figures["seconds"], 1),
        "peak_rss_mib": round(figures["peak_rss_mib"], 1),
    }


def bytes_per_seen_id(n: int = 100_000) -> float:
    """What the duplicate policy's table costs per id (ids like ``problem-0000001``)."""
    from stages.parse import RecordConverter

    convert = RecordConverter()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        convert({"id": f"problem-{i:07d}", "problem": "x"})
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(convert.seen) == n
    return (after - before) / n


def _row(r: dict[str, Any]) -> str:
    cells = [f"{r['problems']:,}", f"{r['results']:,}", r["seconds"], r["problems_per_s"], r["peak_rss_mib"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


SEEN = """
import sys
import pipeline.cli  # the command's imports, so only the table's own growth is measured
from stages.parse import RecordConverter
def hwm():  # VmHWM: ru_maxrss would include the forking parent's peak
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
base = hwm()
c = RecordConverter()
for i in range(int(sys.argv[1])):
    c({"id": f"problem-{i:07d}", "problem": "x"})
print((hwm() - base) / 1024)
"""


def seen_ids_peak_mib(n: int) -> float:
    """Peak RSS growth of a fresh process that only fills the duplicate policy's table with ``n`` ids
    (its resize peaks included)."""
    done = subprocess.run([sys.executable, "-c", SEEN, str(n)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run each size, print the figures, write docs/bench/flat_memory.{json,md}."""
    p = argparse.ArgumentParser(prog="python -m bench.flat_memory", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000, 100_000])
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.sizes:
            rows.append(run_size(n, Path(d)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    per_id = bytes_per_seen_id()
    seen_mib = seen_ids_peak_mib(rows[-1]["problems"]) - seen_ids_peak_mib(rows[0]["problems"])
    small, large = rows[0], rows[-1]
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    report = {
        "command": "python -m bench.flat_memory " + " ".join(sys.argv[1:]),
        "rows": rows,
        "peak_rss_ratio_largest_vs_smallest": round(ratio, 3),
        "seen_id_bytes_each": round(per_id, 1),
        "seen_ids_mib_at_largest": round(per_id * large["problems"] / 2**20, 2),
        "seen_ids_peak_rss_mib_at_largest": round(seen_mib, 2),
        "peak_rss_ratio_without_the_seen_ids": round(
            (large["peak_rss_mib"] - seen_mib) / small["peak_rss_mib"], 3
        ),
        "cpu_count": os.cpu_count(),
        "self_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "when": time.strftime("%Y-%m-%d"),
    }
    md = [
        "# flat memory",
        "",
        f"`{report['command']}` (fake backend: the pipeline's own memory; file in, results file out)",
        "",
        "| problems | results | seconds | problems/s | peak RSS (MiB) |",
        "|---|---|---|---|---|",
        *[_row(r) for r in rows],
        "",
        f"- peak RSS, {large['problems']:,} against {small['problems']:,} problems: "
        f"**{report['peak_rss_ratio_largest_vs_smallest']}** (target: within 1.10)",
        f"- the duplicate policy's table of seen ids: **{report['seen_id_bytes_each']} bytes per id** "
        f"({report['seen_ids_mib_at_largest']} MiB at {large['problems']:,} ids, tracemalloc), the one "
        "thing allowed to grow",
        f"- that table's peak RSS growth in a process of its own: "
        f"**{report['seen_ids_peak_rss_mib_at_largest']} MiB** (resize peaks included)",
        f"- peak RSS ratio less that table: **{report['peak_rss_ratio_without_the_seen_ids']}** "
        "(target: within 1.10)",
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flat_memory.json").write_text(json.dumps(report, indent=1))
    (out / "flat_memory.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
