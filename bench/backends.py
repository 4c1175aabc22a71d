"""``python -m bench.backends``: the model seam measured side by side, in one process, one run.

Figures (GSM8K problems, greedy, the same model, dtype, ``max_new_tokens`` and prompts throughout):

- ``plain transformers loop``: batched ``generate`` over input-order batches, the loop a user writes;
- ``pipeline transformers``: the pipeline on the default backend (micro-batching);
- ``vllm offline``: vLLM's own ``LLM.generate`` over all prompts (vLLM's best case);
- ``pipeline vllm``: the pipeline on ``--backend vllm`` (``AsyncLLM``, continuous batching);
- latency under Poisson arrivals and one at a time (the Kaggle gateway), per backend;
- abort latency: from cancelling a request to its slot being free, per backend;
- with ``--command``: the whole command as a user runs it, start-up included: ``python -m pipeline
  stream`` against ``python -m bench.plain_script`` (the plain batched script), same settings.

Writes ``<out>/backends.json`` and ``backends.md``. Needs the vLLM backend installed
(``bash scripts/setup.sh dev``); the engines start in separate processes, hence the main guard.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from bench.data import gsm8k
from bench.plain import plain_generate
from bench.scenarios import _encode_all as encode_all
from bench.scenarios import _figures as scenario_figures
from bench.scenarios import arrivals
from pipeline.api import Pipeline
from pipeline.config import Config
from pipeline.items import Problem
from stages.backends.base import Backend, Request, SamplingParams
from stages.extraction import check_answer

Figures = dict[str, Any]
ROOT = Path(__file__).resolve().parents[1]


def _config(args: argparse.Namespace, backend: str) -> Config:
    return Config().replace(
        model={"backend": backend, "dtype": args.dtype, "device": "cpu"},
        batch={"max_batch_size": args.batch_size},
        generation={"max_new_tokens": args.max_new_tokens},
        run={"max_in_flight": max(args.problems, 8)},
        vllm={"max_model_len": 2048},
        cache={"size": 0},
    )


def _figures(name: str, problems: list[Problem], seconds: float, new_tokens: int, correct: int) -> Figures:
    figures = scenario_figures(name, problems, seconds, new_tokens, correct)
    figures["correct"] = correct
    return figures


def _correct(text: str, gold: int | None) -> bool:
    answer = check_answer(text, modulus=None, lo=0, hi=99999)[0]
    return answer is not None and answer == gold


def plain_loop(problems: list[Problem], backend: Any, cfg: Config, batch: int) -> Figures:
    """Batched ``generate`` in input order (``bench.plain.plain_generate``: no scheduler)."""
    enc = encode_all(problems, backend, cfg)
    start = time.perf_counter()
    tokens = correct = 0
    for i in range(0, len(enc), batch):
        chunk = enc[i : i + batch]
        outs = plain_generate(backend, [e.prompt_ids for e in chunk], cfg.generation.max_new_tokens)
        for e, o in zip(chunk, outs, strict=True):
            tokens += o.new_tokens
            correct += _correct(o.text, e.problem.answer)
    return _figures("plain transformers loop", problems, time.perf_counter() - start, tokens, correct)


def vllm_offline(problems: list[Problem], cfg: Config, tokenizer_backend: Backend) -> Figures:
    """vLLM's offline ``LLM.generate`` over every prompt at once, same engine settings as the backend."""
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from stages.backends.vllm_backend import engine_settings

    folder = str(getattr(tokenizer_backend, "settings", {}).get("model"))
    settings = engine_settings(cfg, device="cpu", dtype=cfg.model.dtype, folder=folder, max_context=2048)
    llm = LLM(**settings)
    try:
        enc = encode_all(problems, tokenizer_backend, cfg)
        params = VSamplingParams(max_tokens=cfg.generation.max_new_tokens, temperature=0.0)
        llm.generate([TokensPrompt(prompt_token_ids=list(enc[0].prompt_ids))], params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=list(e.prompt_ids)) for e in enc], params, use_tqdm=False
        )
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    correct = sum(_correct(o.outputs[0].text, e.problem.answer) for o, e in zip(outs, enc, strict=True))
    return _figures("vllm offline", problems, seconds, tokens, correct)


async def timed_stream(problems: list[Problem], backend: Backend, cfg: Config) -> tuple[float, list[Any]]:
    """The pipeline over ``problems``: seconds from the first problem in to the last result out, and
    the results."""
    fresh = [replace(p, submitted=time.perf_counter()) for p in problems]
    async with Pipeline(cfg, backend=backend) as p:
        start = time.perf_counter()
        results = [r async for r in p.stream(fresh)]
        seconds = time.perf_counter() - start
    assert len(results) == len(problems)
    return seconds, results


