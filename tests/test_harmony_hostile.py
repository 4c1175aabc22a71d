"""Hostile completions in the Harmony format, through the replay backend, the real sandbox and the whole
pipeline: whatever a (broken or malicious) model writes, the run finishes, every problem gets exactly
one result, code stays in the sandbox and the answer comes only from the final channel."""

from __future__ import annotations

import anyio
import pytest

from stages import harmony
from stages.backends.replay import ReplayBackend
from tests.conftest import write_replay
from tests.test_harmony import CALL, ENC, RETURN, analysis, call, completion, final, harmony_config, record

pytestmark = pytest.mark.anyio


def dialogue() -> harmony.HarmonyDialogue:
    return harmony.HarmonyDialogue(harmony.opening("q", effort="high", instructions="i", tool="t"))


async def solve(cfg, backend, items):
    from pipeline.api import Pipeline

    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(120):
            results = [r async for r in p.stream(items)]
    ids = [r.id for r in results]
    assert sorted(ids) == sorted(i["id"] for i in items), ids  # one result per problem, no more
    return {r.id: r for r in results}


# --- the dialogue on its own: malformed ids must end the sample, never raise -----------------------


@pytest.mark.parametrize("ids", [(999_999_999,), (2**33,), (200_005, 999_999_999, RETURN)])
def test_token_ids_outside_the_encoding_end_the_sample_as_malformed_not_with_an_exception(ids):
    d = dialogue()
    assert d.read(ids, stopped=True) == "done"  # raises HarmonyError / OverflowError today
    assert d.error is not None and d.text == ""


def test_a_completion_of_special_tokens_only_is_done_without_an_answer():
    specials = tuple(
        ENC.encode(t, allowed_special="all")[0] for t in ("<|start|>", "<|channel|>", "<|message|>")
    )
    for ids in ((), (RETURN,), (CALL,), specials, (*specials, CALL)):
        d = dialogue()
        assert d.read(ids, stopped=True) == "done", ids
        assert d.text == "" and not d.final


def test_the_last_final_message_is_the_answer_and_nothing_after_a_final_runs():
    d = dialogue()
    ids = completion(final("\\boxed{1}"), final("\\boxed{2}"), call("print(3)"), end=CALL)
    assert d.read(tuple(ids), stopped=True) == "done"  # a call after the final answer is not run
    assert "\\boxed{2}" in d.text and "\\boxed{1}" not in d.text


def test_a_call_cut_at_the_token_limit_is_not_run():
    d = dialogue()
    ids = completion(call("print(1)"), end=CALL)
    assert d.read(tuple(ids[:-1]), stopped=False) == "done"
    assert d.read(tuple(ids), stopped=False) == "done"  # all there but the backend says length


# --- through the pipeline ------------------------------------------------------------------------


ATTACKS = {
    "fork": (
        "import os\nfor _ in range(10_000):\n    try:\n        os.fork()\n"
        "    except OSError as e:\n        print('fork', e); break\n"
    ),
    "shadow": "print(open('/etc/shadow').read())",
    "network": (
        "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=1)\nprint('con' + 'nected')"
    ),
    "loop": "while True:\n    pass",
    "huge": "print('x' * 50_000_000)",
    "surrogate": "print('\\ud800 caf\\u00e9 \\U0001F600')",
}


async def test_hostile_cells_are_contained_and_every_problem_still_gets_its_answer(tmp_path):
    records = []
    for pid, code in ATTACKS.items():
        records.append(record(pid, 0, completion(analysis("let me try"), call(code), end=CALL)))
        records.append(record(pid, 1, completion(final("\\boxed{7}"), end=RETURN)))
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    cfg = harmony_config(
        sandbox={"cell_timeout_s": 2.0, "output_chars": 500}, run={"max_in_flight": 6}, cache={"size": 0}
    )
    out = await solve(cfg, backend, [{"id": pid, "problem": f"attack {pid}"} for pid in ATTACKS])
    for pid, r in out.items():
        assert r.status == "ok" and r.answer == 7 and r.cells == 1, (pid, r)
    assert backend.requests is not None
    seconds = {q.problem_id: ENC.decode(list(q.prompt_ids)) for q in backend.requests if q.round == 1}
    assert "connected" not in seconds["network"]
    assert "root:" not in seconds["shadow"]
    assert len(seconds["huge"]) < len(seconds["shadow"]) + 2_000  # the output went back cut
    assert "caf\u00e9" in seconds["surrogate"]


