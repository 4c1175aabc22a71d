"""``python -m pipeline stream INPUT``: the command line.

Exit codes: 0 the run finished (per-problem errors are in the output, not the exit code); 1 the run
failed midway (the output written so far stays valid); 2 bad usage or input found before any work
started (missing file, unwritable output, invalid config, a model that does not load); 130 interrupted
by SIGINT or SIGTERM (finished results are written; ``--resume`` finishes the rest).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from pipeline import log as logsetup
from pipeline.api import PipelineError
from pipeline.budget import memory_derivation
from pipeline.config import Config, ConfigError
from pipeline.presets import PRESETS, resolve
from pipeline.run_file import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_stream
from pipeline.sink import OutputError, check_writable
from stages.parse import InputError, check_source

# flag -> (section, field)
_FLAG_FIELDS: dict[str, tuple[str, str]] = {
    "model": ("model", "path"),
    "device": ("model", "device"),
    "dtype": ("model", "dtype"),
    "memory_gb": ("model", "memory_gb"),
    "backend": ("model", "backend"),
    "quantize": ("model", "quantize"),
    "batch_size": ("batch", "max_batch_size"),
    "max_wait_ms": ("batch", "max_wait_ms"),
    "max_batch_tokens": ("batch", "max_batch_tokens"),
    "samples": ("generation", "samples"),
    "temperature": ("generation", "temperature"),
    "top_p": ("generation", "top_p"),
    "min_p": ("generation", "min_p"),
    "max_new_tokens": ("generation", "max_new_tokens"),
    "seed": ("generation", "seed"),
    "answer_modulus": ("answer", "modulus"),
    "answer_min": ("answer", "min"),
    "answer_max": ("answer", "max"),
    "cache_size": ("cache", "size"),
    "cache_dir": ("cache", "dir"),
    "max_in_flight": ("run", "max_in_flight"),
    "max_tokens_in_flight": ("run", "max_tokens_in_flight"),
    "problem_timeout": ("run", "problem_timeout_s"),
    "gpu_memory_utilization": ("vllm", "gpu_memory_utilization"),
    "max_model_len": ("vllm", "max_model_len"),
    "max_num_seqs": ("vllm", "max_num_seqs"),
    "kv_cache_dtype": ("vllm", "kv_cache_dtype"),
    "quantization": ("vllm", "quantization"),
    "enforce_eager": ("vllm", "enforce_eager"),
    "prefix_caching": ("vllm", "enable_prefix_caching"),
    "verify_workers": ("run", "verify_workers"),
    "queue_size": ("run", "queue_size"),
    "cleanup_every": ("run", "cleanup_every"),
    "replay": ("model", "replay"),
    "record": ("model", "record"),
    "replay_speed": ("model", "replay_speed"),
    "prompt": ("generation", "prompt_style"),
    "max_rounds": ("generation", "max_rounds"),
    "stop_at_answer": ("generation", "stop_at_answer"),
    "cell_timeout": ("sandbox", "cell_timeout_s"),
    "sandbox_memory_mb": ("sandbox", "memory_mb"),
    "sandbox_pool": ("sandbox", "pool_size"),
    "output_chars": ("sandbox", "output_chars"),
    "sandbox_disk_mb": ("sandbox", "disk_mb"),
    "sandbox_require": ("sandbox", "require"),
    "early_stop": ("vote", "early_stop"),
    "code_weight": ("vote", "code_weight"),
    "confidence": ("vote", "confidence"),
    "time_budget": ("time", "budget_s"),
    "time_base": ("time", "base_s"),
    "expected_problems": ("time", "expected_problems"),
    "time_margin": ("time", "margin_s"),
    "fallback_answer": ("answer", "fallback"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the flags in the README)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stream", help="solve every problem in a JSONL or CSV file (or - for stdin)")
    s.add_argument("input", help="problems: .jsonl (id, problem[, answer]), .csv (id,problem[,answer]) or -")
    s.add_argument("--output", "-o", help="results JSONL file, appended (default: standard output)")
    s.add_argument("--submission", help="also write Kaggle's id,answer CSV here")
    s.add_argument(
        "--resume",
        action="store_true",
        help="skip input lines already answered in --output (same line, same id); append the rest",
    )
    s.add_argument("--config", help="a TOML file of settings; flags override it")
    g = s.add_argument_group("engine (past one machine)")
    g.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local (default): this process; ray: Ray Data over a pool of actors, each with its own "
        "pipeline and model (the ray extra)",
    )
    g.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    g.add_argument("--replicas", type=int, default=1, help="ray: pipeline actors (default 1)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="ray: CPUs each actor reserves")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, help="ray: GPUs each actor reserves")
    g.add_argument("--ray-batch-size", type=int, default=16, help="ray: problems sent to an actor at once")
    s.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="a named bundle of settings (see the README); a config file and flags override it",
    )
    s.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings and where each came from (default, preset, file, flag); exit",
    )
    g = s.add_argument_group("model")
    g.add_argument(
        "--model", help="a local Hugging Face folder or .gguf file (default: bundled SmolLM2-135M)"
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument(
        "--memory-budget",
        dest="memory_gb",
        type=size_gib,
        help="memory for weights + KV cache: 16GiB (default), 8GB, 512MiB; GPU memory on CUDA, host on CPU",
    )
    g.add_argument("--memory-gb", type=float, help="the memory budget in GiB (same as --memory-budget)")
    g.add_argument(
        "--quantize",
        choices=["none", "fp16", "bf16", "int8", "int4"],
        help="weights: fp16/bf16, int8 (CPU: torch dynamic; CUDA: bitsandbytes), int4 (CUDA: bitsandbytes)",
    )
    g.add_argument(
        "--backend",
        choices=["transformers", "vllm", "replay"],
        help="model engine: transformers (default, micro-batching), vllm (continuous batching; extra), "
        "or replay (recorded completions from --replay)",
    )
    g.add_argument("--replay", help="JSONL of recorded completions for --backend replay (see the README)")
    g.add_argument(
        "--replay-speed",
        type=float,
        help="replay: 0 answers at once (default), 1 waits each recorded time, 2 half of it",
    )
    g.add_argument("--record", help="write every completion the model returns to this JSONL (replayable)")
    g = s.add_argument_group("vllm backend (--backend vllm)")
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="GPU memory share for vLLM (default: from --memory-budget)",
    )
    g.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    g.add_argument(
        "--max-num-seqs",
        type=int,
        help="sequences batched at once (default: in-flight x samples, <= 256)",
    )
    g.add_argument("--kv-cache-dtype", help="KV cache dtype, e.g. auto, fp8 (default auto)")
    g.add_argument("--quantization", help="vLLM quantization method, e.g. awq, gptq, fp8 (default none)")
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="no CUDA graphs / compilation: loads faster (default: on for CPU, off for GPU)",
    )
    g.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of shared prompt prefixes (default on)",
    )
    g = s.add_argument_group("batching (transformers backend)")
    g.add_argument("--batch-size", type=int, help="max problems (samples) per generate call (default 16)")
    g.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 20)")
    g.add_argument(
        "--max-batch-tokens", type=int, help="token cap per batch (default: from the memory budget)"
    )
    g = s.add_argument_group("generation")
    g.add_argument("--samples", type=int, help="samples per problem; 1 is greedy (default 1)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float, help="keep tokens at least this share of the top one (default 0)")
    g.add_argument("--max-new-tokens", type=int, help="default 384")
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--prompt",
        choices=["cot", "tir"],
        help="cot: reason then \\boxed{}; tir: the model may write Python, run in the sandbox (default cot)",
    )
    g.add_argument(
        "--max-rounds",
        type=int,
        help="tir: model requests per sample, with code run between them: at most N-1 cells (default 8)",
    )
    g.add_argument(
        "--stop-at-answer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end a sample once it wrote a closing \\boxed{...} outside code (default on)",
    )
    g = s.add_argument_group("sandbox (--prompt tir)")
    g.add_argument("--cell-timeout", type=float, help="wall-clock seconds per code cell (default 10)")
    g.add_argument("--sandbox-memory-mb", type=int, help="address space per interpreter (default 2048)")
    g.add_argument("--sandbox-pool", type=int, help="interpreters kept alive (default 2 x samples, >= 2)")
    g.add_argument("--output-chars", type=int, help="characters of a cell's output shown (default 1000)")
    g.add_argument(
        "--sandbox-disk-mb",
        type=int,
        help="private tmpfs per interpreter: /tmp, /var/tmp, /dev/shm (default 64)",
    )
    g.add_argument(
        "--sandbox-require",
        metavar="LAYERS",
        help="refuse to start unless these confinement layers hold, comma-separated, or all: "
        "namespaces, filesystem, identity, seccomp, rlimits, audit_hook (default: none required; "
        "every layer that holds is used)",
    )
    g = s.add_argument_group("vote")
    g.add_argument(
        "--early-stop",
        type=int,
        help="end a problem once this many samples agree, or once its leader cannot be overtaken",
    )
    g.add_argument("--code-weight", type=float, help="vote weight of a sample whose code ran cleanly (2)")
    g.add_argument(
        "--confidence",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="weigh votes by the sample's confidence (1 / mean token surprisal; default off)",
    )
    g = s.add_argument_group("time budget")
    g.add_argument(
        "--time-budget",
        type=duration,
        help="the whole run's time, e.g. 5h, 90m, 1h30m, 300 (seconds); every problem is answered in it",
    )
    g.add_argument("--time-base", type=duration, help="the least time a problem gets while time is left")
    g.add_argument(
        "--expected-problems",
        type=int,
        help="problems the budget is spread over (default: counted from the input file)",
    )
    g.add_argument("--time-margin", type=duration, help="kept back at the end of the budget (default 1s)")
    g.add_argument("--fallback-answer", type=int, help="the answer given when no sample finished (default 0)")
    g = s.add_argument_group("answers")
    g.add_argument("--answer-modulus", type=int, help="reduce answers modulo this (1000 for AIMO 1)")
    g.add_argument("--answer-min", type=int, help="smallest valid answer (default 0)")
    g.add_argument("--answer-max", type=int, help="largest valid answer (default 99999)")
    g = s.add_argument_group("cache and concurrency")
    g.add_argument("--cache-size", type=int, help="in-memory LRU entries (default 10000; 0 disables)")
    g.add_argument("--cache-dir", help="a folder for a persistent result cache (SQLite)")
    g.add_argument("--max-in-flight", type=int, help="problems admitted at once (default 64)")
    g.add_argument(
        "--problem-timeout",
        type=float,
        help="seconds a problem may take from admission; then the vote is taken on what finished",
    )
    g.add_argument(
        "--max-tokens-in-flight",
        type=int,
        help="cap on prompt + max-new-tokens of the requests in the model at once (default: none)",
    )
    g.add_argument("--verify-workers", type=int, help="verification worker processes (default 2)")
    g.add_argument(
        "--queue-size", type=int, help="items each stream between stages holds (default: from in-flight)"
    )
    g.add_argument(
        "--cleanup-every",
        type=int,
        help="every N results: gc.collect() and, on CUDA, torch.cuda.empty_cache() (default: never)",
    )
    g = s.add_argument_group("output")
    g.add_argument("--log-json", action="store_true", help="machine-readable JSON logs on stderr")
    g.add_argument("--log-level", default="info", help="debug, info, warning or error")
    g.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    g.add_argument(
        "--metrics-json",
        help="write the summary and the metrics (queue depths, stage waits, batch fill, memory) here",
    )
    g.add_argument(
        "--grace-s",
        type=float,
        default=10.0,
        help="after SIGINT/SIGTERM, how long in-flight problems may finish (default 10)",
    )
    return parser


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)")


_SIZES = {
    "": 2**30,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def size_gib(text: str) -> float:
    """GiB from ``16GiB``, ``8GB``, ``512MiB``, ``1.5TiB`` or a bare number of GiB.

    Raises:
        argparse.ArgumentTypeError: anything else (the message shows the forms that work).
    """
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None or m.group(2) not in _SIZES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; use e.g. 16GiB, 8GB, 512MiB (bare numbers: GiB)"
        )
    gib = float(m.group(1)) * _SIZES[m.group(2)] / 2**30
    if not math.isfinite(gib) or gib <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory budget must be positive")
    return gib


def duration(text: str) -> float:
    """Seconds from ``300``, ``90s``, ``15m``, ``5h``, ``1h30m`` or ``2.5h``.

    Raises:
        argparse.ArgumentTypeError: anything else (the message shows the forms that work).
    """
    t = text.strip().lower().replace(" ", "")
    try:
        seconds = float(t)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos or not t:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration; use seconds (300) or units: 90s, 15m, 5h, 1h30m"
            ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be a positive number of seconds")
    return seconds


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then ``--preset``, then ``--config``, then flags.

    Raises:
        ConfigError: an unknown preset, or the file or a flag's value is invalid.
    """
    return resolve_args(args)[0]


