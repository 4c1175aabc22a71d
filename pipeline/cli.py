"""``python -m pipeline stream INPUT``: the command line.

Exit codes: 0 the run finished (per-problem errors are in the output, not the exit code); 1 the run
failed midway (the output written so far stays valid); 2 bad usage or input found before any work
started (missing file, unwritable output, invalid config, a model that does not load); 130 interrupted
by SIGINT or SIGTERM (finished results are written; ``--resume`` finishes the rest).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import typing
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import anyio

from pipeline import log as logsetup
from pipeline.api import PipelineError
from pipeline.budget import memory_derivation
from pipeline.config import Config, ConfigError
from pipeline.presets import PRESETS, resolve
from pipeline.run_file import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, run_stream
from pipeline.sink import OutputError, check_writable
from pipeline.startup import resume_gc
from stages.backends.models import DEFAULT_MODEL_NAME, cache_root
from stages.items import Problem, Result
from stages.parse import InputError, check_source, read_problems
from stages.prompting import messages_for
from stages.settings import Flag, flags_of
from stages.units import duration as duration
from stages.units import size_gib as size_gib

# argument groups of --help, in order, by config section (sections that share a title share a group)
_GROUPS: dict[str, str] = {
    "model": "model",
    "vllm": "vllm backend (--backend vllm)",
    "batch": "batching (transformers backend)",
    "generation": "generation",
    "prompt": "prompt (the format a model was trained on)",
    "sandbox": "sandbox (--prompt tir)",
    "vote": "vote",
    "time": "time budget",
    "answer": "answers",
    "cache": "cache and concurrency",
    "run": "cache and concurrency",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the flags in the README).

    The flags of settings come from the config fields themselves (``setting(..., flag=...)``, see
    ``add_config_flags``); the flags of the command (input, output, engine, logging) are written here.
    """
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
    add_config_flags(s)
    sub.add_parser(  # parsed by pipeline.report (main dispatches to it before this parser runs)
        "report", help="a run's report: accuracy, pass@k, majority@k, rules re-scored (report --help)"
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


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """A config field the command line sets: ``section.name``, through ``flags``, into ``args.<dest>``."""

    section: str
    name: str
    dest: str
    hint: Any  # the field's annotation, resolved
    default: Any
    flags: tuple[Flag, ...]


@functools.cache
def config_flags() -> tuple[ConfigFlag, ...]:
    """Every config field that has a flag, section by section, in the order of the fields."""
    found = []
    sections = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = sections[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flags, dest = flags_of(f)
            if flags:
                dest = dest or flags[0].name.lstrip("-").replace("-", "_")
                found.append(ConfigFlag(section.name, f.name, dest, hints[f.name], f.default, flags))
    return tuple(found)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One argument group per title of ``_GROUPS``, holding the flags of its sections' fields.

    Every flag defaults to ``None``, so a flag not given leaves the preset's or the file's value.
    """
    missing = {cf.section for cf in config_flags()} - set(_GROUPS)
    if missing:
        raise RuntimeError(f"no --help group for config sections {sorted(missing)}")
    groups: dict[str, Any] = {}
    for section, title in _GROUPS.items():
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        for cf in config_flags():
            if cf.section != section:
                continue
            for flag in cf.flags:
                groups[title].add_argument(
                    flag.name,
                    dest=cf.dest,
                    default=None,
                    metavar=flag.metavar,
                    help=_help(flag.help, cf.default),
                    **_kind(cf.hint, flag),
                )


def _kind(hint: Any, flag: Flag) -> dict[str, Any]:
    """argparse's ``type``, ``choices`` or ``action`` for a flag of a field annotated ``hint``."""
    if type(None) in typing.get_args(hint):  # X | None: the flag gives an X
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    if flag.parse is not None:
        return {"type": flag.parse}
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is Literal:
        return {"choices": list(typing.get_args(hint))}
    if hint in (int, float):
        return {"type": hint}
    if hint is str:
        return {}
    raise TypeError(f"{flag.name}: no flag type for {hint}; give its setting a parse=")


def _help(text: str, default: Any) -> str:
    """A flag's help, with the field's default appended unless the help speaks of one or it has none."""
    text = text.replace("%", "%%")  # argparse %-formats help
    if "default" in text or default is None or default is dataclasses.MISSING or default == ():
        return text
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = str(default)
    return f"{text} (default {shown})" if text else f"default {shown}"


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
    for cf in config_flags():
        value = getattr(args, cf.dest, None)
        if value is not None:
            overrides.setdefault(cf.section, {})[cf.name] = value
    return resolve(getattr(args, "preset", None), getattr(args, "config", None), overrides)


def _toml(value: Any) -> str:
    """One value in TOML (strings and lists as JSON, which TOML reads; tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def print_config(cfg: Config, sources: dict[str, str]) -> None:
    """The resolved settings as TOML, each with where it came from, then the memory derivation."""
    for section, values in cfg.to_dict().items():
        print(f"[{section}]")
        for key, value in values.items():
            shown = _toml(value)
            line = f"{key} = {shown}" if value is not None else f"# {key} unset"
            print(f"{line:<60} # {sources[f'{section}.{key}']}")
        print()
    print(f"# {memory_derivation(cfg)}")


def print_prompt(cfg: Config, source: str) -> None:
    """After the settings, the prompt of the input's first problem (when ``source`` is a readable
    file): its chat messages, the prefill, and, when the model's tokenizer is on disk (no conversion,
    no download), the prompt as the model reads it: the decoded prompt ids."""
    if source == "-" or not Path(source).is_file():
        return
    first = anyio.run(_first_problem, source)
    if first is None:
        print("\n# the input has no problem to render a prompt for")
        return
    where = f"id {first.id}" + (f", line {first.line}" if first.line is not None else "")
    print(f"\n# the prompt of the first problem ({where}):")
    if cfg.generation.prompt_style == "harmony":
        print(
            "#   harmony: rendered by the Harmony library from [generation] (the [prompt] section is unused)"
        )
        return
    messages = messages_for(first.text, cfg)
    for m in messages:
        _comment(f"[{m['role']}] {m['content']}")
    prefill = cfg.prompt.prefill or ""
    if prefill:
        _comment(f"[assistant, prefilled] {prefill}")
    try:
        tokenizer = _tokenizer(cfg)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = [  # as the backend's encode(messages) + encode_text(prefill) make the first round's prompt
            *tokenizer(text, add_special_tokens=False)["input_ids"],
            *(tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []),
        ]
        decoded = tokenizer.decode(ids)
    except Exception as e:  # a preview only: say why and go on
        print(f"# (the prompt text needs the model's tokenizer: {e})")
        return
    print(f"# as the model reads it ({len(ids)} tokens, decoded):")
    _comment(decoded)


async def _first_problem(source: str) -> Problem | None:
    problems = typing.cast(AsyncGenerator[Problem | Result, None], read_problems(source))
    async with aclosing(problems) as items:
        async for item in items:
            if isinstance(item, Problem):
                return item
    return None


def _comment(text: str) -> None:
    for line in text.splitlines() or [""]:
        print(f"#   {line}".rstrip())


def _tokenizer(cfg: Config) -> Any:
    """The model's tokenizer when its files are already on disk (nothing is converted or downloaded).

    Raises:
        LookupError: there is none to load (the message says why).
    """
    if cfg.model.backend == "replay":
        raise LookupError("the replay backend has none")
    if cfg.model.path is None:
        folder = cache_root() / "models" / DEFAULT_MODEL_NAME
        if not (folder / "tokenizer_config.json").is_file():
            raise LookupError(f"no tokenizer files in {folder} yet (the first run converts the model)")
    else:
        folder = Path(cfg.model.path).expanduser()
        if not (folder / "tokenizer_config.json").is_file():
            raise LookupError(f"{folder} is not a folder with tokenizer files")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        return _main(argv)
    finally:
        resume_gc()  # whatever path it took (``stream`` resumes it once its model is loaded)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        resume_gc()  # no model to load
        from pipeline.report import main as report_main

        return report_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.configure(json=args.log_json, level=args.log_level)
    try:
        cfg, sources = resolve_args(args)
        if args.print_config:
            print_config(cfg, sources)
            print_prompt(cfg, args.input)
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
