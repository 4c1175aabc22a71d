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
