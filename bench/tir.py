"""``python -m bench.tir``: tool-integrated reasoning, the sandbox and the time budget, measured.

Three parts (``--parts``), each printed and written to ``docs/bench/tir.{json,md}`` (a part not run
keeps its figures from the report already there):

- sandbox: cells per second through the warm pool (a fresh interpreter per sample, started ahead,
  and cells within one sample's interpreter) against a fresh ``python`` per cell that imports the
  same libraries;
- time budget: the replay backend with recorded completions too slow for the budget; every problem
  must have an answer when the budget ends, and the run must end within a second or two of it;
- accuracy: GSM8K with the default model, greedy against majority of k against TIR with k samples
  (the small model is weak; the figures are reported as they come).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.data import gsm8k
from pipeline.api import Pipeline, load_backend
from pipeline.config import Config, SandboxConfig
from stages.backends.replay import ReplayBackend
from stages.sandbox import PRELOAD, Sandbox, stripped_env

CELL = "n = 2**61 - 1\nprint(sp.isprime(n), int(np.sum(np.arange(1000))), math.gcd(12, 18))"


async def _warm_cells(cells: int, per_sample: int) -> float:
    """Seconds for ``cells`` cells, ``per_sample`` cells in each sample's interpreter, from a pool."""
    sb = Sandbox(SandboxConfig(), size=4)
    async with anyio.create_task_group() as tg:
        await tg.start(sb.serve)
        while len(sb._idle) < 4:  # noqa: ASYNC110 - the pool is warm before the clock starts, as in a run
            await anyio.sleep(0.05)
        started = time.perf_counter()
        done = 0
        while done < cells:
            s = sb.session()
            for _ in range(per_sample):
                r = await s.run(CELL)
                assert r.ok, r.error
                done += 1
            await s.aclose()
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    return elapsed


def _cold_cells(cells: int) -> float:
    code = "\n".join([*PRELOAD, CELL])
    started = time.perf_counter()
    for _ in range(cells):
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(
                [sys.executable, "-I", "-c", code],
                cwd=d,
                env=stripped_env(d),
                check=True,
                capture_output=True,
            )
    return time.perf_counter() - started


def sandbox_figures(cells: int) -> dict[str, Any]:
    """Cells per second: one sample's interpreter, a fresh warm one per sample, a fresh python per cell."""
    same = anyio.run(_warm_cells, cells, cells)
    per_sample = anyio.run(_warm_cells, cells, 1)
    cold = _cold_cells(cells)
    return {
        "cells": cells,
        "cells_per_s_one_sample": round(cells / same, 1),
        "cells_per_s_fresh_warm_interpreter_each": round(cells / per_sample, 2),
        "cells_per_s_fresh_python_each": round(cells / cold, 2),
        "ms_per_cell_one_sample": round(1000 * same / cells, 2),
        "ms_per_cell_fresh_python_each": round(1000 * cold / cells, 1),
        "speed_one_sample_vs_fresh_python": round(cold / same, 1),
        "speed_warm_pool_vs_fresh_python": round(cold / per_sample, 2),
    }


async def _budget_run(problems: int, seconds_each: float, budget_s: float, parallel: int) -> dict[str, Any]:
    records: dict[tuple[str, int | None, int], dict[str, Any]] = {
        (f"p{i}", None, 0): {"text": f"\\boxed{{{i}}}", "seconds": seconds_each} for i in range(problems)
    }
    backend = ReplayBackend(records, model_id="replay-bench")
    cfg = Config().replace(
        time={
            "budget_s": budget_s,
            "expected_problems": problems,
            "margin_s": 0.5,
            "base_s": seconds_each * 1.5,
        },
        run={"max_in_flight": parallel, "verify_workers": 1},
        cache={"size": 0},
    )
    started = time.perf_counter()
    async with Pipeline(cfg, backend=backend) as p:
        results = [r async for r in p.stream({"id": f"p{i}", "problem": f"q{i}"} for i in range(problems))]
        ended = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {
        "problems": problems,
        "seconds_per_problem_recorded": seconds_each,
        "parallel": parallel,
        "budget_s": budget_s,
        "answered": sum(r.answer is not None for r in results),
        "statuses": statuses,
        "run_seconds": round(ended, 2),
        "seconds_past_budget": round(ended - budget_s, 2),
    }


