"""DeepConf online: the running window figures against the offline ones, the threshold from a warmup,
scripted samples stopped through the pipeline (fixed threshold and warmup), and the report's replay of
the stop against a live replay."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.report_data import figures, load_record, load_results
from stages.backends.base import Completion, SamplingParams
from stages.backends.fake import FakeBackend
from stages.backends.replay import RecordingBackend, ReplayBackend
from stages.confidence_stop import ConfidenceGate, ConfidenceTrack, ConfidenceWatch, stop_in
from stages.selection import deepconf_stats, percentile
from tests.conftest import small_config, solve_all

SURE = (-0.5, -1.0, -1.5, -2.0, -2.5)  # the fake's row for a plain word: confidence 1.5
HESITANT = (-0.1, -0.2, -0.3, -0.4, -0.5)  # its row for a word ending in "?": confidence 0.3


def test_the_running_lowest_window_is_the_offline_figure_exactly():
    rng = random.Random(7)
    for window in (1, 3, 7, 50):
        for length in (1, 6, 49, 50, 51, 300):
            conf = [rng.uniform(0.1, 9.0) for _ in range(length)]
            track = ConfidenceTrack(window)
            for c in conf:
                track.add(c)
            offline = deepconf_stats(conf, window)
            assert offline is not None
            assert track.summary() == offline["lowest"], (window, length)
            assert (track.lowest is None) == (length < window)  # shorter than a window: never stopped


def test_a_gate_takes_its_threshold_from_the_first_finished_samples():
    gate = ConfidenceGate(warmup=3, keep=0.9)
    lows = [2.0, 5.0, 3.0]
    for low in lows:
        assert gate.threshold is None
        track = ConfidenceTrack(1)
        track.add(low)
        gate.finished(track)
    assert gate.threshold == percentile(lows, 10.0)
    track = ConfidenceTrack(1)
    track.add(0.0)
    gate.finished(track)  # past the warmup: the threshold stays
    assert gate.threshold == percentile(lows, 10.0)
    assert ConfidenceGate(fixed=1.5).threshold == 1.5


def test_a_watch_stops_at_the_first_low_window_and_a_retry_starts_it_again():
    gate = ConfidenceGate(fixed=0.8)  # windows of 2: (1.5 + 0.3) / 2 = 0.9 stays, 0.3 stops
    watch = ConfidenceWatch(ConfidenceTrack(2), gate)
    assert [watch.feed(r) for r in (SURE, SURE, HESITANT, HESITANT)] == [False, False, False, True]
    watch.reset()
    assert not watch.feed(HESITANT) and not watch.stopped
    rows = (SURE, SURE, HESITANT, HESITANT, SURE, SURE)
    done = Completion(tuple(range(6)), "a b c d e f", "eos", top_logprobs=rows)
    cut = stop_in(done, ConfidenceWatch(ConfidenceTrack(2), gate), lambda n: "x" * n)
    assert (cut.finish_reason, cut.token_ids, cut.text, cut.top_logprobs) == (
        "confidence",
        (0, 1, 2, 3),
        "xxxx",
        rows[:4],
    )
    sure = Completion((0, 1), "a b", "eos", top_logprobs=(SURE, SURE))
    assert stop_in(sure, ConfidenceWatch(ConfidenceTrack(2), gate)) is sure
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(max_new_tokens=4, watch=watch)


def _responder(text: str, nth: int) -> str:
    # sample 0 is sure and says 7; the others hesitate midway, then say 99 (they would outvote it)
    if nth == 0:
        return "Adding the two numbers gives the total \\boxed{7}"
    return "Adding the numbers hmm? maybe? not? sure? gives \\boxed{99}"


def _cfg(**vote):
    return small_config(
        generation={"samples": 3, "top_logprobs": 5, "max_new_tokens": 64},
        vote={"rule": "majority", "deepconf_window": 3, **vote},
    )


async def test_a_fixed_threshold_stops_the_hesitant_samples_and_the_sure_one_decides():
    items = [{"id": "a", "problem": "3 + 4", "answer": 7}]
    plain = (await solve_all(_cfg(), FakeBackend(_responder), items))["a"]
    assert plain.answer == 99 and plain.finish == {"answer": 3}  # without the stop the hesitant outvote it
    backend = FakeBackend(_responder)
    r = (await solve_all(_cfg(deepconf_stop=1.0), backend, items))["a"]
    assert r.answer == 7 and r.status == "ok"
    assert r.finish == {"answer": 1, "confidence": 2}
    # the sure sample's 8 words; window 3 over "numbers hmm? maybe?": (1.5 + 0.3 + 0.3) / 3 = 0.7 < 1
    # at the 5th word of each hesitant one
    assert r.new_tokens == 8 + 5 + 5 < plain.new_tokens
    assert r.votes == {7: 1}


async def test_a_warmup_sets_the_threshold_from_the_first_finished_samples():
    def responder(text: str, nth: int) -> str:
        if nth < 2:  # short and sure: they finish first and set the threshold (1.5)
            return "so \\boxed{7}"
        if nth == 2:  # long and sure all along: never below the threshold
            return "we add " + "one " * 20 + "\\boxed{7}"
        return "we add " + "one " * 10 + "hmm? what? " + "one " * 10 + "\\boxed{99}"

    items = [{"id": "a", "problem": "3 + 4", "answer": 7}]
    cfg = _cfg(deepconf_warmup=2, deepconf_keep=0.9).replace(generation={"samples": 4})
    r = (await solve_all(cfg, FakeBackend(responder, step_s=0.005), items))["a"]
    assert r.finish == {"answer": 3, "confidence": 1}
    assert r.votes == {7: 3}
    # without the stop, the hesitant sample votes
    cfg = _cfg().replace(generation={"samples": 4})
    r = (await solve_all(cfg, FakeBackend(responder, step_s=0.005), items))["a"]
    assert r.finish == {"answer": 4} and r.votes == {7: 3, 99: 1}


def test_the_online_stop_needs_top_k_and_one_way_to_set_its_threshold():
    with pytest.raises(ConfigError, match="top_logprobs"):
        small_config(vote={"deepconf_stop": 1.0})
    with pytest.raises(ConfigError, match=r"vote\.deepconf_stop"):
        small_config(generation={"top_logprobs": 5}, vote={"deepconf_stop": 1.0, "deepconf_warmup": 2})
    with pytest.raises(ConfigError, match=r"vote\.deepconf_warmup"):
        small_config(generation={"top_logprobs": 5}, vote={"deepconf_warmup": 0})


async def test_the_reports_replay_of_a_fixed_threshold_is_what_a_live_replay_gives(tmp_path: Path):
    def responder(text: str, nth: int) -> str:
        n = int(text.split()[-1])
        if nth == 0:
            return f"sure {'x ' * n}\\boxed{{{n}}}"
        return f"hmm {'x? ' * (nth + 1)}then {'y ' * n}\\boxed{{{n + 1}}}"

    items = [{"id": f"p{i}", "problem": f"q {i}", "answer": i} for i in range(1, 7)]
    cfg = _cfg().replace(generation={"samples": 4})
    record = tmp_path / "run.jsonl"
    recorder = RecordingBackend(FakeBackend(responder), record)
    try:
        results = await solve_all(cfg, recorder, items)
    finally:
        recorder.close_file()
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r.to_json()) + "\n" for r in results.values()))
    online = cfg.replace(vote={"deepconf_stop": 1.0})
    fig = figures(load_results(out), load_record(record), online)
    rows = {row["setting"]: row for row in fig["online_stop"]["rows"]}
    fixed = rows["fixed 1"]
    live = await solve_all(online, ReplayBackend.load(record, speed=0), items)
    assert fixed["answers"] == {k: r.answer for k, r in live.items()}
    assert fixed["stopped"] == sum(r.finish.get("confidence", 0) for r in live.values()) > 0
    assert fixed["tokens"] == sum(r.new_tokens for r in live.values())
    assert rows["no online stop"]["tokens"] == sum(r.new_tokens for r in results.values())
    assert 0 < fixed["saved"] < 1 and fixed["accuracy"] > rows["no online stop"]["accuracy"]


def watched(window: int, threshold: float) -> SamplingParams:
    """Greedy, top-5, with a watch on a fixed threshold."""
    watch = ConfidenceWatch(ConfidenceTrack(window), ConfidenceGate(fixed=threshold))
    return SamplingParams(max_new_tokens=40, top_logprobs=5, watch=watch)


async def check_a_backend_stops_where_the_watch_says(generate, prompt: tuple[int, ...]) -> None:
    """On a real backend: a watch that must stop ends the completion after the first full window (a
    prefix of the unwatched completion); one that never stops changes nothing."""
    from stages.backends.base import Request

    free = await generate(Request("free", prompt, SamplingParams(max_new_tokens=40, top_logprobs=5)))
    assert free.new_tokens > 6, free.text
    stopped = await generate(Request("low", prompt, watched(4, 1e9)))
    kept = await generate(Request("high", prompt, watched(4, -1.0)))
    assert stopped.finish_reason == "confidence"
    assert stopped.token_ids == free.token_ids[:4] and stopped.top_logprobs == free.top_logprobs[:4]
    assert (kept.finish_reason, kept.token_ids, kept.text) == (free.finish_reason, free.token_ids, free.text)


@pytest.mark.model
async def test_the_transformers_backend_stops_a_row_where_its_watch_says(real_backend):
    import anyio

    prompt = tuple(real_backend.encode([{"role": "user", "content": "Count from one to twenty."}]))
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            await tg.start(real_backend.serve)
            await check_a_backend_stops_where_the_watch_says(real_backend.generate, prompt)
            tg.cancel_scope.cancel()
