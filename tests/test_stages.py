"""Each stage on its own, driven through memory streams with the scripted backend."""

import anyio
import pytest

from pipeline.config import Config
from pipeline.items import Candidate, Encoded, Generation, Job, Problem, Result, Routed
from stages import tokenization, vote
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
    failed_send, failed_receive = anyio.create_memory_object_stream[Routed](10)
    out = await run_stage(tokenization.run, [job(1), job(2, "x" * 150)], backend, cfg, failed_send)
    async with failed_receive:
        failed = [x async for x in failed_receive]
    assert len(out) == 1 and isinstance(out[0], Encoded) and out[0].prompt_tokens == len("What is 1 + 1?")
    # the rejected prompt goes straight to the router, routed to its job
    assert len(failed) == 1 and (failed[0].key, failed[0].serial) == ("k2", 2)
    assert isinstance(failed[0].result, Result) and failed[0].result.status == "error"
    assert "exceeds the model's context of 400 tokens" in (failed[0].result.error or "")


def encoded(i: int, text: str | None = None) -> Encoded:
    backend = FakeBackend()
    e = tokenization.encode(job(i, text), backend, Config())
    assert isinstance(e, Encoded)
    return e


async def run_inference(stage, backend, items):
    async with anyio.create_task_group() as tg:
        await tg.start(backend.serve)
        out = await run_stage(stage.run, items)
        tg.cancel_scope.cancel()
    return out


async def test_inference_batches_every_sample():
    # (a prompt the tokenize stage rejects no longer passes through here: it goes to the router,
    # tests/test_pipeline.py's too-long-prompt test)
    backend = FakeBackend(delay_s=0.01, max_batch_size=4, max_wait_s=0.005)
    cfg = small_config(generation={"samples": 3})
    stage = Inference(backend, cfg)
    out = await run_inference(stage, backend, [encoded(i) for i in range(5)])
    gens = [g for g in out if isinstance(g, Generation)]
    assert len(gens) == len(out)
    assert sorted((g.encoded.job.serial, g.index) for g in gens) == [
        (i, s) for i in range(5) for s in range(3)
    ]
    assert all(len(batch) <= 4 for batch in backend.calls)
    assert backend.scheduler.stats.rows == 15 and stage.stats.completed == 15
    # each sample ends right after its \\boxed{} (stop_at_answer): the "." after it is not generated
    assert all(g.text == f"Adding the numbers gives \\boxed{{{g.encoded.job.serial + 1}}}" for g in gens)
    assert all(g.finish_reason == "answer" for g in gens)


async def test_inference_seeds_depend_on_the_problem_and_sample_only():
    cfg = small_config(generation={"samples": 3})
    a, b = Inference(FakeBackend(), cfg), Inference(FakeBackend(), cfg)
    e1, e2 = encoded(1), encoded(2)
    seeds = [a.params(e1, i).seed for i in range(3)]
    assert len(set(seeds)) == 3
    assert [b.params(e1, i).seed for i in range(3)] == seeds  # not arrival order or another stage
    assert a.params(e2, 0).seed != seeds[0]
    assert not a.params(e1, 0).greedy


async def test_inference_splits_a_batch_on_out_of_memory():
    def fail(texts):
        if len(texts) > 2:
            raise MemoryError("simulated accelerator OOM")

    backend = FakeBackend(fail=fail, max_batch_size=8, max_wait_s=0.005)
    backend.scheduler.configure(max_size=8, max_wait_s=0.005, max_tokens=100_000)
    stage = Inference(backend, small_config())
    out = await run_inference(stage, backend, [encoded(i) for i in range(8)])
    assert len(out) == 8 and all(g.error is None for g in out)
    assert backend.scheduler.stats.oom_splits >= 1
    assert (backend.scheduler.token_cap or 0) < 100_000  # the cap was lowered


async def test_the_token_cap_recovers_after_a_while_without_errors():
    def fail(texts):
        if len(texts) > 2:
            raise MemoryError("simulated accelerator OOM")

    backend = FakeBackend(fail=fail)
    backend.scheduler.configure(max_size=8, max_wait_s=0.005, max_tokens=100_000)
    backend.scheduler.recover_s = 0.0
    stage = Inference(backend, small_config())
    await run_inference(stage, backend, [encoded(i) for i in range(8)])
    lowered = backend.scheduler.token_cap or 0
    backend.fail = None
    await run_inference(stage, backend, [encoded(i) for i in range(3)])
    assert lowered < (backend.scheduler.token_cap or 0) <= 100_000


async def test_inference_retries_rows_alone_then_errors_the_bad_one():
    def fail(texts):
        if any("poison" in t for t in texts):
            raise RuntimeError("backend exploded")

    backend = FakeBackend(fail=fail)
    stage = Inference(backend, small_config())
    out = await run_inference(stage, backend, [encoded(1), encoded(2, "poison 3"), encoded(3)])
    errors = {g.encoded.job.serial: g.error for g in out}
    assert errors[1] is None and errors[3] is None
    assert errors[2] == "RuntimeError: backend exploded"


