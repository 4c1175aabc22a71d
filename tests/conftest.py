"""Shared fixtures: scripted-backend pipelines for mechanics, the real default model for integration."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

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


def layered_config(base: dict, **sections: dict) -> Config:
    """``small_config`` with ``base``'s sections, each updated by ``sections``' keys."""
    merged = {k: dict(v) for k, v in base.items()}
    for k, v in sections.items():
        merged[k] = {**merged.get(k, {}), **v}
    return small_config(**merged)


def write_replay(path: Path, records: list[dict]) -> Path:
    """A replay file of ``records``, one JSON line each."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


async def solve_all(cfg: Config, backend: Backend, items: list) -> dict:
    """Every result of ``items`` through a fresh pipeline, by id (two minutes at most)."""
    import anyio

    from pipeline.api import Pipeline

    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(120):
            return {r.id: r async for r in p.stream(items)}


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
