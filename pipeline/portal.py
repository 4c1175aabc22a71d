"""A ``Pipeline`` held open for synchronous callers: its event loop runs in a background thread.

The Kaggle ``predict()`` (called by the gateway's thread) and a Ray Data actor (called once per
batch) both need one pipeline for their whole life, reached from plain blocking code. Both use
:class:`BackgroundPipeline`: it starts an anyio blocking portal, opens the pipeline in one task of
that loop (so the pipeline's task group lives in one task for its whole life, as anyio requires),
and ``close()`` ends that task and exits the portal, joining the thread.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import anyio
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from pipeline.config import Config

T = TypeVar("T")
log = structlog.get_logger("pipeline.portal")


class BackgroundPipeline:
    """One ``Pipeline`` (``config``, ``backend`` replacing the configured model) opened on a
    background event loop at once; the model loads there while the caller goes on.

    ``wait_ready()`` blocks until it is open (or failed to open: ``load_error``); ``call()`` and
    ``start_task_soon()`` run coroutine functions on its loop; ``close()`` (idempotent) closes the
    pipeline and joins the loop's thread.
    """

    def __init__(self, config: Config, backend: Any = None) -> None:
        self.config = config
        self.load_error: BaseException | None = None
        self._pipeline: Any = None
        self._ready = threading.Event()
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = start_blocking_portal()
        self._portal: BlockingPortal | None = self._portal_cm.__enter__()
        self._stopped = self._portal.call(anyio.Event)  # before any close() can look for it
        self._serving: Future[None] = self._portal.start_task_soon(self._serve, backend)

    async def _serve(self, backend: Any) -> None:
        from pipeline.api import Pipeline

        try:
            async with Pipeline(self.config, backend=backend) as p:
                self._pipeline = p
                self._ready.set()
                log.info("model loaded", model=p.backend.model_id)
                await self._stopped.wait()
        except BaseException as e:
            self.load_error = e
            log.error("the pipeline stopped", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            self._pipeline = None
            self._ready.set()

    @property
    def pipeline(self) -> Any:
        """The open ``Pipeline``, or ``None`` while loading, after a failure and after ``close()``."""
        return self._pipeline

    @property
    def alive(self) -> bool:
        """Whether the pipeline's task is still running (loading or open)."""
        return not self._serving.done()

    @property
    def ready(self) -> bool:
        """Whether loading has ended (with an open pipeline or a failure)."""
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the pipeline is open or failed to open; ``True`` once it can take problems."""
        self._ready.wait(timeout_s)
        return self._pipeline is not None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the pipeline's loop and wait for its result.

        Raises:
            RuntimeError: the pipeline was closed.
        """
        return self._live_portal().call(fn, *args)

    def start_task_soon(self, fn: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
        """Start ``fn(*args)`` on the pipeline's loop; its future (``cancel()`` cancels the task).

        Raises:
            RuntimeError: the pipeline was closed.
        """
        return self._live_portal().start_task_soon(fn, *args)

    def _live_portal(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeError("the background pipeline is closed")
        return self._portal

    def close(self, timeout_s: float = 60.0) -> None:
        """Close the pipeline (waiting up to ``timeout_s`` for the model to be released) and join the
        loop's thread. Safe to call more than once."""
        portal, portal_cm = self._portal, self._portal_cm
        if portal is None or portal_cm is None:
            return
        self._portal = self._portal_cm = None
        try:
            portal.call(self._stopped.set)
            self._serving.result(timeout=timeout_s)
        except BaseException as e:  # a failed load was logged already
            log.debug("pipeline ended", error=str(e))
        finally:
            portal_cm.__exit__(None, None, None)
