"""The default backend: a Hugging Face transformers causal LM, on one of two engines.

``continuous`` (the default; ``stages.backends.continuous``): transformers' own paged continuous
batching; a request joins the running batch at the next decode step and leaves it the step after it
ends, and requests sharing a prompt prefix share its cache blocks. ``static`` (``--batching static``):
requests are micro-batched (``stages.backends.scheduler``: size, token cap, wait, length grouping) and
a batch runs as one left-padded ``model.generate`` in one thread; a stopping criterion delivers each
row as it ends and drops rows whose caller has gone, ending the batch when all its rows are gone.

On both, each request keeps its own settings (``stages.backends.token_rules``): every row's token is
picked with the row's own rules (greedy, or sampled with its temperature, top-p, min-p and its own
seeded generator, so a sample does not depend on what it was batched with), with log-probabilities,
top-k rows, stop strings, stop tokens, the boxed answer and the confidence watch.

Reproducibility: a seeded sample draws the same random numbers whatever its batch, but the logits
themselves can differ in the last bits with the batch's padding and shape (most visibly in bf16), so a
rerun is identical only with the same batching and arrival order. In float32 on CPU the tests' runs
were identical alone, batched and on both engines; under heavy mixed load about 1 sampled draw in a
few thousand flips with that drift (log-probs moved by about 1e-5), on either engine.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from stages.backends.base import (
    DTYPE_BYTES,
    BackendBase,
    BackendError,
    ChatTokenizer,
    Completion,
    FinishReason,
    MemoryProfile,
    Request,
    kv_bytes_per_token,
)
from stages.backends.continuous import ContinuousEngine
from stages.backends.devices import choose_device_dtype, quantization_kwargs, quantize_linear_int8
from stages.backends.models import resolve_model
from stages.backends.scheduler import BatchScheduler, Row, SchedulerStats
from stages.backends.token_rules import RowState, end_of_row, pick_tokens
from stages.prompting import finish_text


class _PickTokens:
    """Logits processor: chooses each row's next token with that row's own settings (``pick_tokens``).

    The returned scores are ``-inf`` except at the chosen token, so ``generate``'s greedy step takes
    exactly that token.
    """

    def __init__(self, states: list[RowState]) -> None:
        self.states = states
        self.plain = all(s.generator is None for s in states)  # no row samples

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        tokens = pick_tokens(scores, self.states)
        if self.plain:
            return scores  # all greedy: generate's own arg-max picks the same tokens
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, torch.tensor(tokens, device=scores.device).unsqueeze(1), 0.0)
        return out


class _EndRows:
    """Stopping criterion: ends each row by ``end_of_row``; delivers its completion at once; drops rows
    whose caller has gone. The batch ends when every row has ended."""

    def __init__(self, backend: TransformersBackend, rows: list[Row], states: list[RowState]):
        self.backend = backend
        self.rows = rows
        self.states = states

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for i, (row, state) in enumerate(zip(self.rows, self.states, strict=True)):
            if not state.finished:
                if row.aborted:
                    state.finished = True
                    row.drop()
                else:
                    try:
                        completion = end_of_row(self.backend, state)
                    except BackendError as e:  # this row's own rule failed: it alone ends with it
                        state.finished = True
                        row.finish(e)
                        completion = None
                    if completion is not None:
                        state.finished = True
                        row.finish(completion)
            done[i] = state.finished
        return done


CONTINUOUS_TRIED = ((5, 19), (5, 25))
"""The transformers releases (major, minor) the continuous engine was tried on: ``auto`` picks it there."""


def choose_batching(mode: str, *, device: str = "cpu", sampled: bool = True) -> str:
    """Resolve ``auto``: ``continuous`` on a transformers release in ``CONTINUOUS_TRIED`` (the engine
    hooks into its continuous batching's logits processing) where it pays: on CUDA, or for a run whose
    rows end at different lengths and outnumber the batch's places (``sampled``: several samples per
    problem, or tool-integrated rounds). On a CPU a run of one greedy answer per problem gets
    ``static``: there transformers' paged attention packs a step's requests into one masked sequence
    and measured 0.87-0.92x the static batch's speed when rows run to the same length, and more at
    start-up. Each fallback is said in the log."""
    if mode != "auto":
        return mode
    import transformers

    log = logging.getLogger("pipeline")
    m = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    found = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    low, high = CONTINUOUS_TRIED
    if not low <= found <= high:
        log.info(
            "transformers %s: static batches (continuous batching was tried on %d.%d to %d.%d; "
            "--batching continuous to try it here)",
            transformers.__version__,
            *low,
            *high,
        )
        return "static"
    if device.startswith("cuda") or sampled:
        return "continuous"
    log.info(
        "one answer per problem on %s: static batches (continuous batching pays when samples end at "
        "different lengths; --batching continuous to use it anyway)",
        device,
    )
    return "static"


class TransformersBackend(ChatTokenizer, BackendBase):
    """A causal LM from a local folder. Build it with ``TransformersBackend.load``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str,
        dtype: str,
        model_id: str,
        batching: str = "auto",
        sampled: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.model_id = f"{model_id}|{dtype}"
        config = model.config
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = {eos} if isinstance(eos, int) else set(eos or [])
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            self.eos_ids.add(gen_eos)
        elif gen_eos:
            self.eos_ids.update(gen_eos)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab_size = int(getattr(text_config, "vocab_size", None) or len(tokenizer))
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids)
        self.batching = batching = choose_batching(batching, device=device, sampled=sampled)
        self.scheduler = BatchScheduler(self._run_batch, is_out_of_memory=self.is_out_of_memory)
        self.engine: ContinuousEngine | None = ContinuousEngine(self) if batching == "continuous" else None

    @classmethod
    def load(
        cls,
        path: str | None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str = "none",
        batching: str = "auto",
        sampled: bool = True,
    ) -> TransformersBackend:
        """Load a model (blocking; seconds). ``path`` as in ``resolve_model``; ``quantize`` as in
        ``ModelConfig``; ``batching``: ``continuous`` (transformers' paged continuous batching,
        ``stages.backends.continuous``), ``static`` (the micro-batcher, one ``generate`` per batch) or
        ``auto`` (``choose_batching``, told by ``sampled`` whether the run samples several answers per
        problem or runs tools).

        Raises:
            BackendError: the model is missing, is not a model, cannot be loaded, or the quantisation
                mode is not available on the device (the message says what is).
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if quantize in ("fp16", "bf16"):
            dtype = {"fp16": "float16", "bf16": "bfloat16"}[quantize]
        device, dtype = choose_device_dtype(device, dtype)
        extra = quantization_kwargs(quantize, device)
        if quantize in ("int8", "int4") and device == "cpu":
            dtype = "float32"  # dynamic int8 quantises float32 linear layers
        folder, model_id = resolve_model(path)
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), **extra)
            if not extra:
                model = model.to(device)  # type: ignore[arg-type]
            model.eval()
            if quantize == "int8" and device == "cpu":
                model = quantize_linear_int8(model)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"cannot load the model from {folder}: {e}") from e
        if quantize in ("int8", "int4"):
            model_id = f"{model_id}|{quantize}"
        return cls(
            model,
            tokenizer,
            device=device,
            dtype=dtype,
            model_id=model_id,
            batching=batching,
            sampled=sampled,
        )

    @property
    def folder(self) -> Path:
        """Where the weights were loaded from."""
        return Path(self.model.name_or_path)

    def configure(self, *, max_batch_size: int, max_wait_s: float, max_batch_tokens: int | None) -> None:
        """Set the batching limits (before ``serve``): continuous batching takes the batch size as the
        most requests per step and the token cap as a cap on its paged cache; ``max_wait_s`` is the
        micro-batcher's alone."""
        self.scheduler.configure(max_size=max_batch_size, max_wait_s=max_wait_s, max_tokens=max_batch_tokens)
        if self.engine is not None:
            self.engine.max_requests = max_batch_size
            self.engine.kv_tokens = max_batch_tokens

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the engine (continuous batching, or the micro-batching loop) until cancelled."""
        if self.engine is not None:
            await self.engine.serve(task_status=task_status)
        else:
            await self.scheduler.serve(task_status=task_status)

    async def generate(self, request: Request) -> Completion:
        """Generate for one request (batched with others); cancelling aborts it within a decode step.

        Raises:
            BackendError: the backend is not serving, or the request did not fit in memory alone.
            Exception: the model raised for this request.
        """
        self._check(request)
        if self.engine is not None:
            return await self.engine.generate(request)
        return await self.scheduler.generate(request)

    def _check(self, request: Request) -> None:
        """Refuse, by name, a request the model cannot take (before it reaches a shared batch)."""
        ids = request.prompt_ids
        if not ids:
            raise BackendError(f"request {request.id}: the prompt is empty")
        vocab = self.vocab_size
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab:
            raise BackendError(
                f"request {request.id}: prompt token id {low if low < 0 else high} is outside the "
                f"model's vocabulary (0..{vocab - 1})"
            )
        if request.params.top_logprobs > vocab:
            raise BackendError(
                f"request {request.id}: top_logprobs {request.params.top_logprobs} is more than the "
                f"vocabulary's {vocab} tokens"
            )

    def completion(
        self,
        new: list[int],
        reason: str,
        logprobs: list[float] | None = None,
        stop: tuple[str, ...] = (),
        *,
        top: list[tuple[float, ...]] | None = None,
        stop_token_ids: tuple[int, ...] = (),
    ) -> Completion:
        """A row's completion from its new token ids and their log-probs (from the model thread).

        ``eos``: the ids end at the first EOS; ``token``: at the first of ``stop_token_ids`` (finish
        reason ``stop``, the text without that token, as vLLM's); ``stop``: the text ends before the
        first stop string (``stop_string`` stays ``None`` when none of ``stop`` is in the text).
        """
        n = len(new)
        ends = self.eos_ids if reason == "eos" else set(stop_token_ids) if reason == "token" else set()
        n = next((i + 1 for i, t in enumerate(new) if t in ends), n)
        ids = tuple(new[:n])
        lp = tuple(logprobs[:n]) if logprobs is not None else None
        tp = tuple(top[:n]) if top is not None else None
        if reason == "token" and ids and ids[-1] in ends:
            text = self.tokenizer.decode(list(ids[:-1]), skip_special_tokens=True)
            return Completion(ids, text, "stop", logprobs=lp, stop_token=ids[-1], top_logprobs=tp)
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if reason in ("answer", "stop"):  # only the rule asked for ends it here; else it ran out
            cut, how, found = finish_text(text, stop, at_answer=reason == "answer")
            if how != reason:
                return Completion(ids, text, "length", logprobs=lp, top_logprobs=tp)
            return Completion(ids, cut, how, stop_string=found, logprobs=lp, top_logprobs=tp)
        ended: FinishReason = (
            "eos" if reason == "eos" else "confidence" if reason == "confidence" else "length"
        )
        return Completion(ids, text, ended, logprobs=lp, top_logprobs=tp)

    def _run_batch(self, rows: list[Row]) -> None:
        """Left-pad the rows into one batch and run ``model.generate`` once (in the model thread)."""
        import torch
        from transformers import GenerationConfig

        ids, mask, _ = left_pad([r.request.prompt_ids for r in rows], self.pad_id)
        states = [RowState(r.request.params, self.device) for r in rows]
        settings = GenerationConfig(
            max_new_tokens=max(r.request.params.max_new_tokens for r in rows),
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            # neutral, so the model's own generation_config cannot reshape the scores before
            # _PickTokens (the request's settings are the only ones, as on vLLM)
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=settings,
                logits_processor=[_PickTokens(states)],
                stopping_criteria=[_EndRows(self, rows, states)],
            )
        for row, state in zip(rows, states, strict=True):
            if not state.finished and not row.aborted:
                state.finished = True
                limit = row.request.params.max_new_tokens
                row.finish(self.completion(state.new[:limit], "length", state.logprobs, top=state.top))

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """CUDA out-of-memory, or the CPU allocator failing."""
        import torch

        if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
            return True
        return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)

    def memory_profile(self) -> MemoryProfile:
        """Measured weight bytes; KV bytes per token from the config (2 x layers x kv heads x head dim)."""
        weights = sum(t.numel() * t.element_size() for t in self.model.parameters())
        weights += sum(t.numel() * t.element_size() for t in self.model.buffers())
        for module in self.model.modules():  # int8 linear layers keep packed weights, not parameters
            packed = getattr(module, "_packed_params", None)
            if packed is not None and callable(getattr(module, "weight", None)):
                w = module.weight()
                weights += w.numel() * w.element_size()
        kv = kv_bytes_per_token(self.model.config, DTYPE_BYTES[self.dtype])
        return MemoryProfile(weights_bytes=weights, kv_bytes_per_token=kv)

    def statistics(self) -> dict[str, Any] | None:
        """The engine's figures (``None`` before its first request)."""
        if self.engine is not None:
            return self.engine.statistics()
        return self.scheduler.statistics()

    def on_engine(self, batching: str) -> TransformersBackend:
        """This loaded model and tokenizer behind another engine (``continuous`` or ``static``): for
        side-by-side measurements; serve one of the two at a time."""
        return TransformersBackend(
            self.model,
            self.tokenizer,
            device=self.device,
            dtype=self.dtype,
            model_id=f"{self.model_id}|{batching}",
            batching=batching,
        )

    @property
    def stats(self) -> SchedulerStats:
        """The engine's counters (rows, tokens, aborts and their latencies)."""
        return self.engine.stats if self.engine is not None else self.scheduler.stats

    @property
    def busy(self) -> int:
        """Requests the engine is still computing (or holding) now."""
        return self.engine.busy if self.engine is not None else len(self.scheduler.running)

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        import torch

        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any, int]:
    """Input ids and attention mask, prompts right-aligned with ``pad_id`` on their left; the width."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
    return ids, mask, width
