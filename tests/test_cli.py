"""Command-line checks that fail before any work starts (exit code 2, one line on stderr)."""

import json
from pathlib import Path

import pytest

from pipeline.cli import EXIT_USAGE, build_parser, config_from_args, main
from pipeline.config import Config


def test_missing_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["stream", str(tmp_path / "nope.jsonl")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: input file") and "does not exist" in err


def test_directory_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["stream", str(tmp_path)]) == EXIT_USAGE
    assert "is a directory" in capsys.readouterr().err


def test_unwritable_output_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "problem": "1+1"}\n')
    assert main(["stream", str(inp), "--output", str(tmp_path / "no" / "such" / "dir.jsonl")]) == EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_model_that_is_not_a_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "problem": "1+1"}\n')
    (tmp_path / "junk").mkdir()
    assert main(["stream", str(inp), "--model", str(tmp_path / "junk"), "--no-progress"]) == EXIT_USAGE
    assert "is not a model" in capsys.readouterr().err


def test_invalid_config_value_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    inp = tmp_path / "in.jsonl"
    inp.write_text("")
    assert main(["stream", str(inp), "--batch-size", "0"]) == EXIT_USAGE
    assert "batch.max_batch_size" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text("[batch]\nmax_batch_size = 4\nmax_wait_ms = 9\n[generation]\nsamples = 3\n")
    args = build_parser().parse_args(
        ["stream", "x.jsonl", "--config", str(toml), "--batch-size", "32", "--answer-modulus", "1000"]
    )
    cfg = config_from_args(args)
    assert cfg.batch.max_batch_size == 32 and cfg.batch.max_wait_ms == 9
    assert cfg.generation.samples == 3 and cfg.answer.modulus == 1000


