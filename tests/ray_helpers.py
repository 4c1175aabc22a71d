"""Backends built inside Ray actors by the Ray tests (``RayOptions.backend = "tests.ray_helpers:..."``)."""

from __future__ import annotations

import os
from pathlib import Path

from stages.backends.fake import FakeBackend


def fake() -> FakeBackend:
    """The scripted model (answers the sum of the numbers in the problem)."""
    return FakeBackend(record=False)


class _DiesOnce(FakeBackend):
    async def generate(self, request):
        marker = Path(os.environ["PIPELINE_TEST_DIE_MARKER"])
        if not marker.exists():  # the first request anywhere on the cluster kills its actor's process
            marker.write_text(str(os.getpid()))
            os._exit(1)
        return await super().generate(request)


def dies_once() -> FakeBackend:
    """A scripted model whose first request kills the actor process it runs in (once per cluster)."""
    return _DiesOnce(record=False)


class _AlwaysDies(FakeBackend):
    async def generate(self, request):
        text = "".join(map(chr, request.prompt_ids))
        if "poison" in text:  # this problem kills every actor that tries it
            os._exit(1)
        return await super().generate(request)


def poison() -> FakeBackend:
    """A scripted model that dies on any problem mentioning "poison", every time."""
    return _AlwaysDies(record=False)
