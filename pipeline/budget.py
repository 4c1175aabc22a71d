"""Re-exported from ``stages/budget.py``, which lies below the runtime (``stages`` never imports
``pipeline``), as part of the public API."""

from stages.budget import *  # noqa: F403