def test_a_missing_vllm_is_a_clear_error(monkeypatch, capsys):
    from pipeline import cli
    from stages.backends import vllm_backend as module

    monkeypatch.setattr(module, "vllm_available", lambda: False)
    assert cli.main(["stream", "examples/problems.jsonl", "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "scripts/setup.sh vllm" in err and "aimo-pipeline[vllm]" in err
    with pytest.raises(module.BackendError, match="needs vLLM"):
        module.VllmBackend.load(Config().replace(model={"backend": "vllm"}))


async def test_pipeline_reports_a_missing_vllm(monkeypatch):
    from pipeline.api import Pipeline, PipelineError
    from stages.backends import vllm_backend as module

    monkeypatch.setattr(module, "vllm_available", lambda: False)
    with pytest.raises(PipelineError, match="needs vLLM"):
        async with Pipeline(Config().replace(model={"backend": "vllm"})):
            pass


def test_backend_and_engine_flags_reach_the_config():
    args = build_parser().parse_args(
        [
            "stream", "x.jsonl", "--backend", "vllm", "--min-p", "0.02", "--max-num-seqs", "4",
            "--no-prefix-caching", "--enforce-eager", "--gpu-memory-utilization", "0.5",
            "--max-model-len", "2048", "--kv-cache-dtype", "fp8", "--quantization", "awq",
            "--max-tokens-in-flight", "9000",
        ]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.model.backend == "vllm" and cfg.generation.min_p == 0.02
    v = cfg.vllm
    assert (v.max_num_seqs, v.enable_prefix_caching, v.enforce_eager) == (4, False, True)
    assert (v.gpu_memory_utilization, v.max_model_len, v.kv_cache_dtype, v.quantization) == (
        0.5,
        2048,
        "fp8",
        "awq",
    )
    assert cfg.run.max_tokens_in_flight == 9000
    plain = config_from_args(build_parser().parse_args(["stream", "x.jsonl"]))
    assert plain.vllm.enable_prefix_caching is True and plain.vllm.enforce_eager is None


@pytest.mark.parametrize("name", ["max-accuracy", "max-speed", "low-memory", "timeout-safe", "sequential"])
def test_each_preset_resolves_to_its_documented_settings(name):
    from pipeline.presets import PRESETS

    cfg = config_from_args(build_parser().parse_args(["stream", "x.jsonl", "--preset", name]))
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{name}: {section}.{key}"
    assert PRESETS["sequential"]["batch"] == {"max_batch_size": 1, "max_wait_ms": 0.0}


def test_flags_override_a_file_which_overrides_a_preset(tmp_path: Path, capsys):
    f = tmp_path / "c.toml"
    f.write_text('preset = "max-accuracy"\n[generation]\nmax_new_tokens = 300\n')
    argv = ["stream", "x.jsonl", "--config", str(f), "--samples", "3"]
    cfg = config_from_args(build_parser().parse_args(argv))
    g = cfg.generation
    assert (g.samples, g.max_new_tokens, g.min_p) == (3, 300, 0.02)  # flag, file, the file's preset
    assert main([*argv, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "samples = 3" in out and "# flag" in out.split("samples = 3")[1].splitlines()[0]
    assert f"# file {f}" in out.split("max_new_tokens = 300")[1].splitlines()[0]
    assert "# preset max-accuracy" in out.split("min_p = 0.02")[1].splitlines()[0]
    cfg = config_from_args(build_parser().parse_args([*argv, "--preset", "max-speed"]))
    assert cfg.batch.max_batch_size == 32  # the flag's preset wins over the file's


def test_an_unknown_preset_exits_2(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["stream", "x.jsonl", "--preset", "fastest"])
    assert e.value.code == 2
    f = tmp_path / "c.toml"
    f.write_text('preset = "fastest"\n')
    (tmp_path / "x.jsonl").write_text("")
    assert main(["stream", str(tmp_path / "x.jsonl"), "--config", str(f)]) == EXIT_USAGE
    assert "unknown preset 'fastest'" in capsys.readouterr().err


def test_tir_vote_and_time_flags_reach_their_settings():
    argv = [
        "stream", "x.jsonl", "--prompt", "tir", "--max-rounds", "5", "--no-stop-at-answer",
        "--cell-timeout", "4", "--sandbox-memory-mb", "1024", "--sandbox-pool", "6", "--output-chars", "500",
        "--early-stop", "3", "--code-weight", "1.5", "--confidence",
        "--time-budget", "1h30m", "--time-base", "2m", "--expected-problems", "50", "--time-margin", "5s",
        "--fallback-answer", "7", "--queue-size", "1", "--backend", "replay", "--replay", "r.jsonl",
        "--replay-speed", "1", "--record", "rec.jsonl",
    ]  # fmt: skip
    cfg = config_from_args(build_parser().parse_args(argv))
    g, sb, v, t = cfg.generation, cfg.sandbox, cfg.vote, cfg.time
    assert (g.prompt_style, g.max_rounds, g.stop_at_answer) == ("tir", 5, False)
    assert (sb.cell_timeout_s, sb.memory_mb, sb.pool_size, sb.output_chars) == (4.0, 1024, 6, 500)
    assert (v.early_stop, v.code_weight, v.confidence) == (3, 1.5, True)
    assert (t.budget_s, t.base_s, t.expected_problems, t.margin_s) == (5400.0, 120.0, 50, 5.0)
    assert cfg.answer.fallback == 7 and cfg.run.queue_size == 1
    assert (cfg.model.backend, cfg.model.replay, cfg.model.replay_speed, cfg.model.record) == (
        "replay",
        "r.jsonl",
        1.0,
        "rec.jsonl",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--time-budget", "soon"], "is not a duration"),
        (["--time-budget", "0"], "must be a positive number"),
        (["--time-budget", "inf"], "must be a positive number"),
        (["--prompt", "pot"], "invalid choice"),
    ],
)
def test_bad_time_and_prompt_flags_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["stream", "x.jsonl", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--early-stop", "0"], "vote.early_stop: must be at least 1"),
        (["--max-rounds", "0"], "generation.max_rounds: must be at least 1"),
        (["--cell-timeout", "-1"], "sandbox.cell_timeout_s: must be positive"),
        (["--backend", "replay"], "model.replay: the replay backend needs a file"),
    ],
)
def test_invalid_tir_settings_exit_2_naming_the_field(argv, message, tmp_path: Path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "problem": "1+1"}\n')
    assert main(["stream", str(src), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_recorded_run_replays_through_the_command(tmp_path: Path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "problem": "1+1", "answer": 2}\n{"id": "b", "problem": "2+2", "answer": 4}\n')
    replay = tmp_path / "r.jsonl"
    replay.write_text(
        '{"id": "a", "round": 0, "text": "```python\\nprint(1+1)\\n```\\n"}\n'
        '{"id": "a", "round": 1, "text": "so \\\\boxed{2}"}\n'
        '{"id": "b", "sample": 0, "round": 0, "text": "\\\\boxed{5}", "seconds": 60}\n'
    )
    out = tmp_path / "out.jsonl"
    argv = [
        "stream",
        str(src),
        "-o",
        str(out),
        "--backend",
        "replay",
        "--replay",
        str(replay),
        "--prompt",
        "tir",
    ]
    assert main(argv) == 0  # recorded seconds are not waited for by default
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["a"]["answer"] == 2 and rows["a"]["cells"] == 1 and rows["a"]["correct"] is True
    assert rows["b"]["answer"] == 5 and rows["b"]["correct"] is False
    assert "code cells" in capsys.readouterr().err


# The flags of settings as they were written out by hand before they came from the config fields:
# dest -> (section, field). Every config field with a flag is here, and no other.
_FLAGS_OF_SETTINGS = {
    "model": ("model", "path"),
    "device": ("model", "device"),
    "dtype": ("model", "dtype"),
    "memory_gb": ("model", "memory_gb"),  # --memory-budget SIZE and --memory-gb N
    "backend": ("model", "backend"),
    "quantize": ("model", "quantize"),
    "batching": ("batch", "mode"),
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
    "base_url": ("model", "base_url"),
    "api_model": ("model", "api_model"),
    "api_key_env": ("model", "api_key_env"),
    "api_concurrency": ("model", "api_concurrency"),
    "reasoning_effort": ("generation", "reasoning_effort"),
    "instructions": ("generation", "instructions"),
    "tool_description": ("generation", "tool_description"),
    "top_logprobs": ("generation", "top_logprobs"),
    "vote_rule": ("vote", "rule"),
    "entropy_tokens": ("vote", "entropy_tokens"),
    "entropy_stat": ("vote", "entropy_stat"),
    "deepconf_keep": ("vote", "deepconf_keep"),
    "deepconf_window": ("vote", "deepconf_window"),
    "deepconf_stop": ("vote", "deepconf_stop"),
    "deepconf_warmup": ("vote", "deepconf_warmup"),
    "prompt_format": ("prompt", "format"),
    "system_prompt": ("prompt", "system"),
    "user_template": ("prompt", "user_template"),
    "prefill": ("prompt", "prefill"),
    "fewshot": ("prompt", "fewshot"),
    "time_reserve": ("time", "reserve_per_problem_s"),
}


def _stream_parser():
    return build_parser()._subparsers._group_actions[0].choices["stream"]


def test_the_flags_of_settings_come_from_the_config_fields():
    from pipeline.cli import config_flags

    assert {cf.dest: (cf.section, cf.name) for cf in config_flags()} == _FLAGS_OF_SETTINGS
    by_dest: dict[str, list[str]] = {}
    for action in _stream_parser()._actions:
        by_dest.setdefault(action.dest, []).extend(action.option_strings)
    assert by_dest["memory_gb"] == ["--memory-budget", "--memory-gb"]
    assert by_dest["prefix_caching"] == ["--prefix-caching", "--no-prefix-caching"]
    # every flag of a setting defaults to None: one not given leaves the preset's or the file's value
    defaults = vars(build_parser().parse_args(["stream", "x.jsonl"]))
    assert all(defaults[dest] is None for dest in _FLAGS_OF_SETTINGS)


@pytest.mark.parametrize(
    ("flag", "value", "setting", "expected"),
    [
        ("--memory-budget", "512MiB", ("model", "memory_gb"), 0.5),
        ("--memory-gb", "2.5", ("model", "memory_gb"), 2.5),
        ("--device", "cpu", ("model", "device"), "cpu"),
        ("--cache-dir", "d", ("cache", "dir"), "d"),
        ("--time-base", "1m", ("time", "base_s"), 60.0),
        ("--sandbox-require", "rlimits,audit_hook", ("sandbox", "require"), ("rlimits", "audit_hook")),
    ],
)
def test_a_flag_parses_as_its_field_says(flag, value, setting, expected):
    cfg = config_from_args(build_parser().parse_args(["stream", "x.jsonl", flag, value]))
    assert getattr(getattr(cfg, setting[0]), setting[1]) == expected


def test_help_shows_each_field_default_once():
    helps = {a.option_strings[0]: a.help for a in _stream_parser()._actions if a.option_strings}
    assert helps["--batch-size"] == "max problems (samples) decoding at once (default 16)"
    assert helps["--temperature"] == "default 0.7"
    assert helps["--stop-at-answer"].endswith("(default on)")
    assert helps["--max-wait-ms"].endswith("(default 20)")
    assert helps["--max-batch-tokens"] == "token cap per batch (default: from the memory budget)"
    assert (
        helps["--answer-modulus"] == "reduce answers modulo this (1000 for AIMO 1)"
    )  # None: no default shown
    assert all(h is None or h.count("default") <= 1 for h in helps.values())
