"""Functions sent to worker processes by the tests (module level, so they pickle by reference)."""

from __future__ import annotations

import os
import time


def double(x: int) -> int:
    return 2 * x


def fail(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os._exit(3)


def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def pid() -> int:
    return os.getpid()
