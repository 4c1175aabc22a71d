"""Attacks on DeepConf online (``stages/confidence_stop.py``): bad flags, ``stop_in`` edges, many problems
at once, the tir prompt style, early stop and the time budget with the stop, recorded ``confidence``
completions, the cache, the report's replay of the stop on hostile records, a retried batch, Kaggle.

Only the scripted (FakeBackend) and replay backends are used. Tests marked ``# BUG:`` show the behaviour
that is expected and fail until the bug is fixed."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import anyio
import pytest

from pipeline.api import Pipeline
from pipeline.cli import EXIT_USAGE, main
from pipeline.report_data import figures, load_record, load_results
from pipeline.report_online import stop_point
from stages.backends.base import Completion, Request, SamplingParams
from stages.backends.fake import FakeBackend
from stages.backends.replay import RecordingBackend, ReplayBackend
from stages.confidence_stop import LOW_CONFIDENCE, ConfidenceGate, ConfidenceTrack, ConfidenceWatch, stop_in
from tests.conftest import layered_config, small_config, solve_all, write_replay

SURE = [-0.5, -1.0, -1.5, -2.0, -2.5]  # confidence 1.5
HESITANT = [-0.1, -0.2, -0.3, -0.4, -0.5]  # confidence 0.3
FENCE = "```"


def online(window: int = 2, samples: int = 2, **vote) -> dict:
    return {
        "generation": {"samples": samples, "top_logprobs": 5, "max_new_tokens": 64},
        "vote": {"rule": "majority", "deepconf_window": window, **vote},
    }


def watch(window: int, threshold: float) -> ConfidenceWatch:
    return ConfidenceWatch(ConfidenceTrack(window), ConfidenceGate(fixed=threshold))


def stopped_count(results) -> int:
    return sum(r.finish.get("confidence", 0) for r in results)


async def record_run(tmp_path: Path, name: str, source: list[dict], cfg, items) -> tuple[Path, Path]:
    """Run ``items`` on a replay of ``source`` through a recorder: the record file and the results file
    (what ``--record`` and ``--output`` write)."""
    src = write_replay(tmp_path / f"{name}.src.jsonl", source)
    record = tmp_path / f"{name}.record.jsonl"
    recorder = RecordingBackend(ReplayBackend.load(src, speed=0), record)
    try:
        results = await solve_all(cfg, recorder, items)
    finally:
        recorder.close_file()
    out = tmp_path / f"{name}.results.jsonl"
    out.write_text("".join(json.dumps(r.to_json()) + "\n" for r in results.values()))
    return record, out


def fixed_row(record: Path, results: Path, cfg) -> dict:
    fig = figures(load_results(results), load_record(record), cfg)
    rows = {row["setting"]: row for row in fig["online_stop"]["rows"]}
    return rows[f"fixed {cfg.vote.deepconf_stop:g}"]


# --- the command line --------------------------------------------------------------------------------


@pytest.fixture
def cli_files(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "problem": "1+1", "answer": 2}\n')
    replay = write_replay(
        tmp_path / "r.jsonl",
        [
            {"id": "a", "sample": 0, "text": "so we add x y \\boxed{2}", "top_logprobs": [SURE] * 6},
            {
                "id": "a",
                "sample": 1,
                "text": "hmm? what? x? y? z? \\boxed{3}",
                "top_logprobs": [HESITANT] * 6,
            },
        ],
    )
    return src, replay


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--deepconf-stop", "nan"], "vote.deepconf_stop: must be a finite number"),
        (["--deepconf-stop", "inf"], "vote.deepconf_stop: must be a finite number"),
        (["--deepconf-stop=-inf"], "vote.deepconf_stop: must be a finite number"),
        (["--deepconf-keep", "nan"], "vote.deepconf_keep: must be in (0, 1]"),
        (["--deepconf-keep", "0"], "vote.deepconf_keep: must be in (0, 1]"),
        (["--deepconf-keep", "1.5"], "vote.deepconf_keep: must be in (0, 1]"),
        (["--deepconf-keep=-0.5"], "vote.deepconf_keep: must be in (0, 1]"),
        (["--deepconf-window", "0"], "vote.deepconf_window: must be at least 1"),
        (["--deepconf-window=-3"], "vote.deepconf_window: must be at least 1"),
        (["--deepconf-warmup", "0"], "vote.deepconf_warmup: must be at least 1"),
        (["--deepconf-warmup=-2"], "vote.deepconf_warmup: must be at least 1"),
        (["--deepconf-warmup", "2", "--deepconf-stop", "1"], "vote.deepconf_stop: a fixed threshold"),
    ],
)
def test_bad_online_stop_flags_exit_2_naming_the_field(argv, message, cli_files, capsys):
    src, replay = cli_files
    common = ["--backend", "replay", "--replay", str(replay), "--top-logprobs", "5", "--no-progress"]
    assert main(["stream", str(src), *common, *argv]) == EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--deepconf-stop", "1"], ["--deepconf-warmup", "1"]])
def test_the_online_stop_without_top_logprobs_exits_2(argv, cli_files, capsys):
    src, replay = cli_files
    assert main(["stream", str(src), "--backend", "replay", "--replay", str(replay), *argv]) == EXIT_USAGE
    assert "--top-logprobs" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["x", "1e"])
def test_a_threshold_that_is_not_a_number_is_refused_by_the_parser(value, cli_files, capsys):
    src, _ = cli_files
    with pytest.raises(SystemExit) as e:
        main(["stream", str(src), "--deepconf-stop", value])
    assert e.value.code == 2 and "--deepconf-stop" in capsys.readouterr().err


def test_the_command_stops_the_hesitant_sample_and_writes_its_finish(cli_files, tmp_path: Path):
    src, replay = cli_files
    out = tmp_path / "out.jsonl"
    argv = ["stream", str(src), "--backend", "replay", "--replay", str(replay)]
    argv += ["--samples", "2", "--top-logprobs", "5", "--vote-rule", "majority", "--no-progress"]
    assert main([*argv, "-o", str(out), "--deepconf-stop", "1", "--deepconf-window", "2"]) == 0
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["finish"] == {"confidence": 1, "answer": 1} and row["votes"] == {"2": 1}
    assert row["new_tokens"] == 6 + 2  # stopped at its first full window
    # a negative threshold is a valid number that never stops anything
    out = tmp_path / "out2.jsonl"
    assert main([*argv, "-o", str(out), "--deepconf-stop=-1", "--deepconf-window", "2"]) == 0
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["finish"] == {"answer": 2} and row["votes"] == {"2": 1, "3": 1}


def test_a_warmup_as_large_as_the_samples_never_stops_any(cli_files, tmp_path: Path):
    src, replay = cli_files
    out = tmp_path / "out.jsonl"
    argv = ["stream", str(src), "-o", str(out), "--backend", "replay", "--replay", str(replay)]
    argv += ["--samples", "2", "--top-logprobs", "5", "--vote-rule", "majority", "--no-progress"]
    assert main([*argv, "--deepconf-warmup", "5", "--deepconf-window", "2"]) == 0
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["finish"] == {"answer": 2}  # the threshold is never set: nothing is stopped


# --- stop_in and the running figures ------------------------------------------------------------------


def completion(n: int, reason: str = "eos", rows=None, **kw) -> Completion:
    rows = rows if rows is not None else [SURE] * n
    return Completion(tuple(range(n)), " ".join("w" * n), reason, top_logprobs=tuple(map(tuple, rows)), **kw)


def test_stop_in_leaves_a_completion_without_a_watch_or_rows_as_it_is():
    c = completion(3, rows=[HESITANT] * 3)
    assert stop_in(c, None) is c
    bare = Completion((1, 2), "a b", "eos")
    assert stop_in(bare, watch(1, 10.0)) is bare
    empty = Completion((), "", "eos", top_logprobs=())
    assert stop_in(empty, watch(1, 10.0)) is empty


@pytest.mark.parametrize("reason", ["eos", "stop", "answer"])
def test_stop_in_at_the_last_token_of_an_ended_completion_stops_it_too(reason):
    # the watch wins at its token whatever else ends there (as every backend does): the sample stops
    c = completion(4, reason, rows=[SURE, SURE, SURE, HESITANT])
    cut = stop_in(c, watch(2, 1.0), lambda n: "cut")
    assert (cut.finish_reason, cut.new_tokens, cut.text) == ("confidence", 4, "cut")


def test_stop_in_at_the_last_token_of_a_length_completion_is_a_stop():
    c = completion(4, "length", rows=[SURE, SURE, SURE, HESITANT], logprobs=(-0.1,) * 4)
    cut = stop_in(c, watch(2, 1.0), lambda n: f"{n} tokens")
    assert (cut.finish_reason, cut.new_tokens, cut.text, cut.logprobs) == (
        "confidence",
        4,
        "4 tokens",
        (-0.1,) * 4,
    )


def test_stop_in_cuts_the_ids_rows_and_logprobs_and_clears_the_stop_fields():
    rows = [SURE, HESITANT, HESITANT, SURE, SURE]
    c = completion(5, "stop", rows=rows, logprobs=(-1.0, -2.0, -3.0, -4.0, -5.0), stop_token=4)
    cut = stop_in(c, watch(2, 1.0))  # (1.5 + 0.3) / 2 = 0.9 < 1 at the second token
    assert cut.token_ids == (0, 1) and cut.logprobs == (-1.0, -2.0) and len(cut.top_logprobs) == 2
    assert cut.finish_reason == "confidence" and cut.stop_token is None and cut.stop_string is None
    assert cut.text == c.text  # no cut function: the text stays whole


def test_broken_rows_count_for_nothing_in_a_track():
    track = ConfidenceTrack(2)
    for row in ([], [math.nan], [-math.inf, math.nan], SURE, [math.inf, -0.5]):
        track.feed(row)
    # only SURE (1.5) and [inf, -0.5] -> 0.5 counted: one window of two
    assert list(track.recent) == [1.5, 0.5] and track.lowest == 1.0
    assert all(math.isfinite(x) for x in track.recent)


def test_a_watch_fed_only_broken_rows_never_stops():
    w = watch(1, 100.0)
    assert not any(w.feed(row) for row in ([], [math.nan], [-math.inf]))
    assert w.track.lowest is None


def test_a_stopped_watch_stays_stopped_until_reset():
    w = watch(1, 1.0)
    assert w.feed(HESITANT) and w.feed(SURE) and w.stopped
    w.reset()
    assert not w.stopped and not w.feed(SURE)


def test_a_gate_ignores_finished_samples_with_no_figure_and_keep_1_is_the_minimum():
    gate = ConfidenceGate(warmup=2, keep=1.0)
    gate.finished(ConfidenceTrack(3))  # no token confidence at all: does not count
    assert gate.threshold is None and gate.seen == []
    for low in (4.0, 2.0):
        t = ConfidenceTrack(1)
        t.add(low)
        gate.finished(t)
    assert gate.threshold == 2.0


def test_a_watch_starts_from_the_samples_track_without_changing_it():
    track = ConfidenceTrack(2)
    track.feed(SURE)
    w = ConfidenceWatch(track, ConfidenceGate(fixed=1.0))
    assert w.feed(HESITANT)  # (1.5 + 0.3) / 2 across the round's start
    assert list(track.recent) == [1.5] and track.lowest is None


def test_the_reports_stop_point_matches_a_watch_on_clean_rows():
    conf = [1.5, 1.5, 0.3, 1.5, 0.3, 0.3, 1.5]
    rows = [SURE if c == 1.5 else HESITANT for c in conf]
    for window in (1, 2, 3):
        for threshold in (0.2, 0.8, 1.0, 1.4):
            n = stop_point(rows, window, threshold)
            c = stop_in(completion(len(rows), "eos", rows=rows), watch(window, threshold))
            assert (c.new_tokens if c.finish_reason == "confidence" else None) == n, (window, threshold)


# --- many problems, early stop, time budget, cache, recorded stops ------------------------------------


def _many(text: str, nth: int) -> str:
    n = int(text.split()[-1])
    if nth < 3:
        return f"so the total is \\boxed{{{n}}}"
    return f"hmm? what? maybe? not? sure? x y z \\boxed{{{n + 1}}}"


async def _run_many(vote: dict, problems: int, samples: int = 8):
    cfg = small_config(
        generation={"samples": samples, "top_logprobs": 5, "max_new_tokens": 64},
        vote={"rule": "majority", "deepconf_window": 3, **vote},
        batch={"max_batch_size": 64, "max_wait_ms": 1.0},
        run={"max_in_flight": 64, "verify_workers": 1},
    )
    items = [{"id": f"p{i}", "problem": f"q {i}", "answer": i} for i in range(problems)]
    async with Pipeline(cfg, backend=FakeBackend(_many, step_s=0.0002)) as p:
        with anyio.fail_after(60):
            out = {r.id: r async for r in p.stream(items)}
        inf = p.runner.inference
        return out, dict(inf._gates), dict(inf._scopes), inf.stats.report()


async def test_200_problems_by_8_samples_lose_no_sample_and_forget_every_gate():
    out, gates, scopes, stats = await _run_many({"deepconf_stop": 1.0}, 200)
    assert len(out) == 200 and gates == {} and scopes == {}
    for r in out.values():
        assert r.samples == 8 and sum(r.finish.values()) == 8
        assert r.finish == {"answer": 3, "confidence": 5} and r.votes == {r.gold: 3} and r.correct
    assert stats["completed"] == 1600 and stats["failed"] == stats["aborted"] == 0
    # 3 x 5 words and 5 x 3 words (window 3 of "hmm? what? maybe?") per problem
    assert stats["new_tokens"] == sum(r.new_tokens for r in out.values()) == 200 * (3 * 5 + 5 * 3)


async def test_a_warmup_under_load_loses_no_sample_and_forgets_every_gate():
    out, gates, scopes, stats = await _run_many({"deepconf_warmup": 2}, 100)
    assert gates == {} and scopes == {} and stats["completed"] == 800
    for r in out.values():
        assert r.samples == 8 and sum(r.finish.values()) == 8
        # the threshold comes when the warmup samples finish, so which hesitant ones it catches depends
        # on timing; what holds whatever the timing: a stopped sample never votes, the sure ones do
        assert sum(r.votes.values()) == r.finish.get("answer", 0) >= 3
        assert r.votes.get(r.gold, 0) >= 3
    assert stopped_count(out.values()) > 0


async def test_an_early_stop_with_the_online_stop_counts_every_sample():
    out, gates, scopes, stats = await _run_many({"deepconf_stop": 1.0, "early_stop": 2}, 100)
    assert gates == {} and scopes == {}
    for r in out.values():
        assert r.early_stop and r.correct and r.votes == {r.gold: 2}
        assert sum(r.finish.values()) == 8 and r.finish.get("confidence", 0) + r.finish["answer"] <= r.samples
    assert stats["requests"] == 800


async def test_a_time_budget_with_the_online_stop_keeps_every_sample(tmp_path: Path):
    records = [
        {"id": "p", "sample": 0, "text": "so \\boxed{4}", "top_logprobs": [SURE] * 2},
        {"id": "p", "sample": 1, "text": "hmm? what? \\boxed{5}", "top_logprobs": [HESITANT] * 3},
        {"id": "p", "sample": 2, "text": "slow \\boxed{6}", "top_logprobs": [SURE] * 2, "seconds": 30},
        {
            "id": "p",
            "sample": 3,
            "text": "hmm? slow? \\boxed{6}",
            "top_logprobs": [HESITANT] * 3,
            "seconds": 30,
        },
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = layered_config(
        online(samples=4, deepconf_stop=1.0),
        time={"budget_s": 1.5, "expected_problems": 1, "min_samples": 4, "max_samples": 4},
    )
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(20):
            (r,) = [r async for r in p.stream([{"id": "p", "problem": "q"}])]
        gates = dict(p.runner.inference._gates)
    assert gates == {}
    assert r.answer == 4 and r.finish == {"answer": 1, "confidence": 1, "aborted": 2}
    assert r.samples == 4 and r.votes == {4: 1}


async def test_a_recorded_confidence_finish_replays_as_a_stopped_sample_without_a_threshold(tmp_path: Path):
    records = [
        {"id": "a", "sample": 0, "text": "so \\boxed{2}"},
        {"id": "a", "sample": 1, "text": "hmm \\boxed{3}", "finish_reason": "confidence"},
        {"id": "a", "sample": 2, "text": "hmm \\boxed{3}", "finish_reason": "confidence"},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    r = (await solve_all(small_config(generation={"samples": 3}), backend, [{"id": "a", "problem": "1+1"}]))[
        "a"
    ]
    assert r.answer == 2 and r.votes == {2: 1} and r.finish == {"answer": 1, "confidence": 2}
    # all of them stopped: the fallback, saying why
    records = [{"id": "b", "text": "hmm \\boxed{3}", "finish_reason": "confidence"}]
    backend = ReplayBackend.load(write_replay(tmp_path / "s.jsonl", records))
    r = (await solve_all(small_config(generation={"samples": 2}), backend, [{"id": "b", "problem": "2"}]))[
        "b"
    ]
    assert r.status == "fallback" and r.votes == {} and LOW_CONFIDENCE in (r.error or "")


async def test_a_result_with_stopped_samples_is_cached_and_served_whole(tmp_path: Path):
    items = [{"id": "a", "problem": "3 + 4", "answer": 7}]

    def responder(text: str, nth: int) -> str:
        return "so it is \\boxed{7}" if nth == 0 else "hmm? what? maybe? \\boxed{99}"

    cfg = small_config(
        cache={"size": 100, "dir": str(tmp_path / "cache")}, **online(window=2, samples=3, deepconf_stop=1.0)
    )
    backend = FakeBackend(responder)
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(30):
            (first,) = [r async for r in p.stream(items)]
            (again,) = [r async for r in p.stream(items)]
    assert first.status == "ok" and first.finish == {"answer": 1, "confidence": 2}
    assert again.status == "cached" and again.finish == first.finish and again.votes == first.votes
    assert again.answer == 7 and len(backend.requests) == 3
    # another threshold is another key: computed again
    other = cfg.replace(vote={"deepconf_stop": 0.1})
    async with Pipeline(other, backend=FakeBackend(responder)) as p:
        with anyio.fail_after(30):
            (r,) = [r async for r in p.stream(items)]
    assert r.status == "ok" and r.finish == {"answer": 3} and r.answer == 99


def test_kaggle_predict_with_the_online_stop(tmp_path: Path):
    import polars as pl

    from pipeline.kaggle import make_predict

    def responder(text: str, nth: int) -> str:
        return "so it is \\boxed{7}" if nth == 0 else "hmm? what? maybe? \\boxed{99}"

    results = tmp_path / "results.jsonl"
    cfg = small_config(**online(window=2, samples=3, deepconf_stop=1.0))
    predict = make_predict(cfg, backend=FakeBackend(responder), results_path=results)
    try:
        frame = predict(pl.Series("id", ["q1"]), pl.Series("problem", ["3 + 4"]))
    finally:
        predict.close()
    assert frame["answer"].item(0) == 7
    (line,) = map(json.loads, results.read_text().splitlines())
    assert line["finish"] == {"answer": 1, "confidence": 2} and line["submitted_answer"] == 7


# --- tir: code rounds ---------------------------------------------------------------------------------


def tir(**vote):
    return layered_config(
        {
            "generation": {"prompt_style": "tir", "max_rounds": 4, "max_new_tokens": 200, "top_logprobs": 5},
            "sandbox": {"cell_timeout_s": 5.0},
            "vote": {"rule": "majority", "deepconf_window": 2, **vote},
        },
        generation={"samples": 1},
    )


ROUND0 = f"Let me compute.\n{FENCE}python\nprint(6*7)\n{FENCE}\nand the rest is never read"  # 5 words kept


async def test_a_stop_in_the_middle_of_a_later_round_closes_the_sandbox_session(tmp_path: Path, monkeypatch):
    from stages import sandbox as sandbox_module

    opened, closed = [], []
    real_init, real_close = sandbox_module.Session.__init__, sandbox_module.Session.aclose

    def init(self, sb):
        opened.append(self)
        real_init(self, sb)

    async def aclose(self):
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(sandbox_module.Session, "__init__", init)
    monkeypatch.setattr(sandbox_module.Session, "aclose", aclose)
    records = [
        {"id": "p", "round": 0, "text": ROUND0, "top_logprobs": [SURE] * 10},
        {
            "id": "p",
            "round": 1,
            "text": "it is 42 hmm? what? so \\boxed{42}",
            "top_logprobs": [SURE] * 3 + [HESITANT] * 4,
        },
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    r = (await solve_all(tir(deepconf_stop=1.0), backend, [{"id": "p", "problem": "6*7?"}]))["p"]
    assert r.finish == {"confidence": 1} and r.cells == 1 and r.votes == {}
    assert r.new_tokens == 5 + 4  # (1.5 + 0.3) / 2 at round 1's 4th word
    assert [q.round for q in backend.requests] == [0, 1]
    assert len(opened) == len(closed) == 1


async def test_a_stop_right_at_a_code_block_end_runs_no_code_and_drops_the_answer(tmp_path: Path):
    # Fixed (found by an attack pass):
    # stages/confidence_stop.py stop_in (`n == len(top) and finish_reason != "length"`: "it ended
    # there anyway") also leaves a round that stopped at a code block's closing fence unchanged, though
    # the sample does not end there: its code runs in the sandbox, the next round is sent, the watch
    # (carrying the low window) stops it after one token -- or, when that round is one token long, not
    # at all, and the answer of a sample whose window fell below the threshold votes. Expected: the
    # sample is stopped at the fence (finish "confidence"), no cell runs, no next round, no vote.
    records = [
        # windows of 2 over the 5 kept words: 1.5, 1.5, 0.9, then 0.3 < 0.5 at the 5th (the last)
        {"id": "p", "round": 0, "text": ROUND0, "top_logprobs": [SURE] * 3 + [HESITANT] * 2 + [SURE] * 5},
        {"id": "p", "round": 1, "text": "\\boxed{42}", "top_logprobs": [SURE]},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    r = (await solve_all(tir(deepconf_stop=0.5), backend, [{"id": "p", "problem": "6*7?"}]))["p"]
    assert r.votes == {} and r.finish == {"confidence": 1}
    assert r.cells == 0 and r.new_tokens == 5
    assert [q.round for q in backend.requests] == [0]


# --- the report's replay of the stop ------------------------------------------------------------------


async def test_the_report_on_a_record_without_top_logprobs_says_what_it_needs(tmp_path: Path):
    cfg = small_config(generation={"samples": 2})
    record, results = await record_run(
        tmp_path,
        "plain",
        [{"id": "a", "text": "\\boxed{2}"}],
        cfg,
        [{"id": "a", "problem": "1+1", "answer": 2}],
    )
    fig = figures(load_results(results), load_record(record), cfg.replace(vote={"deepconf_window": 2}))
    assert fig["online_stop"] == {"needs": "--record with --top-logprobs (the token confidences)"}


async def test_the_report_on_a_single_sample_never_stops_its_warmup_sample(tmp_path: Path):
    cfg = small_config(**online(samples=1))
    items = [{"id": "a", "problem": "1+1", "answer": 2}]
    source = [{"id": "a", "text": "hmm? what? so \\boxed{2}", "top_logprobs": [HESITANT] * 4}]
    record, results = await record_run(tmp_path, "one", source, cfg, items)
    fig = figures(load_results(results), load_record(record), cfg.replace(vote={"deepconf_stop": 1.0}))
    rows = {row["setting"]: row for row in fig["online_stop"]["rows"]}
    assert fig["online_stop"]["warmup"] == 1
    assert all(row["stopped"] == 0 for name, row in rows.items() if name.startswith("keep"))
    assert rows["fixed 1"]["stopped"] == 1 and rows["fixed 1"]["answers"] == {"a": 0}
    live = await solve_all(
        cfg.replace(vote={"deepconf_stop": 1.0}), ReplayBackend.load(record, speed=0), items
    )
    assert rows["fixed 1"]["tokens"] == live["a"].new_tokens == 2


async def test_the_report_ignores_results_the_record_does_not_hold(tmp_path: Path):
    cfg = small_config(**online())
    items = [{"id": "a", "problem": "1+1", "answer": 2}]
    source = [{"id": "a", "text": "so we add \\boxed{2}", "top_logprobs": [SURE] * 4}]
    record, results = await record_run(tmp_path, "miss", source, cfg, items)
    extra = {"id": "zz", "answer": 5, "status": "ok", "samples": 3, "votes": {"5": 3}, "gold": 5}
    results.write_text(results.read_text() + json.dumps(extra) + "\n")
    fig = figures(load_results(results), load_record(record), cfg.replace(vote={"deepconf_stop": 1.0}))
    for row in fig["online_stop"]["rows"]:
        assert set(row["answers"]) == {"a"} and row["tokens"] == 8


@pytest.mark.parametrize(
    "rows",
    [
        [SURE, [], [], HESITANT, HESITANT, SURE, SURE],  # empty rows (a server that sent none)
        [SURE, [math.nan], [-math.inf], HESITANT, HESITANT, SURE, SURE],  # rows with no finite value
    ],
    ids=["empty", "nan-inf"],
)
async def test_the_reports_fixed_row_counts_tokens_as_a_live_replay_with_broken_rows(tmp_path: Path, rows):
    # Fixed (found by an attack pass):
    # pipeline/report_online.py stop_point counts the position in the sample's *filtered*
    # confidences (pipeline/report_data.py candidates drops the rows with no finite value), while a live
    # run (stop_in, every backend) cuts at the row's position among all generated tokens. A row with no
    # figure before the stop makes the report keep fewer tokens (here 2) than the live replay (4), so
    # "tokens" and "saved" are wrong, though the module says a live run reproduces the fixed row exactly.
    cfg = small_config(**online())
    items = [{"id": "a", "problem": "1+1", "answer": 2}]
    source = [
        {"id": "a", "sample": 0, "text": "a b c d e f \\boxed{2}", "top_logprobs": [SURE] * 7},
        {"id": "a", "sample": 1, "text": "w x y z q r \\boxed{3}", "top_logprobs": rows},
    ]
    record, results = await record_run(tmp_path, "broken", source, cfg, items)
    stop = cfg.replace(vote={"deepconf_stop": 1.0})
    live = await solve_all(stop, ReplayBackend.load(record, speed=0), items)
    assert live["a"].finish == {"answer": 1, "confidence": 1} and live["a"].new_tokens == 7 + 4
    fixed = fixed_row(record, results, stop)
    assert fixed["stopped"] == 1
    assert fixed["tokens"] == live["a"].new_tokens


async def test_the_report_and_a_live_replay_agree_on_a_length_sample_stopped_at_its_last_token(
    tmp_path: Path,
):
    # Fixed (found by an attack pass):
    # a sample cut by max_new_tokens whose window falls below the threshold at its very last token
    # is stopped by stop_in (stages/confidence_stop.py: only a non-"length" finish "ended there anyway")
    # and by the scripted and transformers backends, so it does not vote; the report's stop_point
    # (pipeline/report_online.py: `i + 1 if i + 1 < len(confidences) else None`) treats every last token
    # as an end and lets it vote (as the vLLM and server streams also do). The report's fixed row then
    # disagrees with a live replay of the same record: here it counts no stopped sample and answers 3.
    cfg = small_config(
        generation={"samples": 3, "top_logprobs": 5, "max_new_tokens": 5, "stop_at_answer": False},
        vote={"rule": "majority", "deepconf_window": 2},
    )
    items = [{"id": "a", "problem": "1+1", "answer": 2}]
    long = "w \\boxed{3} y z q r s"  # 7 words, cut at 5: windows 1.5, 1.5, 0.9, then 0.3 at the 5th
    source = [
        {"id": "a", "sample": 0, "text": "a \\boxed{2}", "top_logprobs": [SURE] * 2},
        {"id": "a", "sample": 1, "text": long, "top_logprobs": [SURE] * 3 + [HESITANT] * 2 + [SURE] * 2},
        {"id": "a", "sample": 2, "text": long, "top_logprobs": [SURE] * 3 + [HESITANT] * 2 + [SURE] * 2},
    ]
    record, results = await record_run(tmp_path, "length", source, cfg, items)
    stop = cfg.replace(vote={"deepconf_stop": 0.5})
    live = await solve_all(stop, ReplayBackend.load(record, speed=0), items)
    fixed = fixed_row(record, results, stop)
    assert fixed["tokens"] == live["a"].new_tokens
    assert fixed["stopped"] == stopped_count(live.values())
    assert fixed["answers"] == {"a": live["a"].answer}


def test_the_report_names_a_record_line_with_a_broken_top_logprobs_row(tmp_path: Path, capsys):
    # BUG (pre-existing parsing, now read by the online-stop replay): pipeline/report_data.py
    # load_record converts each top_logprobs value with float() outside its try, so a record line with a
    # null in a row (or rows that are not lists) ends `python -m pipeline report` with a TypeError
    # traceback; the report's documented contract is exit code 2 naming the bad file and line.
    results = tmp_path / "res.jsonl"
    results.write_text(json.dumps({"id": "a", "answer": 2, "status": "ok", "samples": 1, "gold": 2}) + "\n")
    record = tmp_path / "rec.jsonl"
    record.write_text(
        json.dumps({"id": "a", "sample": 0, "text": "\\boxed{2}", "top_logprobs": [[None, -1.0]]}) + "\n"
    )
    assert main(["report", str(results), "--record", str(record), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and str(record) in err


async def test_the_report_on_nan_and_inf_rows_writes_strict_json(tmp_path: Path, capsys):
    results = tmp_path / "res.jsonl"
    results.write_text(json.dumps({"id": "a", "answer": 2, "status": "ok", "samples": 2, "gold": 2}) + "\n")
    record = tmp_path / "rec.jsonl"
    lines = [
        {
            "id": "a",
            "sample": 0,
            "text": "x \\boxed{2}",
            "top_logprobs": [[math.nan, -math.inf], [], [math.inf]],
        },
        {"id": "a", "sample": 1, "text": "\\boxed{3}"},
    ]
    record.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "rep"
    assert main(["report", str(results), "--record", str(record), "--out", str(out)]) == 0
    text = (out / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert "DeepConf online stop" in (out / "report.md").read_text()


# --- a backend that retries a batch -------------------------------------------------------------------


class _OutOfMemoryOnce(FakeBackend):
    """Runs out of memory once, at the third decode step of its first batch (as a GPU can mid-generate):
    the scheduler splits the batch and runs its rows again."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failing = True

    def _step(self, row, words, step, low=None):  # type: ignore[override]
        done = FakeBackend._step(row, words, step, low)
        if self.failing and step == 3:
            self.failing = False
            raise MemoryError("CUDA out of memory")
        return done