async def test_an_out_of_range_token_id_fails_one_sample_and_the_others_still_vote(tmp_path):
    records = [
        {
            "id": "p",
            "sample": 0,
            "round": 0,
            "text": "x",
            "token_ids": [999_999_999, RETURN],
            "finish_reason": "stop",
            "stop_token": RETURN,
        },
        record("p", 0, completion(final("\\boxed{5}"), end=RETURN), sample=1),
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    out = await solve(harmony_config(generation={"samples": 2}), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer == 5 and out["p"].status == "ok"


async def test_a_python_call_on_the_analysis_channel_runs_like_gpt_oss_writes_it(tmp_path):
    m = analysis("print(6*7)").with_recipient("python").with_content_type("code")
    records = [
        record("p", 0, completion(m, end=CALL)),
        record("p", 1, completion(final("\\boxed{42}"), end=RETURN)),
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve(harmony_config(), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer == 42 and out["p"].cells == 1


async def test_a_final_without_boxed_is_a_fallback_and_an_analysis_box_never_counts(tmp_path):
    ids = completion(analysis("\\boxed{13}"), final("I think it is thirteen."), end=RETURN)
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", [record("p", 0, ids)]))
    out = await solve(harmony_config(), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer != 13 and out["p"].status == "fallback"


async def test_a_completion_that_ends_at_call_but_whose_ids_lack_it_still_runs_the_cell(tmp_path):
    ids = completion(call("print(6*7)"), end=CALL)
    rec = {
        "id": "p",
        "round": 0,
        "text": "",
        "token_ids": ids[:-1],
        "finish_reason": "stop",
        "stop_token": CALL,
    }
    records = [rec, record("p", 1, completion(final("\\boxed{42}"), end=RETURN))]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve(harmony_config(), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].answer == 42 and out["p"].cells == 1
    assert backend.requests is not None
    second = list(backend.requests[1].prompt_ids)
    assert (
        second[: len(backend.requests[0].prompt_ids) + len(ids)] == list(backend.requests[0].prompt_ids) + ids
    )


async def test_a_call_whose_call_token_is_the_last_allowed_token_runs(tmp_path):
    first = completion(call("print(6*7)"), end=CALL)
    records = [
        {"id": "p", "round": 0, "text": "", "token_ids": first},  # cut by the replay at max_new_tokens
        record("p", 1, completion(final("\\boxed{42}"), end=RETURN)),
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    cfg = harmony_config(generation={"max_new_tokens": len(first) + 20})
    out = await solve(cfg, backend, [{"id": "p", "problem": "?"}])
    assert out["p"].cells == 1 and out["p"].answer == 42
    cfg = harmony_config(generation={"max_new_tokens": len(first) - 1})  # one short: cut, never run
    out = await solve(cfg, ReplayBackend.load(tmp_path / "r.jsonl"), [{"id": "p", "problem": "?"}])
    assert out["p"].cells == 0 and out["p"].finish == {"length": 1}


async def test_endless_unknown_tool_calls_stop_at_max_rounds(tmp_path):
    records = [record("p", i, completion(call("x", to="browser.open"), end=CALL)) for i in range(50)]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve(harmony_config(generation={"max_rounds": 5}), backend, [{"id": "p", "problem": "?"}])
    assert out["p"].finish == {"rounds": 1} and out["p"].cells == 0
    assert backend.requests is not None and len(backend.requests) == 5


async def test_a_lone_surrogate_in_the_problem_text_gives_a_result_not_a_crash(tmp_path):
    ids = completion(final("\\boxed{1}"), end=RETURN)
    backend = ReplayBackend.load(
        write_replay(tmp_path / "r.jsonl", [record("bad", 0, ids), record("ok", 0, ids)])
    )
    out = await solve(
        harmony_config(), backend, [{"id": "bad", "problem": "x \ud800 y"}, {"id": "ok", "problem": "?"}]
    )
    assert out["ok"].answer == 1
