"""``python -m bench SCENARIO``: measure the pipeline; write ``<out>/<name>.json``, ``.md`` and plots.

Scenarios::

    engine      a plain loop of batched generate (the limit the pipeline should approach)
    sequential  one problem at a time, the old way
    pipeline    the streaming pipeline with the given settings
    overhead    the pipeline with a zero-cost backend: the cost of the pipeline itself
    batch       the pipeline at several batch sizes (plot: throughput against batch size)
    load        arrivals at given rates (Poisson) and the Kaggle gateway's one-at-a-time
                (latency p50/p95/p99 and throughput per rate; plot: latency against rate)
    memory      a long stream, sampling RSS (and GPU memory) over time (plot)
    accuracy    GSM8K: greedy per dtype, and majority of k
    compare     several of engine/sequential/pipeline/overhead, round-robin in one process, with ratios

Examples::

    python -m bench compare engine sequential pipeline --problems 32
    python -m bench load --problems 16 --rates 0.5 1 2 --max-new-tokens 64
    python -m bench memory --fake --problems 20000

Every figure is measured in one process, side by side: the machines are shared and noisy, so the
reports lead with ratios. ``--fake`` swaps the model for the zero-cost scripted backend (a smoke run of
the harness takes seconds); ``--problems`` limits any scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import anyio

from bench import scenarios
from bench.data import gsm8k, synthetic
from bench.scenarios import Figures, Settings
from pipeline.items import Problem
from stages.backends.base import Backend
from stages.backends.fake import FakeBackend

COMPARABLE = ("engine", "sequential", "pipeline", "overhead")
SCENARIOS = (*COMPARABLE, "batch", "load", "memory", "accuracy", "compare")


def environment(backend: Backend | None = None) -> dict[str, Any]:
    """Versions and hardware, saved with every report."""
    import torch
    import transformers

    from stages.backends.devices import cpu_has_native_bf16

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if backend is not None:
        env["model"] = backend.model_id
        env["device"] = backend.device
        env["dtype"] = getattr(backend, "dtype", "none")
    return env


class Harness:
    """One invocation: the settings, the problems, the (lazily loaded) model."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = Settings(
            problems=args.problems,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
            device=args.device,
            model=args.model,
            samples=args.samples,
            overhead_problems=args.overhead_problems,
        )
        self._backend: Backend | None = None
        self._problems: list[Problem] | None = None

    @property
    def problems(self) -> list[Problem]:
        """GSM8K problems; synthetic ones with ``--fake`` when more are asked for than GSM8K has."""
        if self._problems is None:
            n = self.settings.problems
            self._problems = synthetic(n) if self.args.fake and n > 100 else gsm8k(n)
        return self._problems

    def backend(self, dtype: str | None = None) -> Backend:
        """The model (loaded once), or the scripted backend with ``--fake``."""
        if self.args.fake:
            return FakeBackend(delay_s=self.args.fake_delay_ms / 1000.0, record=False)
        if self._backend is None or (dtype and getattr(self._backend, "dtype", None) != dtype):
            if self._backend is not None:
                self._backend.close()
            self._backend = scenarios.load_backend(self.settings, dtype=dtype)
            # one untimed batch: first-call costs belong to no scenario
            scenarios.engine(self.problems[:2], self._backend, replace(self.settings, max_new_tokens=4))
        return self._backend

    def runner(self, name: str) -> Callable[[], Figures]:
        """A no-argument callable that runs one comparable scenario once."""
        s = self.settings
        if name == "overhead":
            return lambda: anyio.run(scenarios.overhead, s)
        backend = self.backend()
        problems = self.problems
        if name == "engine":
            return lambda: scenarios.engine(problems, backend, s)
        if name == "sequential":
            return lambda: scenarios.sequential(problems, backend, s)
        if name == "pipeline":
            return lambda: scenarios.run_pipeline(problems, backend, s)
        raise SystemExit(f"error: {name!r} cannot be compared; choose from {', '.join(COMPARABLE)}")

    # --- scenarios -------------------------------------------------------------------------------

    def compare(self, names: Sequence[str]) -> dict[str, Any]:
        """Round-robin ``--repeats`` times; medians; ratios against the engine and sequential loops."""
        runners = {n: self.runner(n) for n in names}
        runs: dict[str, list[Figures]] = {n: [] for n in names}
        for r in range(self.args.repeats):
            for n, run in runners.items():
                figs = run()
                runs[n].append(figs)
                print(
                    f"[{r + 1}/{self.args.repeats}] {n}: {figs['problems_per_s']} problems/s", file=sys.stderr
                )
        rows = []
        for repeats in runs.values():
            row = dict(repeats[0])
            for key in ("seconds", "problems_per_s", "new_tokens_per_s"):
                row[key] = round(statistics.median(f[key] for f in repeats), 3)
            row["repeats"] = len(repeats)
            rows.append(row)
        by = {row["scenario"]: row["problems_per_s"] for row in rows}
        ratios = {
            f"{a} / {b}": round(by[a] / by[b], 3)
            for a, b in (("pipeline", "engine"), ("pipeline", "sequential"), ("engine", "sequential"))
            if a in by and b in by
        }
        return {"rows": rows, "ratios": ratios}

    def batch(self) -> dict[str, Any]:
        """The pipeline at each of ``--batch-sizes``."""
        backend = self.backend()
        rows = []
        for size in self.args.batch_sizes:
            s = replace(self.settings, batch_size=size)
            figs = scenarios.run_pipeline(self.problems, backend, s, name=f"pipeline batch {size}")
            figs["batch_size"] = size
            rows.append(figs)
            print(f"batch {size}: {figs['problems_per_s']} problems/s", file=sys.stderr)
        base = rows[0]["problems_per_s"]
        ratios = {
            f"batch {r['batch_size']} / batch {rows[0]['batch_size']}": round(r["problems_per_s"] / base, 3)
            for r in rows[1:]
        }
        return {"rows": rows, "ratios": ratios}

    def load(self) -> dict[str, Any]:
        """Latency under arrival rates, and the gateway's one-at-a-time."""
        backend = self.backend()
        rows = []
        arrivals: list[float | None] = [*self.args.rates]
        if not self.args.no_gateway:
            arrivals.append(None)
        for rate in arrivals:
            figs = anyio.run(scenarios.load, self.problems, backend, self.settings, rate)
            rows.append(figs)
            print(
                f"{figs['arrival']}: p50 {figs['latency_p50_s']} s, p95 {figs['latency_p95_s']} s",
                file=sys.stderr,
            )
        return {"rows": rows, "ratios": {}}

    def memory(self) -> dict[str, Any]:
        """RSS over a long stream."""
        figs = anyio.run(lambda: scenarios.memory(self.problems, self.backend(), self.settings))
        print(f"RSS start {figs['rss_start_mb']} MiB, peak {figs['rss_peak_mb']} MiB", file=sys.stderr)
        ratios = {"rss peak / start": round(figs["rss_peak_mb"] / figs["rss_start_mb"], 3)}
        return {"rows": [figs], "ratios": ratios}

    def accuracy(self) -> dict[str, Any]:
        """Greedy per dtype, then majority of k (sampled) in the last dtype."""
        rows = []
        for dtype in self.args.dtypes:
            backend = self.backend(dtype=None if self.args.fake else dtype)
            s = replace(self.settings, samples=1, dtype=dtype)
            figs = scenarios.run_pipeline(self.problems, backend, s, name=f"greedy {dtype}")
            figs["dtype"] = dtype
            rows.append(figs)
            print(f"greedy {dtype}: accuracy {figs['accuracy']}, {figs['problems_per_s']}/s", file=sys.stderr)
        ratios: dict[str, Any] = {}
        if len(rows) >= 2:
            a, b = rows[0], rows[1]
            ratios[f"accuracy {b['dtype']} - {a['dtype']}"] = round(b["accuracy"] - a["accuracy"], 4)
            ratios[f"speed {b['dtype']} / {a['dtype']}"] = round(b["problems_per_s"] / a["problems_per_s"], 3)
            same = sum(a["answers"][i] == b["answers"].get(i) for i in a["answers"])
            ratios[f"same answer in {a['dtype']} and {b['dtype']}"] = f"{same}/{len(a['answers'])}"
        if self.args.k > 1:
            s = replace(self.settings, samples=self.args.k)
            figs = scenarios.run_pipeline(self.problems, self.backend(), s, name=f"majority of {self.args.k}")
            rows.append(figs)
            ratios[f"accuracy majority@{self.args.k} - greedy"] = round(
                figs["accuracy"] - rows[-2]["accuracy"], 4
            )
            print(f"majority of {self.args.k}: accuracy {figs['accuracy']}", file=sys.stderr)
        ratios["tool-integrated (TIR)"] = "not available: sandboxed code execution is not built yet"
        return {"rows": rows, "ratios": ratios}


