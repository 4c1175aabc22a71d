"""The model backend protocol: the one question a stage asks of a model.

A backend answers one request at a time, asynchronously: ``await backend.generate(request)`` returns
that request's ``Completion``. A request is one sample's next round: the prompt's token ids and its own
sampling settings. Cancelling the task that awaits ``generate`` aborts the request inside the engine
(within one decode step): nothing keeps computing for a caller that has gone. How requests are batched
is the backend's business: the transformers adapter micro-batches, vLLM batches continuously.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from anyio.abc import TaskStatus

FinishReason = Literal["eos", "length", "stop", "answer", "aborted", "confidence"]


class TokenWatch(Protocol):
    """A per-request check a backend runs at every generated token (``stages/confidence_stop.py``'s
    ``ConfidenceWatch``, DeepConf online)."""

    def feed(self, top: Sequence[float]) -> bool:
        """Take the token's top-k log-probabilities; ``True``: end the completion after this token."""
        ...

    def reset(self) -> None:
        """Forget what was fed for this request (it is being retried from its start)."""
        ...


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one request.

    ``greedy`` ignores temperature, top-p and min-p. ``seed`` makes a sampled request reproducible
    whatever else is being generated at the same time (see ``sample_seed``). ``stop`` strings end the
    completion; the text returned stops before the string. ``logprobs`` asks for the log-probability
    of each generated token under the model. ``stop_at_answer`` ends the completion right after the
    first complete ``\\boxed{...}`` written outside a code block (finish reason ``answer``).
    ``stop_token_ids`` end the completion at any of these token ids (finish reason ``stop``, the id
    named in ``Completion.stop_token``; it is the last of ``token_ids``, and ``text`` leaves it out, as
    vLLM does). ``top_logprobs`` k > 0 asks for the k highest log-probabilities at each generated
    position (``Completion.top_logprobs``). ``watch`` (which needs ``top_logprobs``) is fed each
    generated token's top-k row as it is decoded; the completion ends after the first token it says so
    for (finish reason ``confidence``).
    """

    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    stop_at_answer: bool = False
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0
    watch: TokenWatch | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if not self.greedy and self.temperature <= 0:
            raise ValueError("temperature must be positive when sampling")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop token ids must be non-negative")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be at least 0")
        if self.watch is not None and self.top_logprobs < 1:
            raise ValueError("a watch reads the top-k log-probabilities: top_logprobs must be at least 1")


@dataclass(frozen=True)
class Request:
    """One generation request: ``id`` is unique among the requests in flight (for logs and aborts).

    ``problem_id``, ``sample`` and ``round`` say which problem, sample and round of tool use it is for
    (the replay backend looks completions up by them; the recorder writes them).
    """

    id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    problem_id: str | None = None
    sample: int = 0
    round: int = 0


@dataclass(frozen=True)
class Completion:
    """What the model wrote for one request.

    ``finish_reason``: ``eos`` (the model ended), ``length`` (``max_new_tokens`` reached), ``stop`` (a
    stop string, named in ``stop_string``, ``text`` ending before it; or a stop token id, named in
    ``stop_token`` with ``stop_string`` ``None``, ``token_ids`` ending with it), ``answer`` (the
    request asked to stop at its answer and ``text`` ends with the closing brace of its
    ``\\boxed{}``), ``aborted`` (cancelled), ``confidence`` (the request's watch stopped it).
    ``logprobs`` holds one log-probability per new token when the request asked for them;
    ``top_logprobs`` (when the request asked for k > 0) one tuple per new token: the k highest
    log-probabilities at that position, highest first.
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    stop_string: str | None = None
    logprobs: tuple[float, ...] | None = None
    stop_token: int | None = None
    top_logprobs: tuple[tuple[float, ...], ...] | None = None

    @property
    def new_tokens(self) -> int:
        """How many tokens were generated."""
        return len(self.token_ids)


@dataclass(frozen=True)
class MemoryProfile:
    """What the memory budget needs to know about a loaded model."""

    weights_bytes: int
    kv_bytes_per_token: int


# bytes per value of the dtypes a model runs in (weights, KV cache)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """The KV cache one token takes: 2 x layers x KV heads x head dim x ``dtype_bytes``.

    ``config`` is a model's ``config.json`` as a dict, or a transformers config object.

    Raises:
        KeyError, AttributeError, TypeError: the config lacks the model's shape.
    """

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    layers = int(get("num_hidden_layers"))
    heads = int(get("num_key_value_heads") or get("num_attention_heads"))
    head_dim = int(get("head_dim") or get("hidden_size") // get("num_attention_heads"))
    return 2 * layers * heads * head_dim * dtype_bytes


class BackendError(RuntimeError):
    """The model cannot be loaded or used; the message says what the user can do."""


def sample_seed(base: int, key: str, index: int, round_: int = 0) -> int:
    """The seed of one sample: a function of the run's seed, the problem, the sample and the round.

    Not of arrival order or batch: a rerun with the same settings draws the same samples.
    """
    digest = hashlib.sha256(f"{base}\x00{key}\x00{index}\x00{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@runtime_checkable
class Backend(Protocol):
    """A loaded model.

    ``serve`` runs whatever the backend needs in the background (the transformers adapter's batch
    loop) for as long as the pipeline runs; it calls ``task_status.started()`` once requests can be
    taken and is cancelled at shutdown. ``generate`` is called from many tasks at once.
    """

    model_id: str
    max_context: int
    device: str  # where the model runs ("cpu", "cuda"): the memory budget's kind of memory

    def configure(self, *, max_batch_size: int, max_wait_s: float, max_batch_tokens: int | None) -> None:
        """Set the micro-batching limits, once, before ``serve`` (a backend that batches on its own,
        like vLLM, ignores them)."""
        ...

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Render chat ``messages`` through the chat template and return the prompt's token ids."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """The token ids of plain ``text`` (no special tokens): what a sample wrote so far, appended to
        its prompt for the next round."""
        ...

    async def serve(self, *, task_status: TaskStatus[None]) -> None:
        """Run the backend's scheduler until cancelled.

        Raises:
            BackendError: the engine died; the run cannot go on.
        """
        ...

    async def generate(self, request: Request) -> Completion:
        """Generate for one request. Cancelling the caller aborts the request in the engine.

        Raises:
            Exception: the request failed (the model raised for it); other requests go on.
        """
        ...

    def memory_profile(self) -> MemoryProfile | None:
        """Weights and KV-cache sizes, or ``None`` when the backend manages its own memory."""
        ...

    def statistics(self) -> dict[str, Any] | None:
        """The backend's own figures for the run's metrics (the micro-batcher's ``batches``), a
        snapshot, or ``None`` when it has none."""
        ...

    def close(self) -> None:
        """Release the model."""
        ...


class ChatTokenizer:
    """``encode`` and ``encode_text`` through a Hugging Face tokenizer (``self.tokenizer``), for the
    backends that hold one (transformers, vLLM in process, a server's model's tokenizer)."""

    tokenizer: Any

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Tokenize plain text without special tokens."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids


class BackendBase:
    """Neutral defaults for the members of ``Backend`` that not every backend needs; a backend
    inherits them (as Ray Data's operators inherit optional hooks) instead of the pipeline probing
    with ``getattr``."""

    device: str = "cpu"

    def configure(self, *, max_batch_size: int, max_wait_s: float, max_batch_tokens: int | None) -> None:
        """Batching limits: ignored by a backend that does not micro-batch."""

    def memory_profile(self) -> MemoryProfile | None:
        """``None``: the backend manages its own memory (or holds no model)."""
        return None

    def statistics(self) -> dict[str, Any] | None:
        """``None``: no figures of its own."""
        return None

    def close(self) -> None:
        """Nothing to release."""
