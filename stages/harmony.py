"""The Harmony response format of gpt-oss: conversations rendered to token ids, completions parsed back.

The ``harmony`` prompt style works on token ids, not on a chat template: a sample's conversation
(system content with the reasoning effort and the ``python`` tool, a developer message with the
instructions, the problem as the user's message, then everything the sample wrote and the tool
answered) is rendered by the Harmony library; each round stops at an assistant-action stop token
(``<|call|>``, ``<|return|>``); the completion's ids are parsed into messages. A message to
``python`` is a code cell: it runs in the sample's sandbox interpreter (the same pool, limits and
stateful cells as ``tir``) and its output goes back as the tool's message; the next round renders
the grown conversation, so a server's prefix cache covers all of it but the new tail. The answer is
read from the ``final`` channel.

The encoding comes from ``openai_harmony`` (the ``oss-harmony`` wheel loads it offline; the official
``openai-harmony`` downloads its vocabulary unless ``TIKTOKEN_ENCODINGS_BASE`` names a folder that
holds it, which is how a Kaggle notebook with the internet off attaches it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import anyio

from stages.backends.base import Completion, SamplingParams
from stages.config import Config, ReasoningEffort
from stages.prompting import Dialogue, Step

if TYPE_CHECKING:
    from stages.backends.base import Backend

HARMONY_INSTRUCTIONS = (
    "Solve the problem. Use the python tool for any computation you want to check; its output is "
    "shown to you. Give the final answer as a single integer inside \\boxed{} in your final message."
)
"""The developer message's default instructions."""

_TOOL_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. When you send a message containing "
    "Python code to python, it will be executed in a stateful Jupyter-like environment; python will "
    "respond with what the code printed (and the value of its last expression) or time out after "
    "{timeout:g} seconds. sympy, numpy and mpmath are available. There is no internet access."
)

INSTALL_HARMONY = (
    "the harmony prompt style needs the Harmony library: pip install 'aimo-pipeline[harmony]' "
    "(oss-harmony; or openai-harmony with TIKTOKEN_ENCODINGS_BASE pointing at its vocabulary)"
)


class HarmonyUnavailable(RuntimeError):
    """The Harmony library or its vocabulary cannot be loaded; the message says what to do."""


@functools.cache
def encoding() -> Any:
    """The ``HARMONY_GPT_OSS`` encoding (loaded once per process).

    Raises:
        HarmonyUnavailable: the library is not installed or its vocabulary cannot be loaded.
    """
    try:
        import openai_harmony as h
    except ImportError as e:
        raise HarmonyUnavailable(INSTALL_HARMONY) from e
    try:
        return h.load_harmony_encoding(h.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # the official wheel without its vocabulary: "error downloading ..."
        where = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        hint = (
            f"TIKTOKEN_ENCODINGS_BASE={where} does not hold it"
            if where
            else "set TIKTOKEN_ENCODINGS_BASE to a folder holding o200k_base.tiktoken, or install oss-harmony"
        )
        raise HarmonyUnavailable(f"cannot load the Harmony encoding ({e}); {hint}") from e


def stop_token_ids() -> tuple[int, ...]:
    """The assistant-action stop tokens (``<|return|>``, ``<|call|>``): each round ends at one."""
    return tuple(sorted(encoding().stop_tokens_for_assistant_actions()))


def tool_description(timeout_s: float) -> str:
    """The ``python`` tool's description with the sandbox's cell time limit."""
    return _TOOL_DESCRIPTION.format(timeout=timeout_s)


def opening(problem: str, *, effort: ReasoningEffort, instructions: str, tool: str | None) -> list[Any]:
    """The conversation's first messages: system (reasoning effort, the ``python`` tool unless
    ``tool`` is ``None``), developer (``instructions``), user (``problem``)."""
    import openai_harmony as h

    system = h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort(effort.capitalize()))
    if tool is not None:
        system = system.with_tools(h.ToolNamespaceConfig(name="python", description=tool, tools=[]))
    return [
        h.Message.from_role_and_content(h.Role.SYSTEM, system),
        h.Message.from_role_and_content(
            h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions(instructions)
        ),
        h.Message.from_role_and_content(h.Role.USER, problem),
    ]


def render(messages: list[Any]) -> list[int]:
    """The prompt ids of ``messages`` with the assistant's turn to come."""
    import openai_harmony as h

    return list(
        encoding().render_conversation_for_completion(
            h.Conversation.from_messages(messages), h.Role.ASSISTANT
        )
    )


def text_of(message: Any) -> str:
    """The text content of one message."""
    return "".join(getattr(c, "text", "") for c in message.content)