async def test_inference_sends_completions_in_completion_order_not_batch_order():
    # one batch: p1's answer is long, p2's short; p2 must come out first although p1 was first in
    def responder(text, nth):
        return "word " * 40 + "\\boxed{1}" if "long" in text else "\\boxed{2}"

    backend = FakeBackend(responder, step_s=0.01, max_wait_s=0.05)
    stage = Inference(backend, small_config())
    out = await run_inference(stage, backend, [encoded(1, "long one"), encoded(2, "short")])
    assert [g.encoded.job.serial for g in out] == [2, 1]
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 2  # they did share a batch


async def test_cancelling_a_problem_aborts_its_requests_within_a_step():
    backend = FakeBackend(lambda t, n: "word " * 10_000, step_s=0.01)
    cfg = small_config(generation={"samples": 2})
    stage = Inference(backend, cfg)
    in_send, in_receive = anyio.create_memory_object_stream(10)
    out_send, out_receive = anyio.create_memory_object_stream(10)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(backend.serve)
            tg.start_soon(stage.run, in_receive, out_send)
            await in_send.send(encoded(1))
            while len(backend.scheduler.running) < 2:
                await anyio.sleep(0.005)
            await anyio.sleep(0.05)
            steps_at_cancel = backend.steps
            stage.cancel(1)
            gens = [await out_receive.receive(), await out_receive.receive()]
            while backend.scheduler.running:
                await anyio.sleep(0.001)
            steps_after = backend.steps - steps_at_cancel
            in_send.close()
            tg.cancel_scope.cancel()
    out_receive.close()
    assert [g.finish_reason for g in gens] == ["aborted", "aborted"]
    assert all(g.error == "cancelled" for g in gens)
    assert steps_after <= 2  # the rows left the batch at the next decode step, not after 10,000
    assert backend.scheduler.stats.aborted == 2
    assert stage.stats.aborted == 2 and stage.stats.in_flight == 0


async def test_requests_in_flight_are_bounded():
    backend = FakeBackend(step_s=0.001)
    cfg = small_config(generation={"samples": 3}, run={"max_in_flight": 2})
    stage = Inference(backend, cfg)
    out = await run_inference(stage, backend, [encoded(i) for i in range(6)])
    assert len(out) == 18
    assert stage.stats.peak_in_flight <= 6 == stage.max_requests


async def test_token_gate_bounds_tokens_in_flight():
    backend = FakeBackend(step_s=0.001)
    prompt = encoded(1).prompt_tokens
    cfg = small_config(
        generation={"samples": 4, "max_new_tokens": 50}, run={"max_tokens_in_flight": 2 * (prompt + 50)}
    )
    stage = Inference(backend, cfg)
    out = await run_inference(stage, backend, [encoded(1)])
    assert len(out) == 4
    assert stage.stats.peak_in_flight == 2


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


async def test_the_vote_waits_until_all_of_a_problems_samples_are_in():
    cfg = small_config(generation={"samples": 2})
    e1, e2 = encoded(1), encoded(2)

    def cand(e, i, a):  # `of`: how many samples the problem has (the inference stage sets it)
        return Candidate(
            generation=Generation(encoded=e, index=i, text="", new_tokens=1, of=2), answer=a, extracted=None
        )

    items = [cand(e1, 0, 5), cand(e2, 0, 9), cand(e2, 1, 9), cand(e1, 1, 6)]
    out = await run_stage(vote.run, items, cfg)
    assert [(o.serial, o.key) for o in out] == [(2, "k2"), (1, "k1")]  # each routed to its job
    assert [(o.result.id, o.result.answer, o.result.samples) for o in out] == [("p2", 9, 2), ("p1", 5, 2)]


@pytest.mark.parametrize("samples", [1, 4])
async def test_stage_output_count_matches_input(samples):
    cfg = small_config(generation={"samples": samples})
    backend = FakeBackend()
    stage = Inference(backend, cfg)
    out = await run_inference(stage, backend, [encoded(i) for i in range(7)])
    assert len(out) == 7 * samples


def test_one_rule_cuts_every_backends_completion():
    from stages.prompting import finish_text

    text = "so \\boxed{42} then ```python\nx\n```"
    assert finish_text(text, (), at_answer=True) == ("so \\boxed{42}", "answer", None)
    assert finish_text(text, ("```",), at_answer=True) == ("so \\boxed{42}", "answer", None)
    assert finish_text("a STOP b \\boxed{1}", ("STOP",), at_answer=True) == ("a ", "stop", "STOP")
    assert finish_text("x Y z X", ("X", "Y")) == ("x ", "stop", "Y")  # the earliest stop string
    in_code = "```python\n\\boxed{1}\n"
    assert finish_text(in_code, (), at_answer=True) == (in_code, None, None)
    assert finish_text("plain", ("Q",), at_answer=True) == ("plain", None, None)
