"""The ``[prompt]`` section: the prompt a model was trained on, as a setting.

A model fine-tuned for tool-integrated reasoning expects its own prompt: Qwen2.5-Math its instruction
as the system message, DeepSeek-Math its instruction after the problem, NuminaMath the bare problem
(its chat template adds ``### Problem:`` and ``### Solution:``). ``PromptConfig.format`` names one of
these (``FORMATS``); ``system``, ``user_template``, ``prefill`` and ``fewshot`` adjust or replace
parts of it. ``stages/prompting.py`` renders the messages (``messages_for``) and starts each sample's
text with the prefill; the ``harmony`` style renders its own conversation and ignores this section.

The few-shot file is read when the section is built, so a bad line is reported before a model loads
(and its content, not its path, goes into the cache key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from stages.settings import ConfigError, setting
from stages.settings import check as _check

PromptFormat = Literal[
    "default", "qwen25-math-cot", "qwen25-math-tir", "numina-tir", "deepseek-math", "deepseek-math-tir"
]

PROBLEM = "{problem}"
"""Where the problem goes in a user-message template."""

STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."
INTEGRATE = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)


@dataclass(frozen=True)
class Format:
    """A named prompt format: the system message (``None``: none; ``own_system``: the prompt style's
    own) and the user-message template; ``source`` says where it is published."""

    system: str | None
    user: str
    source: str
    own_system: bool = False


FORMATS: dict[str, Format] = {
    "default": Format(None, PROBLEM, "this project: the prompt style's system prompt", own_system=True),
    "qwen25-math-cot": Format(
        STEP_BY_STEP, PROBLEM, "QwenLM/Qwen2.5-Math README (CoT) and evaluation/utils.py 'qwen25-math-cot'"
    ),
    "qwen25-math-tir": Format(INTEGRATE, PROBLEM, "QwenLM/Qwen2.5-Math README (TIR)"),
    "numina-tir": Format(
        None,
        PROBLEM,
        "project-numina/aimo-progress-prize kaggle-solution.ipynb (the user message is the problem; the "
        "model's chat template adds '### Problem: ' and '### Solution: ')",
    ),
    "deepseek-math": Format(
        None, f"{PROBLEM}\n{STEP_BY_STEP}", "deepseek-ai/DeepSeek-Math README (no system prompt)"
    ),
    "deepseek-math-tir": Format(
        None, f"{PROBLEM}\n{INTEGRATE}", "deepseek-ai/DeepSeek-Math evaluation/README.md (tool-integrated)"
    ),
}


@dataclass(frozen=True)
class PromptConfig:
    """The prompt around a problem.

    ``format``: a named format (``FORMATS``; ``default`` is the prompt style's own system prompt and
    the problem as the user message). ``system`` replaces the format's system message (``""``: no
    system message; ``generation.system_prompt`` is the older name for it, used when this is unset).
    ``user_template`` replaces the format's user message: ``{problem}`` marks where the problem goes
    (nothing else in it is special, so ``\\boxed{}`` is written as it is). ``prefill``: the text the
    assistant's answer starts with (after the chat template's generation prompt); it is part of the
    sample's text, so a prefill of an open ```python block makes the first round's code a cell.
    ``fewshot``: a JSONL file of ``{"problem": ..., "solution": ...}`` exemplars, shown as earlier
    user and assistant turns (each problem through the user template).
    """

    format: PromptFormat = setting(  # noqa: RUF009 (a Literal)
        "default",
        flag="--prompt-format",
        help="the prompt a model was trained on: default (the style's system prompt), qwen25-math-cot, "
        "qwen25-math-tir, numina-tir, deepseek-math, deepseek-math-tir (see the README)",
    )
    system: str | None = setting(
        None,
        flag="--system-prompt",
        help="the system message, replacing the format's ('' for none; default: the format's)",
    )
    user_template: str | None = setting(
        None,
        flag="--user-template",
        help="the user message, with {problem} where the problem goes (default: the format's)",
    )
    prefill: str | None = setting(
        None,
        flag="--prefill",
        help="text the answer starts with, e.g. an open ```python block (default: none)",
    )
    fewshot: str | None = setting(
        None,
        flag="--fewshot",
        metavar="FILE",
        help="a JSONL file of {problem, solution} exemplars shown as earlier turns (default: none)",
    )

    def __post_init__(self) -> None:
        _check(self.format in FORMATS, "prompt.format", f"must be one of {', '.join(FORMATS)}")
        _check(
            self.user_template is None or PROBLEM in self.user_template,
            "prompt.user_template",
            f"must contain {PROBLEM} (where the problem goes), got {self.user_template!r}",
        )
        exemplars = read_fewshot(self.fewshot) if self.fewshot is not None else ()
        object.__setattr__(self, "_exemplars", exemplars)

    @property
    def exemplars(self) -> tuple[tuple[str, str], ...]:
        """The few-shot exemplars, ``(problem, solution)`` each, in the file's order."""
        found: tuple[tuple[str, str], ...] = self.__dict__.get("_exemplars", ())
        return found

    def system_message(self, style_system: str, alias: str | None = None) -> str | None:
        """The system message (``None``: none): ``system``, else ``alias`` (``generation.system_prompt``)
        when set, else the format's (``default``: ``style_system``, the prompt style's own)."""
        if self.system is not None:
            return self.system or None
        if alias:
            return alias
        fmt = FORMATS[self.format]
        return style_system if fmt.own_system else fmt.system

    def user_message(self, problem: str) -> str:
        """The user message for ``problem`` (stripped), through the template."""
        template = self.user_template if self.user_template is not None else FORMATS[self.format].user
        return template.replace(PROBLEM, problem.strip())

    def cache_key(self) -> dict[str, Any]:
        """What of the section changes an answer: the few-shot file by its content, not its path."""
        shots = json.dumps(self.exemplars).encode()
        return {
            "format": self.format,
            "system": self.system,
            "user_template": self.user_template,
            "prefill": self.prefill,
            "fewshot": hashlib.sha256(shots).hexdigest() if self.exemplars else None,
        }


def read_fewshot(path: str) -> tuple[tuple[str, str], ...]:
    """The exemplars of a few-shot JSONL file (blank lines skipped).

    Raises:
        ConfigError: the file cannot be read, has no exemplar, or a line is not an object with string
            ``problem`` and ``solution`` (named by file and line).
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"prompt.fewshot: cannot read {p}: {e.strerror or e}") from e
    return _read_fewshot(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _read_fewshot(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    """``read_fewshot`` of one version of the file (a config is rebuilt often: read it once)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt.fewshot: cannot read {path}: {e}") from e
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompt.fewshot: {path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected an object with 'problem' and 'solution'")
        for key in ("problem", "solution"):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: '{key}' must be a non-empty string")
        out.append((record["problem"], record["solution"]))
    if not out:
        raise ConfigError(f"prompt.fewshot: {path} has no exemplars")
    return tuple(out)
