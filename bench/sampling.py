"""``python -m bench.sampling``: each backend's tokens/s on greedy, sampled and tool-integrated runs, side
by side in one process, with each engine's own best case as the reference.

Workloads (GSM8K problems, the default model, float32 on CPU, ``--max-new-tokens``):

- ``greedy``: one greedy sample per problem;
- ``sampled``: ``--samples`` seeded samples per problem at temperature 0.7;
- ``tir``: the same samples with ``--prompt tir`` (code cells run in the sandbox between rounds).

Rows: ``pipeline <backend> <workload>`` (the whole pipeline, first problem in to last result out; the
transformers backend on its default continuous batching, and again as ``pipeline transformers static``
on the micro-batcher, the same loaded model), and
the references: ``vllm offline <workload>`` (vLLM's ``LLM.generate`` over every prompt at once, one
request per sample with its own seed, the same engine settings as the backend: its best case), and
``transformers continuous batching <workload>`` (the pinned transformers' ``generate_batch``, its
paged continuous batching, which has no per-request seeds: its sampled row draws with one global
generator). Ratios: pipeline vLLM against vLLM offline; the pipeline's transformers backend (the
micro-batcher) against transformers' continuous batching.

Writes ``<out>/sampling.json`` and ``sampling.md``; the engines start in separate processes, hence
the main guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench.backends import _correct, timed_stream
from bench.data import gsm8k
from bench.scenarios import _encode_all as encode_all
from pipeline.config import Config
from pipeline.items import Problem
from stages.backends.base import Backend

Figures = dict[str, Any]
WORKLOADS = ("greedy", "sampled", "tir")


def config(args: argparse.Namespace, backend: str, workload: str) -> Config:
    """The run's settings for one backend and workload."""
    samples = 1 if workload == "greedy" else args.samples
    gen: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "samples": samples}
    if workload != "greedy":
        gen["temperature"] = 0.7
    if workload == "tir":
        gen["prompt_style"] = "tir"
    return Config().replace(
        model={"backend": backend, "dtype": "float32", "device": "cpu"},
        batch={"max_batch_size": args.batch_size},
        generation=gen,
        run={"max_in_flight": args.problems},
        # one engine for every workload, sized for the sampled ones (as a sampled run sizes it)
        vllm={"max_model_len": 2048, "max_num_seqs": args.problems * args.samples},
        cache={"size": 0},
    )


def row(name: str, seconds: float, tokens: int, samples: int, correct: int | None = None) -> Figures:
    """One row of figures."""
    return {
        "scenario": name,
        "seconds": round(seconds, 3),
        "samples": samples,
        "new_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
        "correct": correct,
    }


async def pipeline(problems: list[Problem], backend: Backend, cfg: Config, name: str) -> Figures:
    """The pipeline over ``problems``: first problem in to last result out."""
    seconds, results = await timed_stream(problems, backend, cfg)
    samples = sum(r.samples for r in results)
    return row(
        name, seconds, sum(r.new_tokens for r in results), samples, sum(bool(r.correct) for r in results)
    )


def offline_sampling(cfg: Config, seed: int) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords for one offline sample: the sampling the pipeline's requests
    carry (``stages/backends/vllm_backend.py`` maps them so), seeded."""
    g = cfg.generation
    if g.greedy:
        return {"max_tokens": g.max_new_tokens, "temperature": 0.0}
    want_logprobs = g.logprobs or cfg.vote.confidence or g.top_logprobs > 0
    return {
        "max_tokens": g.max_new_tokens,
        "temperature": g.temperature,
        "top_p": g.top_p,
        "min_p": g.min_p,
        "seed": seed,
        "logprobs": g.top_logprobs if want_logprobs else None,
    }


def vllm_offline(problems: list[Problem], cfg: Config, tokenizer: Backend, folder: str, name: str) -> Figures:
    """``LLM.generate`` over every sample's prompt at once (one request per sample, seeded, with the
    temperature, top-p, min-p and log-probs the pipeline's requests carry)."""
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    from stages.backends.vllm_backend import engine_settings

    g = cfg.generation
    settings = engine_settings(cfg, device="cpu", dtype="float32", folder=folder, max_context=2048)
    llm = LLM(**settings)
    try:
        enc = encode_all(problems, tokenizer, cfg)
        prompts, params = [], []
        for i, e in enumerate(enc):
            for s in range(g.samples):
                prompts.append(TokensPrompt(prompt_token_ids=list(e.prompt_ids)))
                params.append(VSamplingParams(**offline_sampling(cfg, 1000 * i + s)))
        llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return row(name, seconds, tokens, len(outs))