def resolve_args(args: argparse.Namespace) -> tuple[Config, dict[str, str]]:
    """The config and where each setting came from (for ``--print-config``).

    Raises:
        ConfigError: as ``config_from_args``.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for flag, (section, name) in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.setdefault(section, {})[name] = value
    return resolve(getattr(args, "preset", None), getattr(args, "config", None), overrides)


def print_config(cfg: Config, sources: dict[str, str]) -> None:
    """The resolved settings as TOML, each with where it came from, then the memory derivation."""
    for section, values in cfg.to_dict().items():
        print(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, str | list | tuple):
                shown = json.dumps(list(value) if isinstance(value, tuple) else value)
            elif isinstance(value, bool):
                shown = "true" if value else "false"
            else:
                shown = repr(value)
            line = f"{key} = {shown}" if value is not None else f"# {key} unset"
            print(f"{line:<60} # {sources[f'{section}.{key}']}")
        print()
    print(f"# {memory_derivation(cfg)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.configure(json=args.log_json, level=args.log_level)
    try:
        cfg, sources = resolve_args(args)
        if args.print_config:
            print_config(cfg, sources)
            return EXIT_OK
        if args.engine == "ray":
            from pipeline.ray_engine import INSTALL_RAY, RayOptions, ray_available

            if not ray_available():
                raise ConfigError(f"--engine ray: {INSTALL_RAY}")
            if cfg.time.budget_s is not None or cfg.model.record is not None:
                raise ConfigError(
                    "--engine ray: --time-budget and --record are per process and not supported across "
                    "replicas (use --problem-timeout; record on one machine)"
                )
            try:
                RayOptions(
                    replicas=args.replicas,
                    cpus=args.cpus_per_replica,
                    gpus=args.gpus_per_replica,
                    batch_size=args.ray_batch_size,
                )
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if cfg.model.backend == "vllm":
            from stages.backends.vllm_backend import INSTALL_VLLM, vllm_available

            if not vllm_available():
                raise ConfigError(f"--backend vllm: {INSTALL_VLLM}")
        check_source(args.input)
        if args.output:
            check_writable(args.output)
        if args.submission:
            check_writable(args.submission)
    except (ConfigError, InputError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return anyio.run(run_stream, args, cfg)
    except KeyboardInterrupt:  # --engine ray has no grace period: what is written stays written
        print("interrupted: the results written so far are kept; run again with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:
        leaf = first_leaf(e, (PipelineError, OutputError))
        if leaf is None:
            raise
        print(f"error: {leaf}", file=sys.stderr)
        return EXIT_USAGE if isinstance(leaf, PipelineError) else EXIT_FAILED


def first_leaf(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` in ``exc`` or, for a task group's exception group, inside it."""
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = first_leaf(inner, types)
            if found is not None:
                return found
    return None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
