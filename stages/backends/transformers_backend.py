"""The default backend: a Hugging Face transformers causal LM, batched ``generate`` with left padding."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stages.backends.base import BackendError, MemoryProfile, Output, SamplingParams
from stages.backends.models import resolve_model

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    Without them bf16 on CPU is emulated and slower than float32.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def choose_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """Resolve ``auto`` settings: CUDA with bf16 (fp16 where bf16 is missing); on CPU bf16 where the
    processor has native bf16 units, else float32.

    Raises:
        BackendError: ``cuda`` was asked for and none is available.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda was given but no CUDA device is available")
    if dtype == "auto":
        if device == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    return device, dtype


class TransformersBackend:
    """A causal LM from a local folder. Build it with ``TransformersBackend.load``."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str, dtype: str, model_id: str) -> None:
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
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids)

    @classmethod
    def load(cls, path: str | None, *, device: str = "auto", dtype: str = "auto") -> TransformersBackend:
        """Load a model (blocking; seconds). ``path`` as in ``resolve_model``.

        Raises:
            BackendError: the model is missing, is not a model, or cannot be loaded.
        """
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder, model_id = resolve_model(path)
        device, dtype = choose_device_dtype(device, dtype)
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
            model = model.to(device)  # type: ignore[arg-type]
            model.eval()
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"cannot load the model from {folder}: {e}") from e
        return cls(model, tokenizer, device=device, dtype=dtype, model_id=model_id)

    @property
    def folder(self) -> Path:
        """Where the weights were loaded from."""
        return Path(self.model.name_or_path)

    def encode(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Apply the chat template (with the generation prompt) and tokenize."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Output]:
        """Left-pad the prompts into one batch and run ``model.generate`` once."""
        import torch
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
                mask[row, width - len(prompt) :] = 1
        settings: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": not params.greedy,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids),
        }
        if not params.greedy:
            settings.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=GenerationConfig(**settings),
            )
        outputs = []
        for row in out[:, width:].tolist():
            n = len(row)
            for i, tok in enumerate(row):
                if tok in self.eos_ids:
                    n = i + 1
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            outputs.append(Output(text=text, new_tokens=n))
        return outputs

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
        c = self.model.config
        layers = int(c.num_hidden_layers)
        heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        kv = 2 * layers * heads * head_dim * _DTYPE_BYTES[self.dtype]
        return MemoryProfile(weights_bytes=weights, kv_bytes_per_token=kv)

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        import torch

        self.model = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
