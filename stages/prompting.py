"""Prompt styles: how a problem becomes chat messages, and how a sample goes from one round to the next.

A style is a small pluggable part (``PromptStyle``): it turns a problem into prompt ids
(``prompt_ids``) and gives each sample a ``Dialogue``, which the inference stage drives round by
round: the next prompt, the request's stops, what a completion means (a code cell to run, another
round, or the end) and where the tool's output goes. ``cot`` is one round of reasoning ending in
``\\boxed{}``. ``tir`` (tool-integrated reasoning) lets the model write fenced Python; a round ends at
the block's closing fence, the code runs in the sandbox, and its output is appended as a fenced
``output`` block before the next round. ``harmony`` (``stages/harmony.py``) is gpt-oss's own format,
on token ids, with its ``python`` tool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

import anyio

from stages.backends.base import Completion, SamplingParams
from stages.config import DEFAULT_SYSTEM_PROMPT, Config

if TYPE_CHECKING:
    from stages.backends.base import Backend

COT_SYSTEM_PROMPT = DEFAULT_SYSTEM_PROMPT
TIR_SYSTEM_PROMPT = (
    "You are a careful competition mathematician who checks the work with Python. Reason step by step. "
    "When a computation helps, write Python in a ```python code block; it is run and its printed output "
    "is shown to you in an ```output block, and variables persist between blocks. sympy, numpy and "
    "mpmath are available. Give the final answer as a single integer inside \\boxed{}."
)

_OPEN = re.compile(r"```(?:python|py)[ \t]*\n", re.IGNORECASE)
_FENCE = re.compile(r"```")


Step = Literal["cell", "again", "done"]
"""What a round's completion leaves: a code ``cell`` to run, ``again`` (another round, nothing to
run), or ``done`` (the sample has ended)."""


class Dialogue(Protocol):
    """One sample's turns with the model, made by its prompt style and driven by the inference stage.

    ``text`` is what the sample has written that counts (what its answer is read from); after a
    ``take`` that said ``cell``, ``code`` is the cell's code.
    """

    text: str
    code: str

    async def prompt(self) -> tuple[int, ...]:
        """The next round's prompt ids."""
        ...

    def shape(self, params: SamplingParams) -> SamplingParams:
        """The round's request settings: the style's stop strings or stop tokens."""
        ...

    def take(self, completion: Completion) -> Step:
        """Read one round's completion."""
        ...

    def answer(self, output: str) -> None:
        """The cell ran: its output (as the model will read it) goes into the conversation."""
        ...

    def unrun(self) -> None:
        """The cell will not run (no round is left to read its output)."""
        ...


class PromptStyle(Protocol):
    """What the inference and tokenize stages ask of a prompt style."""

    name: str
    system_prompt: str
    stop: tuple[str, ...]

    def prompt_ids(self, text: str, cfg: Config, backend: Backend) -> list[int]:
        """The first round's prompt ids for problem ``text``."""
        ...

    def dialogue(self, prompt_ids: tuple[int, ...], text: str, cfg: Config, backend: Backend) -> Dialogue:
        """A fresh dialogue for one sample of the problem ``text`` whose prompt is ``prompt_ids``."""
        ...


def messages_for(text: str, cfg: Config) -> list[dict[str, str]]:
    """The chat messages for a problem under the configured prompt format (``[prompt]``,
    ``stages/prompt_config.py``): the system message (by default the prompt style's own, or
    ``generation.system_prompt``), the few-shot exemplars as earlier user and assistant turns, then the
    problem through the user template. The prefill is not a message: it starts the sample's text."""
    p = cfg.prompt
    system = p.system_message(
        style_for(cfg.generation.prompt_style).system_prompt, cfg.generation.system_prompt
    )
    messages = [{"role": "system", "content": system}] if system is not None else []
    for problem, solution in p.exemplars:
        messages += [
            {"role": "user", "content": p.user_message(problem)},
            {"role": "assistant", "content": solution},
        ]
    messages.append({"role": "user", "content": p.user_message(text)})
    return messages


@dataclass
class TextDialogue:
    """The dialogue of a text style (``cot``, ``tir``): the sample's text grows by each completion; a
    round that stopped at a closing fence of an open code block is a cell; the output is appended by
    the style's ``feedback``. Each round's prompt is the problem's prompt plus the text so far, which
    starts with the prefill (``prompt.prefill``), so the first round's prompt is the problem's prompt
    plus the prefill, and the answer is read from a text that includes it."""

    style: _TextStyle
    prompt_ids: tuple[int, ...]
    backend: Backend
    text: str = ""
    code: str = ""
    _stop: str = ""

    async def prompt(self) -> tuple[int, ...]:
        """The problem's prompt, then the sample's text (tokenized off the event loop)."""
        if not self.text:
            return self.prompt_ids
        return self.prompt_ids + tuple(await anyio.to_thread.run_sync(self.backend.encode_text, self.text))

    def shape(self, params: SamplingParams) -> SamplingParams:
        """The style's stop strings; a round that starts inside a block has no final answer there."""
        at_answer = params.stop_at_answer and not inside_block(self.text)
        return replace(params, stop=self.style.stop, stop_at_answer=at_answer)

    def take(self, completion: Completion) -> Step:
        """Append the completion; a stop at the end of an open code block is a cell."""
        self.text += completion.text
        stop = completion.stop_string
        if completion.finish_reason != "stop" or stop is None:
            return "done"
        code = self.style.next_cell(self.text)
        if code is None:  # a fence that closes no code: write on
            self.text += stop
            return "again"
        self.code, self._stop = code, stop
        return "cell"

    def answer(self, output: str) -> None:
        """Close the block, then the output in the style's shape."""
        self.text += self.style.feedback(self._stop, output)

    def unrun(self) -> None:
        """Close the block; nothing follows."""
        self.text += self._stop


class _TextStyle:
    """What the text styles share: prompts through the backend's chat template, a ``TextDialogue``."""

    name: str
    system_prompt: str
    stop: tuple[str, ...]

    def next_cell(self, text: str) -> str | None:
        """The code to run when the round's ``text`` (which stopped at one of ``stop``) ends inside an
        open code block, else ``None``."""
        return None

    def feedback(self, stop_string: str, output: str) -> str:
        """The text appended after a cell ran: the stop string the round ended on, then the output."""
        return stop_string

    def prompt_ids(self, text: str, cfg: Config, backend: Backend) -> list[int]:
        """The chat messages through the backend's chat template."""
        return backend.encode(messages_for(text, cfg))

    def dialogue(self, prompt_ids: tuple[int, ...], text: str, cfg: Config, backend: Backend) -> Dialogue:
        """A ``TextDialogue`` over the problem's prompt, its text starting with the prefill."""
        return TextDialogue(self, prompt_ids, backend, text=cfg.prompt.prefill or "")


class Cot(_TextStyle):
    """One round: reason, then ``\\boxed{answer}``; never a cell."""

    name = "cot"
    system_prompt = COT_SYSTEM_PROMPT
    stop: tuple[str, ...] = ()


class Tir(_TextStyle):
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
    """The style called ``name`` (``harmony`` is loaded at its first use).

    Raises:
        KeyError: no such style.
    """
    if name == "harmony" and name not in STYLES:
        from stages.harmony import HarmonyStyle

        STYLES[name] = HarmonyStyle()
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
