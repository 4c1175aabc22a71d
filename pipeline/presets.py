"""Named bundles of settings, and the layering of defaults, a preset, a TOML file and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.config import _SECTIONS, Config, ConfigError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # the AIMO 3 recipe: 8 samples with code, sampled and voted, stop once 4 agree; long answers
    "max-accuracy": {
        "generation": {
            "samples": 8,
            "temperature": 1.0,
            "top_p": 1.0,
            "min_p": 0.02,
            "max_new_tokens": 1024,
            "prompt_style": "tir",
            "max_rounds": 8,
        },
        "vote": {"early_stop": 4, "code_weight": 2.0},
    },
    # The recipe that won AIMO 3 (the private leaderboard's top four ran it): gpt-oss in the Harmony
    # format with its python tool, 8 attempts at temperature 1.0 and min-p 0.02 with the top 5
    # log-probabilities, stop once 4 agree, a vote weighted by 1 / max(mean token entropy, 1e-9), 16
    # kernels with a 6 s cell limit, up to 128 tool turns, a per-problem time of clamp(time left -
    # problems left x 300 s, 300 s, 900 s); with --backend vllm (or a vllm server) the engine settings
    # below. The first place differs from the public notebook only in its temperature.
    "aimo3": {
        "generation": {
            "prompt_style": "harmony",
            "reasoning_effort": "high",
            "samples": 8,
            "temperature": 1.0,
            "top_p": 1.0,
            "min_p": 0.02,
            "top_logprobs": 5,
            "max_rounds": 128,
            "max_new_tokens": 60_000,
            "stop_at_answer": False,
        },
        "vote": {"rule": "entropy", "entropy_stat": "mean", "early_stop": 4},
        "sandbox": {"cell_timeout_s": 6.0, "pool_size": 16},
        "time": {"base_s": 300.0, "reserve_per_problem_s": 300.0},
        "run": {"problem_timeout_s": 900.0},
        "vllm": {
            "kv_cache_dtype": "fp8",
            "max_model_len": 65_536,
            "gpu_memory_utilization": 0.96,
            "max_num_seqs": 256,
            "enable_prefix_caching": True,
        },
    },
    # one greedy sample, short answers, big batches
    "max-speed": {
        "generation": {"samples": 1, "max_new_tokens": 256},
        "batch": {"max_batch_size": 32, "max_wait_ms": 5.0},
    },
    # a small budget, small batches, fewer problems in flight, a small cache
    "low-memory": {
        "model": {"memory_gb": 4.0},
        "batch": {"max_batch_size": 4},
        "run": {"max_in_flight": 16},
        "cache": {"size": 1000},
        "vllm": {"gpu_memory_utilization": 0.5},
    },
    # every problem answered within a minute (the vote on what finished, or the fallback)
    "timeout-safe": {
        "generation": {"samples": 4, "temperature": 0.7, "max_new_tokens": 512},
        "run": {"problem_timeout_s": 60.0},
        "vote": {"early_stop": 3},
    },
    # the old one-problem-at-a-time mode, kept for comparison
    "sequential": {
        "batch": {"max_batch_size": 1, "max_wait_ms": 0.0},
        "run": {"max_in_flight": 1},
    },
}
"""Named bundles of settings (``--preset NAME`` or ``preset = "NAME"`` in a config file)."""


def resolve(
    preset: str | None = None,
    file: str | Path | None = None,
    flags: dict[str, dict[str, Any]] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Layer the settings: defaults, then the preset, then the config file, then flags. Returns the
    config and, for every ``section.key``, where its value came from (``default``, ``preset NAME``,
    ``file PATH``, ``flag``). ``preset`` (the flag) wins over a file's ``preset = ...``.

    Raises:
        ConfigError: an unknown preset, or an invalid file or value (the message names it).
    """
    data = Config().to_dict()
    sources = {f"{sec}.{key}": "default" for sec, values in data.items() for key in values}
    file_data: dict[str, Any] = Config.read_toml(file) if file is not None else {}
    name = preset or file_data.get("preset")
    layers: list[tuple[str, dict[str, Any]]] = []
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        layers.append((f"preset {name}", PRESETS[name]))
    if file is not None:
        layers.append((f"file {file}", {k: v for k, v in file_data.items() if k != "preset"}))
    if flags:
        layers.append(("flag", flags))
    for source, layer in layers:
        for section, values in layer.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown section [{section}]; known: {', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table")
            for key, value in values.items():
                if key not in data[section]:
                    known = ", ".join(sorted(data[section]))
                    raise ConfigError(f"{section}.{key}: unknown key; known: {known}")
                data[section][key] = value
                sources[f"{section}.{key}"] = source
    try:
        return Config.from_dict(data), sources
    except ConfigError as e:
        if file is not None and any(s.startswith("file") for s in sources.values()):
            raise ConfigError(f"{e} (settings from {file})") from e
        raise
