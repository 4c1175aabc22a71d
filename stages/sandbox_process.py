"""One sandbox interpreter as the pipeline sees it: its process, its length-prefixed JSON protocol,
its set-up report, and a kill that cannot raise."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from stages.items import encodable
from stages.sandbox_launch import _remove_tree

START_TIMEOUT_S = 60.0
MAX_REPLY = 4 * 1024 * 1024
_GONE = (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.DelimiterNotFound)
_log = structlog.get_logger("pipeline.sandbox")


class SandboxError(RuntimeError):
    """The sandbox cannot start interpreters (the message says why)."""


@dataclass(frozen=True)
class CellResult:
    """What one code cell did: its printed output (capped; ``dropped`` characters more were printed),
    the last lines of its error (``None`` when it ran cleanly), and whether its interpreter was lost
    (a timeout, a crash, a cancelled cell: the sample's next cell starts from an empty namespace)."""

    output: str
    error: str | None
    dropped: int = 0
    seconds: float = 0.0
    restarted: bool = False

    @property
    def ok(self) -> bool:
        """True when the cell raised nothing and its interpreter survived."""
        return self.error is None

    def for_model(self, limit: int) -> str:
        """The text fed back to the model: output, a note on what was cut, the error's last lines."""
        parts = []
        out = self.output.rstrip("\n")
        if len(out) > limit:
            self_dropped = self.dropped + len(out) - limit
            out = out[:limit]
        else:
            self_dropped = self.dropped
        if out:
            parts.append(out)
        if self_dropped:
            parts.append(f"[... {self_dropped:,} more characters of output not shown]")
        if self.error:
            error = self.error if len(self.error) <= limit else "..." + self.error[-limit:]
            parts.append(error)
        return "\n".join(parts) if parts else "(no output)"


class Kernel:
    """One confined interpreter process (and, with the ``plain`` launcher, its host working directory)."""

    def __init__(
        self, process: Process, workdir: str | None, uid: int | None = None, errors: Any = None
    ) -> None:
        self.process = process
        self.errors = errors  # a temporary file with the launcher's standard error
        self.workdir = workdir
        self.uid = uid
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.layers: dict[str, str | None] = {}
        self.inside_workdir = ""

    async def _receive(self) -> dict[str, Any]:
        header = await self.stdout.receive_until(b"\n", 16)
        if not header.isdigit() or int(header) > MAX_REPLY:
            raise SandboxError(f"the interpreter broke the protocol (length line {header[:16]!r})")
        data = await self.stdout.receive_exactly(int(header))
        try:
            reply = json.loads(data)
        except (ValueError, RecursionError) as e:  # a forged reply is the cell's problem, not ours
            raise SandboxError(
                f"the interpreter broke the protocol (unreadable reply: {type(e).__name__})"
            ) from e
        if not isinstance(reply, dict):
            raise SandboxError("the interpreter broke the protocol (reply is not an object)")
        return reply

    def _stderr(self) -> str:
        """What the launcher said before it died (bwrap's reason): the last line of it."""
        if self.errors is None:
            return ""
        try:
            self.errors.seek(0)
            lines = self.errors.read(8192).decode("utf-8", "replace").strip().splitlines()
        except (OSError, ValueError):
            return ""
        return encodable(lines[-1][:300]) if lines else ""

    async def ready(self) -> None:
        """Wait for the kernel's set-up.

        Raises:
            SandboxError: it failed to set up, broke the protocol, or took over a minute.
        """
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                reply = await self._receive()
        except _GONE as e:
            with anyio.move_on_after(2):
                await self.process.wait()
            said = self._stderr()
            raise SandboxError(
                f"the interpreter exited during set-up (code {self.process.returncode})"
                + (f": {said}" if said else "")
            ) from e
        except TimeoutError as e:
            raise SandboxError(f"the interpreter took over {START_TIMEOUT_S:g} s to start") from e
        if not reply.get("ready"):
            raise SandboxError(f"the interpreter could not set up: {encodable(str(reply.get('error')))}")
        layers = reply.get("layers")
        self.layers = {str(k): (None if v is None else str(v)) for k, v in dict(layers or {}).items()}
        self.inside_workdir = str(reply.get("workdir", ""))

    def verify_uid(self) -> None:
        """From outside: the interpreter (the deepest process under the launcher) runs as its own uid.

        Raises:
            SandboxError: it does not.
        """
        if self.uid is None:
            return
        pid = self.process.pid
        for _ in range(4):  # bwrap, its pid-1 reaper, the interpreter
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    children = f.read().split()
            except OSError:
                break
            if not children:
                break
            pid = int(children[0])
        try:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration) as e:
            raise SandboxError(f"cannot read the interpreter's uid: {e}") from e
        if uids != [str(self.uid)] * 4:
            raise SandboxError(f"the interpreter does not run as its own uid {self.uid} (Uid {uids})")

    async def run(self, code: str, timeout_s: float) -> CellResult:
        """Run one cell.

        Raises:
            TimeoutError: the cell ran past ``timeout_s`` (the caller kills the kernel).
            SandboxError: the kernel died or broke the protocol.
        """
        data = json.dumps({"code": code}).encode("utf-8", "surrogatepass")
        started = time.perf_counter()
        try:
            with anyio.fail_after(timeout_s):
                await self.stdin.send(b"%d\n" % len(data) + data)
                reply = await self._receive()
        except _GONE as e:
            with anyio.move_on_after(1, shield=True):
                await self.process.wait()
            raise SandboxError(_death(self.process.returncode)) from e
        output, error, dropped = reply.get("output"), reply.get("error"), reply.get("dropped", 0)
        if not isinstance(output, str) or not (error is None or isinstance(error, str)):
            raise SandboxError("the interpreter broke the protocol (bad reply fields)")
        return CellResult(  # a lone surrogate from the cell would break every writer downstream
            output=encodable(output),
            error=None if error is None else encodable(error),
            dropped=max(0, dropped) if isinstance(dropped, int) else 0,
            seconds=time.perf_counter() - started,
        )

    async def kill(self) -> None:
        """Kill the kernel (with everything it started) and remove what it left on the host. Never
        raises; shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                for send in (lambda: os.killpg(self.process.pid, signal.SIGKILL), self.process.kill):
                    try:
                        send()
                        break
                    except (ProcessLookupError, PermissionError):
                        continue
            with anyio.move_on_after(10):
                await self.process.wait()
            with anyio.move_on_after(2):  # read to the end: the pipe closes now, not at loop close
                try:
                    while await self.stdout.receive(65536):
                        pass
                except (*_GONE, anyio.ClosedResourceError):
                    pass
            try:
                await self.process.aclose()
            except Exception as e:  # a kernel that will not close is still released
                _log.warning("a sandbox interpreter did not close", error=str(e))
            if self.errors is not None:
                self.errors.close()
            if self.workdir is not None:
                await anyio.to_thread.run_sync(_remove_tree, self.workdir)


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGXCPU":
            return "the cell used up its CPU-time limit; the interpreter was killed"
        return f"the interpreter was killed by {name}"
    return f"the interpreter exited (code {code})"