async def test_a_batch_retried_after_running_out_of_memory_starts_each_watch_again():
    # Fixed (found by an attack pass):
    # stages/backends/scheduler.py BatchScheduler._run re-runs a failed batch's rows (halves after an
    # out-of-memory error, one by one after another error) without calling their watches' reset(), which
    # the TokenWatch protocol requires of a backend that retries a request. The transformers backend
    # feeds the watch in its logits processor, so a row retried after an OOM mid-generate carries the
    # tokens of the failed try: here "a? b c?" then "a?" again makes a window (0.3 + 0.3) / 2 that the
    # real completion never has, and the row is stopped after one token instead of ending whole.
    text = "a? b c? d e f g h"  # windows of 2: 0.9 at most between hesitant words, never 0.3
    backend = _OutOfMemoryOnce(lambda t, n: text, max_wait_s=0.05, step_s=0.001)  # decode step by step
    gate = ConfidenceGate(fixed=0.5)

    def request(i: int) -> Request:
        w = ConfidenceWatch(ConfidenceTrack(2), gate)
        return Request(f"r{i}", (ord("x"),), SamplingParams(max_new_tokens=40, top_logprobs=5, watch=w))

    done: dict[int, Completion] = {}
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(backend.serve)

            async def one(i: int) -> None:
                done[i] = await backend.generate(request(i))

            async with anyio.create_task_group() as requests:
                for i in range(2):
                    requests.start_soon(one, i)
            tg.cancel_scope.cancel()
    assert backend.scheduler.stats.oom_splits == 1
    assert Counter(c.finish_reason for c in done.values()) == {"eos": 2}
    assert all(c.new_tokens == 8 and c.text == text for c in done.values())


