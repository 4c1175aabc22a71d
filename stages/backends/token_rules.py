"""Per-row decoding rules shared by the transformers backend's two engines (static and continuous).

``pick_tokens`` chooses every row's next token with that row's own settings (greedy, or sampled with
its temperature, top-p, min-p and its own seeded generator, so a sample does not depend on what it was
batched with), records log-probabilities and top-k rows and feeds the request's watch. ``end_of_row``
says whether the row ends at the token just chosen: EOS, a stop token, a stop string, the first boxed
answer, the watch, or ``max_new_tokens``; it builds the completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stages.backends.base import Completion, SamplingParams

if TYPE_CHECKING:
    from stages.backends.transformers_backend import TransformersBackend


class RowState:
    """What the model thread keeps per row while it decodes: the new token ids and their log-probs."""

    __slots__ = ("finished", "generator", "logprobs", "low", "new", "params", "stop_tail", "top")

    def __init__(self, params: SamplingParams, device: str) -> None:
        import torch

        self.params = params
        self.finished = False
        self.new: list[int] = []
        self.generator: Any = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.top: list[tuple[float, ...]] | None = [] if params.top_logprobs else None
        self.low = False  # the request's watch stopped it at the last token
        # tokens to decode when looking for a stop string: enough to hold the longest one
        self.stop_tail = max((len(s) for s in params.stop), default=0) + 4


def _sample(scores: Any, p: SamplingParams, generator: Any) -> Any:
    import torch

    probs = torch.softmax(scores.float() / p.temperature, dim=-1)
    if p.min_p > 0:
        probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
        probs = probs / probs.sum()  # top-p below is on what min-p kept, as vLLM does
    if p.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        beyond = torch.cumsum(sorted_p, dim=-1) - sorted_p > p.top_p
        probs = probs.scatter(0, order, torch.where(beyond, 0.0, sorted_p))
    return torch.multinomial(probs, 1, generator=generator)[0]


def pick_tokens(scores: Any, states: Sequence[RowState | None]) -> list[int]:
    """Choose each row's next token (``scores``: one row of logits per state; a ``None`` state or a
    finished one takes the arg-max and records nothing). Appends the token to each live row's ``new``,
    records its log-probs and top-k row, and feeds its watch (``RowState.low`` when it says stop)."""
    import torch

    chosen = torch.argmax(scores, dim=-1)
    live = [(i, s) for i, s in enumerate(states) if s is not None and not s.finished]
    for i, s in live:
        if s.generator is not None:
            chosen[i] = _sample(scores[i], s.params, s.generator)
    want = [(i, s) for i, s in live if s.logprobs is not None or s.top is not None]
    if want:
        top_k = max(s.params.top_logprobs for _, s in want)
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        picked = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        top = torch.topk(log_probs, top_k, dim=-1).values.tolist() if top_k else None
        for i, s in want:
            if s.logprobs is not None:
                s.logprobs.append(picked[i])
            if s.top is not None and top is not None:
                s.top.append(row_top := tuple(top[i][: s.params.top_logprobs]))
                watch = s.params.watch
                if watch is not None and watch.feed(row_top):
                    s.low = True
    tokens: list[int] = chosen.tolist()
    for i, s in live:
        s.new.append(tokens[i])
    return tokens


def end_of_row(backend: TransformersBackend, state: RowState) -> Completion | None:
    """The row's completion if it ends at its last token, else ``None``."""
    p = state.params
    b = backend
    new = state.new
    last = new[-1]
    if state.low:  # the watch wins at its token, whatever else ends there
        return b.completion(new, "confidence", state.logprobs, top=state.top)
    if last in b.eos_ids:
        return b.completion(new, "eos", state.logprobs, top=state.top)
    if last in p.stop_token_ids:
        return b.completion(new, "token", state.logprobs, top=state.top, stop_token_ids=p.stop_token_ids)
    if p.stop or p.stop_at_answer:
        tail = b.tokenizer.decode(new[-state.stop_tail :], skip_special_tokens=True)
        if p.stop_at_answer and "}" in tail:
            completion = b.completion(new, "answer", state.logprobs, p.stop, top=state.top)
            if completion.finish_reason == "answer":
                return completion
        if p.stop and any(s in tail for s in p.stop):
            completion = b.completion(new, "stop", state.logprobs, p.stop, top=state.top)
            if completion.stop_string is not None:
                return completion
    if len(new) >= p.max_new_tokens:
        return b.completion(new, "length", state.logprobs, top=state.top)
    return None
