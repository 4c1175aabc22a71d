"""The worker process: ``python -m stages.pool_worker``. Runs picklable calls sent by ``WorkerPool``.

Protocol, both ways: an ASCII length line (``b"123\\n"``) then that many bytes of pickle. A request is
``(function, args)``; a reply is ``("ok", value)`` or ``("error", exception)``. End of input ends the
process. The worker never imports the parent's ``__main__`` (unlike ``multiprocessing`` spawn or
``anyio.to_process``), so a user's script needs no ``if __name__ == "__main__"`` guard.

The protocol runs on private duplicates of file descriptors 0 and 1, and those two descriptors are
pointed at ``/dev/null``: whatever the called code reads or writes there (``print``, ``input``, a C
extension's ``printf``, ``os.write(1, ...)``) cannot touch the protocol.
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
    """Entry point: the protocol on private copies of the pipes the parent gave as stdin and stdout;
    descriptors 0 and 1 then read and write ``/dev/null``, so the called code cannot touch the protocol."""
    # Ctrl-C reaches the whole process group; the parent decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    inp_fd, out_fd = os.dup(0), os.dup(1)  # not inherited by processes the called code starts
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    # sys.stdin / sys.stdout still wrap descriptors 0 and 1, which now lead to /dev/null
    with os.fdopen(inp_fd, "rb") as inp, os.fdopen(out_fd, "wb") as out:
        serve(inp, out)


if __name__ == "__main__":
    main()