async def pipeline(problems: list[Problem], backend: Backend, cfg: Config, name: str) -> Figures:
    """The pipeline over ``problems``, timed from the first problem in to the last result out."""
    seconds, results = await timed_stream(problems, backend, cfg)
    figs = _figures(
        name, problems, seconds, sum(r.new_tokens for r in results), sum(bool(r.correct) for r in results)
    )
    figs["answers"] = {str(r.id): r.answer for r in results}
    return figs


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 3)


async def load(
    problems: list[Problem], backend: Backend, cfg: Config, rate: float | None, name: str
) -> Figures:
    """Latency (submit to result) under Poisson arrivals at ``rate``/s, or one at a time (``None``)."""
    latencies, seconds = await arrivals(problems, backend, cfg, rate)
    return {
        "scenario": f"load {name}",
        "arrival": "one at a time (gateway)" if rate is None else f"poisson {rate:g}/s",
        "problems": len(problems),
        "seconds": round(seconds, 3),
        "latency_p50_s": _pct(latencies, 50),
        "latency_p95_s": _pct(latencies, 95),
    }


async def abort_latency(backend: Any, name: str, repeats: int = 5) -> Figures:
    """Cancel one of four running long requests after 0.5 s; time until the engine no longer holds it.

    transformers: until the batch loop dropped the row (its next decode step); vLLM: until the
    engine's count of unfinished requests fell.
    """
    prompt = tuple(backend.encode([{"role": "user", "content": "Write a very long story about a dragon."}]))
    waits: list[float] = []
    for r in range(repeats):
        async with anyio.create_task_group() as tg:
            await tg.start(backend.serve)
            others = [anyio.CancelScope() for _ in range(3)]

            async def long(rid: str, scope: anyio.CancelScope) -> None:
                with scope:
                    await backend.generate(Request(rid, prompt, SamplingParams(max_new_tokens=400)))

            async with anyio.create_task_group() as bg:
                for i in range(3):
                    bg.start_soon(long, f"bg{r}-{i}", others[i])
                target = anyio.CancelScope()
                bg.start_soon(long, f"target{r}", target)
                await anyio.sleep(0.5)
                if name == "vllm":
                    before = backend.unfinished()
                    target.cancel()
                    t0 = time.perf_counter()
                    while backend.unfinished() >= before:  # noqa: ASYNC110 (the engine has no event)
                        await anyio.sleep(0.0005)
                    waits.append(time.perf_counter() - t0)
                else:
                    n = len(backend.scheduler.stats.abort_latency_s)
                    target.cancel()
                    while len(backend.scheduler.stats.abort_latency_s) == n:  # noqa: ASYNC110
                        await anyio.sleep(0.0005)
                    waits.append(backend.scheduler.stats.abort_latency_s[-1])
                for scope in others:
                    scope.cancel()
            tg.cancel_scope.cancel()
    return {
        "scenario": f"abort {name}",
        "repeats": repeats,
        "abort_median_ms": round(statistics.median(waits) * 1000, 2),
        "abort_max_ms": round(max(waits) * 1000, 2),
    }