def continuous_batching(problems: list[Problem], backend: Any, cfg: Config, name: str) -> Figures:
    """transformers' own paged continuous batching (``generate_batch``) over every sample's prompt."""
    import logging

    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    g = cfg.generation
    enc = encode_all(problems, backend, cfg)
    prompts = [list(e.prompt_ids) for e in enc for _ in range(g.samples)]
    settings = GenerationConfig(
        max_new_tokens=g.max_new_tokens,
        do_sample=not g.greedy,
        temperature=None if g.greedy else g.temperature,
        top_p=None,
        top_k=None,
        eos_token_id=sorted(backend.eos_ids),
        pad_token_id=backend.pad_id,
    )
    per_block = 256
    blocks = max(16, -(-len(prompts) * (max(map(len, prompts)) + g.max_new_tokens) // per_block))
    cb = ContinuousBatchingConfig(
        num_blocks=blocks,
        max_batch_tokens=512,
        max_requests_per_batch=cfg.batch.max_batch_size,
        use_cuda_graph=False,
        use_async_batching=False,
    )
    start = time.perf_counter()
    out = backend.model.generate_batch(prompts, generation_config=settings, continuous_batching_config=cb)
    seconds = time.perf_counter() - start
    texts = [backend.tokenizer.decode(o.generated_tokens, skip_special_tokens=True) for o in out.values()]
    tokens = sum(len(o.generated_tokens) for o in out.values())
    golds = [e.problem.answer for e in enc for _ in range(g.samples)]
    correct = sum(_correct(t, a) for t, a in zip(texts, golds, strict=False))
    return row(name, seconds, tokens, len(prompts), correct)


def main() -> None:
    """Run every row, print them, write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.sampling", description=__doc__.splitlines()[0])
    p.add_argument("--problems", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--backends", default="transformers,vllm")
    p.add_argument("--out", default="docs/bench")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.api import load_backend

    workloads = [w for w in args.workloads.split(",") if w]
    backends = [b for b in args.backends.split(",") if b]
    problems = gsm8k(args.problems)
    rows: list[Figures] = []

    def show(f: Figures) -> None:
        rows.append(f)
        print(json.dumps(f), file=sys.stderr, flush=True)

    tb: Any = load_backend(config(args, "transformers", "greedy"))
    anyio.run(
        pipeline, problems[:2], tb, replace_tokens(config(args, "transformers", "greedy"), 4), "warm-up"
    )
    if "transformers" in backends:
        static = tb.on_engine("static")
        for w in workloads:
            cfg = config(args, "transformers", w)
            show(anyio.run(pipeline, problems, tb, cfg, f"pipeline transformers {w}"))
            show(anyio.run(pipeline, problems, static, cfg, f"pipeline transformers static {w}"))
        for w in (w for w in workloads if w != "tir"):
            cfg = config(args, "transformers", w)
            show(continuous_batching(problems, tb, cfg, f"transformers continuous batching {w}"))
    if "vllm" in backends:
        vb: Any = load_backend(config(args, "vllm", "greedy"))
        folder = str(vb.settings["model"])

        async def vllm_phase() -> None:  # one event loop: the engine's output task belongs to it
            await pipeline(problems[:2], vb, replace_tokens(config(args, "vllm", "greedy"), 4), "warm-up")
            for w in workloads:
                show(await pipeline(problems, vb, config(args, "vllm", w), f"pipeline vllm {w}"))

        try:
            anyio.run(vllm_phase)
        finally:
            vb.close()
        for w in (w for w in workloads if w != "tir"):
            show(vllm_offline(problems, config(args, "vllm", w), tb, folder, f"vllm offline {w}"))
    tb.close()
    by = {r["scenario"]: r for r in rows}
    ratios: dict[str, float] = {}
    for w in workloads:
        for a, b in (
            (f"pipeline vllm {w}", f"vllm offline {w}"),
            (f"pipeline transformers {w}", f"pipeline transformers static {w}"),
            (f"pipeline transformers {w}", f"transformers continuous batching {w}"),
            (f"pipeline vllm {w}", f"pipeline transformers {w}"),
        ):
            if a in by and b in by and by[b]["tokens_per_s"]:
                ratios[f"{a} / {b} (tokens/s)"] = round(by[a]["tokens_per_s"] / by[b]["tokens_per_s"], 3)
    report = {"settings": vars(args), "cpu_count": os.cpu_count(), "rows": rows, "ratios": ratios}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(report, indent=1))
    (out / "sampling.md").write_text(markdown(report))
    print(json.dumps(ratios, indent=1))


def replace_tokens(cfg: Config, n: int) -> Config:
    """``cfg`` with ``max_new_tokens = n``."""
    return cfg.replace(generation={"max_new_tokens": n})


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    lines = [
        "# Sampling at full speed, side by side",
        "",
        f"Settings: `{json.dumps(report['settings'])}`",
        "",
    ]
    lines += [
        "| scenario | samples | new tokens | seconds | tokens/s | correct |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['scenario']} | {r['samples']} | {r['new_tokens']} | {r['seconds']} | {r['tokens_per_s']} "
            f"| {r['correct'] if r['correct'] is not None else '-'} |"
        )
    lines += ["", "Measured side by side in one run:", ""]
    lines += [f"- {k}: **{v}**" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
