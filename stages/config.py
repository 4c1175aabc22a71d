"""Configuration: frozen dataclasses, validated when built, loadable from TOML.

A ``Config`` has one section per concern (``model``, ``generation``, ``batch``, ``answer``, ``cache``,
``run``, ...). Every value is checked in ``__post_init__`` and a bad one raises ``ConfigError`` naming
the field, so a typo in a TOML file is reported before a model is loaded. Nothing here reads the
environment. A field with a command-line flag is declared with ``setting()`` (``stages/settings.py``,
which also holds the ``model``, ``batch`` and ``vllm`` sections; all re-exported here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stages.prompt_config import PromptConfig as PromptConfig
from stages.settings import BackendName as BackendName
from stages.settings import BatchConfig, ConfigError, ModelConfig, VllmConfig, setting
from stages.settings import Device as Device
from stages.settings import DType as DType
from stages.settings import Quantize as Quantize
from stages.settings import check as _check
from stages.units import duration
from stages.vote_config import VoteConfig as VoteConfig

PromptStyle = Literal["cot", "tir", "harmony"]
ReasoningEffort = Literal["low", "medium", "high"]

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful competition mathematician. Solve the problem step by step, then give the final "
    "answer as a single integer inside \\boxed{}."
)


@dataclass(frozen=True)
class GenerationConfig:
    """How samples are drawn. ``samples == 1`` means greedy decoding; more are sampled with
    ``temperature``, ``top_p`` and ``min_p`` (a token is kept when its probability is at least
    ``min_p`` times the most likely token's), each sample seeded from ``seed``, the problem and the
    sample's index.

    ``prompt_style``: ``cot`` (reason, then ``\\boxed{}``), ``tir`` (tool-integrated reasoning: the
    model may write fenced Python, which runs in the sandbox; its output is appended and the sample
    goes on, for up to ``max_rounds`` rounds (model requests; code runs between them, so at most
    ``max_rounds - 1`` cells), all within ``max_new_tokens``) or ``harmony`` (gpt-oss's own format,
    rendered by the Harmony library, with its ``python`` tool running in the same sandbox; the
    system message carries ``reasoning_effort`` and the tool's ``tool_description`` (``None``: ours,
    naming the cell time limit), the developer message ``instructions`` (``None``: ours)). ``system_prompt``
    ``None`` is the style's own (an older name of ``prompt.system``, which wins when both are set).
    ``stop_at_answer`` ends a sample as soon as it has written a closing
    ``\\boxed{...}`` outside a code block. ``logprobs`` asks the backend for token log-probabilities
    (``vote.confidence`` turns it on); ``top_logprobs`` k > 0 for the k highest at each token, from
    which each token's entropy is taken (the entropy vote rules need it).
    """

    samples: int = setting(1, flag="--samples", help="samples per problem; 1 is greedy")
    temperature: float = setting(0.7, flag="--temperature")
    top_p: float = setting(0.95, flag="--top-p")
    min_p: float = setting(0.0, flag="--min-p", help="keep tokens at least this share of the top one")
    max_new_tokens: int = setting(384, flag="--max-new-tokens")
    seed: int = setting(0, flag="--seed")
    prompt_style: PromptStyle = setting(  # noqa: RUF009 (a Literal)
        "cot",
        flag="--prompt",
        help="cot: reason then \\boxed{}; tir: the model may write Python, run in the sandbox",
    )
    system_prompt: str | None = None
    reasoning_effort: ReasoningEffort = setting(  # noqa: RUF009 (a Literal)
        "high", flag="--reasoning-effort", help="harmony: the system message's reasoning effort"
    )
    instructions: str | None = setting(
        None, flag="--instructions", help="harmony: the developer message (default: solve, \\boxed{} answer)"
    )
    tool_description: str | None = setting(
        None, flag="--tool-description", help="harmony: the python tool's description (default: ours)"
    )
    max_rounds: int = setting(
        8,
        flag="--max-rounds",
        help="tir: model requests per sample, with code run between them: at most N-1 cells",
    )
    logprobs: bool = False
    top_logprobs: int = setting(
        0, flag="--top-logprobs", help="ask for the top K log-probabilities per token (entropy vote rules)"
    )
    stop_at_answer: bool = setting(
        True, flag="--stop-at-answer", help="end a sample once it wrote a closing \\boxed{...} outside code"
    )

    def __post_init__(self) -> None:
        _check(self.samples >= 1, "generation.samples", "must be at least 1")
        _check(self.temperature > 0, "generation.temperature", "must be positive")
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(0 <= self.min_p < 1, "generation.min_p", "must be in [0, 1)")
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", "must be at least 1")
        _check(
            self.prompt_style in ("cot", "tir", "harmony"),
            "generation.prompt_style",
            "must be cot, tir or harmony",
        )
        _check(
            self.reasoning_effort in ("low", "medium", "high"),
            "generation.reasoning_effort",
            "must be low, medium or high",
        )
        _check(self.max_rounds >= 1, "generation.max_rounds", "must be at least 1")
        _check(0 <= self.top_logprobs <= 20, "generation.top_logprobs", "must be in 0..20")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (one sample)."""
        return self.samples == 1

    @property
    def uses_tools(self) -> bool:
        """True when the prompt style runs model-written code (``tir``, ``harmony``): the run needs the
        sandbox."""
        return self.prompt_style in ("tir", "harmony")