def command(args: argparse.Namespace, problems: list[Problem]) -> list[Figures]:
    """The whole command, start-up included, against the plain script (each run twice, alternating)."""
    work = Path(tempfile.mkdtemp(prefix="bench-command-"))
    data = work / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "problem": p.text}) + "\n" for p in problems))
    common = ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    runs = {
        "command: python -m pipeline stream": [
            sys.executable, "-m", "pipeline", "stream", str(data), "-o", str(work / "a.jsonl"),
            "--dtype", args.dtype, "--no-progress", "--log-level", "warning", *common,
        ],
        "command: plain script": [
            sys.executable, "-m", "bench.plain_script", str(data), str(work / "b.jsonl"),
            "--dtype", args.dtype, *common,
        ],
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(args.command_repeats):
        for name, cmd in runs.items():
            (work / "a.jsonl").unlink(missing_ok=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {times[name][-1]:.1f} s", file=sys.stderr)
    return [
        {"scenario": name, "problems": len(problems), "seconds": round(statistics.median(t), 3), "runs": t}
        for name, t in times.items()
    ]


def main() -> None:
    """Run every figure, print them, write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="transformers batch (plain loop and pipeline)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--load-problems", type=int, default=16)
    p.add_argument("--rates", type=float, nargs="*", default=[0.25, 1.0])
    p.add_argument("--command", action="store_true", help="also time the whole command against the script")
    p.add_argument("--command-repeats", type=int, default=2)
    p.add_argument(
        "--command-only", action="store_true", help="time only the whole command against the script"
    )
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command_only:
        whole_command(args)
        return

    from pipeline.api import load_backend

    problems = gsm8k(args.problems)
    rows: list[Figures] = []

    def show(f: Figures) -> None:
        rows.append(f)
        print(json.dumps({k: v for k, v in f.items() if k != "answers"}), file=sys.stderr)

    cfg_t = _config(args, "transformers")
    tb: Any = load_backend(cfg_t)
    plain_loop(problems[:2], tb, replace_tokens(cfg_t, 4), args.batch_size)  # warm-up, untimed
    show(plain_loop(problems, tb, cfg_t, args.batch_size))
    show(anyio.run(pipeline, problems, tb, cfg_t, "pipeline transformers"))
    for rate in [*args.rates, None]:
        show(anyio.run(load, problems[: args.load_problems], tb, cfg_t, rate, "transformers"))
    show(anyio.run(abort_latency, tb, "transformers"))

    cfg_v = _config(args, "vllm")
    vb: Any = load_backend(cfg_v)

    async def vllm_phase() -> None:  # one event loop: the engine's output task belongs to it
        await pipeline(problems[:2], vb, cfg_v, "warm-up")
        show(await pipeline(problems, vb, cfg_v, "pipeline vllm"))
        for rate in [*args.rates, None]:
            show(await load(problems[: args.load_problems], vb, cfg_v, rate, "vllm"))
        show(await abort_latency(vb, "vllm"))

    try:
        anyio.run(vllm_phase)
    finally:
        vb.close()
    show(vllm_offline(problems, cfg_v, tb_with_folder(tb, vb)))
    tb.close()
    if args.command:
        for f in command(args, problems):
            show(f)

    by = {r["scenario"]: r for r in rows}
    ratios: dict[str, float] = {}

    def ratio(name: str, a: str, b: str, key: str = "problems_per_s", invert: bool = False) -> None:
        if a in by and b in by:
            x, y = by[a][key], by[b][key]
            ratios[name] = round((y / x) if invert else (x / y), 3)

    ratio("pipeline vllm / vllm offline", "pipeline vllm", "vllm offline")
    ratio("pipeline vllm / plain transformers loop", "pipeline vllm", "plain transformers loop")
    ratio(
        "pipeline transformers / plain transformers loop", "pipeline transformers", "plain transformers loop"
    )
    ratio(
        "command pipeline / plain script (speed)",
        "command: python -m pipeline stream",
        "command: plain script",
        key="seconds",
        invert=True,
    )
    same = sum(
        by["pipeline vllm"]["answers"][k] == v for k, v in by["pipeline transformers"]["answers"].items()
    )
    report = {
        "settings": vars(args),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "ratios": ratios,
        "same_answers_vllm_vs_transformers": f"{same}/{len(problems)}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backends.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "backends.md").write_text(markdown(report))
    print(json.dumps(ratios, indent=1))


def whole_command(args: argparse.Namespace) -> None:
    """``--command-only``: the whole command against the plain script, alone (``command.json``/``.md``)."""
    rows = command(args, gsm8k(args.problems))
    a, b = (statistics.median(r["runs"]) for r in rows)
    report = {
        "settings": vars(args),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "ratios": {"command pipeline / plain script (speed)": round(b / a, 3)},
    }
    speed = round(b / a, 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.json").write_text(json.dumps(report, indent=1, default=str))
    lines = ["# The whole command against the plain script", "", f"Settings: `{json.dumps(vars(args))}`", ""]
    lines += ["| scenario | median s | runs (s) |", "|---|---|---|"]
    lines += [
        f"| {r['scenario']} | {r['seconds']} | {', '.join(f'{t:.2f}' for t in r['runs'])} |" for r in rows
    ]
    lines += [
        "",
        f"pipeline / plain script (speed): **{speed}**",
    ]
    (out / "command.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"command pipeline / plain script (speed)": speed}, indent=1))


def replace_tokens(cfg: Config, n: int) -> Config:
    """``cfg`` with ``max_new_tokens = n``."""
    return cfg.replace(generation={"max_new_tokens": n})


def tb_with_folder(tb: Any, vb: Any) -> Any:
    """The transformers backend (for its tokenizer), tagged with the model folder vLLM used."""
    tb.settings = vb.settings
    return tb


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    lines = ["# Backends, side by side", "", f"Settings: `{json.dumps(report['settings'])}`", ""]
    lines += [
        "| scenario | seconds | problems/s | tokens/s | p50 s | p95 s | abort ms (median) |",
        "|---" * 7 + "|",
    ]
    for r in report["rows"]:
        name = f"{r['scenario']} {r.get('arrival', '')}".strip()
        keys = ("seconds", "problems_per_s", "new_tokens_per_s", "latency_p50_s", "latency_p95_s")
        cells = [str(r.get(k, "")) for k in (*keys, "abort_median_ms")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios (measured in this one run):", ""]
    lines += [f"- {k}: **{v}**" for k, v in report["ratios"].items()]
    lines += [
        "",
        f"Greedy answers equal between the backends: {report['same_answers_vllm_vs_transformers']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
