"""The ``harmony`` prompt style through the whole pipeline: the replay backend answers with completions
rendered by the Harmony library itself (the real ``HARMONY_GPT_OSS`` encoding), code runs in the real
sandbox, and each round's prompt is the rendered, grown conversation."""

from __future__ import annotations

import anyio
import openai_harmony as h
import pytest

from stages import harmony
from stages.backends.replay import ReplayBackend
from tests.conftest import layered_config, solve_all, write_replay

pytestmark = pytest.mark.anyio

ENC = harmony.encoding()
START = ENC.encode("<|start|>assistant", allowed_special="all")
RETURN, CALL = (ENC.encode(t, allowed_special="all")[0] for t in ("<|return|>", "<|call|>"))


def analysis(text: str) -> h.Message:
    return h.Message.from_role_and_content(h.Role.ASSISTANT, text).with_channel("analysis")


def call(code: str, to: str = "python") -> h.Message:
    m = h.Message.from_role_and_content(h.Role.ASSISTANT, code).with_channel("commentary")
    return m.with_recipient(to).with_content_type("code")


def final(text: str) -> h.Message:
    return h.Message.from_role_and_content(h.Role.ASSISTANT, text).with_channel("final")


def completion(*messages: h.Message, end: int | None = None) -> list[int]:
    """The ids a gpt-oss model would write after ``<|start|>assistant``: the messages as Harmony
    renders them, the last one ending at ``end`` (``<|call|>`` for a call, ``<|return|>`` for a final
    answer, ``None``: as rendered)."""
    ids = list(ENC.render_conversation(h.Conversation.from_messages(list(messages))))
    assert ids[: len(START)] == START
    ids = ids[len(START) :]
    if end is not None and ids[-1] != end:
        ids[-1] = end  # the renderer ends a final message with <|end|>; the model with <|return|>
    return ids


def record(pid: str, round_: int, ids: list[int], *, reason: str = "stop", sample: int | None = None) -> dict:
    rec = {"id": pid, "round": round_, "text": ENC.decode(ids), "token_ids": ids, "finish_reason": reason}
    if reason == "stop":
        rec["stop_token"] = ids[-1]
    if sample is not None:
        rec["sample"] = sample
    return rec


def harmony_config(**sections):
    return layered_config(
        {
            "generation": {"prompt_style": "harmony", "max_rounds": 4, "max_new_tokens": 2000},
            "sandbox": {"cell_timeout_s": 2.0},
        },
        **sections,
    )


async def test_a_python_call_runs_in_the_sandbox_and_the_next_round_renders_the_grown_conversation(tmp_path):
    round0 = completion(analysis("I will compute it."), call("a = 6 * 7\nprint(a)"), end=CALL)
    round1 = completion(analysis("The tool says 42."), final("So the answer is \\boxed{42}."), end=RETURN)
    records = [record("p", 0, round0), record("p", 1, round1)]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve_all(harmony_config(), backend, [{"id": "p", "problem": "What is 6*7?"}])
    r = out["p"]
    assert r.status == "ok" and r.answer == 42 and r.cells == 1, r
    assert backend.requests is not None and [q.round for q in backend.requests] == [0, 1]
    first, second = backend.requests
    assert first.params.stop_token_ids == harmony.stop_token_ids() and first.params.stop == ()
    prompt0 = list(first.prompt_ids)
    text0 = ENC.decode(prompt0)
    assert text0.startswith("<|start|>system<|message|>") and "Reasoning: high" in text0
    assert "## python" in text0 and "What is 6*7?" in text0 and text0.endswith("<|start|>assistant")
    prompt1 = list(second.prompt_ids)
    # a prefix cache covers the whole first round: its prompt and its completion, as the model wrote them
    assert prompt1[: len(prompt0) + len(round0)] == prompt0 + round0
    tail = ENC.decode(prompt1[len(prompt0) + len(round0) :])
    assert tail.startswith("<|start|>python") and "42" in tail and tail.endswith("<|start|>assistant")