@dataclass
class HarmonyDialogue:
    """One sample's Harmony conversation, grown round by round.

    ``read(ids, stopped)`` reads one round's completion and says what comes next: ``cell`` (a call to
    ``python``: its code is ``code``), ``again`` (the model called a tool it does not have; the tool's
    error went back and the next round goes on) or ``done`` (a final message, a malformed or cut-off
    completion, or no call). ``text`` is what the sample's answer is read from: the final channel's
    text, empty until there is one (an answer in the analysis is not an answer). The conversation
    (``messages``) keeps everything else the model wrote; ``error`` says what was malformed.
    """

    messages: list[Any]
    code: str = ""
    text: str = ""
    final: bool = False
    error: str | None = None

    async def prompt(self) -> tuple[int, ...]:
        """The ids of the next round's prompt: the whole conversation so far (rendered off the loop
        once it has grown)."""
        if len(self.messages) <= 3:
            return tuple(render(self.messages))
        return tuple(await anyio.to_thread.run_sync(render, self.messages))

    def shape(self, params: SamplingParams) -> SamplingParams:
        """Stop at the assistant-action tokens; no stop strings, no cut at a ``\\boxed{}`` (the answer
        is the final channel's)."""
        return replace(params, stop=(), stop_token_ids=stop_token_ids(), stop_at_answer=False)

    def take(self, completion: Completion) -> Step:
        """Read one round's completion (its ids; a stop token the backend left out is put back)."""
        ids = completion.token_ids
        token = completion.stop_token
        if token is not None and (not ids or ids[-1] != token):
            ids = (*ids, token)
        return self.read(ids, stopped=completion.finish_reason == "stop")

    def answer(self, output: str) -> None:
        """The cell's output, as the ``python`` tool's message."""
        self.tool_answer("python", output)

    def unrun(self) -> None:
        """Nothing to add: the call stays unanswered."""

    def read(self, ids: tuple[int, ...], stopped: bool) -> Step:
        """Read one round's completion ``ids``; ``stopped``: it ended at a stop token (not cut off)."""
        import openai_harmony as h

        enc = encoding()
        try:
            parsed = enc.parse_messages_from_completion_tokens(list(ids), h.Role.ASSISTANT, strict=False)
        except Exception as e:  # not Harmony at all (or ids outside the encoding): no answer, it ends
            self.error = f"malformed Harmony completion: {e}"
            return "done"
        self.messages.extend(parsed)
        for m in parsed:
            if m.channel == "final":
                self.final = True
                self.text = text_of(m)
        last = parsed[-1] if parsed else None
        ended_call = (
            stopped and bool(ids) and ids[-1] in stop_token_ids() and last is not None and last.recipient
        )
        if self.final or not ended_call or last is None:
            return "done"
        recipient = str(last.recipient)
        if recipient == "python" or recipient.startswith("python."):
            self.code = text_of(last)
            return "cell"
        self.tool_answer(recipient, f"error: there is no tool called {recipient!r}; the only tool is python")
        return "again"

    def tool_answer(self, tool: str, output: str) -> None:
        """The tool's answer, as the tool's message on the commentary channel."""
        import openai_harmony as h

        author = h.Author.new(h.Role.TOOL, tool)
        self.messages.append(
            h.Message.from_author_and_content(author, output)
            .with_channel("commentary")
            .with_recipient("assistant")
        )


class HarmonyStyle:
    """The ``harmony`` prompt style: prompts rendered by the Harmony library, a ``HarmonyDialogue`` per
    sample. ``system_prompt`` and ``stop`` are unused (the system message is Harmony's own)."""

    name = "harmony"
    system_prompt = ""
    stop: tuple[str, ...] = ()

    def __init__(self) -> None:
        encoding()  # a missing library or vocabulary fails the run's start, not each problem

    def opening(self, text: str, cfg: Config) -> list[Any]:
        """The conversation's first messages under ``cfg``'s generation settings."""
        g = cfg.generation
        tool = g.tool_description or tool_description(cfg.sandbox.cell_timeout_s)
        return opening(
            text.strip(),
            effort=g.reasoning_effort,
            instructions=g.instructions or HARMONY_INSTRUCTIONS,
            tool=tool,
        )

    def prompt_ids(self, text: str, cfg: Config, backend: Backend) -> list[int]:
        """The rendered conversation, the assistant's turn to come.

        Raises:
            HarmonyUnavailable: the Harmony library or its vocabulary cannot be loaded.
        """
        return render(self.opening(text, cfg))

    def dialogue(self, prompt_ids: tuple[int, ...], text: str, cfg: Config, backend: Backend) -> Dialogue:
        """A fresh conversation for one sample."""
        return HarmonyDialogue(self.opening(text, cfg))
