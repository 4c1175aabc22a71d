"""``python -m bench.options``: each preset and each quantisation mode, side by side in one run.

Every row is one ``python -m pipeline stream`` process on the same GSM8K problems with the default
model; the figures come from its summary and ``--metrics-json``: problems/s (after the model loaded),
peak RSS of the process, accuracy. ``--max-new-tokens`` caps every row alike so the table finishes on
a small CPU; the presets' other settings (samples, tir, early stop, batching) are theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.data import gsm8k

ROWS: list[tuple[str, list[str]]] = [
    ("default (float32)", ["--dtype", "float32"]),
    ("--quantize bf16", ["--quantize", "bf16"]),
    ("--quantize int8", ["--quantize", "int8", "--dtype", "float32"]),
    ("--preset max-speed", ["--preset", "max-speed", "--dtype", "float32"]),
    ("--preset low-memory", ["--preset", "low-memory", "--dtype", "float32"]),
    ("--preset timeout-safe", ["--preset", "timeout-safe", "--dtype", "float32"]),
    ("--preset sequential", ["--preset", "sequential", "--dtype", "float32"]),
    ("--preset max-accuracy", ["--preset", "max-accuracy", "--dtype", "float32"]),
]


def run_row(name: str, flags: list[str], src: Path, folder: Path, max_new_tokens: int) -> dict[str, Any]:
    """One command; its summary and metrics."""
    metrics, out = folder / "m.json", folder / "out.jsonl"
    out.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "pipeline", "stream", str(src), "-o", str(out), "--no-progress",
        "--metrics-json", str(metrics), "--cache-size", "0", *flags, "--max-new-tokens", str(max_new_tokens),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        return {
            "name": name,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode,
        }
    data = json.loads(metrics.read_text())
    s, m = data["summary"], data["metrics"]
    return {
        "name": name,
        "flags": " ".join(flags),
        "problems": s["problems"],
        "accuracy": s.get("accuracy"),
        "seconds": s["seconds"],
        "problems_per_s": s["problems_per_s"],
        "new_tokens_per_s": s["new_tokens_per_s"],
        "peak_rss_mib": m["memory"]["peak_rss_mib"],
        "samples": data["config"]["generation"]["samples"],
        "prompt_style": data["config"]["generation"]["prompt_style"],
    }


def main() -> None:
    """Run every row, print it, write docs/bench/options.{json,md}."""
    p = argparse.ArgumentParser(prog="python -m bench.options", description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rows", nargs="*", help="names of the rows to run (default: all)")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "gsm8k.jsonl"
        src.write_text(
            "".join(
                json.dumps({"id": q.id, "problem": q.text, "answer": q.answer}) + "\n"
                for q in gsm8k(args.problems)
            )
        )
        for name, flags in ROWS:
            if args.rows and name not in args.rows:
                continue
            rows.append(run_row(name, flags, src, Path(d), args.max_new_tokens))
            print(json.dumps(rows[-1]), file=sys.stderr)
    base = next((r for r in rows if r["name"].startswith("default") and "error" not in r), None)
    md = [
        "# presets and quantisation",
        "",
        f"`python -m bench.options {' '.join(sys.argv[1:])}`: first {args.problems} GSM8K problems, "
        f"{args.max_new_tokens} new tokens at most, default model, one process per row, "
        f"cpu_count={os.cpu_count()}",
        "",
        "| setting | samples | prompt | accuracy | problems/s | speed vs default | tokens/s "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['name']} | | | error: {r['error']} | | | | |")
            continue
        speed = f"{r['problems_per_s'] / base['problems_per_s']:.2f}" if base else ""
        md.append(
            f"| {r['name']} | {r['samples']} | {r['prompt_style']} | {r['accuracy']} | "
            f"{r['problems_per_s']} | {speed} | {r['new_tokens_per_s']} | {r['peak_rss_mib']} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "options.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    (out / "options.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
