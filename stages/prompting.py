"""Prompt styles: how a problem becomes chat messages, and how a sample goes from one round to the next.

A style is a small pluggable part (``PromptStyle``): its system prompt, the stop strings that end a
round, and ``next_cell(text)``, which says whether a round that stopped there left a code cell to run.
``cot`` is one round of reasoning ending in ``\\boxed{}``. ``tir`` (tool-integrated reasoning) lets
the model write fenced Python; a round ends at the block's closing fence, the code runs in the
sandbox, and its output is appended as a fenced ``output`` block before the next round. A model with a
native tool-call format gets a style of its own by implementing the same four members.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, Protocol

from stages.config import DEFAULT_SYSTEM_PROMPT

COT_SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT
TIR_SYSTEM_PROMPT = (
    "You are a careful competition mathematician who checks the work with Python. Reason step by step. "
    "When a computation helps, write Python in a ```python code block; it is run and its printed output "
    "is shown to you in an ```output block, and variables persist between blocks. sympy, numpy and "
    "mpmath are available. Give the final answer as a single integer inside \\boxed{}."
)

_OPEN = re.compile(r"```(?:python|py)[ \t]*\n", re.IGNORECASE)
_FENCE = re.compile(r"```")


class PromptStyle(Protocol):
    """What the inference stage asks of a prompt style."""

    name: str
    system_prompt: str
    stop: tuple[str, ...]

    def next_cell(self, text: str) -> str | None:
        """The code to run when the round's ``text`` (which stopped at one of ``stop``) ends inside an
        open code block, else ``None``."""
        ...

    def feedback(self, stop_string: str, output: str) -> str:
        """The text appended after a cell ran: the stop string the round ended on, then the output."""
        ...


class Cot:
    """One round: reason, then ``\\boxed{answer}``."""

    name = "cot"
    system_prompt = COT_SYSTEM_PROMPT
    stop: tuple[str, ...] = ()

    def next_cell(self, text: str) -> str | None:
        """Never a cell."""
        return None

    def feedback(self, stop_string: str, output: str) -> str:
        """Unused: chain of thought has no cells."""
        return stop_string


class Tir:
    """Tool-integrated reasoning with fenced ```python blocks and ```output blocks."""

    name = "tir"
    system_prompt = TIR_SYSTEM_PROMPT
    stop: tuple[str, ...] = ("```\n",)

    def next_cell(self, text: str) -> str | None:
        """The code of the last ```python block when it is still open at the end of ``text``."""
        opens = list(_OPEN.finditer(text))
        if not opens:
            return None
        last = opens[-1]
        if _FENCE.search(text, last.end()):  # closed already: the stop was some other fence
            return None
        code = text[last.end() :]
        return code if code.strip() else None

    def feedback(self, stop_string: str, output: str) -> str:
        """Close the code block, then show the output in its own block."""
        return f"{stop_string}```output\n{output}\n```\n"


STYLES: dict[str, PromptStyle] = {"cot": Cot(), "tir": Tir()}


def style_for(name: str) -> PromptStyle:
    """The style called ``name``.

    Raises:
        KeyError: no such style.
    """
    return STYLES[name]


def inside_block(text: str) -> bool:
    """Whether ``text`` ends inside a fenced block (an odd number of fences)."""
    return len(_FENCE.findall(text)) % 2 == 1


_BOXED = re.compile(r"\\boxed\s*\{")


def finish_text(
    text: str, stop: Sequence[str] = (), at_answer: bool = False
) -> tuple[str, Literal["answer", "stop"] | None, str | None]:
    """Where a completion's text ends: ``(text, reason, stop string)``.

    With ``at_answer``, right after the first final ``\\boxed{...}`` outside code (``answer_end``)
    unless a stop string comes before it; else before the first stop string (``"stop"``, and which
    one); else the text unchanged and ``None``. Every backend cuts its completions with this one rule.
    """
    hits = [(text.find(s), s) for s in stop if s in text]
    first = min(hits) if hits else None
    end = answer_end(text) if at_answer else None
    if end is not None and (first is None or end <= first[0]):
        return text[:end], "answer", None
    if first is not None:
        return text[: first[0]], "stop", first[1]
    return text, None, None


def answer_end(text: str) -> int | None:
    """Where the first complete ``\\boxed{...}`` written outside a code block ends (the index after its
    closing brace), or ``None``: once a sample has written one, its answer is final."""
    inside = False
    pos = 0
    fences = [m.start() for m in _FENCE.finditer(text)] + [len(text)]
    for end in fences:
        if not inside:
            for m in _BOXED.finditer(text, pos, end):
                depth = 0
                for j in range(m.end() - 1, end):
                    if text[j] == "{":
                        depth += 1
                    elif text[j] == "}":
                        depth -= 1
                        if depth == 0:
                            return j + 1
        inside = not inside
        pos = end + 3
    return None
