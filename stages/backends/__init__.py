"""Model backends behind one small protocol (``Backend``)."""

from stages.backends.base import Backend, BackendError, MemoryProfile, Output, SamplingParams

__all__ = ["Backend", "BackendError", "MemoryProfile", "Output", "SamplingParams"]
