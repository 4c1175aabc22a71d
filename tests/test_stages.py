"""Each stage on its own, driven through memory streams with the scripted backend."""

import anyio
import pytest

from pipeline.config import Config
from pipeline.items import Candidate, Encoded, Generation, Job, Problem, Result
from stages import extraction, tokenization
from stages.backends.fake import FakeBackend
from stages.inference import Inference
from stages.verification import Verification
from tests.conftest import small_config


def job(i: int, text: str | None = None) -> Job:
    return Job(problem=Problem(id=f"p{i}", text=text or f"What is {i} + 1?"), key=f"k{i}", serial=i)


async def run_stage(stage, items, *args, capacity=1000):
    in_send, in_receive = anyio.create_memory_object_stream(capacity)
    out_send, out_receive = anyio.create_memory_object_stream(capacity)
    async with in_send:
        for item in items:
            await in_send.send(item)
    with anyio.fail_after(30):
        await stage(in_receive, out_send, *args)
        async with out_receive:
            return [x async for x in out_receive]


async def test_tokenization_encodes_and_rejects_prompts_over_the_context():
    backend = FakeBackend(max_context=400)
    cfg = small_config(generation={"max_new_tokens": 300})
    out = await run_stage(tokenization.run, [job(1), job(2, "x" * 150)], backend, cfg)
    assert isinstance(out[0], Encoded) and out[0].prompt_tokens == len("What is 1 + 1?")
    assert isinstance(out[1], Result) and out[1].status == "error" and out[1].key == "k2"
    assert "exceeds the model's context of 400 tokens" in (out[1].error or "")


def encoded(i: int, text: str | None = None) -> Encoded:
    backend = FakeBackend()
    e = tokenization.encode(job(i, text), backend, Config())
    assert isinstance(e, Encoded)
    return e


async def test_inference_batches_every_sample_and_passes_results_through():
    backend = FakeBackend(delay_s=0.01)
    cfg = small_config(generation={"samples": 3}, batch={"max_batch_size": 4, "max_wait_ms": 5})
    stage = Inference(backend, cfg, max_batch_tokens=None)
    passthrough = Result(id="bad", answer=None, status="error", error="x")
    out = await run_stage(stage.run, [encoded(i) for i in range(5)] + [passthrough])
    gens = [g for g in out if isinstance(g, Generation)]
    assert passthrough in out
    assert sorted((g.encoded.job.serial, g.index) for g in gens) == [
        (i, s) for i in range(5) for s in range(3)
    ]
    assert all(len(batch) <= 4 for batch in backend.calls)
    assert stage.stats.rows == 15
    assert all(g.text == f"Adding the numbers gives \\boxed{{{g.encoded.job.serial + 1}}}." for g in gens)


async def test_inference_splits_a_batch_on_out_of_memory():
    def fail(texts):
        if len(texts) > 2:
            raise MemoryError("simulated accelerator OOM")

    backend = FakeBackend(fail=fail)
    cfg = small_config(batch={"max_batch_size": 8, "max_wait_ms": 5})
    stage = Inference(backend, cfg, max_batch_tokens=None)
    out = await run_stage(stage.run, [encoded(i) for i in range(8)])
    assert len(out) == 8 and all(g.error is None for g in out)
    assert stage.stats.oom_splits >= 1
    assert stage.max_batch_tokens is not None  # the cap was lowered


async def test_inference_retries_rows_alone_then_errors_the_bad_one():
    def fail(texts):
        if any("poison" in t for t in texts):
            raise RuntimeError("backend exploded")

    backend = FakeBackend(fail=fail)
    stage = Inference(backend, small_config(), max_batch_tokens=None)
    out = await run_stage(stage.run, [encoded(1), encoded(2, "poison 3"), encoded(3)])
    errors = {g.encoded.job.serial: g.error for g in out}
    assert errors[1] is None and errors[3] is None
    assert errors[2] == "RuntimeError: backend exploded"


async def test_verification_checks_answers_in_worker_processes():
    cfg = small_config(answer={"max": 100})
    v = Verification(cfg)
    e = encoded(1)
    gens = [
        Generation(encoded=e, index=0, text="so \\boxed{\\frac{84}{2}}", new_tokens=3),
        Generation(encoded=e, index=1, text="\\boxed{1000}", new_tokens=3),
        Generation(encoded=e, index=2, text="", new_tokens=0, error="model failed"),
    ]
    try:
        out = await run_stage(v.run, gens)
    finally:
        await v.aclose()
    by_index = {c.generation.index: c for c in out}
    assert by_index[0].answer == 42 and by_index[0].extracted == "\\frac{84}{2}"
    assert by_index[1].answer is None and "outside the range 0-100" in (by_index[1].reason or "")
    assert by_index[2].answer is None and by_index[2].reason == "model failed"


async def test_extraction_votes_once_all_samples_are_in():
    cfg = small_config(generation={"samples": 2})
    e1, e2 = encoded(1), encoded(2)

    def cand(e, i, a):
        return Candidate(
            generation=Generation(encoded=e, index=i, text="", new_tokens=1), answer=a, extracted=None
        )

    items = [cand(e1, 0, 5), cand(e2, 0, 9), cand(e2, 1, 9), cand(e1, 1, 6)]
    out = await run_stage(extraction.run, items, cfg)
    assert [(r.id, r.answer, r.samples) for r in out] == [("p2", 9, 2), ("p1", 5, 2)]


@pytest.mark.parametrize("samples", [1, 4])
async def test_stage_output_count_matches_input(samples):
    cfg = small_config(generation={"samples": samples})
    stage = Inference(FakeBackend(), cfg, None)
    out = await run_stage(stage.run, [encoded(i) for i in range(7)])
    assert len(out) == 7 * samples
