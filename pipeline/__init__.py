"""aimo-pipeline: a bounded, resumable asyncio streaming pipeline from math problems to integer answers.

The public API: ``Pipeline`` (``async with Pipeline(cfg) as p: async for r in p.stream(problems)``),
``Config``, and the items ``Problem`` and ``Result``.
"""

from pipeline.api import Pipeline, PipelineError
from pipeline.config import Config, ConfigError
from pipeline.items import Problem, Result

__all__ = ["Config", "ConfigError", "Pipeline", "PipelineError", "Problem", "Result"]
__version__ = "0.1.0"
