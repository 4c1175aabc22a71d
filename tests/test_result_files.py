"""One row per id, always: input and output defects, through the whole command (scripted model).

Each test drives ``pipeline.cli.run_stream`` (the ``stream`` command after argument checks) with the
scripted backend, and checks the files a user gets: ``results.jsonl`` and ``submission.csv``.
"""

import csv
import json
import sqlite3
import tracemalloc
from pathlib import Path

import anyio
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cache as cache_module
from pipeline.cli import build_parser, config_from_args, run_stream
from pipeline.sink import read_written
from stages.backends.fake import FakeBackend
from stages.parse import LineTooLong, read_lines, read_problems


def run(tmp: Path, inp: Path, *extra: str, backend: FakeBackend | None = None) -> tuple[list[dict], dict]:
    """Run the command; return the results lines and the submission as {id: answer}."""
    out, sub = tmp / "results.jsonl", tmp / "submission.csv"
    argv = ["stream", str(inp), "-o", str(out), "--submission", str(sub), "--no-progress", *extra]
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args).replace(run={"verify_workers": 1, "max_in_flight": 8})

    async def bounded() -> int:
        with anyio.fail_after(60):
            return await run_stream(args, cfg, backend or FakeBackend())

    assert anyio.run(bounded) == 0
    return read_results(out), read_submission(sub)


def read_results(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def read_submission(path: Path) -> dict:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "answer"]
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == len(set(ids)), f"duplicate submission rows: {ids}"
    return {r[0]: int(r[1]) for r in rows[1:]}


