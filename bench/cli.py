"""``python -m bench``: run scenarios, print a table, write ``report.json`` and ``report.md``.

Examples::

    python -m bench compare engine sequential pipeline --problems 32
    python -m bench overhead --overhead-problems 5000
    python -m bench accuracy --dtypes float32 bfloat16 --problems 100

``compare`` runs its scenarios round-robin ``--repeats`` times in one process and reports medians and
ratios: the machines are shared and noisy, and ratios measured side by side hold where absolute times
drift.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from bench import scenarios
from bench.data import gsm8k
from bench.scenarios import Figures, Settings

MODEL_SCENARIOS = ("engine", "sequential", "pipeline")
ALL = (*MODEL_SCENARIOS, "overhead", "accuracy")


def environment(backend: Any | None = None) -> dict[str, Any]:
    """Versions and hardware, saved with every report."""
    import torch
    import transformers

    from stages.backends.transformers_backend import cpu_has_native_bf16

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if backend is not None:
        env["model"] = backend.model_id
        env["device"] = getattr(backend, "device", None)
        env["dtype"] = getattr(backend, "dtype", None)
    return env


def _markdown(rows: list[Figures], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    return head + body


def write_report(out: Path, name: str, report: dict[str, Any], columns: Sequence[str]) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``out``; return the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    md = [f"# {name}", "", f"`{report['command']}`", "", _markdown(report["rows"], columns)]
    if report.get("ratios"):
        md += ["", "Ratios (medians, measured in one run):", ""]
        md += [f"- {k}: **{v}**" for k, v in report["ratios"].items()]
    md += ["", "Environment: " + ", ".join(f"{k}={v}" for k, v in report["environment"].items()), ""]
    path = out / f"{name}.md"
    path.write_text("\n".join(md))
    return path


def _median_rows(runs: dict[str, list[Figures]]) -> list[Figures]:
    rows = []
    for figs in runs.values():
        row = dict(figs[0])
        for key in ("seconds", "problems_per_s", "new_tokens_per_s"):
            row[key] = round(statistics.median(f[key] for f in figs), 3)
        row["repeats"] = len(figs)
        rows.append(row)
    return rows


def compare(names: Sequence[str], settings: Settings, repeats: int) -> dict[str, Any]:
    """Run ``names`` round-robin ``repeats`` times; medians and ratios against the engine loop."""
    problems = gsm8k(settings.problems)
    needs_model = any(n in MODEL_SCENARIOS for n in names)
    backend = scenarios.load_backend(settings) if needs_model else None
    runners: dict[str, Callable[[], Figures]] = {}
    for n in names:
        if n == "engine":
            runners[n] = lambda: scenarios.engine(problems, backend, settings)  # type: ignore[arg-type]
        elif n == "sequential":
            runners[n] = lambda: scenarios.sequential(problems, backend, settings)  # type: ignore[arg-type]
        elif n == "pipeline":
            runners[n] = lambda: scenarios.run_pipeline(problems, backend, settings)  # type: ignore[arg-type]
        elif n == "overhead":
            runners[n] = lambda: anyio.run(scenarios.overhead, settings)
        else:
            raise SystemExit(f"error: compare cannot run {n!r}; choose from {', '.join(ALL[:-1])}")
    if backend is not None:  # one untimed warm-up batch: first-call costs belong to no scenario
        scenarios.engine(problems[:2], backend, Settings(max_new_tokens=4))
    runs: dict[str, list[Figures]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names:
            figs = runners[n]()
            runs[n].append(figs)
            print(f"[{r + 1}/{repeats}] {n}: {figs['problems_per_s']} problems/s", file=sys.stderr)
    rows = _median_rows(runs)
    by = {row["scenario"]: row["problems_per_s"] for row in rows}
    ratios = {}
    if "pipeline" in by and "engine" in by:
        ratios["pipeline / engine"] = round(by["pipeline"] / by["engine"], 3)
    if "pipeline" in by and "sequential" in by:
        ratios["pipeline / sequential"] = round(by["pipeline"] / by["sequential"], 3)
    if "engine" in by and "sequential" in by:
        ratios["engine / sequential"] = round(by["engine"] / by["sequential"], 3)
    return {"rows": rows, "ratios": ratios, "environment": environment(backend)}


def accuracy(settings: Settings, dtypes: Sequence[str]) -> dict[str, Any]:
    """The pipeline over GSM8K once per dtype: accuracy and speed side by side."""
    problems = gsm8k(settings.problems)
    rows = []
    env: dict[str, Any] = {}
    for dtype in dtypes:
        backend = scenarios.load_backend(settings, dtype=dtype)
        env = environment(backend)
        figs = scenarios.run_pipeline(problems, backend, settings, name=f"pipeline {dtype}")
        figs["dtype"] = dtype
        rows.append(figs)
        backend.close()
        print(f"{dtype}: accuracy {figs['accuracy']}, {figs['problems_per_s']} problems/s", file=sys.stderr)
    ratios = {}
    if len(rows) == 2:
        a, b = rows
        ratios[f"accuracy {b['dtype']} - {a['dtype']}"] = round(b["accuracy"] - a["accuracy"], 4)
        ratios[f"speed {b['dtype']} / {a['dtype']}"] = round(b["problems_per_s"] / a["problems_per_s"], 3)
    env.pop("dtype", None)
    return {"rows": rows, "ratios": ratios, "environment": env}


COLUMNS = (
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
)


def build_parser() -> argparse.ArgumentParser:
    """The harness's arguments."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=[*ALL, "compare"])
    p.add_argument("more", nargs="*", help="with compare: the scenarios to compare")
    p.add_argument("--problems", type=int, default=32, help="GSM8K problems (default 32)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="with accuracy")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default=None)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--overhead-problems", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=1, help="with compare: rounds of every scenario")
    p.add_argument("--out", default="bench/out", help="folder for the reports")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    settings = Settings(
        problems=args.problems,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        device=args.device,
        model=args.model,
        samples=args.samples,
        overhead_problems=args.overhead_problems,
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if args.scenario == "compare":
        report = compare(args.more or list(MODEL_SCENARIOS), settings, args.repeats)
        name = "compare-" + "-".join(args.more or MODEL_SCENARIOS)
    elif args.scenario == "accuracy":
        report = accuracy(settings, args.dtypes)
        name = "accuracy"
    else:
        report = compare([args.scenario], settings, args.repeats)
        name = args.scenario
    report.update(command="python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    report.update(settings=settings.__dict__, started=started)
    path = write_report(Path(args.out), name, report, COLUMNS)
    print(path.read_text())
    return 0
