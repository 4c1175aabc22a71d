"""Stop token ids and top-k log-probabilities across the backend seam: the scripted backends, and the
transformers backend with the real default model (the vLLM ones are in tests/test_openai_backend.py,
beside the server's)."""

import json
import math

import anyio
import pytest

from stages.backends.base import Backend, Completion, Request, SamplingParams
from stages.backends.fake import FakeBackend
from stages.backends.replay import RecordingBackend, ReplayBackend


async def served(backend: Backend, *requests: Request) -> list[Completion]:
    out: list[Completion] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(backend.serve)
            for r in requests:
                out.append(await backend.generate(r))
            tg.cancel_scope.cancel()
    return out


def test_the_new_settings_default_to_nothing_and_are_checked():
    p = SamplingParams(max_new_tokens=4)
    assert p.stop_token_ids == () and p.top_logprobs == 0
    c = Completion((1,), "a", "eos")
    assert c.stop_token is None and c.top_logprobs is None
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(max_new_tokens=4, top_logprobs=-1)
    with pytest.raises(ValueError, match="stop token ids"):
        SamplingParams(max_new_tokens=4, stop_token_ids=(-1,))


async def test_the_fake_stops_at_a_token_id_and_gives_top_logprobs():
    backend = FakeBackend(lambda text, nth: "one two three four five")
    prompt = tuple(map(ord, "hi"))
    stopped, free, both = await served(
        backend,
        Request("a", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(3, 9), top_logprobs=2)),
        Request("b", prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(9,))),
        # a stop string before the stop token ends it first
        Request("c", prompt, SamplingParams(max_new_tokens=10, stop=("two",), stop_token_ids=(4,))),
    )
    assert stopped.finish_reason == "stop" and stopped.stop_token == 3 and stopped.stop_string is None
    assert stopped.token_ids == (1, 2, 3) and stopped.text == "one two "  # the stop token's word left out
    assert stopped.top_logprobs == ((-0.5, -1.0),) * 3
    assert free.finish_reason == "eos" and free.stop_token is None and free.top_logprobs is None
    assert both.stop_string == "two" and both.stop_token is None


async def test_replay_cuts_recorded_token_ids_at_a_stop_token_and_records_them(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(
        json.dumps(
            {
                "id": "p",
                "text": "analysis then call",
                "token_ids": [5, 6, 7, 8],
                "top_logprobs": [[-0.1, -2]] * 4,
            }
        )
        + "\n"
        + json.dumps(
            {"id": "q", "text": "done", "token_ids": [1, 2], "finish_reason": "stop", "stop_token": 2}
        )
        + "\n"
    )
    replay = ReplayBackend.load(path)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=(7,), top_logprobs=1)
    record = tmp_path / "again.jsonl"
    recorder = RecordingBackend(replay, record)
    cut, short, recorded = await served(
        recorder,
        Request("a", (), params, problem_id="p"),
        Request("b", (), SamplingParams(max_new_tokens=2), problem_id="p"),
        Request("c", (), params, problem_id="q"),
    )
    recorder.close()
    assert cut.token_ids == (5, 6, 7) and cut.finish_reason == "stop" and cut.stop_token == 7
    assert cut.top_logprobs == ((-0.1,),) * 3 and cut.text == "analysis then call"
    assert short.token_ids == (5, 6) and short.finish_reason == "length" and short.top_logprobs is None
    assert recorded.stop_token == 2 and recorded.token_ids == (1, 2)
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert lines[0]["token_ids"] == [5, 6, 7] and lines[0]["stop_token"] == 7
    assert lines[0]["top_logprobs"] == [[-0.1]] * 3
    assert "token_ids" not in lines[1]  # only a request with stop token ids needs them back


@pytest.mark.model
async def test_the_transformers_backend_stops_at_a_token_and_gives_the_top_k(real_backend: Backend):
    b = real_backend
    prompt = tuple(b.encode([{"role": "user", "content": "What is 2 + 2?"}]))
    (free,) = await served(
        b, Request("f", prompt, SamplingParams(max_new_tokens=24, logprobs=True, top_logprobs=3))
    )
    assert free.top_logprobs is not None and free.logprobs is not None
    assert len(free.top_logprobs) == free.new_tokens and all(len(t) == 3 for t in free.top_logprobs)
    for top, drawn in zip(free.top_logprobs, free.logprobs, strict=True):
        assert list(top) == sorted(top, reverse=True) and all(x <= 0 for x in top)
        assert math.isclose(top[0], drawn, abs_tol=1e-5)  # greedy draws the most likely token
    # stop at the fourth token the model wrote: the ids end with it, the text leaves it out
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    (stopped,) = await served(
        b, Request("s", prompt, SamplingParams(max_new_tokens=24, stop_token_ids=(stop_id,), top_logprobs=2))
    )
    assert stopped.finish_reason == "stop" and stopped.stop_token == stop_id and stopped.stop_string is None
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.text == b.tokenizer.decode(list(free.token_ids[:first]), skip_special_tokens=True)  # type: ignore[attr-defined]
    assert stopped.top_logprobs is not None and len(stopped.top_logprobs) == first + 1
