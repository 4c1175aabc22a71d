"""The command line's start-up without the cyclic garbage collector.

Importing torch and transformers and loading a model make millions of objects that live for the whole
run; each full collection during start-up walks all of them (7 collections, 0.6-0.75 s of a 5 s
one-problem run on a 2-core CPU, the same for a plain ``generate`` script). ``python -m pipeline``
owns its process, so it turns the collector off while it starts (``pause_gc``) and, once the model is
loaded, moves everything start-up made out of the collector's sight (``gc.freeze``) and turns it back
on (``resume_gc``); later collections only walk what the run itself makes. The library's own API
(``Pipeline``) never touches the collector: a program that embeds it owns its process.
"""

from __future__ import annotations

import gc
import os

_paused = False


def pause_gc() -> None:
    """Turn the collector off for start-up (unless it is off already, or ``PIPELINE_STARTUP_GC=1``)."""
    global _paused
    if gc.isenabled() and os.environ.get("PIPELINE_STARTUP_GC") != "1":
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """Start-up is over: freeze what it made and turn the collector back on (once; a no-op when
    ``pause_gc`` did not turn it off)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
