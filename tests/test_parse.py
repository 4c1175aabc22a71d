import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.items import Problem, Result
from stages.parse import (
    InputError,
    RecordConverter,
    check_source,
    parse_json_line,
    read_problems,
    record_to_problem,
)


async def collect(path) -> list[Problem | Result]:
    return [item async for item in read_problems(path)]


async def test_jsonl_field_aliases_bom_crlf_blank_lines(tmp_path: Path):
    f = tmp_path / "in.jsonl"
    lines = [
        '\ufeff{"id": "a", "problem": "1+1?", "answer": 2}',
        "",
        '{"ID": 7, "question": "2+2?", "answer": "4"}',
        "   ",
        '{"id": "c", "text": "3+3?"}',
    ]
    f.write_bytes("\r\n".join(lines).encode("utf-8"))
    items = await collect(f)
    assert [type(i) for i in items] == [Problem, Problem, Problem]
    assert [(p.id, p.text, p.answer, p.line) for p in items] == [
        ("a", "1+1?", 2, 1),
        ("7", "2+2?", 4, 3),
        ("c", "3+3?", None, 5),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"problem": "x"}', "missing or empty field 'id'"),
        ('{"id": "", "problem": "x"}', "missing or empty field 'id'"),
        ('{"id": "a"}', "missing field 'problem'"),
        ('{"id": "a", "problem": "  "}', "field 'problem' is empty"),
        ('{"id": "a", "problem": 5}', "field 'problem' must be a string"),
        ('{"id": [1], "problem": "x"}', "field 'id' must be a string"),
        ('{"id": "a", "problem": "x", "answer": "seven"}', "field 'answer' must be an integer"),
    ],
)
def test_bad_lines_become_errors_naming_the_line(line, message):
    item = parse_json_line(line.encode(), 12)
    assert isinstance(item, Result)
    assert item.status == "error"
    assert item.line == 12
    assert item.error is not None and item.error.startswith("line 12: ") and message in item.error


def test_invalid_utf8_is_replaced_and_the_line_kept():
    item = parse_json_line(b'{"id": "a", "problem": "caf\xe9 \xff"}', 3)
    assert isinstance(item, Problem)
    assert (item.id, item.text, item.line) == ("a", "caf\ufffd \ufffd", 3)


async def test_duplicates_first_is_solved_repeat_is_an_error(tmp_path: Path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"id": "x", "problem": f"q{i}"}) for i in range(3)) + "\n")
    convert = RecordConverter()
    items = [convert(i) for i in await collect(f)]
    assert isinstance(items[0], Problem)
    for dup, line in zip(items[1:], (2, 3), strict=True):
        assert isinstance(dup, Result)
        assert dup.id == "x"
        assert f"line {line}: duplicate id 'x' (first seen at line 1)" in (dup.error or "")


async def test_csv_with_quoted_multiline_fields(tmp_path: Path):
    f = tmp_path / "test.csv"
    f.write_text(
        'id,problem,answer\r\nq1,"What is\n1+1, really?",2\r\nq2,Plain one,\r\nq3,too,many,fields\r\n'
    )
    items = await collect(f)
    assert isinstance(items[0], Problem) and items[0].text == "What is\n1+1, really?" and items[0].answer == 2
    assert isinstance(items[1], Problem) and items[1].answer is None and items[1].line == 4
    assert isinstance(items[2], Result) and "expected 3 CSV fields" in (items[2].error or "")


async def test_csv_without_usable_header_errors_every_row(tmp_path: Path):
    f = tmp_path / "bad.csv"
    f.write_text("a,b\n1,2\n3,4\n")
    items = await collect(f)
    assert len(items) == 3
    assert all(isinstance(i, Result) and i.status == "error" for i in items)


def test_missing_file_and_directory(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        check_source(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        check_source(tmp_path)


async def test_large_file_streams_in_chunks(tmp_path: Path):
    f = tmp_path / "big.jsonl"
    with f.open("w") as out:
        for i in range(20_000):
            out.write(json.dumps({"id": f"p{i}", "problem": f"What is {i}+1?"}) + "\n")
    count = 0
    async for item in read_problems(f):
        assert isinstance(item, Problem)
        count += 1
    assert count == 20_000


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_parser_never_raises_on_arbitrary_bytes(raw):
    item = parse_json_line(raw.replace(b"\n", b" "), 1)
    assert item is None or isinstance(item, (Problem, Result))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    )
)
def test_record_to_problem_never_raises(record):
    item = record_to_problem(record, 1)
    assert isinstance(item, (Problem, Result))