@dataclass(frozen=True)
class AnswerConfig:
    """What counts as a valid answer.

    With ``modulus`` set (1000 for AIMO 1), answers are reduced modulo it before the range check.
    ``fallback`` is the answer given when no sample produced a valid one (status ``fallback``).
    """

    modulus: int | None = setting(
        None, flag="--answer-modulus", help="reduce answers modulo this (1000 for AIMO 1)"
    )
    min: int = setting(0, flag="--answer-min", help="smallest valid answer")
    max: int = setting(99999, flag="--answer-max", help="largest valid answer")
    fallback: int | None = setting(
        0, flag="--fallback-answer", help="the answer given when no sample finished"
    )

    def __post_init__(self) -> None:
        _check(self.modulus is None or self.modulus >= 1, "answer.modulus", "must be at least 1")
        _check(self.min <= self.max, "answer.min", "must not exceed answer.max")


@dataclass(frozen=True)
class CacheConfig:
    """The result cache: ``size`` entries in memory (0 disables), ``dir`` for a persistent store."""

    size: int = setting(10_000, flag="--cache-size", help="in-memory LRU entries; 0 disables")
    dir: str | None = setting(
        None, flag="--cache-dir", help="a folder for a persistent result cache (SQLite)"
    )

    def __post_init__(self) -> None:
        _check(self.size >= 0, "cache.size", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Concurrency limits.

    ``max_in_flight`` bounds the problems admitted and not yet handed to the caller; every queue is
    sized from it, so host memory stays flat however long the input is. The inference stage keeps at
    most ``max_in_flight x samples`` requests in the backend, and, with ``max_tokens_in_flight``, at
    most that many tokens (prompt + ``max_new_tokens`` per request; a request larger than the cap
    still runs alone). ``problem_timeout_s`` caps each problem from admission: its unfinished samples
    are cancelled and the vote is taken on what finished (a fallback answer when nothing did).
    ``verify_workers`` is the number of verification worker processes. ``queue_size`` sets every
    stream between stages to that many items (``None``: sized from ``max_in_flight`` so each can hold
    all admitted work); any size works, 1 included, since admission, not queue room, bounds the work.
    ``cleanup_every``: after every that many results, ``gc.collect()`` and, on CUDA,
    ``torch.cuda.empty_cache()`` (the notebooks' "aggressive cleanup"; measured in the README).
    """

    max_in_flight: int = setting(64, flag="--max-in-flight", help="problems admitted at once")
    max_tokens_in_flight: int | None = setting(
        None,
        flag="--max-tokens-in-flight",
        help="cap on prompt + max-new-tokens of the requests in the model at once (default: none)",
    )
    problem_timeout_s: float | None = setting(
        None,
        flag="--problem-timeout",
        help="seconds a problem may take from admission; then the vote is taken on what finished",
    )
    verify_workers: int = setting(2, flag="--verify-workers", help="verification worker processes")
    verify_batch: int = 64
    verify_timeout_s: float = 60.0
    queue_size: int | None = setting(
        None, flag="--queue-size", help="items each stream between stages holds (default: from in-flight)"
    )
    cleanup_every: int | None = setting(
        None,
        flag="--cleanup-every",
        help="every N results: gc.collect() and, on CUDA, torch.cuda.empty_cache() (default: never)",
    )

    def __post_init__(self) -> None:
        _check(
            self.cleanup_every is None or self.cleanup_every >= 1, "run.cleanup_every", "must be at least 1"
        )
        _check(self.max_in_flight >= 1, "run.max_in_flight", "must be at least 1")
        _check(self.queue_size is None or self.queue_size >= 1, "run.queue_size", "must be at least 1")
        _check(
            self.problem_timeout_s is None or self.problem_timeout_s > 0,
            "run.problem_timeout_s",
            "must be positive",
        )
        _check(
            self.max_tokens_in_flight is None or self.max_tokens_in_flight >= 1,
            "run.max_tokens_in_flight",
            "must be at least 1",
        )
        _check(self.verify_workers >= 1, "run.verify_workers", "must be at least 1")
        _check(self.verify_batch >= 1, "run.verify_batch", "must be at least 1")
        _check(self.verify_timeout_s > 0, "run.verify_timeout_s", "must be positive")


# How the sandbox confines each interpreter, strongest first (see stages/sandbox.py and the README).
SANDBOX_LAYERS = ("namespaces", "filesystem", "identity", "seccomp", "rlimits", "audit_hook")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for model-written code (``prompt_style = "tir"``).

    ``cell_timeout_s`` is the wall-clock limit per cell (enforced by the parent); ``memory_mb`` the
    interpreter's address space; ``file_mb`` the largest file it may write; ``output_chars`` how much
    of a cell's output the model sees. ``pool_size`` is how many interpreters are kept alive (warm
    ones waiting, plus one per sample that has run code); ``None`` is twice ``generation.samples``,
    at least 2, as in the AIMO recipe (8 samples, 16 interpreters). ``disk_mb`` and ``max_files`` cap
    the private tmpfs each interpreter writes in (``/tmp``, ``/var/tmp``, ``/dev/shm`` and its working
    directory, all together).

    ``require`` names the confinement layers (``SANDBOX_LAYERS``, or ``"all"``) a run must have: the
    sandbox learns at start which ones this machine can apply and refuses to start without these. Every
    layer that held at start is applied to every interpreter whatever ``require`` says; an interpreter
    that cannot apply one is never used.
    """

    cell_timeout_s: float = setting(10.0, flag="--cell-timeout", help="wall-clock seconds per code cell")
    memory_mb: int = setting(2048, flag="--sandbox-memory-mb", help="address space per interpreter")
    file_mb: int = 16
    output_chars: int = setting(1000, flag="--output-chars", help="characters of a cell's output shown")
    pool_size: int | None = setting(
        None, flag="--sandbox-pool", help="interpreters kept alive (default 2 x samples, >= 2)"
    )
    disk_mb: int = setting(
        64, flag="--sandbox-disk-mb", help="private tmpfs per interpreter: /tmp, /var/tmp, /dev/shm"
    )
    max_files: int = 10_000
    require: tuple[str, ...] = setting(
        (),
        flag="--sandbox-require",
        parse=str,  # the flag's text is comma-separated: __post_init__ splits it
        metavar="LAYERS",
        help="refuse to start unless these confinement layers hold, comma-separated, or all: "
        f"{', '.join(SANDBOX_LAYERS)} (default: none required; every layer that holds is used)",
    )

    def __post_init__(self) -> None:
        raw = self.require
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        require = tuple(str(x).strip() for x in items if str(x).strip())
        if "all" in require:
            require = SANDBOX_LAYERS
        object.__setattr__(self, "require", require)
        unknown = [x for x in require if x not in SANDBOX_LAYERS]
        known = ", ".join(SANDBOX_LAYERS)
        _check(not unknown, "sandbox.require", f"unknown layer {unknown}; known: all, {known}")
        _check(self.disk_mb >= 1, "sandbox.disk_mb", "must be at least 1")
        _check(self.max_files >= 16, "sandbox.max_files", "must be at least 16")
        _check(self.cell_timeout_s > 0, "sandbox.cell_timeout_s", "must be positive")
        _check(self.memory_mb >= 256, "sandbox.memory_mb", "must be at least 256 (numpy and sympy need it)")
        _check(self.file_mb >= 0, "sandbox.file_mb", "must be >= 0")
        _check(self.output_chars >= 16, "sandbox.output_chars", "must be at least 16")
        _check(self.pool_size is None or self.pool_size >= 1, "sandbox.pool_size", "must be at least 1")


@dataclass(frozen=True)
class TimeConfig:
    """The run's time budget (``budget_s``; ``None``: no budget).

    Each problem, when its samples start, gets a share of what is left: the time left spread over the
    problems still to come (``expected_problems``, counted from the input file by the CLI), in waves
    of ``run.max_in_flight``, kept between ``base_s`` and ``run.problem_timeout_s`` (the ceiling) and
    never past the run's end minus ``margin_s``; time a problem does not use goes back to the pool.
    When the share is below the even split the problem gets fewer samples (down to ``min_samples``),
    above it more (up to ``max_samples``; ``None`` is twice ``generation.samples``); greedy runs keep
    one sample. With ``reserve_per_problem_s`` the share is instead what is left after keeping that
    much for each problem (wave) after this one, between the same bounds: the AIMO 3 winners'
    clamp(time left - problems left x 300 s, 300 s, 900 s). Once the budget is spent, problems not
    yet started are answered at once with ``answer.fallback`` (status ``fallback``).
    """

    budget_s: float | None = setting(
        None,
        flag="--time-budget",
        parse=duration,
        help="the whole run's time, e.g. 5h, 90m, 1h30m, 300 (seconds); every problem is answered in it",
    )
    base_s: float = setting(
        0.0, flag="--time-base", parse=duration, help="the least time a problem gets while time is left"
    )
    expected_problems: int | None = setting(
        None,
        flag="--expected-problems",
        help="problems the budget is spread over (default: counted from the input file)",
    )
    margin_s: float = setting(
        1.0, flag="--time-margin", parse=duration, help="kept back at the end of the budget (default 1s)"
    )
    min_samples: int = 1
    max_samples: int | None = None
    reserve_per_problem_s: float | None = setting(
        None,
        flag="--time-reserve",
        parse=duration,
        help="share = time left - this x problems after it (AIMO 3: 300s), not an even split",
    )

    def __post_init__(self) -> None:
        _check(
            self.reserve_per_problem_s is None or self.reserve_per_problem_s >= 0,
            "time.reserve_per_problem_s",
            "must be >= 0",
        )
        _check(
            self.budget_s is None or 0 < self.budget_s < math.inf,
            "time.budget_s",
            "must be a positive number",
        )
        _check(self.base_s >= 0, "time.base_s", "must be >= 0")
        _check(
            self.expected_problems is None or self.expected_problems >= 1,
            "time.expected_problems",
            "must be at least 1",
        )
        _check(self.margin_s >= 0, "time.margin_s", "must be >= 0")
        _check(self.min_samples >= 1, "time.min_samples", "must be at least 1")
        _check(
            self.max_samples is None or self.max_samples >= self.min_samples,
            "time.max_samples",
            "must be at least time.min_samples",
        )


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationConfig,
    "batch": BatchConfig,
    "answer": AnswerConfig,
    "cache": CacheConfig,
    "run": RunConfig,
    "vllm": VllmConfig,
    "sandbox": SandboxConfig,
    "vote": VoteConfig,
    "time": TimeConfig,
    "prompt": PromptConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole pipeline configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    answer: AnswerConfig = field(default_factory=AnswerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    run: RunConfig = field(default_factory=RunConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    vote: VoteConfig = field(default_factory=VoteConfig)
    time: TimeConfig = field(default_factory=TimeConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        _check(
            not self.vote.needs_entropy or self.generation.top_logprobs > 0,
            "vote.rule",
            f"{'the DeepConf online stop' if self.vote.stops_early else self.vote.rule} reads the samples' "
            "top-k log-probabilities: set generation.top_logprobs "
            "(--top-logprobs K, e.g. 5)",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from nested dicts (``{"batch": {"max_batch_size": 8}}``).

        Raises:
            ConfigError: an unknown section or key, or a value that fails validation.
        """
        sections: dict[str, Any] = {}
        for name, values in data.items():
            if name == "preset":
                continue  # a file may name a preset; resolve() applies it
            if name not in _SECTIONS:
                raise ConfigError(f"unknown section [{name}]; known: {', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{name}] must be a table")
            section_cls = _SECTIONS[name]
            known = {f.name for f in dataclasses.fields(section_cls)}
            for key in values:
                if key not in known:
                    raise ConfigError(f"{name}.{key}: unknown key; known: {', '.join(sorted(known))}")
            try:
                sections[name] = section_cls(**values)
            except TypeError as e:
                raise ConfigError(f"[{name}]: {e}") from e
        return cls(**sections)

    @classmethod
    def read_toml(cls, path: str | Path) -> dict[str, Any]:
        """A TOML config file's tables (and its optional top-level ``preset``), unvalidated.

        Raises:
            ConfigError: the file cannot be read or is not valid TOML.
        """
        p = Path(path)
        try:
            return tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Load a TOML file whose tables are the sections.

        Raises:
            ConfigError: the file cannot be read or parsed, or a value is invalid.
        """
        data = cls.read_toml(path)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some fields of some sections changed: ``cfg.replace(batch={"max_wait_ms": 5})``.

        Raises:
            ConfigError: as ``from_dict``.
        """
        data = self.to_dict()
        for name, values in sections.items():
            if name not in _SECTIONS:
                raise ConfigError(f"unknown section [{name}]")
            data[name].update(values)
        return Config.from_dict(data)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dicts, as in a TOML file."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def fingerprint(self, model_id: str) -> str:
        """A short hash of everything that changes an answer: the model and the generation settings.

        Batch sizes and concurrency do not change answers, so they are not part of it.
        """
        payload = {
            "model": model_id,
            "generation": dataclasses.asdict(self.generation),
            "answer": dataclasses.asdict(self.answer),
            "vote": dataclasses.asdict(self.vote),
        }
        if self.prompt != PromptConfig():  # the default prompt keeps the keys of runs before [prompt]
            payload["prompt"] = self.prompt.cache_key()
        if self.generation.uses_tools:  # the sandbox's limits change what code can print
            payload["sandbox"] = {
                k: v for k, v in dataclasses.asdict(self.sandbox).items() if k not in ("pool_size", "require")
            }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
