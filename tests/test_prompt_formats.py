"""The ``[prompt]`` section: named formats, the system and user templates, the prefill, few-shot files,
the cache key and ``--print-config``'s rendered prompt; one check through the real chat template."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from pipeline.api import Pipeline
from pipeline.cli import EXIT_USAGE, main
from pipeline.config import Config, ConfigError
from pipeline.items import Result
from stages.backends.replay import ReplayBackend
from stages.prompting import COT_SYSTEM_PROMPT, TIR_SYSTEM_PROMPT, messages_for, style_for
from tests.conftest import small_config

FENCE = "```"
PROBLEM = "What is 6*7?"
# the published strings, written out here so that a typo in stages/prompt_config.py is caught
STEP = "Please reason step by step, and put your final answer within \\boxed{}."
INTEGRATE = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)


def cfg_with(**prompt) -> Config:
    return Config().replace(prompt=prompt)


def roles(messages: list[dict[str, str]]) -> list[str]:
    return [m["role"] for m in messages]


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("qwen25-math-cot", [("system", STEP), ("user", PROBLEM)]),
        ("qwen25-math-tir", [("system", INTEGRATE), ("user", PROBLEM)]),
        ("numina-tir", [("user", PROBLEM)]),
        ("deepseek-math", [("user", f"{PROBLEM}\n{STEP}")]),
        ("deepseek-math-tir", [("user", f"{PROBLEM}\n{INTEGRATE}")]),
    ],
)
def test_each_named_format_puts_its_instruction_where_it_was_published(fmt, expected):
    for style in ("cot", "tir"):  # the format, not the style, decides the messages
        cfg = Config().replace(generation={"prompt_style": style}, prompt={"format": fmt})
        got = [(m["role"], m["content"]) for m in messages_for(f"  {PROBLEM}\n", cfg)]
        assert got == expected


def test_the_default_format_is_the_prompt_as_before():
    assert messages_for(f" {PROBLEM} ", Config()) == [
        {"role": "system", "content": COT_SYSTEM_PROMPT},
        {"role": "user", "content": PROBLEM},
    ]
    tir = Config().replace(generation={"prompt_style": "tir"})
    assert messages_for(PROBLEM, tir)[0] == {"role": "system", "content": TIR_SYSTEM_PROMPT}
    alias = Config().replace(generation={"system_prompt": "Be brief."})  # the older key still works
    assert messages_for(PROBLEM, alias)[0]["content"] == "Be brief."


def test_the_system_prompt_replaces_the_formats_and_an_empty_one_removes_it():
    cfg = Config().replace(
        generation={"system_prompt": "old name"}, prompt={"format": "qwen25-math-tir", "system": "Mine."}
    )
    assert messages_for(PROBLEM, cfg)[0] == {"role": "system", "content": "Mine."}
    assert roles(messages_for(PROBLEM, cfg_with(system=""))) == ["user"]
    on_deepseek = cfg_with(format="deepseek-math", system="S")
    assert messages_for(PROBLEM, on_deepseek) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": f"{PROBLEM}\n{STEP}"},
    ]


def test_a_user_template_puts_the_problem_in_place_and_leaves_braces_alone():
    cfg = cfg_with(format="qwen25-math-tir", user_template="Problem: {problem}\nAnswer in \\boxed{}. {x}")
    assert (
        messages_for(f" {PROBLEM}\n", cfg)[-1]["content"]
        == f"Problem: {PROBLEM}\nAnswer in \\boxed{{}}. {{x}}"
    )
    assert messages_for(PROBLEM, cfg)[0]["content"] == INTEGRATE  # the format's system message stays


def test_a_user_template_without_the_placeholder_is_a_config_error(tmp_path: Path, capsys):
    with pytest.raises(ConfigError, match=r"prompt\.user_template: must contain \{problem\}"):
        cfg_with(user_template="Solve it.")
    with pytest.raises(ConfigError, match=r"prompt\.format: must be one of default, qwen25-math-cot"):
        cfg_with(format="llama")
    assert main(["stream", "x.jsonl", "--user-template", "{question}", "--print-config"]) == EXIT_USAGE
    assert "prompt.user_template: must contain {problem}" in capsys.readouterr().err


def write_shots(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_fewshot_exemplars_are_earlier_turns_through_the_user_template(tmp_path: Path):
    shots = write_shots(
        tmp_path / "shots.jsonl",
        [
            json.dumps({"problem": "1+1?", "solution": "It is \\boxed{2}."}),
            "",
            json.dumps(
                {"problem": " 2+2? ", "solution": "```python\nprint(2+2)\n```\n```output\n4\n```\n\\boxed{4}"}
            ),
        ],
    )
    cfg = cfg_with(format="deepseek-math-tir", fewshot=str(shots))
    messages = messages_for(PROBLEM, cfg)
    assert roles(messages) == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == f"1+1?\n{INTEGRATE}" and messages[1]["content"] == "It is \\boxed{2}."
    assert messages[2]["content"] == f"2+2?\n{INTEGRATE}" and messages[3]["content"].endswith("\\boxed{4}")
    assert messages[4]["content"] == f"{PROBLEM}\n{INTEGRATE}"
    with_system = messages_for(PROBLEM, Config().replace(prompt={"fewshot": str(shots)}))
    assert roles(with_system) == ["system", "user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['{"problem": "a", "solution": "b"}', "{not json"], r"line 2: not valid JSON"),
        (['{"problem": "a", "solution": "b"}', "", '{"problem": "c"}'], r"line 3: 'solution' must be"),
        (['["problem", "solution"]'], r"line 1: expected an object"),
        (['{"problem": "", "solution": "b"}'], r"line 1: 'problem' must be a non-empty string"),
        (["", "  "], r"has no exemplars"),
    ],
)
def test_a_bad_fewshot_line_is_a_config_error_naming_file_and_line(tmp_path: Path, lines, expected):
    shots = write_shots(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ConfigError, match=expected) as e:
        cfg_with(fewshot=str(shots))
    assert str(shots) in str(e.value) and str(e.value).startswith("prompt.fewshot: ")


def test_a_missing_fewshot_file_exits_2_naming_it(tmp_path: Path, capsys):
    missing = tmp_path / "none.jsonl"
    assert main(["stream", "x.jsonl", "--fewshot", str(missing)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: prompt.fewshot: cannot read") and str(missing) in err


def test_the_cache_key_follows_the_prompt(tmp_path: Path):
    base = Config().fingerprint("m")
    assert cfg_with().fingerprint("m") == base
    changed = [
        cfg_with(format="qwen25-math-tir"),
        cfg_with(system="S"),
        cfg_with(user_template="Q: {problem}"),
        cfg_with(prefill=f"{FENCE}python\n"),
    ]
    keys = {c.fingerprint("m") for c in changed}
    assert base not in keys and len(keys) == len(changed)
    one = write_shots(tmp_path / "a.jsonl", [json.dumps({"problem": "p", "solution": "s"})])
    same = write_shots(tmp_path / "b.jsonl", [json.dumps({"problem": "p", "solution": "s"})])
    other = write_shots(tmp_path / "c.jsonl", [json.dumps({"problem": "p", "solution": "t"})])
    a, b, c = (cfg_with(fewshot=str(p)).fingerprint("m") for p in (one, same, other))
    assert a == b != c and base not in (a, c)  # the exemplars' content, not the file's name


# the prefill, through the whole pipeline with the replay backend scripting the model


def write_replay(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def prompt_text(request) -> str:
    return "".join(map(chr, request.prompt_ids))  # the replay backend's ids are code points


async def solve(cfg: Config, backend: ReplayBackend, problem: str) -> Result:
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(120):
            (result,) = [r async for r in p.stream([{"id": "p", "problem": problem}])]
    return result


@pytest.mark.anyio
async def test_an_open_code_block_prefill_makes_the_first_round_a_cell(tmp_path: Path):
    records = [
        {"id": "p", "round": 0, "text": f"print(6*7)\n{FENCE}\nnever read"},
        {"id": "p", "round": 1, "text": "So the answer is \\boxed{42}."},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    cfg = small_config(
        generation={"prompt_style": "tir", "max_rounds": 3, "max_new_tokens": 200},
        sandbox={"cell_timeout_s": 5.0},
        prompt={"format": "qwen25-math-tir", "prefill": f"{FENCE}python\n"},
    )
    r = await solve(cfg, backend, PROBLEM)
    assert r.status == "ok" and r.answer == 42 and r.cells == 1
    assert backend.requests is not None and len(backend.requests) == 2
    first, second = (prompt_text(q) for q in backend.requests)
    assert first == f"{PROBLEM}{FENCE}python\n"  # the problem's prompt, then the prefill
    assert second == f"{PROBLEM}{FENCE}python\nprint(6*7)\n{FENCE}\n{FENCE}output\n42\n{FENCE}\n"
    assert backend.requests[0].params.stop_at_answer is False  # the first round starts inside a block


@pytest.mark.anyio
async def test_the_prefill_is_part_of_the_text_the_answer_is_read_from(tmp_path: Path):
    records = [{"id": "p", "round": 0, "text": "42}, not 41 or 43."}]  # alone, its answer is 43
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    cfg = small_config(prompt={"prefill": "The answer is \\boxed{"})
    r = await solve(cfg, backend, PROBLEM)
    assert r.status == "ok" and r.answer == 42
    assert backend.requests is not None
    assert prompt_text(backend.requests[0]) == f"{PROBLEM}The answer is \\boxed{{"


# --print-config


def write_input(tmp_path: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text(f'\n{{"id": "a", "problem": "{PROBLEM}"}}\n{{"id": "b", "problem": "Second?"}}\n')
    return inp


def test_print_config_shows_the_first_problems_messages(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("AIMO_PIPELINE_CACHE", str(tmp_path / "empty-cache"))  # no tokenizer on disk
    argv = ["stream", str(write_input(tmp_path)), "--print-config", "--prompt-format", "deepseek-math"]
    assert main([*argv, "--prefill", "Let me think."]) == 0
    out = capsys.readouterr().out
    assert 'format = "deepseek-math"' in out and 'prefill = "Let me think."' in out
    shown = out.split("# the prompt of the first problem (id a, line 2):\n")[1]
    assert shown.startswith(f"#   [user] {PROBLEM}\n#   {STEP}\n#   [assistant, prefilled] Let me think.\n")
    assert "Second?" not in shown and "[system]" not in shown
    assert "# (the prompt text needs the model's tokenizer: no tokenizer files in" in shown


def test_print_config_without_an_input_file_shows_the_settings_only(capsys):
    assert main(["stream", "no-such-input.jsonl", "--print-config", "--prompt-format", "numina-tir"]) == 0
    out = capsys.readouterr().out
    assert 'format = "numina-tir"' in out and "the prompt of the first problem" not in out


@pytest.mark.model
def test_print_config_decodes_the_prompt_through_the_models_chat_template(tmp_path: Path, capsys):
    argv = ["stream", str(write_input(tmp_path)), "--print-config", "--prompt-format", "qwen25-math-tir"]
    assert main([*argv, "--prefill", f"{FENCE}python\n"]) == 0
    decoded = capsys.readouterr().out.split("tokens, decoded):\n")[1]
    assert f"#   <|im_start|>system\n#   {INTEGRATE}<|im_end|>\n" in decoded
    assert decoded.endswith(f"#   {PROBLEM}<|im_end|>\n#   <|im_start|>assistant\n#   {FENCE}python\n")


@pytest.mark.model
def test_the_qwen25_math_tir_format_through_the_real_chat_template(real_backend):
    cfg = Config().replace(
        generation={"prompt_style": "tir"},
        prompt={"format": "qwen25-math-tir", "prefill": f"{FENCE}python\n"},
    )
    style = style_for("tir")
    ids = style.prompt_ids(PROBLEM, cfg, real_backend)
    text = real_backend.tokenizer.decode(ids)  # type: ignore[attr-defined]
    assert f"system\n{INTEGRATE}" in text and text.index(INTEGRATE) < text.index(PROBLEM)
    assert TIR_SYSTEM_PROMPT not in text

    async def first_prompt() -> tuple[int, ...]:
        return await style.dialogue(tuple(ids), PROBLEM, cfg, real_backend).prompt()

    first = anyio.run(first_prompt)
    assert first[: len(ids)] == tuple(ids)
    assert real_backend.tokenizer.decode(first[len(ids) :]) == f"{FENCE}python\n"  # type: ignore[attr-defined]