async def test_a_call_to_an_unknown_tool_gets_an_error_and_the_sample_goes_on(tmp_path):
    records = [
        record("p", 0, completion(call("search('6*7')", to="browser.search"), end=CALL)),
        record("p", 1, completion(final("\\boxed{7}"), end=RETURN)),
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve_all(harmony_config(), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer == 7 and out["p"].cells == 0
    assert backend.requests is not None
    tail = ENC.decode(list(backend.requests[1].prompt_ids))
    assert "there is no tool called 'browser.search'" in tail


async def test_the_answer_is_the_final_channels_not_the_analysis(tmp_path):
    ids = completion(analysis("Maybe \\boxed{13}? No."), final("The answer is \\boxed{12}."), end=RETURN)
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", [record("p", 0, ids)]))
    out = await solve_all(harmony_config(), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer == 12


async def test_a_code_error_goes_back_as_the_tools_answer(tmp_path):
    records = [
        record("p", 0, completion(call("print(1 / 0)"), end=CALL)),
        record("p", 1, completion(final("\\boxed{3}"), end=RETURN)),
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve_all(harmony_config(), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer == 3 and out["p"].cells == 1
    assert backend.requests is not None
    assert "ZeroDivisionError" in ENC.decode(list(backend.requests[1].prompt_ids))


async def test_malformed_and_truncated_completions_end_their_samples_and_the_vote_goes_on(tmp_path):
    garbage = ENC.encode("no header at all \\boxed{99}")  # not Harmony: no <|channel|>, no <|message|>
    cut = completion(analysis("a long thought that is cut off " * 3), call("print(1)"))[:-8]
    good = completion(final("\\boxed{5}"), end=RETURN)
    records = [
        record("p", 0, garbage, reason="eos", sample=0),
        record("p", 0, cut, reason="length", sample=1),
        record("p", 0, good, sample=2),
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = harmony_config(generation={"samples": 3})
    out = await solve_all(cfg, backend, [{"id": "p", "problem": "?"}])
    r = out["p"]
    assert r.answer == 5 and r.status == "ok"
    assert r.votes == {5: 1}  # the garbage sample's \boxed{99} is not a final answer; the cut one has none
    assert r.cells == 0  # the cut-off call never ran


async def test_rounds_end_at_max_rounds_with_the_call_unanswered(tmp_path):
    records = [record("p", i, completion(call(f"print({i})"), end=CALL)) for i in range(4)]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    cfg = harmony_config(generation={"max_rounds": 3})
    out = await solve_all(cfg, backend, [{"id": "p", "problem": "?"}])
    r = out["p"]
    assert r.cells == 2 and r.status == "fallback" and r.finish == {"rounds": 1}
    assert backend.requests is not None and len(backend.requests) == 3


def test_settings_reach_the_rendered_prompt():
    settings = {"reasoning_effort": "low", "instructions": "Be brief.", "tool_description": "A calculator."}
    cfg = harmony_config(generation=settings)
    style = harmony.HarmonyStyle()
    text = ENC.decode(style.prompt_ids("Find x.", cfg, None))  # type: ignore[arg-type]
    assert "Reasoning: low" in text and "Be brief." in text and "A calculator." in text
    default = ENC.decode(style.prompt_ids("Find x.", harmony_config(), None))  # type: ignore[arg-type]
    assert "time out after 2 seconds" in default  # the sandbox's cell limit, not Harmony's 120 s


async def test_the_aimo3_preset_runs_the_recipe_end_to_end(tmp_path):
    from pipeline.presets import resolve

    cfg, sources = resolve(preset="aimo3", flags={"sandbox": {"pool_size": 2}, "cache": {"size": 0}})
    g, v = cfg.generation, cfg.vote
    assert (g.prompt_style, g.samples, g.temperature, g.min_p, g.top_logprobs, g.max_rounds) == (
        "harmony",
        8,
        1.0,
        0.02,
        5,
        128,
    )
    assert (v.rule, v.early_stop, cfg.sandbox.cell_timeout_s, cfg.time.reserve_per_problem_s) == (
        "entropy",
        4,
        6.0,
        300.0,
    )
    assert (cfg.vllm.kv_cache_dtype, cfg.vllm.max_model_len, cfg.vllm.max_num_seqs) == ("fp8", 65_536, 256)
    assert sources["generation.prompt_style"] == "preset aimo3"
    sure = [[-0.01, -5.0, -6.0]]
    records = []
    for s in range(8):
        answer = 42 if s % 2 == 0 else 17  # four agree on 42 among the first ones to finish
        ids = completion(analysis("think"), final(f"\\boxed{{{answer}}}"), end=RETURN)
        rec = record("p", 0, ids, sample=s)
        rec["top_logprobs"] = sure * len(ids)
        rec["seconds"] = 0.0 if answer == 42 else 5.0  # the others are still running when 4 agree
        records.append(rec)
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), speed=1.0)
    with anyio.fail_after(30):
        out = await solve_all(cfg, backend, [{"id": "p", "problem": "?"}])
    r = out["p"]
    assert r.answer == 42 and r.early_stop and r.votes == {42: 4}
