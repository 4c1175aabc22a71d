"""The transformers backend's continuous batching engine, with the real model (float32, CPU)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest

from pipeline import Pipeline
from stages.backends.base import Backend, BackendError, Request, SamplingParams
from tests.conftest import small_config

STORY = [{"role": "user", "content": "Write a very long story about a dragon."}]


async def _all(backend: Backend, requests: list[Request], *, keep_errors: bool = False) -> dict[str, Any]:
    """Serve ``backend`` and send ``requests`` at once: each one's completion (or, with
    ``keep_errors``, its ``BackendError``)."""
    out: dict[str, Any] = {}

    async def one(r: Request) -> None:
        try:
            out[r.id] = await backend.generate(r)
        except BackendError as e:
            if not keep_errors:
                raise
            out[r.id] = e

    async with anyio.create_task_group() as tg:
        await tg.start(backend.serve)
        async with anyio.create_task_group() as inner:
            for r in requests:
                inner.start_soon(one, r)
        tg.cancel_scope.cancel()
    return out


def test_the_default_transformers_backend_batches_continuously(real_backend: Any):
    assert real_backend.batching == "continuous" and real_backend.engine is not None


async def test_both_engines_give_the_same_tokens_greedy_and_seeded(real_backend: Any):
    # float32 on CPU: the paged engine's logits equal the padded batch's, so every row's token is the
    # same, sampled ones included (each request draws from its own seeded generator)
    prompts = [
        tuple(real_backend.encode([{"role": "user", "content": f"What is {i} + {2 * i}? Think it through."}]))
        for i in range(6)
    ]
    reqs = []
    for i, p in enumerate(prompts):
        reqs.append(Request(f"g{i}", p, SamplingParams(max_new_tokens=24 + 4 * i, logprobs=True)))
        sampled = SamplingParams(max_new_tokens=24, greedy=False, temperature=0.8, top_p=0.9, seed=i)
        reqs.append(Request(f"s{i}", p, sampled))
    with anyio.fail_after(240):
        cont = await _all(real_backend, reqs)
        static = await _all(real_backend.on_engine("static"), reqs)
    for r in reqs:
        assert cont[r.id].token_ids == static[r.id].token_ids, r.id
        assert cont[r.id].finish_reason == static[r.id].finish_reason
    assert cont["g0"].logprobs == pytest.approx(static["g0"].logprobs, abs=1e-3)
    assert len({cont[f"s{i}"].text for i in range(6)}) > 1


async def test_a_cancelled_request_leaves_the_continuous_batch_at_the_next_step(real_backend: Any):
    engine = real_backend.engine
    story = tuple(real_backend.encode(STORY))
    long = SamplingParams(max_new_tokens=3000)
    before = len(engine.abort_steps)
    with anyio.fail_after(120):  # 2 x 3,000 tokens would take many minutes on a CPU
        async with anyio.create_task_group() as tg:
            await tg.start(real_backend.serve)
            kept: list[Any] = []

            async def keep() -> None:
                kept.append(
                    await real_backend.generate(Request("kept", story, replace(long, max_new_tokens=60)))
                )

            tg.start_soon(keep)
            with anyio.move_on_after(3.0):  # both decode together for a while, then "gone" is cancelled
                await real_backend.generate(Request("gone", story, long))
            at_cancel = engine.steps
            while len(engine.abort_steps) == before:
                await anyio.sleep(0.001)
            while not kept:  # the other request goes on decoding to its own end
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert at_cancel > 5
    assert engine.abort_steps[-1] <= 1  # computed in at most the step already under way
    assert kept[0].finish_reason in ("length", "eos") and kept[0].new_tokens >= 1
    assert engine.steps > at_cancel and real_backend.busy == 0


async def test_stop_strings_and_answers_end_rows_inside_the_continuous_batch(real_backend: Any):
    p = tuple(real_backend.encode([{"role": "user", "content": "Count from 1 to 30, separated by commas."}]))
    with anyio.fail_after(120):
        free = (await _all(real_backend, [Request("free", p, SamplingParams(max_new_tokens=60))]))["free"]
        stop = free.text[10:13]
        out = await _all(
            real_backend,
            [
                Request("stopped", p, SamplingParams(max_new_tokens=60, stop=(stop,))),
                Request("free2", p, SamplingParams(max_new_tokens=60)),
            ],
        )
        stopped = out["stopped"]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.find(stop)]
    assert out["free2"].token_ids == free.token_ids  # the row beside it was not disturbed
    assert real_backend.busy == 0


async def test_tir_rounds_run_on_the_continuous_engine_with_the_real_sandbox(real_backend: Any):
    # The prefill opens a code cell, so the model's first round closes it, the sandbox runs it, and
    # the next round is a longer prompt that starts with the first one (its cache blocks are shared)
    seen: list[Request] = []

    class Spy:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def serve(self, *, task_status: Any) -> None:
            await self.inner.serve(task_status=task_status)

        async def generate(self, request: Request) -> Any:
            seen.append(request)
            return await self.inner.generate(request)

        def close(self) -> None:
            pass

    cfg = small_config(
        generation={"prompt_style": "tir", "samples": 2, "max_new_tokens": 64, "max_rounds": 3},
        prompt={"prefill": "I will compute it.\n```python\nprint(123 * 45)\n"},
    )
    async with Pipeline(cfg, backend=Spy(real_backend)) as p:  # type: ignore[arg-type]
        with anyio.fail_after(300):
            r = await p.solve({"id": "a", "problem": "What is 123 * 45?", "answer": 5535})
    later = [q for q in seen if q.round >= 1]
    assert later, [q.round for q in seen]
    first = next(q for q in seen if q.round == 0 and q.sample == later[0].sample)
    assert later[0].prompt_ids[: len(first.prompt_ids)] == first.prompt_ids
    assert "5535" in real_backend.tokenizer.decode(list(later[0].prompt_ids))
    assert sum(r.finish.values()) == 2 and real_backend.busy == 0


async def test_generate_before_serve_and_after_a_stop_is_a_clear_error(real_backend: Any):
    p = tuple(real_backend.encode(STORY))
    with pytest.raises(BackendError, match="not serving"):
        await real_backend.generate(Request("x", p, SamplingParams(max_new_tokens=2)))


async def test_a_dead_engine_fails_what_it_held_restarts_and_at_last_refuses(real_backend: Any):
    engine = real_backend.engine
    story = tuple(real_backend.encode(STORY))
    original = engine.choose
    faults = {"left": 1}

    def explode(order: list[str], scores: Any) -> Any:
        if faults["left"] > 0:
            faults["left"] -= 1
            raise RuntimeError("simulated device fault")
        return original(order, scores)

    async def until_restarted(n: int) -> None:
        while engine.restarts < n or engine._manager is None or not engine._manager.is_running():
            await anyio.sleep(0.01)

    engine.choose = explode
    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                await tg.start(real_backend.serve)
                with pytest.raises(BackendError, match="simulated device fault"):
                    await real_backend.generate(Request("a", story, SamplingParams(max_new_tokens=50)))
                await until_restarted(1)  # a new manager answers the next request
                ok = await real_backend.generate(Request("b", story, SamplingParams(max_new_tokens=3)))
                assert ok.new_tokens == 3
                faults["left"] = engine.MAX_RESTARTS  # it dies again and again: the last death is final
                for n in range(engine.MAX_RESTARTS):
                    with pytest.raises(BackendError, match="simulated device fault"):
                        await real_backend.generate(Request(f"c{n}", story, SamplingParams(max_new_tokens=5)))
                    if n + 2 <= engine.MAX_RESTARTS:
                        await until_restarted(n + 2)
                while engine._died is None:
                    await anyio.sleep(0.01)
                with pytest.raises(BackendError, match="died: simulated device fault"):
                    await real_backend.generate(Request("d", story, SamplingParams(max_new_tokens=5)))
                tg.cancel_scope.cancel()
    finally:
        del engine.choose
    # served again, it starts afresh and answers
    out = await _all(real_backend, [Request("e", story, SamplingParams(max_new_tokens=3))])
    assert out["e"].new_tokens == 3 and real_backend.busy == 0


async def test_a_request_larger_than_the_paged_cache_is_refused_by_name(real_backend: Any):
    engine = real_backend.engine
    saved = engine.kv_tokens
    engine.kv_tokens = 512
    try:
        story = tuple(real_backend.encode(STORY))
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(real_backend.serve)
                with pytest.raises(BackendError, match=r"needs 1[0-9]+ tokens of cache .* holds 512"):
                    await real_backend.generate(Request("big", story, SamplingParams(max_new_tokens=1000)))
                small = await real_backend.generate(Request("small", story, SamplingParams(max_new_tokens=4)))
                tg.cancel_scope.cancel()
    finally:
        engine.kv_tokens = saved
    assert small.new_tokens == 4


def test_auto_batching_is_continuous_only_on_the_transformers_releases_it_was_tried_on(monkeypatch):
    import transformers

    from stages.backends.transformers_backend import choose_batching

    for version, mode in [
        ("5.19.0", "continuous"),
        ("5.25.3", "continuous"),
        ("4.46.0", "static"),
        ("5.26.0", "static"),
    ]:
        monkeypatch.setattr(transformers, "__version__", version)
        assert choose_batching("auto") == mode, version
        assert choose_batching("auto", device="cuda:0", sampled=False) == mode, version
        assert choose_batching("auto", device="cpu", sampled=False) == "static", version
    assert choose_batching("continuous", sampled=False) == "continuous"
    assert choose_batching("static", device="cuda") == "static"


def test_the_pipeline_tells_the_backend_whether_its_run_samples(monkeypatch):
    """``auto`` follows the run: one greedy answer per problem is not ``sampled``; several samples, or
    tir rounds, are (the rule itself: the test above)."""
    from pipeline.api import load_backend
    from pipeline.config import Config
    from stages.backends.transformers_backend import TransformersBackend

    seen: list[tuple[str, bool]] = []

    def fake_load(path: Any, **kw: Any) -> Any:
        seen.append((kw["batching"], kw["sampled"]))
        return None

    monkeypatch.setattr(TransformersBackend, "load", fake_load)
    for sections in [{}, {"generation": {"samples": 4}}, {"generation": {"prompt_style": "tir"}}]:
        load_backend(Config().replace(**sections))
    load_backend(Config().replace(batch={"mode": "static"}, generation={"samples": 2}))
    assert seen == [("auto", False), ("auto", True), ("auto", True), ("static", True)]


class _Raises:
    """A watch that fails at its third token."""

    def __init__(self) -> None:
        self.n = 0

    def feed(self, top: Any) -> bool:
        self.n += 1
        if self.n == 3:
            raise RuntimeError("watch blew up")
        return False

    def reset(self) -> None:
        self.n = 0


async def test_one_bad_request_fails_alone_and_the_engine_keeps_its_other_rows(real_backend: Any):
    engine = real_backend.engine
    story = tuple(real_backend.encode(STORY))
    good = [
        Request(f"g{i}", story, SamplingParams(max_new_tokens=12, greedy=False, seed=i)) for i in range(3)
    ]
    bad = Request("bad", story, SamplingParams(max_new_tokens=12, top_logprobs=2, watch=_Raises()))
    with anyio.fail_after(120):
        out = await _all(real_backend, [*good, bad], keep_errors=True)
        assert engine.restarts == 0
        for r, why in [  # refused by name before they reach the shared batch
            (Request("empty", (), SamplingParams(max_new_tokens=3)), "prompt is empty"),
            (Request("oov", (1, 10**7), SamplingParams(max_new_tokens=3)), "outside the model's vocabulary"),
            (Request("topk", story, SamplingParams(max_new_tokens=3, top_logprobs=10**6)), "more than the"),
        ]:
            with pytest.raises(BackendError, match=why):
                await real_backend.generate(r)
        again = await _all(real_backend, [Request("after", story, SamplingParams(max_new_tokens=2))])
    assert isinstance(out["bad"], BackendError) and "watch blew up" in str(out["bad"])
    assert all(out[r.id].new_tokens == 12 for r in good)
    assert again["after"].new_tokens == 2 and real_backend.busy == 0


async def test_serving_twice_is_refused_and_configure_alone_starts_nothing(real_backend: Any):
    story = tuple(real_backend.encode(STORY))
    real_backend.configure(max_batch_size=16, max_wait_s=0.0, max_batch_tokens=None)
    assert real_backend.engine._manager is None
    with pytest.raises(BackendError, match="not serving"):
        await real_backend.generate(Request("x", story, SamplingParams(max_new_tokens=2)))
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(real_backend.serve)
            with pytest.raises(BackendError, match="already serving"):
                await real_backend.serve(task_status=anyio.TASK_STATUS_IGNORED)
            done = await real_backend.generate(Request("y", story, SamplingParams(max_new_tokens=2)))
            tg.cancel_scope.cancel()
    assert done.new_tokens == 2 and real_backend.engine._manager is None


async def test_stopping_while_a_dead_manager_restarts_leaves_no_manager_behind(real_backend: Any):
    engine = real_backend.engine
    story = tuple(real_backend.encode(STORY))
    original = engine.choose

    def explode(order: list[str], scores: Any) -> Any:
        raise RuntimeError("simulated device fault")

    engine.choose = explode
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                await tg.start(real_backend.serve)
                with pytest.raises(BackendError):
                    await real_backend.generate(Request("a", story, SamplingParams(max_new_tokens=5)))
                tg.cancel_scope.cancel()  # at once: the supervisor may be starting a new manager
    finally:
        del engine.choose
    assert engine.choose == original and engine._manager is None and engine._supervisor is None
    with pytest.raises(BackendError, match="not serving"):
        await real_backend.generate(Request("b", story, SamplingParams(max_new_tokens=2)))


async def test_a_watch_that_raises_fails_its_request_alone_on_the_static_engine_too(real_backend: Any):
    story = tuple(real_backend.encode(STORY))
    static = real_backend.on_engine("static")
    reqs = [
        Request("g", story, SamplingParams(max_new_tokens=8)),
        Request("bad", story, SamplingParams(max_new_tokens=8, top_logprobs=2, watch=_Raises())),
    ]
    with anyio.fail_after(60):
        out = await _all(static, reqs, keep_errors=True)
    assert isinstance(out["bad"], BackendError) and "watch blew up" in str(out["bad"])
    assert out["g"].new_tokens == 8