def _accuracy_cfg(style: str, samples: int, max_new_tokens: int, batch: int) -> Config:
    return Config().replace(
        model={"dtype": "float32"},
        generation={
            "samples": samples,
            "temperature": 0.8,
            "min_p": 0.02,
            "max_new_tokens": max_new_tokens,
            "prompt_style": style,
            "max_rounds": 4,
        },
        batch={"max_batch_size": batch},
        cache={"size": 0},
    )


async def _solve(cfg: Config, backend: Any, problems: list[Any]) -> dict[str, Any]:
    started = time.perf_counter()
    async with Pipeline(cfg, backend=backend) as p:
        results = [r async for r in p.stream(problems)]
        cells = p.runner.sandbox.stats.cells if p.runner.sandbox is not None else 0
    elapsed = time.perf_counter() - started
    return {
        "accuracy": round(sum(bool(r.correct) for r in results) / len(results), 3),
        "seconds": round(elapsed, 1),
        "new_tokens": sum(r.new_tokens for r in results),
        "code_cells": cells,
        "answers": {r.id: r.answer for r in results},
    }


def accuracy_figures(n: int, k: int, max_new_tokens: int, batch: int) -> dict[str, Any]:
    """Greedy, majority of ``k`` and TIR with ``k`` samples on the first ``n`` GSM8K problems."""
    problems = gsm8k(n)
    backend: Any = load_backend(_accuracy_cfg("cot", 1, max_new_tokens, batch))
    backend.configure(max_batch_size=batch, max_wait_s=0.02, max_batch_tokens=None)
    rows = {}
    try:
        for name, style, samples in [
            ("greedy", "cot", 1),
            (f"majority of {k}", "cot", k),
            (f"tir, {k} samples", "tir", k),
        ]:
            rows[name] = anyio.run(
                _solve, _accuracy_cfg(style, samples, max_new_tokens, batch), backend, problems
            )
            print(
                json.dumps({name: {k_: v for k_, v in rows[name].items() if k_ != "answers"}}),
                file=sys.stderr,
            )
    finally:
        backend.close()
    return {"problems": n, "k": k, "max_new_tokens": max_new_tokens, "model": backend.model_id, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    """The report as the page in docs/bench."""
    lines = ["# tool-integrated reasoning, sandbox, time budget", "", f"`{report['command']}`", ""]
    sb = report.get("sandbox")
    if sb:
        lines += ["## sandbox", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in sb.items()]
        lines.append("")
    b = report.get("budget")
    if b:
        lines += ["## time budget (replay backend)", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in b.items()]
        lines.append("")
    a = report.get("accuracy")
    if a:
        lines += [
            f"## accuracy: GSM8K, first {a['problems']} problems, {a['model']}, "
            f"{a['max_new_tokens']} new tokens",
            "",
            "| mode | accuracy | seconds | new tokens | code cells |",
            "|---|---|---|---|---|",
        ]
        for name, r in a["rows"].items():
            lines.append(
                f"| {name} | {r['accuracy']} | {r['seconds']} | {r['new_tokens']} | {r['code_cells']} |"
            )
        lines.append("")
    lines.append(f"Environment: {report['environment']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the parts asked for, print them, write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.tir", description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="*", default=["sandbox", "budget", "accuracy"])
    p.add_argument("--cells", type=int, default=40)
    p.add_argument("--problems", type=int, default=20)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--budget-problems", type=int, default=50)
    p.add_argument("--budget-s", type=float, default=5.0)
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    previous = out / "tir.json"
    report: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    command = "python -m bench.tir " + " ".join(sys.argv[1:])
    report["command"] = f"{report['command']}; then {command}" if report.get("command") else command
    report["settings"] = vars(args)
    if "sandbox" in args.parts:
        report["sandbox"] = sandbox_figures(args.cells)
        print(json.dumps(report["sandbox"]), file=sys.stderr)
    if "budget" in args.parts:
        report["budget"] = anyio.run(_budget_run, args.budget_problems, 0.5, args.budget_s, 2)
        print(json.dumps(report["budget"]), file=sys.stderr)
    if "accuracy" in args.parts:
        report["accuracy"] = accuracy_figures(args.problems, args.k, args.max_new_tokens, args.batch_size)
    import torch

    report["environment"] = (
        f"python={platform.python_version()}, torch={torch.__version__}, machine={platform.machine()}, "
        f"cpu_count={os.cpu_count()}, root={os.geteuid() == 0}"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tir.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "tir.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
