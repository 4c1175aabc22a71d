"""Units in settings' text: memory sizes (``16GiB``, ``8GB``, ``512MiB``) and durations (``5h``, ``1h30m``).

A setting names one of these as its flag's parser (``setting(..., parse=size_gib)`` in
``stages/settings.py``). They raise ``argparse.ArgumentTypeError``, whose message argparse prints as it is.
"""

from __future__ import annotations

import argparse
import math
import re

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|h|m|s)")


_SIZES = {
    "": 2**30,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def size_gib(text: str) -> float:
    """GiB from ``16GiB``, ``8GB``, ``512MiB``, ``1.5TiB`` or a bare number of GiB.

    Raises:
        argparse.ArgumentTypeError: anything else (the message shows the forms that work).
    """
    m = _SIZE.fullmatch(text.strip().lower())
    if m is None or m.group(2) not in _SIZES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; use e.g. 16GiB, 8GB, 512MiB (bare numbers: GiB)"
        )
    gib = float(m.group(1)) * _SIZES[m.group(2)] / 2**30
    if not math.isfinite(gib) or gib <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory budget must be positive")
    return gib


def duration(text: str) -> float:
    """Seconds from ``300``, ``90s``, ``15m``, ``5h``, ``1h30m`` or ``2.5h``.

    Raises:
        argparse.ArgumentTypeError: anything else (the message shows the forms that work).
    """
    t = text.strip().lower().replace(" ", "")
    try:
        seconds = float(t)
    except ValueError:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos or not t:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration; use seconds (300) or units: 90s, 15m, 5h, 1h30m"
            ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be a positive number of seconds")
    return seconds
