"""The run report: each rule on a scripted record (answers known by hand), the report's files and
figures from a scripted run through the command, and re-scoring against a live run of each rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.report_data import ReportError, candidates, config_of, load_record, load_results, rule_answer
from stages.selection import deepconf_stats, token_confidence
from stages.vote_config import VoteConfig
from tests.conftest import write_replay

C = [-0.01, -8.0, -9.0]  # a sure token: confidence (0.01 + 8 + 9) / 3 = 5.67, entropy ~0.01 bits
U = [-1.0, -1.2, -1.4]  # an unsure one: confidence 1.2, entropy ~1.55 bits


def rec(pid: str, sample: int, answer: int | None, rows: list[list[float]], **extra) -> dict:
    text = f"so \\boxed{{{answer}}}" if answer is not None else "no idea"
    return {
        "id": pid,
        "sample": sample,
        "round": 0,
        "text": text,
        "finish_reason": "stop" if answer is not None else "length",
        "top_logprobs": rows,
        "logprobs": [r[0] for r in rows],
        **extra,
    }


# a (gold 2): two unsure samples say 3 (the first sample among them), two sure ones say 2.
# b (gold 6): five unsure samples say 7, one sure one says 6: top-10% keeps only the sure one.
# c (gold 9), window 2: sample 0 says 8, sure then unsure at the end (lowest 3.43, tail 3.43); sample 1
#   says 9, unsure then sure (lowest 1.2, tail 5.67).
RECORDS = [
    rec("a", 0, 3, [U] * 4),
    rec("a", 1, 2, [C] * 4),
    rec("a", 2, 2, [C] * 4),
    rec("a", 3, 3, [U] * 4),
    *(rec("b", i, 7, [U] * 4) for i in range(5)),
    rec("b", 5, 6, [C] * 4),
    rec("c", 0, 8, [C, C, C, U]),
    rec("c", 1, 9, [U, U, C, C]),
]
PROBLEMS = [("a", 2, 4), ("b", 6, 6), ("c", 9, 2)]

# by hand: rule -> (answers of a, b, c) with deepconf_window 2 and deepconf_keep 0.9 (and 0.1)
EXPECTED = {
    "majority": (3, 7, 8),
    "code": (3, 7, 8),  # no sample ran code: every weight 1
    "entropy": (2, 6, 8),  # c: sample 0 has one unsure token of four, sample 1 two
    "aimo3-second": (2, 6, 8),
    "deepconf-lowest": (2, 7, 8),
    "deepconf-bottom10": (2, 7, 8),
    "deepconf-tail": (2, 7, 9),
}


def test_token_and_group_confidences_by_hand():
    assert token_confidence(C) == pytest.approx(17.01 / 3)
    assert token_confidence([float("nan")]) is None
    s = deepconf_stats([5.0, 5.0, 5.0, 1.0], window=2)
    assert s == pytest.approx({"mean": 4.0, "lowest": 3.0, "bottom10": 3.0, "tail": 3.0})
    s = deepconf_stats([1.0, 2.0] + [9.0] * 19, window=1)  # 21 groups: the lowest two make bottom-10%
    assert s is not None and s["lowest"] == 1.0 and s["bottom10"] == 1.5 and s["tail"] == 9.0
    assert deepconf_stats([3.0, 1.0], window=8) == pytest.approx(
        {"mean": 2.0, "lowest": 2.0, "bottom10": 2.0, "tail": 2.0}
    )
    assert deepconf_stats([]) is None


@pytest.mark.parametrize("rule", list(EXPECTED))
def test_each_rule_on_a_scripted_record(rule, tmp_path: Path):
    record = load_record(write_replay(tmp_path / "r.jsonl", RECORDS))
    cfg = config_of(None)
    vote = VoteConfig(rule=rule, deepconf_window=2)  # type: ignore[arg-type]
    got = tuple(rule_answer(candidates(pid, record[pid], cfg), vote, None) for pid, _, _ in PROBLEMS)
    assert got == EXPECTED[rule]


def test_top_eta_filtering_keeps_the_top_tenth(tmp_path: Path):
    record = load_record(write_replay(tmp_path / "r.jsonl", RECORDS))
    cands = candidates("b", record["b"], config_of(None))
    for rule in ("deepconf-lowest", "deepconf-bottom10", "deepconf-tail"):
        assert rule_answer(cands, VoteConfig(rule=rule, deepconf_keep=0.9), None) == 7  # type: ignore[arg-type]
        assert rule_answer(cands, VoteConfig(rule=rule, deepconf_keep=0.1), None) == 6  # type: ignore[arg-type]


def _problems(tmp_path: Path) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": p, "problem": f"q {p}", "answer": g}) + "\n" for p, g, _ in PROBLEMS)
    )
    return src


def _run(tmp_path: Path, name: str, replay: Path, *flags: str) -> dict[str, dict]:
    out = tmp_path / f"{name}.jsonl"
    argv = [
        "stream",
        str(_problems(tmp_path)),
        "-o",
        str(out),
        "--backend",
        "replay",
        "--replay",
        str(replay),
    ]
    argv += ["--samples", "6", "--top-logprobs", "3", "--log-level", "warning", "--no-progress", *flags]
    assert main(argv) == 0
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def _record_of_scripted_run(tmp_path: Path) -> tuple[Path, Path]:
    """A scripted replay run through the command with --record: its results and its record."""
    # a and c have fewer samples than b: their extra samples' requests find no recording and fail
    scripted = write_replay(tmp_path / "scripted.jsonl", RECORDS)
    record = tmp_path / "run.record.jsonl"
    _run(tmp_path, "run", scripted, "--vote-rule", "majority", "--record", str(record))
    return tmp_path / "run.jsonl", record


def test_the_report_of_a_scripted_run(tmp_path: Path, capsys):
    results, record = _record_of_scripted_run(tmp_path)
    out = tmp_path / "rep"
    argv = [
        "report",
        str(results),
        "--record",
        str(record),
        "--out",
        str(out),
        "--rules",
        "majority,deepconf-tail",
    ]
    assert main(argv) == 0
    assert "report: 3 problems, accuracy 0.000" in capsys.readouterr().out
    fig = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert fig["problems"] == 3 and fig["samples"] == 18  # 6 failed (nothing recorded): no answer
    assert fig["accuracy"]["mean"] == 0.0  # majority: 3, 7, 8
    assert fig["pass_at_n"]["mean"] == 1.0 and fig["selection_loss"] == 1.0
    # pass@1 per problem: a 2/6, b 1/6, c 1/6 -> mean 2/9
    assert fig["pass_at_k"][0] == pytest.approx(2 / 9, abs=1e-6)
    assert fig["pass_at_1_averaged"]["mean"] == pytest.approx(2 / 9, abs=1e-6)
    # k = 2: a 1 - C(4,2)/C(6,2) = 3/5, b and c 1 - C(5,2)/C(6,2) = 1/3
    assert fig["pass_at_k"][1] == pytest.approx((3 / 5 + 2 / 3) / 3, abs=1e-6)
    assert len(fig["pass_at_k"]) == 6 and fig["pass_at_k"][5] == 1.0
    # majority@2 of a [3, 2, 2, 3, -, -]: 2 wins (1,2) (1,3) (2,3) (1,4) (1,5) (2,4) (2,5): 7/15;
    # b: the 6 is last, so it ties a 7 that comes first: 0; c [8, 9, -, ...]: (1, 2..5): 4/15
    assert fig["majority_at_k"][1] == pytest.approx((7 / 15 + 4 / 15) / 3, abs=1e-6)
    assert fig["no_answer_share"] == pytest.approx(1 / 3, abs=1e-6)
    assert fig["finish_reasons"] == {"stop": 12, "error": 6}
    assert {m["id"] for m in fig["vote_wrong_sample_right"]} == {"a", "b", "c"}
    assert fig["rules"]["deepconf-tail"]["answers"] == {"a": 2, "b": 7, "c": 8}  # window 2048: one group
    assert fig["samples_detail"]["a"][1]["confidence"]["lowest"] == pytest.approx(17.01 / 3, abs=1e-4)
    assert "| selection loss (pass@n - accuracy) | 1.000 |" in md
    assert "deepconf-tail" in md
    for png in ("accuracy_vs_k.png", "per_problem.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
        assert f"![{png}]({png})" in md


def test_without_a_record_the_votes_give_the_estimates_and_rules_need_it(tmp_path: Path):
    results, _ = _record_of_scripted_run(tmp_path)
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--rules", "entropy"]) == 0
    fig = json.loads((out / "report.json").read_text())
    assert fig["pass_at_k"][0] == pytest.approx(2 / 9, abs=1e-6)  # the failed samples: no answer
    assert "needs" in fig["rules"]["entropy"]


def test_a_record_without_top_k_says_the_rules_need_it(tmp_path: Path):
    bare = [{k: v for k, v in r.items() if k != "top_logprobs"} for r in RECORDS]
    results, _ = _record_of_scripted_run(tmp_path)
    record = write_replay(tmp_path / "bare.jsonl", bare)
    out = tmp_path / "rep"
    assert (
        main(
            [
                "report",
                str(results),
                "--record",
                str(record),
                "--out",
                str(out),
                "--rules",
                "deepconf-lowest,majority",
            ]
        )
        == 0
    )
    fig = json.loads((out / "report.json").read_text())
    assert fig["rules"]["deepconf-lowest"]["needs"].startswith("--top-logprobs")
    assert "accuracy" in fig["rules"]["majority"]
    assert "needs --top-logprobs" in (out / "report.md").read_text()


def test_bad_files_are_clear_errors_naming_the_line(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read the results file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "answer": 1, "status": "ok"}\n{"id": "b", "answer": 1}\n')
    assert main(["report", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad} line 2: result record: field 'status' is missing" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "answer": 1, "status": "ok"}\n')
    badrec = tmp_path / "rec.jsonl"
    badrec.write_text('{"id": "a", "text": "x"}\nnot json\n')
    assert main(["report", str(good), "--record", str(badrec), "--out", str(tmp_path / "o")]) == 2
    assert f"{badrec} line 2: not JSON" in capsys.readouterr().err
    assert main(["report", str(good), "--rules", "best", "--out", str(tmp_path / "o")]) == 2
    assert "unknown rule best" in capsys.readouterr().err
    with pytest.raises(ReportError, match="holds no results"):
        load_results(write_replay(tmp_path / "empty.jsonl", []))


def test_without_matplotlib_the_markdown_and_json_still_come_out(tmp_path: Path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    results, record = _record_of_scripted_run(tmp_path)
    out = tmp_path / "rep"
    assert main(["report", str(results), "--record", str(record), "--out", str(out)]) == 0
    assert "pip install 'aimo-pipeline[bench]'" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["plots"] == []
    assert not (out / "accuracy_vs_k.png").exists()


LIVE_RULES = ["majority", "code", "entropy", "aimo3-second"]
DEEPCONF = ["deepconf-lowest", "deepconf-bottom10", "deepconf-tail"]


@pytest.mark.parametrize("rule", LIVE_RULES + DEEPCONF)
def test_rescoring_a_record_gives_the_answers_of_a_live_run_with_that_rule(rule, tmp_path: Path):
    _, record = _record_of_scripted_run(tmp_path)
    settings = tmp_path / "vote.toml"
    settings.write_text("[vote]\ndeepconf_window = 2\n")
    live = _run(tmp_path, f"live-{rule}", record, "--vote-rule", rule, "--config", str(settings))
    out = tmp_path / "rep"
    argv = ["report", str(tmp_path / "run.jsonl"), "--record", str(record), "--out", str(out)]
    assert main([*argv, "--rules", rule, "--config", str(settings)]) == 0
    fig = json.loads((out / "report.json").read_text())
    assert fig["rules"][rule]["answers"] == {pid: r["answer"] for pid, r in live.items()}


@pytest.mark.model
async def test_rescoring_a_real_run_gives_the_answers_of_a_live_replay_with_each_rule(
    real_backend, tmp_path: Path
):
    # The default model on 3 GSM8K problems x 4 samples, recorded with its top-5 log-probabilities;
    # then, per rule, the recorded run replayed live with that rule against the report's re-scoring.
    from bench.data import gsm8k
    from pipeline.report_data import figures
    from stages.backends.replay import RecordingBackend, ReplayBackend
    from tests.conftest import small_config, solve_all

    items = [{"id": p.id, "problem": p.text, "answer": p.answer} for p in gsm8k(3)]
    cfg = small_config(
        generation={"samples": 4, "top_logprobs": 5, "max_new_tokens": 128}, vote={"rule": "majority"}
    )
    record = tmp_path / "run.jsonl"
    recorder = RecordingBackend(real_backend, record)
    try:
        results = await solve_all(cfg, recorder, items)
    finally:
        recorder.close_file()
    assert len(record.read_text().splitlines()) == 12
    out = tmp_path / "results.jsonl"
    out.write_text("".join(json.dumps(r.to_json()) + "\n" for r in results.values()))
    fig = figures(load_results(out), load_record(record), cfg, LIVE_RULES + DEEPCONF)
    for rule in LIVE_RULES + DEEPCONF:
        live = await solve_all(cfg.replace(vote={"rule": rule}), ReplayBackend.load(record, speed=0), items)
        assert fig["rules"][rule]["answers"] == {k: r.answer for k, r in live.items()}, rule
    assert fig["rules"]["majority"]["answers"] == {k: r.answer for k, r in results.items()}
    assert all(s["confidence"] is not None for ss in fig["samples_detail"].values() for s in ss)
    answered = sum(s["answer"] is not None for ss in fig["samples_detail"].values() for s in ss)
    assert answered > 0  # 11 of 12 here: the rules had answers to choose among
    # DeepConf online on the same record: a fixed threshold at the samples' median lowest window
    # stops some; the report's replay of it gives the answers and stops of a live replay
    from pipeline.report_data import candidates

    record_samples = load_record(record)
    lows = sorted(
        st["lowest"]
        for pid, ss in record_samples.items()
        for c in candidates(pid, ss, cfg)
        if c.generation.confidences
        and len(c.generation.confidences) > 16
        and (st := deepconf_stats(c.generation.confidences, 16)) is not None
    )
    online = cfg.replace(vote={"deepconf_window": 16, "deepconf_stop": lows[len(lows) // 2]})
    row = next(
        r
        for r in figures(load_results(out), record_samples, online)["online_stop"]["rows"]
        if r["setting"].startswith("fixed")
    )
    live = await solve_all(online, ReplayBackend.load(record, speed=0), items)
    assert row["answers"] == {k: r.answer for k, r in live.items()}
    assert row["stopped"] == sum(r.finish.get("confidence", 0) for r in live.values()) > 0
