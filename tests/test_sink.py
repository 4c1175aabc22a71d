import csv
import io
import json
from pathlib import Path

import anyio

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
    import pytest

    from pipeline.sink import OutputError

    with pytest.raises(OutputError, match="is a directory"):
        check_writable(tmp_path)
