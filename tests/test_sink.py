import csv
import io
import json
from pathlib import Path

import anyio
import pytest

from pipeline.items import Result
from pipeline.sink import ResultWriter, check_writable


async def write(writer: ResultWriter, results: list[Result]) -> None:
    send, receive = anyio.create_memory_object_stream[Result](4)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                for r in results:
                    await send.send(r)


async def test_results_append_and_submission_is_valid_csv(tmp_path: Path):
    out, sub = tmp_path / "r.jsonl", tmp_path / "s.csv"
    out.write_text('{"id": "old", "answer": 1}\n')
    results = [
        Result(id="a,b", answer=5, status="ok"),
        Result(id="c", answer=None, status="error", error="bad"),
        Result(id=None, answer=None, status="error", error="line 3: invalid JSON", line=3),
    ]
    await write(ResultWriter(str(out), str(sub), fallback=7), results)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["old", "a,b", "c", None]
    assert lines[3]["error"] == "line 3: invalid JSON" and lines[3]["line"] == 3
    rows = list(csv.reader(sub.read_text().splitlines()))
    # the submission follows the whole results file (the earlier "old" line included); errors get the
    # fallback; no id, no row
    assert rows == [["id", "answer"], ["old", "1"], ["a,b", "5"], ["c", "7"]]
    await write(ResultWriter(str(out), str(sub)), [Result(id="d", answer=1, status="ok")])
    assert sub.read_text().count("id,answer") == 1  # the header is written once
    assert sub.read_text().splitlines()[-1] == "d,1"


async def test_standard_output():
    buf = io.StringIO()
    await write(ResultWriter(None, stdout=buf), [Result(id=str(i), answer=i, status="ok") for i in range(5)])
    assert [json.loads(x)["answer"] for x in buf.getvalue().splitlines()] == [0, 1, 2, 3, 4]


def test_check_writable_rejects_a_directory(tmp_path: Path):
    from pipeline.sink import OutputError

    with pytest.raises(OutputError, match="is a directory"):
        check_writable(tmp_path)


FULL = Result(
    id="p1",
    answer=42,
    status="fallback",
    error="time limit reached",
    line=3,
    votes={42: 2, 7: 1},
    samples=3,
    prompt_tokens=11,
    new_tokens=99,
    timings={"inference": 1.5, "total": 2.25},
    finish={"eos": 2, "cancelled": 1},
    gold=42,
    duplicate=True,
    early_stop=True,
    cells=4,
    code_errors=("sample 1: ZeroDivisionError: division by zero",),
)


def test_a_result_round_trips_through_its_json():
    from pipeline.items import SCHEMA_VERSION

    obj = json.loads(json.dumps(FULL.to_json()))
    assert obj["schema"] == SCHEMA_VERSION and obj["timings_ms"] == {"inference": 1500.0, "total": 2250.0}
    assert Result.from_json(obj) == FULL
    line = FULL.to_json(schema=False)  # a results line, as written: version 1, no "schema"
    assert "schema" not in line and Result.from_json(line) == FULL
    bare = Result(id=None, answer=None, status="error", error="line 2: invalid JSON", line=2)
    assert Result.from_json(bare.to_json()) == bare
    kaggle_row = {**Result(id="k", answer=1, status="ok").to_json(schema=False), "submitted_answer": 1}
    assert Result.from_json(kaggle_row) == Result(id="k", answer=1, status="ok")  # extras are ignored


async def test_results_lines_keep_their_fields(tmp_path: Path):
    out = tmp_path / "r.jsonl"
    await write(ResultWriter(str(out)), [FULL, Result(id="a", answer=1, status="ok")])
    full, plain = (json.loads(x) for x in out.read_text().splitlines())
    common = ["id", "answer", "status", "error", "line", "votes", "samples", "prompt_tokens", "new_tokens"]
    common += ["timings_ms", "finish"]
    assert list(plain) == common
    assert list(full) == [*common, "gold", "correct", "duplicate", "early_stop", "cells", "code_errors"]
    assert full["votes"] == {"42": 2, "7": 1} and full["correct"] is True


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"status": "maybe"}, "status"),
        ({"answer": "42"}, "answer"),
        ({"answer": True}, "answer"),
        ({"votes": {"x": 1}}, "votes"),
        ({"votes": {"4": "1"}}, "votes"),
        ({"timings_ms": {"total": "fast"}}, "timings_ms"),
        ({"code_errors": "boom"}, "code_errors"),
        ({"early_stop": 1}, "early_stop"),
        ({"schema": 99}, "schema"),
        ({"id": 7}, "id"),
    ],
)
def test_a_bad_result_record_is_a_value_error_naming_the_field(change, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        Result.from_json({**FULL.to_json(), **change})


def test_a_result_record_missing_a_required_field_is_a_value_error():
    for name in ("id", "answer", "status"):
        obj = FULL.to_json()
        del obj[name]
        with pytest.raises(ValueError, match=f"'{name}' is missing"):
            Result.from_json(obj)
    with pytest.raises(ValueError, match="JSON object"):
        Result.from_json([1, 2])
