import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.config import Config
from pipeline.items import Candidate, Encoded, Generation, Job, Problem
from stages.extraction import check_answer, extract_answer, last_boxed, to_integer
from stages.vote import build_result, vote


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{8}{2}}", "\\frac{8}{2}"),
        ("\\boxed{\\text{{nested}}}", "\\text{{nested}}"),
        ("\\boxed 7 is it", "7"),
        ("no box", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("We get \\boxed{12}. Also 99.", "12"),
        ("The final answer is 37.", "37"),
        ("Thus the answer is: $1,250$", "1,250"),
        ("first 3 then 4 and finally 5", "5"),
        ("nothing numeric", None),
    ],
)
def test_extract_answer_fallbacks(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1,000", 1000),
        ("12.0", 12),
        ("$5$", 5),
        ("\\frac{8}{2}", 4),
        ("\\dfrac{12}{3}", 4),
        ("-3", -3),
        ("2^{10}", 1024),
        ("\\text{ 17 }", 17),
        ("45\\%", 45),
    ],
)
def test_to_integer_normalises(raw, value):
    assert to_integer(raw) == (value, None)


@pytest.mark.parametrize("raw", ["2.5", "\\frac{1}{3}", "x+1", "\\sqrt{2}"])
def test_to_integer_rejects_non_integers(raw):
    value, reason = to_integer(raw)
    assert value is None
    assert reason


def test_check_answer_range_and_modulus():
    assert check_answer("\\boxed{123456}", modulus=None, lo=0, hi=99999)[0] is None
    assert "outside the range" in check_answer("\\boxed{123456}", modulus=None, lo=0, hi=99999)[2]
    assert check_answer("\\boxed{123456}", modulus=1000, lo=0, hi=999)[0] == 456
    assert check_answer("\\boxed{-1}", modulus=None, lo=0, hi=9)[0] is None
    assert check_answer("words only", modulus=None, lo=0, hi=9) == (
        None,
        None,
        "no answer found in the output",
    )


def _cands(answers):
    job = Job(problem=Problem(id="p", text="t", answer=7), key="k", serial=1)
    enc = Encoded(job=job, prompt_ids=(1, 2, 3))
    return [
        Candidate(
            generation=Generation(encoded=enc, index=i, text="", new_tokens=2),
            answer=a,
            extracted=None if a is None else str(a),
            reason=None if a is not None else "no answer found in the output",
        )
        for i, a in enumerate(answers)
    ]


def test_vote_majority_and_tie_break():
    assert vote(_cands([3, 7, 7, None])) == (7, {7: 2, 3: 1})
    assert vote(_cands([5, 9]))[0] == 5  # a tie goes to the first sample
    assert vote(_cands([None, None])) == (None, {})


def test_build_result_ok_and_fallback():
    cfg = Config()
    ok = build_result(_cands([7, 7, 2]), cfg)
    assert (ok.status, ok.answer, ok.correct, ok.samples, ok.new_tokens) == ("ok", 7, True, 3, 6)
    fb = build_result(_cands([None]), cfg)
    assert fb.status == "fallback"
    assert fb.answer == cfg.answer.fallback
    assert "no answer found" in (fb.error or "")


@given(
    st.text(max_size=300)
    | st.builds(lambda n, w: f"so \\boxed{{{'9' * n}}} {w}", st.integers(4000, 6000), st.text(max_size=20))
    | st.builds(lambda n: "The final answer is " + "7" * n, st.integers(900, 5000))
)
def test_extraction_never_raises(text):
    answer, _, reason = check_answer(text, modulus=None, lo=0, hi=99999)
    assert (answer is None) == (reason is not None)
    if answer is not None:
        assert 0 <= answer <= 99999


@given(st.integers(min_value=0, max_value=10**9))
def test_integers_round_trip_through_formats(n):
    for text in (f"\\boxed{{{n}}}", f"\\boxed{{{n:,}}}", f"The final answer is {n}.", f"\\boxed{{{n}.0}}"):
        assert check_answer(text, modulus=None, lo=0, hi=10**9)[0] == n


QUICK_TEXTS = [
    "so \\boxed{42}",
    "\\boxed{1,000} and more",
    "first \\boxed{3} then \\boxed{ 12 }",
    "\\boxed{$7$}",
    "\\boxed{12.0}",
    "\\boxed{12.5}",
    "\\boxed{-5}",
    "\\boxed{−8}",
    "\\boxed{\\frac{8}{2}}",
    "\\boxed{}",
    "\\boxed {9}",
    "\\fbox{11}",
    "\\boxed 13",
    "\\boxed{5} the final answer is 6",
    "\\boxed{99999999999}",
    "\\boxed{\\text{17}}",
    "\\boxed{5\\%}",
    "\\boxed{x}",
    "\\boxed{2} \\boxed{\\boxed{3}}",
    "\\boxed{4",
    "the answer is 12",
    "",
]


@pytest.mark.parametrize("modulus", [None, 1000])
def test_the_in_process_reading_gives_check_answers_result_or_leaves_it_to_the_workers(modulus):
    from stages.extraction import quick_check

    read = 0
    for text in QUICK_TEXTS:
        quick = quick_check(text, modulus=modulus, lo=0, hi=99999)
        if quick is not None:
            read += 1
            assert quick == check_answer(text, modulus=modulus, lo=0, hi=99999), text
    assert read >= 10  # the plain numbers are read here
    assert quick_check("\\boxed{\\frac{8}{2}}", modulus=None, lo=0, hi=9) is None  # LaTeX: the workers
    # a hostile text (200,000 characters of unclosed boxes) is passed on, not scanned once per box
    assert quick_check("\\boxed{" * 30_000, modulus=None, lo=0, hi=9) is None


@given(
    st.lists(
        st.sampled_from(
            ["\\boxed{", "\\boxed ", "}", "{", "1", "23", ",", ".", "0", " ", "$", "-", "x", "\\frac"]
        ),
        max_size=14,
    )
)
def test_the_in_process_reading_agrees_with_check_answer_on_generated_texts(parts):
    from stages.extraction import quick_check

    text = "".join(parts)
    quick = quick_check(text, modulus=None, lo=0, hi=10**6)
    if quick is not None:
        assert quick == check_answer(text, modulus=None, lo=0, hi=10**6)
