"""Continuous batching for the transformers backend, on transformers' own engine.

transformers' ``ContinuousBatchingManager`` (``generation/continuous_batching``) keeps a paged KV cache
and runs one decode step at a time over every request it holds: a request joins the running batch at
the next step after it arrives and leaves it the step after it ends, so a short answer never holds a
place until the longest row of its batch ends; prompt blocks with the same prefix are shared between
requests (the samples of one problem, a tool-integrated round that extends the text of the last).

The per-request rules stay ours (``token_rules``): the manager's logits-processor list is replaced,
before its thread starts, by ``_Choose``, which learns as each step's inputs are prepared which request
each row of logits belongs to (the requests with a new token, in batch order, as the manager reads
them), picks every row's token with that request's settings and seeded generator and returns scores
that are ``-inf`` except at that token, so the manager's greedy step takes exactly it. A row that ends
(EOS, stop token or string, boxed answer, watch, length) is delivered at once and, unless the manager
ends it itself, cancelled there: the manager drops it before its next step. A request whose caller has
gone is cancelled the same way (and skipped by ``_Choose`` if it is in the step being computed).

Faults: the manager's thread catches its own errors and fails every request it holds; a supervisor
thread reads those failures (and the manager's finished outputs, so none pile up) and hands each
waiting caller a ``BackendError``. When the manager's thread dies (an error in a step, out of memory),
every request it held fails with that error and a new manager starts for the requests after them, up
to ``MAX_RESTARTS`` times a serve; after that new requests fail at once with the error.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from stages.backends.base import BackendError, Completion, Request
from stages.backends.scheduler import Row, SchedulerStats, loop_poster
from stages.backends.token_rules import RowState, end_of_row, pick_tokens

if TYPE_CHECKING:
    from stages.backends.transformers_backend import TransformersBackend


class _Seq:
    """One request inside the manager: its row (delivery, abort flag) and its decoding state."""

    __slots__ = ("after_abort", "rid", "row", "state")

    def __init__(self, rid: str, row: Row, state: RowState) -> None:
        self.rid = rid
        self.row = row
        self.state = state
        self.after_abort = 0  # steps it was still computed in after its caller went


def _choose_class() -> type:
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessorList,
    )
    from transformers.generation.logits_process import LogitsProcessorList

    class _Choose(ContinuousBatchingLogitsProcessorList):
        """The manager's logits processing, replaced: our per-request token choice."""

        def __init__(self, engine: ContinuousEngine) -> None:
            super().__init__(LogitsProcessorList())
            self.engine = engine
            self.do_processing = True  # the manager calls us at every step
            self.order: list[str] = []

        def check_kwargs(self, kwargs: dict[str, Any]) -> None:
            return None

        def fill_defaults(self, int32_tensor: Any) -> None:
            return None

        def prepare_tensor_args(self, requests_in_batch: list[Any], arg_storage: Any) -> Any:
            self.order = [r.state.request_id for r in requests_in_batch if r.has_new_token]
            return arg_storage

        def __call__(self, input_ids: Any, scores: Any, logits_processor_args: Any) -> Any:
            return self.engine.choose(self.order, scores)

    return _Choose


