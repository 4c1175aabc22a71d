"""Re-exported from ``stages/batching.py``, which lies below the runtime (``stages`` never imports
``pipeline``), as part of the public API."""

from stages.batching import *  # noqa: F403
