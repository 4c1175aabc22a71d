from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError


def test_defaults_are_valid_and_greedy():
    cfg = Config()
    assert cfg.generation.greedy
    assert cfg.answer.max == 99999
    assert cfg.batch.max_batch_tokens is None


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("batch", {"max_batch_size": 0}, "batch.max_batch_size"),
        ("generation", {"samples": 0}, "generation.samples"),
        ("generation", {"top_p": 1.5}, "generation.top_p"),
        ("model", {"device": "tpu"}, "model.device"),
        ("answer", {"min": 10, "max": 1}, "answer.min"),
        ("run", {"max_in_flight": 0}, "run.max_in_flight"),
        ("run", {"max_tokens_in_flight": 0}, "run.max_tokens_in_flight"),
        ("generation", {"min_p": 1.0}, "generation.min_p"),
        ("model", {"backend": "llama.cpp"}, "model.backend"),
        ("vllm", {"gpu_memory_utilization": 1.5}, "vllm.gpu_memory_utilization"),
        ("vllm", {"max_num_seqs": 0}, "vllm.max_num_seqs"),
        ("vllm", {"max_model_len": 4}, "vllm.max_model_len"),
        ("vllm", {"cpu_reserved": -1}, "vllm.cpu_reserved"),
        ("model", {"quantize": "int3"}, "model.quantize"),
        ("model", {"quantize": "fp16", "dtype": "float32"}, "model.quantize"),
    ],
)
def test_invalid_values_name_the_field(section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config().replace(**{section: values})


def test_unknown_keys_and_sections_are_rejected():
    with pytest.raises(ConfigError, match=r"batch\.max_size: unknown key"):
        Config.from_dict({"batch": {"max_size": 3}})
    with pytest.raises(ConfigError, match=r"unknown section \[bogus\]"):
        Config.from_dict({"bogus": {}})


def test_toml_round_trip(tmp_path: Path):
    f = tmp_path / "c.toml"
    f.write_text("[batch]\nmax_batch_size = 4\n[answer]\nmodulus = 1000\n")
    cfg = Config.from_toml(f)
    assert cfg.batch.max_batch_size == 4
    assert cfg.answer.modulus == 1000
    assert cfg.generation == Config().generation


def test_bad_toml_names_the_file(tmp_path: Path):
    f = tmp_path / "bad.toml"
    f.write_text("[batch\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        Config.from_toml(f)
    with pytest.raises(ConfigError, match=r"cannot read"):
        Config.from_toml(tmp_path / "missing.toml")


def test_fingerprint_tracks_answer_changing_settings_only():
    a = Config()
    assert a.fingerprint("m") == Config().fingerprint("m")
    assert a.fingerprint("m") != a.fingerprint("other-model")
    assert a.fingerprint("m") != a.replace(generation={"max_new_tokens": 10}).fingerprint("m")
    assert a.fingerprint("m") == a.replace(batch={"max_batch_size": 3}).fingerprint("m")


def test_vllm_engine_settings_follow_the_config_and_the_budget(monkeypatch):
    from stages.backends import vllm_backend as v

    cfg = Config().replace(
        model={"backend": "vllm", "memory_gb": 4},
        generation={"samples": 4},
        run={"max_in_flight": 8},
        vllm={"max_model_len": 1024, "quantization": "awq", "kv_cache_dtype": "fp8"},
    )
    s = v.engine_settings(cfg, device="cpu", dtype="float32", folder="/m", max_context=8192)
    assert s["max_model_len"] == 1024 and s["max_num_seqs"] == 32  # in flight x samples
    assert s["quantization"] == "awq" and s["kv_cache_dtype"] == "fp8"
    assert s["enforce_eager"] is True and s["enable_prefix_caching"] is True
    assert "gpu_memory_utilization" not in s
    flags = Config().replace(vllm={"enforce_eager": False, "enable_prefix_caching": False, "max_num_seqs": 3})
    s = v.engine_settings(flags, device="cpu", dtype="float32", folder="/m", max_context=512)
    assert s["enforce_eager"] is False and s["enable_prefix_caching"] is False
    assert s["max_num_seqs"] == 3 and s["max_model_len"] == 512  # never past the model's context

    monkeypatch.setattr(v.os, "cpu_count", lambda: 2)
    env = v.cpu_environment(cfg, weights_bytes=v.GIB, kv_bytes_per_token=1000, max_len=1024, max_seqs=32)
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"  # a small machine computes on every core
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # what 32 full sequences need, rounded up to 1 GiB
    big = v.cpu_environment(cfg, weights_bytes=v.GIB, kv_bytes_per_token=10**6, max_len=8192, max_seqs=256)
    assert int(big["VLLM_CPU_KVCACHE_SPACE"]) <= 3  # 70% of what the 4 GiB budget leaves after weights
    monkeypatch.setattr(v.os, "cpu_count", lambda: 32)
    assert (
        v.cpu_environment(cfg, weights_bytes=0, kv_bytes_per_token=1, max_len=16, max_seqs=1)[
            "VLLM_CPU_NUM_OF_RESERVED_CPU"
        ]
        == "1"
    )


def test_engine_args_the_config_does_not_name_pass_through(tmp_path):
    from stages.backends.vllm_backend import engine_settings

    path = tmp_path / "c.toml"
    path.write_text(
        '[vllm]\nkv_cache_dtype = "fp8"\n[vllm.engine_args]\nswap_space = 4\n'
        'speculative_config = {method = "eagle3", num_speculative_tokens = 3}\n',
        encoding="utf-8",
    )
    cfg = Config.from_toml(path)
    got = engine_settings(cfg, device="cpu", dtype="float32", folder="/m", max_context=2048)
    assert got["swap_space"] == 4 and got["kv_cache_dtype"] == "fp8"
    assert got["speculative_config"] == {"method": "eagle3", "num_speculative_tokens": 3}
