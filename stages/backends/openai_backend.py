"""The server backend (``--backend openai --base-url URL``): a server the user already runs, through its
OpenAI-compatible completions endpoint (vLLM's ``vllm serve``, SGLang, TensorRT-LLM's ``trtllm-serve``,
llama.cpp's server).

Each request is one streamed ``POST {base_url}/v1/completions`` whose prompt is the token ids (the
pipeline renders the chat template itself, with the server model's tokenizer loaded here), so the
server's prefix cache sees exactly what an in-process engine would. Cancelling the caller closes the
stream, and vLLM aborts a request whose client has gone; a request that stops at its answer closes its
stream the same way. Every sampling setting is sent explicitly (temperature 0 for greedy, top-p,
min-p, ``top_k`` -1, repetition penalty 1, the seed), so a server's own defaults from the model's
``generation_config`` cannot change the answers. vLLM's and SGLang's extra fields go in the request
body: ``min_p``, ``stop_token_ids``, ``return_token_ids`` (the new tokens' ids; a server that does not
send them gets the text tokenized here) and ``return_tokens_as_token_ids`` (top-log-prob keys that
stay unique). Stop strings are the server's (its text leaves them out and names the one in
``stop_reason``); ``finish_text`` cuts what it let through and finds the answer.

At most ``model.api_concurrency`` requests are open at once. A connection error, a timeout, a 429 or a
5xx is retried with exponential backoff (the request starts again; a few tries, then the request fails
with the last error, naming the server); any other refusal fails the request at once. A server that is
not there when the backend loads is a ``BackendError`` naming the address and how to start one.

An optional extra: ``pip install 'aimo-pipeline[server]'`` (the ``openai`` client).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from stages.backends.base import (
    BackendBase,
    BackendError,
    ChatTokenizer,
    Completion,
    FinishReason,
    Request,
    SamplingParams,
)
from stages.backends.models import resolve_model
from stages.config import Config
from stages.prompting import finish_text

INSTALL_OPENAI = "the openai backend needs the openai client: pip install 'aimo-pipeline[server]'"
START_SERVER = (
    "start one, e.g. `vllm serve MODEL --port 8000` (SGLang, trtllm-serve and llama.cpp's llama-server "
    "work too), and pass its address: --base-url http://127.0.0.1:8000"
)
PROBE_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # a server silent this long on one open request is taken as gone
RETRY_STATUS = frozenset({408, 429})


class ServerError(RuntimeError):
    """The server failed one request (after the retries, where it was worth retrying)."""


def api_root(base_url: str) -> str:
    """The server's address without a trailing ``/`` or ``/v1``."""
    root = base_url.strip().rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _get_json(url: str, api_key: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Authorization", f"Bearer {api_key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as response:
        return json.loads(response.read().decode())


def server_models(root: str, api_key: str) -> list[dict[str, Any]]:
    """The entries of the server's ``/v1/models`` (blocking).

    Raises:
        BackendError: nothing answers there, or not like an OpenAI-compatible server; the message names
            the address and how to start a server.
    """
    url = f"{root}/v1/models"
    try:
        listing = _get_json(url, api_key)
    except urllib.error.HTTPError as e:
        hint = " (is the API key right? --api-key-env names its variable)" if e.code in (401, 403) else ""
        raise BackendError(f"the server at {root} answered {url} with HTTP {e.code}{hint}") from e
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise BackendError(f"no OpenAI-compatible server answers at {root} ({reason}); {START_SERVER}") from e
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list) or not data:
        raise BackendError(f"the server at {root} lists no models at {url}")
    return [m for m in data if isinstance(m, dict) and "id" in m]


def _tokenizer_source(path: str | None, entry: dict[str, Any]) -> str:
    """Where the tokenizer comes from: ``model.path`` (a folder, a .gguf file or a cached hub name), the
    server model's own folder when it is on this machine, its name in the local hub cache, else the
    bundled default model."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            return str(p)
        if p.is_file():
            return str(resolve_model(path)[0])
        return path
    for candidate in (entry.get("root"), entry.get("id")):
        if isinstance(candidate, str) and (Path(candidate) / "tokenizer_config.json").is_file():
            return candidate
    name = str(entry["id"])
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "tokenizer_config.json"), str):
            return name
    except Exception:  # not a hub name
        pass
    return str(resolve_model(None)[0])


def _check_tokenizer(root: str, api_key: str, name: str, tokenizer: Any, source: str) -> None:
    """Compare a sample's token ids with the server's own ``/tokenize`` (vLLM, SGLang); skipped when the
    server has no such endpoint.

    Raises:
        BackendError: the server tokenizes differently: the tokenizer here is not its model's.
    """
    sample = "Find the remainder when 2^100 is divided by 7. \\boxed{2}"
    try:
        theirs = _get_json(
            f"{root}/tokenize", api_key, {"model": name, "prompt": sample, "add_special_tokens": False}
        )
    except (OSError, ValueError):
        return
    ours = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if isinstance(theirs, dict) and isinstance(theirs.get("tokens"), list) and theirs["tokens"] != ours:
        raise BackendError(
            f"the tokenizer loaded from {source} is not the one of the server's model {name!r} (they "
            "tokenize the same text differently); pass --model FOLDER holding the server model's tokenizer"
        )


class OpenAIBackend(ChatTokenizer, BackendBase):
    """A model served elsewhere, behind the backend protocol. Build it with ``OpenAIBackend.load``.

    ``open`` is the streams open now; ``counts`` the requests sent, retried, failed, and closed early at
    their answer (not in the run's metrics, whose ``batches`` section is the micro-batcher's).
    """

    device = "server"

    def __init__(
        self,
        tokenizer: Any,
        *,
        base_url: str,
        api_model: str,
        api_key: str = "EMPTY",
        max_context: int = 4096,
        concurrency: int = 64,
        tries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        self.tokenizer = tokenizer
        self.root = api_root(base_url)
        self.api_model = api_model
        self.api_key = api_key
        self.model_id = f"openai:{api_model}"
        self.max_context = max_context
        self.tries = tries
        self.backoff_s = backoff_s
        self._limit = anyio.CapacityLimiter(concurrency)
        self._ids = itertools.count()
        self._client: Any = None
        self._client_loop: object | None = None
        self.open = 0
        self.counts = {"requests": 0, "retries": 0, "failed": 0, "early_closes": 0}

    @classmethod
    def load(cls, cfg: Config) -> OpenAIBackend:
        """Find the server and its model, and load that model's tokenizer here (blocking; seconds).

        Raises:
            BackendError: the client is not installed, no server answers at ``model.base_url`` (named,
                with how to start one), it does not serve ``model.api_model``, or the tokenizer cannot
                be loaded or is not the server model's.
        """
        if importlib.util.find_spec("openai") is None:
            raise BackendError(INSTALL_OPENAI)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        m = cfg.model
        if not m.base_url:
            raise BackendError("the openai backend needs the server's address: --base-url http://HOST:PORT")
        root = api_root(m.base_url)
        api_key = os.environ.get(m.api_key_env) or "EMPTY"
        models = server_models(root, api_key)
        names = [str(e["id"]) for e in models]
        if m.api_model is not None and m.api_model not in names:
            raise BackendError(
                f"the server at {root} does not serve {m.api_model!r}; it serves: {', '.join(names)}"
            )
        entry = models[names.index(m.api_model)] if m.api_model is not None else models[0]
        name = str(entry["id"])
        source = _tokenizer_source(m.path, entry)
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            raise BackendError(
                f"cannot load the tokenizer of the server's model {name!r} from {source}: {e}; pass --model "
                "FOLDER holding it"
            ) from e
        _check_tokenizer(root, api_key, name, tokenizer, source)
        context = entry.get("max_model_len")
        if not isinstance(context, int) or context < 1:
            context = _config_context(source)
        return cls(
            tokenizer,
            base_url=root,
            api_model=name,
            api_key=api_key,
            max_context=context,
            concurrency=m.api_concurrency,
        )

    def new_client(self) -> Any:
        """An async client for the server (its connections belong to the event loop that uses it)."""
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.root}/v1",
            api_key=self.api_key,
            max_retries=0,  # retried here, around the whole stream
            timeout=openai.Timeout(READ_TIMEOUT_S, connect=PROBE_TIMEOUT_S),
        )

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Check that the server still answers, then hold the client every request on this event loop
        shares, and close its connections when cancelled.

        Raises:
            BackendError: the server is gone (named, with how to start one).
        """
        import asyncio

        client = self.new_client()
        try:
            try:
                await client.models.list()
            except Exception as e:
                raise BackendError(
                    f"no OpenAI-compatible server answers at {self.root} ({e}); {START_SERVER}"
                ) from e
            self._client, self._client_loop = client, asyncio.get_running_loop()
            task_status.started()
            await anyio.sleep_forever()
        finally:
            if self._client is client:
                self._client = self._client_loop = None
            with anyio.CancelScope(shield=True):
                await client.close()

    def _body(self, request: Request) -> dict[str, Any]:
        """The request's settings as the completions endpoint takes them."""
        p = request.params
        max_tokens = min(p.max_new_tokens, max(1, self.max_context - len(request.prompt_ids)))
        extra: dict[str, Any] = {
            "min_p": 0.0 if p.greedy else p.min_p,
            "top_k": -1,
            "repetition_penalty": 1.0,
            "skip_special_tokens": True,
            "return_token_ids": True,
        }
        if p.stop_token_ids:
            extra["stop_token_ids"] = list(p.stop_token_ids)
        body: dict[str, Any] = {
            "model": self.api_model,
            "prompt": list(request.prompt_ids),
            "max_tokens": max_tokens,
            "temperature": 0.0 if p.greedy else p.temperature,
            "top_p": 1.0 if p.greedy else p.top_p,
            "stream": True,
            "extra_body": extra,
        }
        if not p.greedy:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.logprobs or p.top_logprobs:
            body["logprobs"] = p.top_logprobs
            extra["return_tokens_as_token_ids"] = True
        return body

    async def generate(self, request: Request) -> Completion:
        """Stream one completion from the server; cancelling the caller closes the stream (which aborts
        the request on vLLM).

        Raises:
            ServerError: the server failed the request (after retries for a connection error, a
                timeout, a 429 or a 5xx), naming the server and the last error.
        """
        async with self._limit:
            self.counts["requests"] += 1
            delay = self.backoff_s
            for attempt in range(1, self.tries + 1):
                try:
                    return await self._stream(request)
                except Exception as e:
                    retry, why = _retryable(e)
                    if not retry or attempt == self.tries:
                        self.counts["failed"] += 1
                        tries = f" after {attempt} tries" if attempt > 1 else ""
                        raise ServerError(
                            f"the server at {self.root} failed the request{tries}: {why}"
                        ) from e
                self.counts["retries"] += 1
                await anyio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _stream(self, request: Request) -> Completion:
        import asyncio

        if self._client is not None and self._client_loop is asyncio.get_running_loop():
            return await self._stream_on(self._client, request)
        async with self.new_client() as client:  # not served on this loop: a client for this request
            return await self._stream_on(client, request)

    async def _stream_on(self, client: Any, request: Request) -> Completion:
        p = request.params
        body = self._body(request)
        limit: int = body["max_tokens"]
        stream = await client.completions.create(**body)
        self.open += 1
        chunks = 0  # chunks that carried output: at least a token each
        text = ""
        ids: list[int] = []
        logprobs: list[float] = []
        top: list[tuple[float, ...]] = []
        finish: str | None = None
        stop_reason: Any = None
        watch = p.watch
        if watch is not None:
            watch.reset()  # a retried request starts its watch again
        fed = 0
        try:
            async for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = choice.text or ""
                text += delta
                ids.extend(getattr(choice, "token_ids", None) or ())
                _read_logprobs(choice.logprobs, logprobs, top)
                chunks += bool(delta or getattr(choice, "token_ids", None))
                if len(ids) > limit or (not ids and chunks > limit):  # a server that overruns max_tokens
                    del ids[limit:], logprobs[limit:], top[limit:]
                    finish = "length"
                    break
                if watch is not None and finish is None:
                    low = False
                    while fed < len(top) and not low:
                        low = watch.feed(top[fed][: p.top_logprobs])
                        fed += 1
                    if low:  # closing the stream aborts the rest on the server
                        self.counts["early_closes"] += 1
                        return self._cut(text, ids, fed, logprobs, top, p)
                if choice.finish_reason is not None:
                    finish = choice.finish_reason
                    stop_reason = getattr(choice, "stop_reason", None)
                    if stop_reason is None:
                        stop_reason = getattr(choice, "matched_stop", None)  # SGLang's name
                if p.stop_at_answer and finish is None and "}" in delta:
                    cut, how, _ = finish_text(text, (), at_answer=True)
                    if how == "answer":  # closing the stream aborts the rest on the server
                        self.counts["early_closes"] += 1
                        return self._completion(cut, ids, "answer", None, None, logprobs, top, p)
        finally:
            self.open -= 1
            with anyio.CancelScope(shield=True):
                await stream.close()
        if finish is None:
            raise ConnectionError("the stream ended without a finish reason")
        if not ids and text:  # a server that does not send token ids
            ids = self.encode_text(text)
            if isinstance(stop_reason, int) and stop_reason in p.stop_token_ids:
                ids.append(stop_reason)
            del ids[limit:]
        cut, how, found = finish_text(text, p.stop, p.stop_at_answer)
        if how is not None:
            return self._completion(cut, ids, how, found, None, logprobs, top, p)
        reason: FinishReason = "eos"
        string = token = None
        if finish == "length":
            reason = "length"
        elif finish == "abort":
            reason = "aborted"
        elif isinstance(stop_reason, str) and stop_reason in p.stop:
            reason, string = "stop", stop_reason
        elif isinstance(stop_reason, int) and stop_reason in p.stop_token_ids:
            reason, token = "stop", stop_reason
        elif stop_reason is None and ids and ids[-1] in p.stop_token_ids:
            reason, token = "stop", ids[-1]
        return self._completion(text, ids, reason, string, token, logprobs, top, p)

    def _cut(
        self,
        text: str,
        ids: list[int],
        n: int,
        logprobs: list[float],
        top: list[tuple[float, ...]],
        p: SamplingParams,
    ) -> Completion:
        """The completion cut after its ``n``-th token, where the request's watch stopped it (a chunk
        may carry tokens past it; the text is then decoded from the ids kept)."""
        if len(ids) > n:
            del ids[n:]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return self._completion(text, ids, "confidence", None, None, logprobs[:n], top[:n], p)

    @staticmethod
    def _completion(
        text: str,
        ids: list[int],
        reason: FinishReason,
        stop_string: str | None,
        stop_token: int | None,
        logprobs: list[float],
        top: list[tuple[float, ...]],
        p: SamplingParams,
    ) -> Completion:
        return Completion(
            tuple(ids),
            text,
            reason,
            stop_string=stop_string,
            logprobs=tuple(logprobs) if p.logprobs else None,
            stop_token=stop_token,
            top_logprobs=tuple(t[: p.top_logprobs] for t in top) if p.top_logprobs else None,
        )

    def close(self) -> None:
        """Nothing to release: the client's connections close with ``serve``; the server runs on."""


def _read_logprobs(lp: Any, logprobs: list[float], top: list[tuple[float, ...]]) -> None:
    """Append a chunk's log-probs: the drawn tokens', and each position's top ones, highest first (the
    server's dict also holds the drawn token when it ranks below k; the caller keeps k)."""
    if lp is None:
        return
    for x in getattr(lp, "token_logprobs", None) or ():
        logprobs.append(float(x) if x is not None else float("-inf"))
    for d in getattr(lp, "top_logprobs", None) or ():
        top.append(tuple(sorted((float(v) for v in (d or {}).values()), reverse=True)))


def _retryable(e: Exception) -> tuple[bool, str]:
    """Whether a request's failure is worth another try (the connection, a timeout, 429, 5xx), and what
    to call it."""
    import openai

    if isinstance(e, openai.APIStatusError):
        return e.status_code >= 500 or e.status_code in RETRY_STATUS, f"HTTP {e.status_code}: {e.message}"
    if isinstance(e, (openai.APIConnectionError, ConnectionError, TimeoutError)):
        return True, f"{type(e).__name__}: {e}"
    # a broken stream surfaces as the HTTP library's own transport error (httpx, or httpx2 for openai 3)
    module = type(e).__module__.split(".")[0]
    if module in ("httpx", "httpx2", "httpcore", "httpcore2"):
        return True, f"{type(e).__name__}: {e}"
    return False, f"{type(e).__name__}: {e}"


def _config_context(source: str) -> int:
    """The model's context from its config where the server does not say (else 4096)."""
    try:
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", 4096))
    except Exception:
        return 4096
