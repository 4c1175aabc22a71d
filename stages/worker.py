"""The worker process: ``python -m stages.worker``. Runs picklable calls sent by ``WorkerPool``.

Protocol, both ways: an ASCII length line (``b"123\\n"``) then that many bytes of pickle. A request is
``(function, args)``; a reply is ``("ok", value)`` or ``("error", exception)``. End of input ends the
process. The worker never imports the parent's ``__main__`` (unlike ``multiprocessing`` spawn or
``anyio.to_process``), so a user's script needs no ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from typing import Any, BinaryIO


def _reply(out: BinaryIO, status: str, value: Any) -> None:
    try:
        data = pickle.dumps((status, value), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # an unpicklable result or exception still gets an answer
        data = pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value!r} ({e})")))
    out.write(b"%d\n" % len(data))
    out.write(data)
    out.flush()


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer requests from ``inp`` on ``out`` until ``inp`` ends."""
    while True:
        header = inp.readline()
        if not header:
            return
        data = inp.read(int(header))
        try:
            func, args = pickle.loads(data)
            value = func(*args)
        except Exception as e:
            _reply(out, "error", e)
        else:
            _reply(out, "ok", value)


def main() -> None:
    """Entry point: protocol on the real stdin/stdout; anything the called code prints goes nowhere."""
    # Ctrl-C reaches the whole process group; the parent decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdin = open(os.devnull)
    sys.stdout = open(os.devnull, "w")
    serve(inp, out)


if __name__ == "__main__":
    main()
