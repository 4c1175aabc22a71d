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
