"""Answer extraction: from a model's text to a checked integer.

Pure text functions (``extract_answer``, ``to_integer``, ``check_answer``), cheap to import: the
verification worker processes call them. The vote over a problem's answers is ``stages/vote.py``.

Extraction order: the last ``\\boxed{...}`` (nested braces allowed), then "the final answer is ...",
then the last number in the text. Normalisation turns "1,000", "12.0", "$5$", "\\frac{8}{2}" and other
LaTeX that ``math-verify`` understands into integers.
"""

from __future__ import annotations

import re
from typing import Any

"""The error of a sample cut off by its problem's deadline (``Problem.deadline``)."""

MAX_ANSWER_CHARS = 1000
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_FINAL = re.compile(
    r"(?:final answer|the answer)\s*(?:is|=|:)?\s*[:=]?\s*\$?\s*([-−]?[\d,]*\.?\d+(?:\s*/\s*\d+)?)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?")
_PLAIN_INT = re.compile(r"^[-−]?\d{1,3}(?:,\d{3})+$|^[-−]?\d+$")
_PLAIN_DEC = re.compile(r"^[-−]?\d+\.\d+$")
_WRAPPERS = re.compile(r"^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$")
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}")
_UNITS = re.compile(r"\s*(?:\\%|%|\\,|\\!|\\;|\\ |°|\^\\circ|\^\{\\circ\})\s*")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or ``None``."""
    found: str | None = None
    for m in _BOXED.finditer(text):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        found = text[i + 1 : j]
                        break
        else:
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                found = token.group(0)
    return found


def extract_answer(text: str) -> str | None:
    """The answer string a model gave: boxed, else "final answer is", else the last number."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    finals = _FINAL.findall(text)
    if finals:
        return str(finals[-1]).strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return str(numbers[-1])
    return None


def _clean(s: str) -> str:
    s = s.strip()
    prev = None
    while prev != s:
        prev = s
        s = _WRAPPERS.sub("", s).strip()
    s = _TEXT_CMD.sub(r"\1", s)
    s = _UNITS.sub("", s)
    return s.replace("−", "-").strip().rstrip(".")


def to_integer(answer: str) -> tuple[int | None, str | None]:
    """``(value, None)`` when ``answer`` is an integer, else ``(None, reason)``.

    Plain numbers are read directly; anything else goes through ``math-verify``.
    """
    s = _clean(answer)
    if len(s) > MAX_ANSWER_CHARS:  # int() refuses past 4,300 digits; no valid answer is that long
        return None, f"answer has {len(s):,} characters; too long to be an answer"
    plain = _plain_integer(s)
    return plain if plain is not None else _math_verify_integer(s)


def _plain_integer(s: str) -> tuple[int | None, str | None] | None:
    """A cleaned answer read as a plain number (``1,000``, ``12.0``), or ``None`` when it is not one."""
    if _PLAIN_INT.match(s):
        return int(s.replace(",", "")), None
    if _PLAIN_DEC.match(s):
        f = float(s)
        return (int(f), None) if f.is_integer() else (None, f"answer {s} is not an integer")
    return None


def _math_verify_integer(s: str) -> tuple[int | None, str | None]:
    import sympy
    from math_verify import parse

    try:
        parsed: list[Any] = parse(f"${s}$", parsing_timeout=None)
    except Exception as e:  # math-verify raises many kinds on odd input; the reason is kept
        return None, f"cannot parse answer {s!r}: {e}"
    for value in parsed:
        if isinstance(value, sympy.Basic):
            try:
                if value.is_number:
                    number = sympy.nsimplify(value)
                    if number.is_integer:
                        return int(number), None
                    return None, f"answer {s} is not an integer"
            except (TypeError, ValueError, AttributeError):
                continue
    return None, f"cannot read answer {s!r} as a number"


def quick_check(
    text: str, *, modulus: int | None, lo: int, hi: int
) -> tuple[int | None, str | None, str | None] | None:
    """``check_answer``'s result when the text's last ``\\boxed{...}`` holds a plain number, found in
    time linear in the text (so it is safe in the pipeline's own process); ``None`` for anything else
    (no boxed answer, one that does not close, LaTeX for ``math-verify``), which goes to the workers."""
    last = None
    for m in _BOXED.finditer(text):
        last = m
    if last is None:
        return None
    i = last.end()
    if i >= len(text) or text[i] != "{":
        return None
    j = text.find("}", i)
    if j < 0 or "{" in text[i + 1 : j] or j - i > 64:
        return None  # nested, unclosed or long: the full reading decides
    extracted = text[i + 1 : j].strip()
    plain = _plain_integer(_clean(extracted))
    if plain is None:
        return None
    value, reason = plain
    if value is None:
        return None, extracted, reason
    return _ranged(value, extracted, modulus, lo, hi)


def _ranged(
    value: int, extracted: str, modulus: int | None, lo: int, hi: int
) -> tuple[int | None, str | None, str | None]:
    if modulus is not None:
        value %= modulus
    if not lo <= value <= hi:
        return None, extracted, f"answer {value} is outside the range {lo}-{hi}"
    return value, extracted, None


def check_answer(
    text: str, *, modulus: int | None, lo: int, hi: int
) -> tuple[int | None, str | None, str | None]:
    """Extract, normalise and range-check the answer in a model's output.

    Returns ``(answer, extracted, reason)``: ``answer`` is ``None`` (with a ``reason``) when the output
    holds no valid integer answer.
    """
    extracted = extract_answer(text)
    if extracted is None:
        return None, None, "no answer found in the output"
    value, reason = to_integer(extracted)
    if value is None:
        return None, extracted, reason
    return _ranged(value, extracted, modulus, lo, hi)
