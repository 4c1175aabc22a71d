"""Re-exported from ``stages/config.py``, which lies below the runtime (``stages`` never imports
``pipeline``), as part of the public API."""

from stages.config import *  # noqa: F403
