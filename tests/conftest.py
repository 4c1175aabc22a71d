"""Shared fixtures: scripted-backend pipelines for mechanics, the real default model for integration."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator

import pytest

from pipeline.config import Config
from stages.backends.base import Backend


def small_config(**sections: dict) -> Config:
    """A config for fast tests: short waits, small queues, one verification worker."""
    base = Config().replace(
        batch={"max_wait_ms": 2.0, "max_batch_size": 8},
        run={"max_in_flight": 16, "verify_workers": 1},
        cache={"size": 0},
    )
    return base.replace(**sections) if sections else base


@pytest.fixture(scope="session")
def real_backend() -> Iterator[Backend]:
    """The bundled SmolLM2-135M model, loaded once per test session (float32: deterministic everywhere)."""
    from stages.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend.load(None, device="cpu", dtype="float32")
    yield backend
    backend.close()


class EarlyAnswers:
    """Wraps a real backend: samples 0 and 1 answer ``\\boxed{5}`` at once, every other sample asks the
    real model for a long story (thousands of tokens). With ``--early-stop 2`` the vote is decided while
    the real engine is still generating the others: the test of cancellation in a real engine."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.max_context = inner.max_context
        self.story = tuple(
            inner.encode([{"role": "user", "content": "Write a very long story about a dragon."}])
        )

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, messages):
        return self.inner.encode(messages)

    def encode_text(self, text):
        return self.inner.encode_text(text)

    async def serve(self, *, task_status):
        await self.inner.serve(task_status=task_status)

    async def generate(self, request):
        from dataclasses import replace

        import anyio

        from stages.backends.base import Completion

        if request.sample < 2:  # answer once the long samples are running in the engine
            await anyio.sleep(1.0)
            return Completion((1, 2), "\\boxed{5}", "answer")
        return await self.inner.generate(replace(request, prompt_ids=self.story))

    def memory_profile(self):
        return self.inner.memory_profile()

    def close(self) -> None:
        pass
