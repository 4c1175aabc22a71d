"""aimo-pipeline: a bounded, resumable asyncio streaming pipeline from math problems to integer answers.

The public API: ``Pipeline``
(``async with Pipeline(cfg) as p, p.stream(problems) as results: async for r in results``),
``Config``, and the items ``Problem`` and ``Result``. Names are imported on first use, so a
verification worker process that needs only ``pipeline.items`` does not load the whole runtime.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# The forward pass runs off the event loop's thread. With OpenMP's default wait policy the threads of
# an idle OpenMP team keep spinning and take cores from the team doing the work; measured on a 2-core
# CPU, batched generate in a worker thread ran 0.80x as fast as on the main thread, and 1.12x with
# PASSIVE (bench/README.md). It only takes effect before torch starts OpenMP, and a value the user set
# wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if TYPE_CHECKING:
    from pipeline.api import Pipeline, PipelineError
    from pipeline.config import Config, ConfigError
    from pipeline.items import Problem, Result

__all__ = ["Config", "ConfigError", "Pipeline", "PipelineError", "Problem", "Result"]
__version__ = "0.1.0"

_HOMES = {
    "Pipeline": "pipeline.api",
    "PipelineError": "pipeline.api",
    "Config": "pipeline.config",
    "ConfigError": "pipeline.config",
    "Problem": "pipeline.items",
    "Result": "pipeline.items",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
