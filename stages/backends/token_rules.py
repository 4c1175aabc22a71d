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

from stages.backends.base import BackendError, Completion, SamplingParams

if TYPE_CHECKING:
    from stages.backends.transformers_backend import TransformersBackend


class RowState:
    """What the model thread keeps per row while it decodes: the new token ids and their log-probs."""

    __slots__ = (
        "error",
        "finished",
        "generator",
        "logprobs",
        "low",
        "new",
        "params",
        "stop_tail",
        "top",
    )

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
        self.error: Exception | None = None  # the request's own rule (its watch) raised this


NUCLEUS_K = 64
"""Sampled rows look for their top-p nucleus among their 64 most likely tokens first (one ``topk``
instead of a sort of the whole vocabulary); a row whose nucleus is wider is sorted whole."""


def _sample_rows(scores: Any, rows: list[RowState]) -> list[int]:
    """One token per sampled row (``scores``: those rows' logits), drawn with the row's own settings.

    Temperature, then min-p (relative to the most likely token), then top-p on what min-p kept (as
    vLLM does); then one uniform number from the row's own generator picks the token by inverse CDF, so
    a seeded row draws the same whatever it is batched with. Vectorised over the rows.
    """
    import torch

    n, vocab = scores.shape
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32).unsqueeze(1)
    probs = torch.softmax(scores.float() / temps.to(scores.device), dim=-1)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=torch.float32, device=scores.device)
    if bool((min_p > 0).any()):
        floor = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < floor, 0.0, probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    u = torch.stack([torch.rand((), generator=r.generator, device=r.generator.device) for r in rows])
    u = u.to(scores.device).unsqueeze(1)
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float32, device=scores.device).unsqueeze(
        1
    )
    out = torch.empty(n, dtype=torch.long, device=scores.device)
    whole = (top_p >= 1).squeeze(1)
    if bool(whole.any()):  # no nucleus: the whole distribution
        cdf = probs[whole].cumsum(dim=-1)
        j = torch.searchsorted(cdf, u[whole] * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
        out[whole] = j.squeeze(1)
    rest = ~whole
    if bool(rest.any()):
        k = min(NUCLEUS_K, vocab)
        vals, idx = probs[rest].topk(k, dim=-1)  # sorted, most likely first
        p_rest = top_p[rest]
        if k < vocab:  # a nucleus wider than k: sort that row whole
            wide = (vals.sum(dim=-1, keepdim=True) <= p_rest).squeeze(1)
            if bool(wide.any()):
                vals_w, idx_w = torch.sort(probs[rest][wide], descending=True)
                vals = torch.cat([vals, vals.new_zeros(vals.shape[0], vocab - k)], dim=1)
                idx = torch.cat([idx, idx.new_zeros(idx.shape[0], vocab - k)], dim=1)
                vals[wide], idx[wide] = vals_w, idx_w
        kept = torch.where(vals.cumsum(dim=-1) - vals > p_rest, 0.0, vals)
        cdf = kept.cumsum(dim=-1)
        j = torch.searchsorted(cdf, u[rest] * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1)
        out[rest] = idx.gather(1, j).squeeze(1)
    return out.tolist()


def pick_tokens(scores: Any, states: Sequence[RowState | None]) -> list[int]:
    """Choose each row's next token (``scores``: one row of logits per state; a ``None`` state or a
    finished one takes the arg-max and records nothing). Appends the token to each live row's ``new``,
    records its log-probs and top-k row, and feeds its watch (``RowState.low`` when it says stop)."""
    import torch

    chosen = torch.argmax(scores, dim=-1)
    live = [(i, s) for i, s in enumerate(states) if s is not None and not s.finished]
    sampled = [(i, s) for i, s in live if s.generator is not None]
    if sampled:
        at = [i for i, _ in sampled]
        drawn = _sample_rows(scores[at], [s for _, s in sampled])
        chosen[at] = torch.tensor(drawn, device=chosen.device)
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
                try:
                    if watch is not None and watch.feed(row_top):
                        s.low = True
                except Exception as e:  # the request's own code: it fails that request alone
                    s.error = e
    tokens: list[int] = chosen.tolist()
    for i, s in live:
        s.new.append(tokens[i])
    return tokens


def end_of_row(backend: TransformersBackend, state: RowState) -> Completion | None:
    """The row's completion if it ends at its last token, else ``None``.

    Raises:
        BackendError: the request's watch raised (its error named).
    """
    if state.error is not None:
        raise BackendError(f"the request's watch failed: {state.error!r}") from state.error
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