def test_invalid_utf8_in_the_text_keeps_the_id_and_is_solved(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(
        b'{"id": "bad-utf8", "problem": "caf\xe9 \xff plus 2 and 3"}\n{"id": "ok", "problem": "1 + 1"}\n'
    )
    results, sub = run(tmp_path, inp)
    by_id = {r["id"]: r for r in results}
    assert by_id["bad-utf8"]["status"] == "ok" and by_id["bad-utf8"]["answer"] == 5
    assert sub == {"bad-utf8": 5, "ok": 2}


def test_a_line_of_broken_json_keeps_its_readable_id(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "broken", "problem": "1 + 1"\n{"id": 17, "problem": "2 + 2",}\n{"problem": 1\n')
    results, sub = run(tmp_path, inp)
    assert [(r["id"], r["status"], r["line"]) for r in sorted(results, key=lambda r: r["line"])] == [
        ("broken", "error", 1),
        ("17", "error", 2),
        (None, "error", 3),
    ]
    assert all("invalid JSON" in r["error"] for r in results)
    assert sub == {"broken": 0, "17": 0}


def test_a_repeated_id_gets_one_submission_row_from_the_solved_line(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": "a", "problem": "What is 2 + 3?"}\n{"id": "b", "problem": "1 + 1"}\n'
        '{"id": "a", "problem": "What is 7 + 7?"}\n'
    )
    results, sub = run(tmp_path, inp)
    assert len(results) == 3
    dup = next(r for r in results if r.get("duplicate"))
    assert dup["id"] == "a" and dup["line"] == 3 and dup["status"] == "error"
    assert sub == {"a": 5, "b": 2}


def test_resume_after_a_kill_solves_the_first_occurrence_of_a_repeated_id(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": "a", "problem": "What is 2 + 3?"}\n{"id": "b", "problem": "1 + 1"}\n'
        '{"id": "a", "problem": "What is 7 + 7?"}\n'
    )
    # what a hard kill can leave: the repeat's error line was written, the first "a" was not
    out = tmp_path / "results.jsonl"
    out.write_text(
        json.dumps({"id": "a", "answer": None, "status": "error", "line": 3, "duplicate": True}) + "\n"
        + json.dumps({"id": "b", "answer": 2, "status": "ok", "line": 2}) + "\n"
    )  # fmt: skip
    assert read_written(out).ids == {"b"}
    results, sub = run(tmp_path, inp, "--resume")
    assert sorted((r["id"], r["line"]) for r in results) == [("a", 1), ("a", 3), ("b", 2)]
    assert sub == {"a": 5, "b": 2}


def test_a_stray_quote_in_an_unquoted_csv_field_spoils_nothing(tmp_path: Path):
    inp = tmp_path / "test.csv"
    inp.write_text(
        'id,problem\nq1,What is 1 + 1?\nq2,A 5" ruler: 5 + 7\n'
        'q3,"A quoted, ""multi-line""\nproblem: 3 + 4"\nq4,4 + 4\n'
    )
    results, sub = run(tmp_path, inp)
    assert {r["id"]: r["status"] for r in results} == dict.fromkeys(["q1", "q2", "q3", "q4"], "ok")
    assert sub == {"q1": 2, "q2": 17, "q3": 7, "q4": 8}


def test_a_line_over_the_cap_is_an_error_naming_the_line_and_keeps_its_id(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    huge = json.dumps({"id": "huge", "problem": "x " * 600_000})
    inp.write_text('{"id": "a", "problem": "1 + 2"}\n' + huge + '\n{"id": "c", "problem": "2 + 2"}')
    results, sub = run(tmp_path, inp)
    by_id = {r["id"]: r for r in results}
    assert by_id["huge"]["status"] == "error" and by_id["huge"]["line"] == 2
    assert "line 2: longer than 1,048,576 bytes" in by_id["huge"]["error"]
    assert sub == {"a": 3, "huge": 0, "c": 4}


async def test_one_enormous_line_is_read_in_bounded_memory(tmp_path: Path):
    inp = tmp_path / "one-line.jsonl"
    with inp.open("wb") as f:  # 48 MiB, no newline at all
        f.write(b'{"id": "big", "problem": "')
        for _ in range(48):
            f.write(b"y" * (1 << 20))
    tracemalloc.start()
    try:
        with anyio.fail_after(60):
            lines = [x async for x in read_lines(inp)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(lines) == 1 and isinstance(lines[0][1], LineTooLong) and lines[0][0] == 1
    assert peak < 8 * (1 << 20), f"peak {peak / (1 << 20):.1f} MiB"  # the old reader held all 48 MiB
    items = [x async for x in read_problems(inp)]
    assert len(items) == 1 and items[0].id == "big" and "longer than" in (items[0].error or "")


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path: Path, monkeypatch):
    def full(self, key, result):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(cache_module.SQLiteStore, "put", full)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i} + 1"}) + "\n" for i in range(5)))
    results, sub = run(tmp_path, inp, "--cache-dir", str(tmp_path / "cache"))
    assert len(results) == 5 and all(r["status"] == "ok" for r in results)
    assert sub == {f"p{i}": i + 1 for i in range(5)}


def test_a_cache_folder_that_cannot_be_opened_is_a_warning(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "problem": "2 + 2"}\n')
    results, sub = run(tmp_path, inp, "--cache-dir", str(blocker / "cache"))
    assert results[0]["status"] == "ok" and sub == {"a": 4}


async def test_cache_rows_of_another_schema_version_are_misses(tmp_path: Path):
    from pipeline.items import SCHEMA_VERSION, Problem, Result

    c = cache_module.ResultCache(0, str(tmp_path))
    try:
        store = c._store
        assert store is not None
        store._db.execute("INSERT INTO results VALUES (?, ?)", ("old", '{"answer": 1, "status": "ok"}'))
        # a row as the cache wrote it before it stored Result.to_json(): its own "v", no "schema"
        legacy = {"answer": 1, "status": "ok", "error": None, "votes": [[1, 1]], "samples": 1, "v": 2}
        store._db.execute("INSERT INTO results VALUES (?, ?)", ("legacy", json.dumps(legacy)))
        bad = {"id": "z", "answer": 1, "status": "ok", "votes": {"one": 1}, "schema": SCHEMA_VERSION}
        store._db.execute("INSERT INTO results VALUES (?, ?)", ("bad", json.dumps(bad)))
        with structlog.testing.capture_logs() as logs:
            for key in ("old", "legacy", "bad", "old"):
                assert await c.get(Problem(id="x", text="t"), key) is None
        warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
        assert len(warnings) == 2 and "another format version" in warnings[0]  # that one once
        assert "unreadable row" in warnings[1] and "'votes'" in logs[-1]["error"]
        await c.put("new", Result(id="y", answer=7, status="ok", votes={7: 1}, finish={"eos": 1}))
        hit = await c.get(Problem(id="x", text="t"), "new")
        assert hit is not None and hit.answer == 7 and hit.id == "x" and hit.finish == {"eos": 1}
    finally:
        c.close()


def test_the_submission_follows_the_results_after_a_kill_between_writes(tmp_path: Path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "problem": f"{i} + 1"}) + "\n" for i in range(4)))
    out, sub = tmp_path / "results.jsonl", tmp_path / "submission.csv"
    # killed after p0 and p1 reached the results but before p1 reached the submission
    out.write_text(
        json.dumps({"id": "p0", "answer": 1, "status": "ok", "line": 1}) + "\n"
        + json.dumps({"id": "p1", "answer": 2, "status": "ok", "line": 2}) + "\n"
    )  # fmt: skip
    sub.write_text("id,answer\np0,1\n")
    results, rows = run(tmp_path, inp, "--resume")
    assert len(results) == 4 and rows == {"p0": 1, "p1": 2, "p2": 3, "p3": 4}


# --- the invariant, fuzzed -------------------------------------------------------------------------

# no digits in the random text: the scripted model answers the sum of the problem's numbers (1 + 2)
_texts = st.text(
    st.characters(blacklist_categories=("Cs", "Nd", "No", "Nl"), blacklist_characters="\n\r\x00"), max_size=40
)
_row = st.tuples(
    st.sampled_from(["a", "b", "c", "d", "e", "f"]),  # few ids: repeats are common
    _texts,
    st.sampled_from(["plain", "bad-utf8", "stray-quote", "blank-before", "no-text"]),
)


