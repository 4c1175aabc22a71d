"""Fault injection helpers that must be importable by worker processes (so: a module, not a test)."""

from __future__ import annotations

import os

from stages.verification import Checked, check_answer


def crashing_check(texts: list[str], modulus: int | None, lo: int, hi: int) -> list[Checked]:
    """Like ``check_batch``, but the worker process dies hard on an output containing CRASH."""
    if any("CRASH" in t for t in texts):
        os._exit(11)
    return [check_answer(t, modulus=modulus, lo=lo, hi=hi) for t in texts]