class ContinuousEngine:
    """Requests in, completions out, over one ``ContinuousBatchingManager`` for the backend's model.

    ``max_requests``: the most requests decoding in one step; ``kv_tokens``: a cap on the paged cache's
    size in tokens (the memory plan's, or ``--max-batch-tokens``); the cache holds
    ``min(kv_tokens, max(16384, the model's context))`` tokens: each step's attention reads scale with
    the cache's size (on CPU a 64 Ki cache decoded at 0.6x the speed of a 16 Ki one), and 16 Ki tokens
    hold 16 requests of 1,000 tokens while one of the model's whole context still fits. A request
    that does not fit waits for room. ``step_tokens``: the most tokens (prompt chunks and decode
    tokens) in one forward pass.
    """

    DEFAULT_KV_TOKENS = 16384
    MAX_RESTARTS = 3

    def __init__(
        self,
        backend: TransformersBackend,
        *,
        max_requests: int = 16,
        kv_tokens: int | None = None,
        step_tokens: int = 1024,
        page_size: int = 64,
    ) -> None:
        self.backend = backend
        self.max_requests = max_requests
        self.kv_tokens = kv_tokens
        self.step_tokens = step_tokens
        self.page_size = page_size
        self.stats = SchedulerStats()
        self.steps = 0
        self.rows_stepped = 0
        self.seqs: dict[str, _Seq] = {}
        self._aborting: dict[str, _Seq] = {}  # cancelled by their callers, not yet seen to leave
        self.abort_steps: deque[int] = deque(maxlen=1000)  # per abort: steps computed after it
        self._ids = itertools.count()
        self._manager: Any = None
        self._post: Callable[..., object] | None = None
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._died: BaseException | None = None
        self.restarts = 0  # managers started again after one died, this serve
        self._serving = False

    # ---- the manager's thread ---------------------------------------------------------------------

    def choose(self, order: list[str], scores: Any) -> Any:
        """Pick every row's token (rows in ``order``); deliver the rows that end; cancel them."""
        import torch

        self.steps += 1
        self.rows_stepped += len(order)
        if self._aborting:
            aborting = dict(self._aborting)  # one copy: the event loop adds to it meanwhile
            present = set(order)
            for rid, gone in aborting.items():
                if rid in present:
                    gone.after_abort += 1
                else:
                    self._left(rid)
        seqs = [self.seqs.get(rid) for rid in order]
        states: list[RowState | None] = [
            None if seq is None or seq.state.finished else seq.state for seq in seqs
        ]
        tokens = pick_tokens(scores, states)
        for seq, state in zip(seqs, states, strict=True):
            if seq is not None and state is not None and not state.finished:
                try:
                    completion = end_of_row(self.backend, state)
                except Exception as e:
                    self._fail_row(seq, e)
                    continue
                if completion is not None:
                    self._end(seq, completion)
        if all(state is None or state.generator is None for state in states):
            return scores  # no row samples: the manager's own arg-max takes the same tokens
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, torch.tensor(tokens, device=scores.device).unsqueeze(1), 0.0)
        return out

    def _fail_row(self, seq: _Seq, error: Exception) -> None:
        seq.state.finished = True
        self.seqs.pop(seq.rid, None)
        seq.row.finish(BackendError(f"this request failed in the model's step: {error!r}"))
        manager = self._manager
        if manager is not None:
            manager.cancel_request(seq.rid)

    def _end(self, seq: _Seq, completion: Completion) -> None:
        seq.state.finished = True
        self.seqs.pop(seq.rid, None)
        self.stats.new_tokens += completion.new_tokens
        seq.row.finish(completion)
        # the manager ends a request itself at its EOS ids or its max_new_tokens; anything else it keeps
        # decoding until cancelled
        manager = self._manager
        if completion.finish_reason not in ("eos", "length") and manager is not None:
            manager.cancel_request(seq.rid)

    def _left(self, rid: str) -> None:
        """A cancelled request is no longer computed: count it (and how many steps that took)."""
        seq = self._aborting.pop(rid, None)
        if seq is not None:
            self.abort_steps.append(seq.after_abort)
            seq.row.drop()

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Build the manager and start its thread (blocking; call from a worker thread).

        Raises:
            BackendError: this transformers has no continuous batching, or the manager cannot start.
        """
        try:
            from transformers import ContinuousBatchingConfig, GenerationConfig
        except ImportError as e:
            raise BackendError(
                "this transformers has no continuous batching (transformers >= 5.19 has it); "
                "use --batching static"
            ) from e
        b = self.backend
        kv = self.cache_tokens
        blocks = max(4, -(-kv // self.page_size))
        settings = GenerationConfig(
            do_sample=False,
            max_new_tokens=b.max_context,
            eos_token_id=sorted(b.eos_ids),
            pad_token_id=b.pad_id,
            repetition_penalty=1.0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        cb = ContinuousBatchingConfig(
            page_size=self.page_size,
            num_blocks=blocks,
            max_batch_tokens=max(self.step_tokens, self.max_requests),
            max_requests_per_batch=self.max_requests,
            use_async_batching=False,
            use_cuda_graph=False,  # a captured graph would replay without our Python token choice
            allow_block_sharing=True,
        )
        try:
            manager = b.model.init_continuous_batching(
                generation_config=settings, continuous_batching_config=cb
            )
            manager.logit_processor = _choose_class()(self)
            manager.start()
        except Exception as e:
            raise BackendError(f"transformers' continuous batching could not start: {e}") from e
        self._manager = manager

    @property
    def cache_tokens(self) -> int:
        """The paged cache's size in tokens: ``min(kv_tokens, max(16384, the model's context))``."""
        kv = max(self.DEFAULT_KV_TOKENS, self.backend.max_context)
        return kv if self.kv_tokens is None else max(self.page_size, min(kv, self.kv_tokens))

    @property
    def busy(self) -> int:
        """Requests the engine holds: running, waiting, or cancelled and not yet seen to leave."""
        return len(self.seqs) + len(self._aborting)

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the manager and supervise it until cancelled; then stop it and fail what waits."""
        if self._serving:
            raise BackendError("the backend is already serving another pipeline")
        self._post = loop_poster()
        if self._post is None:
            raise BackendError("continuous batching runs on asyncio")
        self._serving = True
        try:
            await anyio.to_thread.run_sync(self.start)
            self._stopping.clear()
            self._died = None
            self.restarts = 0
            self._supervisor = threading.Thread(target=self._supervise, name="cb-supervisor", daemon=True)
            self._supervisor.start()
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._shutdown)

    @staticmethod
    def _discard(manager: Any) -> None:
        """Stop a manager's thread (what it held is failed by the caller); it restores the model's
        attention implementation."""
        manager.stop(block=True, timeout=30, hard_stop=True)

    def _shutdown(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:  # first: it may be starting a manager again
            self._supervisor.join(timeout=60)
            self._supervisor = None
        manager, self._manager = self._manager, None
        if manager is not None:
            self._discard(manager)
        self._serving = False
        self._fail_all(BackendError("the backend stopped before this request ended"))

    def _supervise(self) -> None:
        """Read the manager's outputs: failures go to their callers; finished ones are dropped."""
        manager = self._manager
        while not self._stopping.is_set():
            steps = self.steps
            out = manager.get_result(timeout=0.1)
            if out is None:
                if self.steps == steps:  # no step for a while: nothing cancelled is being computed
                    for rid in list(self._aborting):
                        self._left(rid)
                if not manager.is_running() and not self._stopping.is_set():
                    fatal = manager.background_thread_status.fatal_error or RuntimeError("its thread stopped")
                    self._fail_all(BackendError(f"the continuous batching engine died: {fatal}"))
                    if self.restarts >= self.MAX_RESTARTS:
                        self._died = fatal
                        return
                    self.restarts += 1  # what it held has failed; later requests get a new manager
                    try:
                        self._discard(manager)
                        if self._stopping.is_set():
                            return
                        self.start()
                    except BackendError as e:
                        self._died = e
                        return
                    manager = self._manager
                continue
            error = getattr(out, "error", None)
            if error:
                seq = self.seqs.pop(out.request_id, None)
                if seq is not None:
                    seq.state.finished = True
                    seq.row.finish(BackendError(f"the model failed for this request: {error}"))

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._aborting):
            self._left(rid)
        for rid in list(self.seqs):
            seq = self.seqs.pop(rid, None)
            if seq is not None:
                seq.state.finished = True
                seq.row.finish(error)

    # ---- the event loop ---------------------------------------------------------------------------

    async def generate(self, request: Request) -> Completion:
        """Add ``request`` to the running batch and wait for its completion; cancelling cancels it there.

        Raises:
            BackendError: the engine is not serving, or it died (its error named).
        """
        manager = self._manager
        if manager is None or not self._serving:
            raise BackendError("the backend is not serving: it was stopped or never started")
        if self._died is not None:
            raise BackendError(f"the continuous batching engine died: {self._died}")
        p = request.params
        need = len(request.prompt_ids) + p.max_new_tokens
        if need > self.cache_tokens:
            raise BackendError(
                f"the request needs {need} tokens of cache (prompt {len(request.prompt_ids)} + "
                f"max_new_tokens {p.max_new_tokens}) and the continuous engine's paged cache holds "
                f"{self.cache_tokens}: raise --max-batch-tokens or --memory-budget, or lower --max-new-tokens"
            )
        rid = f"r{next(self._ids)}"
        row = Row(request, self.stats, self._post)
        seq = _Seq(rid, row, RowState(request.params, self.backend.device))
        self.seqs[rid] = seq
        self.stats.rows += 1
        self.stats.prompt_tokens += len(request.prompt_ids)
        added = manager.add_request(
            input_ids=list(request.prompt_ids),
            request_id=rid,
            max_new_tokens=p.max_new_tokens,
            eos_token_id=sorted(self.backend.eos_ids),
        )
        if added is None:
            self.seqs.pop(rid, None)
            fatal = manager.background_thread_status.fatal_error
            if fatal is not None:
                raise BackendError(f"the continuous batching engine died: {fatal}")
            raise BackendError("the continuous batching engine is stopping: it takes no new requests")

        def cancel() -> None:  # the caller has gone: out of the manager before its next step
            if self.seqs.pop(rid, None) is not None:
                seq.state.finished = True
                self._aborting[rid] = seq
                manager.cancel_request(rid)

        return await row.wait(on_abort=cancel)

    def statistics(self) -> dict[str, Any] | None:
        """Figures for the run's metrics (``None`` before the first request)."""
        s = self.stats
        if not s.rows:
            return None
        return {
            "engine": "continuous",
            "rows": s.rows,
            "steps": self.steps,
            "mean_rows": round(self.rows_stepped / max(1, self.steps), 2),
            "aborted": s.aborted,
        }
