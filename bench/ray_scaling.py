"""``python -m bench.ray_scaling``: the stream on Ray with 1 and 2 replicas against the local engine.

Two workloads, each through the whole ``stream`` command code (``run_file``), one after another in
one process, on a local Ray cluster:

- a scripted model that waits 0.5 s per batch of 4 (a model whose time is not this machine's CPU,
  as a GPU's is not): what Ray's replicas can add when each has its own device;
- the real default model on this CPU: what 2 replicas sharing 2 cores can add (little: they compete
  for the same cores).

Per-replica throughput against the local engine is the cost of going through Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.data import gsm8k
from stages.backends.fake import FakeBackend


def slow_fake() -> FakeBackend:
    """A scripted model that takes 0.5 s per batch of up to 4 problems (built in each actor)."""
    return FakeBackend(delay_s=0.5, max_batch_size=4, max_wait_s=0.05, record=False)


def _run(
    src: Path, out: Path, flags: list[str], backend: Any = None, spec: str | None = None
) -> dict[str, Any]:
    from pipeline.cli import build_parser, config_from_args
    from pipeline.run_file import run_file

    out.unlink(missing_ok=True)
    args = build_parser().parse_args(["stream", str(src), "-o", str(out), "--no-progress", *flags])
    cfg = config_from_args(args)
    started = time.perf_counter()
    code = anyio.run(run_file, args, cfg, backend, spec)
    seconds = time.perf_counter() - started
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    return {
        "code": code,
        "seconds": round(seconds, 2),
        "problems": len(rows),
        "problems_per_s": round(len(rows) / seconds, 3),
        "answers": {r["id"]: r["answer"] for r in rows},
    }


def main() -> None:
    """Run the workloads, print the figures, write docs/bench/ray_scaling.{json,md}."""
    p = argparse.ArgumentParser(prog="python -m bench.ray_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--fake-problems", type=int, default=64)
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.ray_engine import RayOptions, init_ray

    init_ray(RayOptions(replicas=2))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        fake_src = folder / "fake.jsonl"
        fake_src.write_text(
            "".join(
                json.dumps({"id": f"s{i}", "problem": f"What is {i} + {i % 7}?"}) + "\n"
                for i in range(args.fake_problems)
            )
        )
        real_src = folder / "gsm8k.jsonl"
        real_src.write_text(
            "".join(
                json.dumps({"id": q.id, "problem": q.text, "answer": q.answer}) + "\n"
                for q in gsm8k(args.problems)
            )
        )
        out = folder / "out.jsonl"
        fake_flags = ["--batch-size", "4", "--max-wait-ms", "50"]
        runs: list[tuple[str, str, Path, list[str], Any, str | None]] = [
            ("scripted 0.5 s/batch", "local", fake_src, fake_flags, slow_fake(), None),
            ("scripted 0.5 s/batch", "ray, 1 replica", fake_src, [*fake_flags, "--engine", "ray"], None,
             "bench.ray_scaling:slow_fake"),
            ("scripted 0.5 s/batch", "ray, 2 replicas", fake_src,
             [*fake_flags, "--engine", "ray", "--replicas", "2"], None, "bench.ray_scaling:slow_fake"),
        ]  # fmt: skip
        real_flags = ["--max-new-tokens", str(args.max_new_tokens), "--dtype", "float32"]
        runs += [
            ("real model, CPU", "local", real_src, real_flags, None, None),
            ("real model, CPU", "ray, 1 replica", real_src, [*real_flags, "--engine", "ray"], None, None),
            ("real model, CPU", "ray, 2 replicas", real_src,
             [*real_flags, "--engine", "ray", "--replicas", "2"], None, None),
        ]  # fmt: skip
        for workload, engine, src, flags, backend, spec in runs:
            r = _run(src, out, flags, backend, spec)
            r.update(workload=workload, engine=engine)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "answers"}), file=sys.stderr)
    md = [
        "# the stream on Ray",
        "",
        f"`python -m bench.ray_scaling {' '.join(sys.argv[1:])}`: local Ray cluster on this machine "
        f"({os.cpu_count()} CPUs); seconds include the actors' start-up (model loading)",
        "",
        "| workload | engine | problems | seconds | problems/s | vs local |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        local = next(x for x in rows if x["workload"] == r["workload"] and x["engine"] == "local")
        md.append(
            f"| {r['workload']} | {r['engine']} | {r['problems']} | {r['seconds']} | {r['problems_per_s']} | "
            f"{r['problems_per_s'] / local['problems_per_s']:.2f} |"
        )
        r["same_answers_as_local"] = sum(local["answers"][k] == v for k, v in r["answers"].items())
    md.append("")
    for r in rows:
        if r["engine"] != "local":
            same = r["same_answers_as_local"]
            md.append(f"- {r['workload']}, {r['engine']}: same answers as local on {same}/{r['problems']}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ray_scaling.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "ray_scaling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
