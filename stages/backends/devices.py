"""Where and in what precision a model runs: ``auto`` device and dtype resolved from the machine (CUDA,
the CPU's bf16 units), and the quantisation modes each device offers. Shared by the transformers and
vLLM backends and the memory budget."""

from __future__ import annotations

from typing import Any

from stages.backends.base import BackendError


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


def quantization_kwargs(quantize: str, device: str) -> dict[str, Any]:
    """``from_pretrained`` keywords for a quantisation mode on a device.

    Raises:
        BackendError: the mode is not available there (named, with what would work).
    """
    if quantize not in ("int8", "int4"):
        return {}
    if device == "cpu":
        if quantize == "int4":
            raise BackendError(
                "--quantize int4 is not available on CPU with the transformers backend; use int8 (torch's "
                "dynamic quantisation), bf16 where the CPU has bf16 units, or a CUDA device with bitsandbytes"
            )
        return {}  # int8 on CPU: quantize_linear_int8 after loading
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise BackendError(
            f"--quantize {quantize} on CUDA needs bitsandbytes: pip install bitsandbytes "
            "(or use --backend vllm with --quantization / --kv-cache-dtype fp8)"
        )
    from transformers import BitsAndBytesConfig

    bnb = (
        BitsAndBytesConfig(load_in_8bit=True) if quantize == "int8" else BitsAndBytesConfig(load_in_4bit=True)
    )
    return {"quantization_config": bnb, "device_map": "cuda"}


def quantize_linear_int8(model: Any) -> Any:
    """torch's dynamic int8 quantisation of every ``nn.Linear`` (CPU): weights stored as int8, activations
    quantised on the fly. Returns the quantised model."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch marks its quantised tensor constructors deprecated
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