def _jsonl(rows) -> bytes:
    out = b""
    for pid, text, kind in rows:
        if kind == "blank-before":
            out += b"\n"
        if kind == "no-text":
            out += json.dumps({"id": pid}).encode() + b"\n"
            continue
        body = json.dumps({"id": pid, "problem": text + " 1 + 2"}, ensure_ascii=False).encode()
        if kind == "bad-utf8":
            body = body.replace(b' 1 + 2"', b' \xff\xfe 1 + 2"')
        if kind == "stray-quote":
            body = body.replace(b' 1 + 2"', b' a\\" ruler 1 + 2"')
        out += body + b"\n"
    return out


def _csv(rows) -> bytes:
    out = b"id,problem\n"
    for pid, text, kind in rows:
        if kind == "blank-before":
            out += b"\n"
        field = (text.replace('"', "") or "x") + " 1 + 2"
        if kind == "stray-quote":
            field = 'A five" ruler ' + field.replace(",", " ")
            out += f"{pid},{field}\n".encode()
            continue
        if kind == "no-text":
            out += f"{pid},\n".encode()
            continue
        quoted = '"' + field.replace('"', '""') + '"'
        line = f"{pid},{quoted}\n".encode()
        if kind == "bad-utf8":
            line = line.replace(b' 1 + 2"', b' \xff 1 + 2"')
        out += line
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(_row, min_size=1, max_size=8), fmt=st.sampled_from(["jsonl", "csv"]))
def test_every_id_gets_one_results_line_per_line_and_one_submission_row(tmp_path_factory, rows, fmt):
    tmp = tmp_path_factory.mktemp("fuzz")
    inp = tmp / f"in.{fmt}"
    inp.write_bytes(_jsonl(rows) if fmt == "jsonl" else _csv(rows))
    results, sub = run(tmp, inp)
    assert len(results) == len(rows)  # one results line per (non-blank) input line
    assert sorted(r["line"] for r in results) == sorted({r["line"] for r in results})
    ids = {pid for pid, _, _ in rows}
    assert set(sub) == ids  # exactly one submission row per id (read_submission rejects repeats)
    assert {r["id"] for r in results} == ids
    for pid in ids:  # the row is the first occurrence's answer
        first = next(kind for p, _, kind in rows if p == pid)
        assert sub[pid] == (0 if first == "no-text" else 3)


def test_a_results_file_alone_rebuilds_its_submission(tmp_path: Path):
    from pipeline.sink import rebuild_submission

    out = tmp_path / "r.jsonl"
    out.write_text(
        json.dumps({"id": "x", "answer": None, "status": "error", "line": 1}) + "\n"
        + json.dumps({"id": "x", "answer": 9, "status": "ok", "line": 1}) + "\n"
        + json.dumps({"id": "y", "answer": 1, "status": "ok", "line": 2}) + "\n"
        + json.dumps({"id": "y", "answer": None, "status": "error", "line": 3, "duplicate": True}) + "\n"
        + "not json\n"
        + json.dumps({"id": "z", "answer": 2, "status": "ok", "line": 4}) + "\n"
        # a later run appended to the same file (no --resume): its answers win
        + json.dumps({"id": "z", "answer": 3, "status": "ok", "line": 4}) + "\n"
        + json.dumps({"id": "x", "answer": None, "status": "error", "line": 1}) + "\n"
    )  # fmt: skip
    rows = rebuild_submission(out, tmp_path / "s.csv", fallback=0)
    assert rows == {"x": 9, "y": 1, "z": 3} and read_submission(tmp_path / "s.csv") == rows


def test_resume_skips_a_line_only_when_it_still_holds_the_same_id(tmp_path: Path):
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"id": "b", "answer": 1, "status": "ok", "line": 2}) + "\n")
    done = read_written(out)
    assert done.has("b", 2)
    assert not done.has("c", 2)  # the input changed since: line 2 is another problem now


async def test_an_over_long_line_inside_a_quoted_csv_field_loses_no_other_record(tmp_path: Path):
    from stages.parse import _csv_problems

    f = tmp_path / "long.csv"
    f.write_text(
        'id,problem\n7,"text\n'
        + "x" * 50
        + '\n42,what is 1+1?\n"\n8,ok problem\n9,'
        + "y" * 60
        + "\n10,fine\n"
    )

    async def lines():
        async for x in read_lines(f, max_bytes=40):
            yield x

    out = [x async for x in _csv_problems(lines())]
    assert [(x.id, type(x).__name__, x.line) for x in out] == [
        ("7", "Result", 2),
        ("8", "Problem", 6),
        ("9", "Result", 7),
        ("10", "Problem", 8),
    ]
    assert "line 2: CSV record skipped: line 3: longer than 40 bytes" in (out[0].error or "")