COLUMNS = {
    "overhead": (
        "scenario",
        "problems",
        "seconds",
        "problems_per_s",
        "us_per_problem",
        "stream_floor_items_per_s",
        "batched_floor_items_per_s",
    ),
    "batch": (
        "scenario",
        "batch_size",
        "problems",
        "seconds",
        "problems_per_s",
        "new_tokens_per_s",
        "mean_batch",
        "padding_share",
        "model_busy_share",
    ),
    "load": (
        "arrival",
        "problems",
        "seconds",
        "problems_per_s",
        "latency_p50_s",
        "latency_p95_s",
        "latency_p99_s",
    ),
    "memory": (
        "scenario",
        "problems",
        "seconds",
        "problems_per_s",
        "rss_start_mb",
        "rss_peak_mb",
        "rss_end_mb",
        "rss_growth_second_half_mb",
    ),
    "accuracy": ("scenario", "problems", "accuracy", "seconds", "problems_per_s", "new_tokens_per_s"),
    "default": (
        "scenario",
        "problems",
        "seconds",
        "problems_per_s",
        "new_tokens_per_s",
        "accuracy",
        "mean_batch",
        "padding_share",
        "model_busy_share",
        "repeats",
    ),
}


def _markdown_table(rows: list[Figures], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def write_report(out: Path, name: str, report: dict[str, Any], kind: str, plots: list[Path]) -> Path:
    """``<name>.json`` (every figure and setting) and ``<name>.md`` (table, ratios, plots)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    rows = report["rows"]
    md = [
        f"# {name}",
        "",
        f"`{report['command']}`",
        "",
        _markdown_table(rows, COLUMNS.get(kind, COLUMNS["default"])),
    ]
    if report["ratios"]:
        md += ["Measured side by side in one run:", ""]
        md += [f"- {k}: **{v}**" for k, v in report["ratios"].items()]
        md.append("")
    for r in rows:
        prof = r.get("profile")
        if prof:
            md += [
                f"## Where the time goes ({r['scenario']}, cProfile, event-loop thread)",
                "",
                f"{prof['profiled_us_per_problem']} us per problem under the profiler (which slows every "
                "call: read the shares).",
                "",
                _markdown_table(prof["parts"][:12], ["part", "share", "us_per_problem"]),
                _markdown_table(prof["functions"], ["function", "share"]),
            ]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    env = report["environment"]
    md += ["", "Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    return path


def build_parser() -> argparse.ArgumentParser:
    """The harness's arguments."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("more", nargs="*", help="with compare: the scenarios to compare")
    p.add_argument("--problems", type=int, default=32, help="how many problems (GSM8K has 100)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="with batch")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="with accuracy")
    p.add_argument("--k", type=int, default=0, help="with accuracy: also majority of k samples")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None, help="a local model folder or .gguf (default: bundled)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--rates", type=float, nargs="*", default=[0.5, 1.0, 2.0], help="with load: arrivals/s")
    p.add_argument("--no-gateway", action="store_true", help="with load: skip the one-at-a-time run")
    p.add_argument("--overhead-problems", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=1, help="rounds of each compared scenario")
    p.add_argument("--fake", action="store_true", help="zero-cost scripted backend instead of the model")
    p.add_argument("--fake-delay-ms", type=float, default=0.0, help="with --fake: sleep per generate call")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", default="bench/out", help="folder for the reports (default bench/out)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    from bench.data import DataError

    args = build_parser().parse_args(argv)
    harness = Harness(args)
    kind = args.scenario
    try:
        if kind == "compare":
            names = args.more or ["engine", "sequential", "pipeline"]
            report, name = harness.compare(names), "compare-" + "-".join(names)
        elif kind in COMPARABLE:
            report, name = harness.compare([kind]), kind
        else:
            report, name = getattr(harness, kind)(), kind
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["command"] = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    report["settings"] = {**asdict(harness.settings), "fake": args.fake}
    report["environment"] = environment(harness._backend)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = Path(args.out)
    plots: list[Path] = []
    if not args.no_plots:
        from bench import plots as plotting

        plots = plotting.for_report(kind, report, out)
    path = write_report(out, name, report, kind, plots)
    print(path.read_text())
    return 0
