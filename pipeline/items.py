"""Re-exported from ``stages/items.py``, which lies below the runtime (``stages`` never imports
``pipeline``), as part of the public API."""

from stages.items import *  # noqa: F403