# --- a server that streams several tokens per chunk ---------------------------------------------------


async def test_a_server_stream_stopped_inside_a_chunk_keeps_no_token_past_the_stop():
    # Fixed (found by an attack pass):
    # stages/backends/openai_backend.py _stream_on feeds the watch row by row but, once it says
    # stop, returns the completion with every token, log-prob and row of the chunk read so far. A server
    # that sends several tokens per chunk (vLLM's --stream-interval, speculative decoding, SGLang) gives
    # a "confidence" completion that runs past the token the watch stopped at, unlike every other
    # backend (stop_in, vLLM in process, transformers): tokens counted that the stop should have saved.
    from tests.test_openai_faults import Server, backend, chunk, start_events

    sure, hesitant = {"a": -0.5, "b": -1.0}, {"a": -0.1, "b": -0.2}  # confidence 0.75 and 0.15

    class Chunky(Server):
        async def complete(self, body, reader, writer) -> None:
            event = start_events(writer)
            rows = [sure, hesitant, sure, sure]
            lp = {"tokens": list("abcd"), "token_logprobs": [-0.5] * 4, "top_logprobs": rows}
            lp["text_offset"] = [0, 2, 4, 6]
            event(json.dumps(chunk("a b c d ", [1, 2, 3, 4], lp=lp)))
            event(json.dumps(chunk("e", [5], finish="stop", stop_reason=None)))
            event("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with Chunky() as s:
        b = backend(s.url)
        params = SamplingParams(max_new_tokens=10, top_logprobs=2, watch=watch(1, 0.5))
        with anyio.fail_after(20):
            c = await b.generate(Request("r", (1, 7, 7), params))
    assert c.finish_reason == "confidence"
    assert c.token_ids == (1, 2) and len(c.top_logprobs or ()) == 2
