"""The model backend protocol: the one question a stage asks of a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one ``generate`` call. ``greedy`` ignores temperature and top-p."""

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Output:
    """What the model wrote for one prompt: the decoded new text and how many tokens it took."""

    text: str
    new_tokens: int


@dataclass(frozen=True)
class MemoryProfile:
    """What the memory budget needs to know about a loaded model."""

    weights_bytes: int
    kv_bytes_per_token: int


class BackendError(RuntimeError):
    """The model cannot be loaded or used; the message says what the user can do."""


@runtime_checkable
class Backend(Protocol):
    """A loaded model. ``generate`` blocks; the inference stage calls it from one dedicated thread."""

    model_id: str
    max_context: int

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Render chat ``messages`` through the chat template and return the prompt's token ids."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Output]:
        """Generate one continuation per prompt (same order). May raise; see ``is_out_of_memory``."""
        ...

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` raised by ``generate`` means the batch did not fit in memory."""
        ...

    def memory_profile(self) -> MemoryProfile | None:
        """Weights and KV-cache sizes, or ``None`` when unknown."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...
