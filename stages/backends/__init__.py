"""Model backends: one protocol (``base.Backend``), transformers (default), vllm (extra), fake (tests)."""

from stages.backends.base import (
    Backend,
    BackendError,
    Completion,
    FinishReason,
    MemoryProfile,
    Request,
    SamplingParams,
    sample_seed,
)

__all__ = [
    "Backend",
    "BackendError",
    "Completion",
    "FinishReason",
    "MemoryProfile",
    "Request",
    "SamplingParams",
    "sample_seed",
]
