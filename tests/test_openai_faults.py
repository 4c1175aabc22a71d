"""The server backend against a misbehaving OpenAI-compatible server: a small HTTP server written here
on loopback (no vLLM), which answers each request the way its prompt's first token id says: a good
stream, malformed JSON, a 500 then OK, a 400, a hang, a dropped connection, too many tokens, no
log-probs. Every misbehaviour must be one request's error (or a retry), never a hang, and the number of
requests open at the server must stay within ``model.api_concurrency``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from stages.backends.base import Request, SamplingParams
from stages.backends.openai_backend import OpenAIBackend, ServerError

pytestmark = pytest.mark.anyio

OK, BAD_JSON, FAIL_ONCE, REFUSE, HANG, DROP, TOO_MANY, NO_LOGPROBS, SLOW, HANG_HEADERS, NO_FINISH = range(
    1, 12
)


class Tok:
    """Enough of a tokenizer for a server that does not send token ids: one id per character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


def chunk(text: str, ids: list[int], finish: str | None = None, lp: Any = None, **extra: Any) -> dict:
    choice = {"index": 0, "text": text, "token_ids": ids, "logprobs": lp, "finish_reason": finish, **extra}
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [choice]}


def start_events(writer: asyncio.StreamWriter) -> Callable[[str], None]:
    """Write a server-sent-events response's head; returns the function that writes one event."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )

    def event(payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        writer.write(b"%x\r\n" % len(data) + data + b"\r\n")

    return event


class Server:
    def __init__(self) -> None:
        self.open = 0
        self.peak = 0
        self.hits: dict[int, int] = {}
        self.closed_early = 0
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                _, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b""):
                    k, v = h.decode().split(":", 1)
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if path.endswith("/models"):
                    data = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                        % len(data)
                        + data
                    )
                    await writer.drain()
                    continue
                await self.complete(json.loads(body), reader, writer)
                return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def complete(self, body: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = body["prompt"][0]
        n = self.hits[mode] = self.hits.get(mode, 0) + 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            if mode == HANG_HEADERS:
                await hang(reader)
                return
            if mode == REFUSE or (mode == FAIL_ONCE and n == 1):
                code = b"400 Bad Request" if mode == REFUSE else b"500 Internal Server Error"
                data = json.dumps({"error": {"message": "no", "type": "x", "code": 1}}).encode()
                writer.write(
                    b"HTTP/1.1 "
                    + code
                    + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % len(data)
                    + data
                )
                await writer.drain()
                return
            event = start_events(writer)
            lp = None
            if body.get("logprobs") is not None and mode != NO_LOGPROBS:
                lp = {
                    "tokens": ["a"],
                    "token_logprobs": [-0.5],
                    "top_logprobs": [{"a": -0.5, "b": -1.5}],
                    "text_offset": [0],
                }
            if mode == BAD_JSON:
                event("{this is not json")
            elif mode == TOO_MANY:
                for i in range(50):
                    event(json.dumps(chunk("w ", [100 + i], lp=lp)))
                event(json.dumps(chunk("", [], finish="length")))
            else:
                event(json.dumps(chunk("hello ", [10], lp=lp)))
                await writer.drain()
                if mode == SLOW:
                    await asyncio.sleep(0.05)
                if mode == HANG:
                    await hang(reader)
                    return
                if mode == DROP:
                    writer.transport.abort()
                    return
                if mode != NO_FINISH:
                    event(json.dumps(chunk("world", [11], finish="stop", lp=lp, stop_reason=None)))
            event("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except asyncio.CancelledError:
            self.closed_early += 1
            raise
        finally:
            self.open -= 1


async def hang(reader: asyncio.StreamReader) -> None:
    """Send nothing more; return when the client has closed the connection."""
    with anyio.fail_after(3600):
        while await reader.read(1024):
            pass


def backend(url: str, concurrency: int = 8, tries: int = 3) -> OpenAIBackend:
    return OpenAIBackend(
        Tok(),
        base_url=url,
        api_model="m",
        concurrency=concurrency,
        tries=tries,
        backoff_s=0.01,
        max_context=4096,
    )


def req(mode: int, i: int = 0, **params: Any) -> Request:
    p = SamplingParams(**{"max_new_tokens": 5, **params})
    return Request(id=f"r{i}", prompt_ids=(mode, 7, 7), params=p)


async def test_a_good_stream_and_a_500_that_is_retried():
    async with Server() as s:
        b = backend(s.url)
        with anyio.fail_after(20):
            c = await b.generate(req(OK))
            assert c.text == "hello world" and c.token_ids == (10, 11) and c.finish_reason == "eos"
            c = await b.generate(req(FAIL_ONCE))
        assert c.text == "hello world" and s.hits[FAIL_ONCE] == 2 and b.counts["retries"] == 1


async def test_a_400_is_not_retried_and_names_the_status():
    async with Server() as s:
        b = backend(s.url)
        with anyio.fail_after(20), pytest.raises(ServerError, match="400"):
            await b.generate(req(REFUSE))
        assert s.hits[REFUSE] == 1


@pytest.mark.parametrize("mode", [BAD_JSON, DROP, NO_FINISH])
async def test_a_broken_stream_is_this_requests_error_after_bounded_tries(mode):
    async with Server() as s:
        b = backend(s.url, tries=3)
        with anyio.fail_after(30), pytest.raises(ServerError):
            await b.generate(req(mode))
        assert 1 <= s.hits[mode] <= 3
        assert b.open == 0


@pytest.mark.parametrize("mode", [HANG, HANG_HEADERS])
async def test_a_hung_server_respects_the_callers_timeout_and_the_connection_is_closed(mode):
    async with Server() as s:
        b = backend(s.url)
        started = anyio.current_time()
        with anyio.move_on_after(1.0) as scope:
            await b.generate(req(mode))
        assert scope.cancelled_caught and anyio.current_time() - started < 3.0
        assert b.open == 0
        with anyio.fail_after(5):
            while s.open:  # the server sees the client go away
                await anyio.sleep(0.02)


async def test_more_tokens_than_max_tokens_are_not_passed_on():
    async with Server() as s:
        b = backend(s.url)
        with anyio.fail_after(20):
            c = await b.generate(req(TOO_MANY, max_new_tokens=5))
        assert len(c.token_ids) <= 5, len(c.token_ids)


async def test_missing_logprobs_when_asked_are_empty_not_an_error():
    async with Server() as s:
        b = backend(s.url)
        with anyio.fail_after(20):
            c = await b.generate(req(NO_LOGPROBS, logprobs=True, top_logprobs=2))
            good = await b.generate(req(OK, logprobs=True, top_logprobs=2))
        assert c.text == "hello world" and not c.logprobs and not c.top_logprobs
        assert good.logprobs == (-0.5, -0.5) and good.top_logprobs == ((-0.5, -1.5), (-0.5, -1.5))


async def test_two_hundred_requests_at_once_keep_within_the_concurrency_bound_and_each_gets_its_own_outcome():
    async with Server() as s:
        b = backend(s.url, concurrency=8, tries=2)
        outcomes: dict[int, str] = {}

        async def one(i: int) -> None:
            mode = (SLOW, REFUSE, BAD_JSON, SLOW, FAIL_ONCE)[i % 5]
            try:
                c = await b.generate(req(mode, i))
                outcomes[i] = c.text
            except ServerError:
                outcomes[i] = "error"

        async with anyio.create_task_group() as tg:
            tg.start_soon(b.serve)  # one shared client, as in a run
            await anyio.sleep(0.2)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as inner:
                    for i in range(200):
                        inner.start_soon(one, i)
            tg.cancel_scope.cancel()
        assert len(outcomes) == 200
        assert s.peak <= 8, s.peak
        assert sum(v == "error" for v in outcomes.values()) == 80  # the 400s and the bad JSON
        assert all(v == "hello world" for i, v in outcomes.items() if i % 5 in (0, 3, 4))
        assert b.open == 0
