"""Tool-integrated reasoning through the whole pipeline, with the replay backend scripting the model:
code cells, rounds, attacks on the sandbox, the weighted vote and early stop, the time budget."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import anyio
import pytest

from pipeline.api import Pipeline
from stages.backends.replay import ReplayBackend
from tests.conftest import layered_config, small_config, solve_all, write_replay

pytestmark = pytest.mark.anyio

FENCE = "```"


def cell(code: str, before: str = "Let me compute.\n") -> str:
    return f"{before}{FENCE}python\n{code}\n{FENCE}\nand the rest is never read"


def tir_config(**sections):
    return layered_config(
        {
            "generation": {"prompt_style": "tir", "max_rounds": 4, "max_new_tokens": 200},
            "sandbox": {"cell_timeout_s": 2.0},
        },
        **sections,
    )


def prompt_text(request) -> str:
    return "".join(map(chr, request.prompt_ids))


async def test_a_sample_runs_code_over_rounds_with_shared_state(tmp_path):
    records = [
        {"id": "p", "round": 0, "text": cell("a = 6 * 7\nprint(a)")},
        {"id": "p", "round": 1, "text": cell("print(a + 1)", before="So a is 42. Check a + 1:\n")},
        {"id": "p", "round": 2, "text": "It is 43, so the answer is \\boxed{43}. Extra words."},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    out = await solve_all(tir_config(), backend, [{"id": "p", "problem": "What is 6*7+1?"}])
    r = out["p"]
    assert r.status == "ok" and r.answer == 43 and r.cells == 2 and r.finish == {"answer": 1}
    assert backend.requests is not None
    last = prompt_text(backend.requests[-1])
    assert f"{FENCE}output\n42\n{FENCE}" in last and f"{FENCE}output\n43\n{FENCE}" in last  # state kept
    assert "and the rest is never read" not in last  # each round stopped at the closing fence
    assert [q.round for q in backend.requests] == [0, 1, 2]


async def test_rounds_stop_at_max_rounds(tmp_path):
    records = [{"id": "p", "round": k, "text": cell(f"print({k})")} for k in range(5)]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    out = await solve_all(tir_config(generation={"max_rounds": 3}), backend, [{"id": "p", "problem": "x"}])
    assert out["p"].finish == {"rounds": 1} and out["p"].cells == 2
    assert backend.served == 3


ATTACKS = {
    "loop": "while True:\n    pass",
    "memory": "x = bytearray(50 * 1024**3)",
    "fork": "import os\nwhile True:\n    os.fork()",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned'])",
    "write": "open('{outside}', 'w').write('pwned')",
    "environ": "import os\nprint(os.environ.get('PIPELINE_TEST_SECRET'))\n"
    "print(open(f'/proc/{{os.getppid()}}/environ').read())",
    "kill": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "network": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'pwned')",
    "flood": "print('x' * 100_000_000)",
    "chdir": "import os\nos.chdir('/tmp')\nopen('{outside_name}', 'w').write('pwned')",
    "dirfd": "import os\nd = os.open('/tmp', os.O_RDONLY)\n"
    "os.write(os.open('{outside_name}', os.O_WRONLY | os.O_CREAT, dir_fd=d), b'pwned')",
    "pidfd": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL)",
}


async def test_attacks_through_the_pipeline_are_contained_and_other_answers_are_unaffected(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("PIPELINE_TEST_SECRET", "hunter2")
    outside = Path("/tmp") / f"pipeline-attack-{uuid.uuid4().hex}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    port = server.getsockname()[1]
    records = []
    for name, code in ATTACKS.items():
        records.append(
            {
                "id": name,
                "round": 0,
                "text": cell(code.format(outside=outside, outside_name=outside.name, port=port)),
            }
        )
        records.append({"id": name, "round": 1, "text": "Moving on: \\boxed{7}"})
    records.append({"id": "honest", "round": 0, "text": cell("print(sum(range(10)))")})
    records.append({"id": "honest", "round": 1, "text": "So \\boxed{45}"})
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records), keep_requests=True)
    cfg = tir_config(run={"max_in_flight": 4})
    items = [{"id": name, "problem": f"attack {name}"} for name in ATTACKS] + [
        {"id": "honest", "problem": "sum"}
    ]
    out = await solve_all(cfg, backend, items)

    assert set(out) == {*ATTACKS, "honest"}  # the run finished, every problem answered
    assert out["honest"].answer == 45 and out["honest"].status == "ok" and not out["honest"].code_errors
    for name in ATTACKS:
        assert out[name].answer == 7, name
    errors = {name: " ".join(out[name].code_errors) for name in ATTACKS}
    assert "TimeoutError" in errors["loop"]
    assert "MemoryError" in errors["memory"]
    assert "starting processes is not allowed" in errors["fork"]
    assert "starting processes is not allowed" in errors["subprocess"]
    assert "PermissionError" in errors["write"] and not outside.exists()
    assert "PermissionError" in errors["environ"]
    assert "PermissionError" in errors["kill"]
    assert "network access is not allowed" in errors["network"]
    assert errors["flood"] == ""  # printing is allowed; only what the model sees is capped
    assert "changing the working directory is not allowed" in errors["chdir"]
    assert "opening a directory outside the working directory" in errors["dirfd"] and not outside.exists()
    assert "AttributeError" in errors["pidfd"]  # calls no audit hook sees are gone from the modules
    with pytest.raises(BlockingIOError):
        server.accept()  # nothing connected
    server.close()
    assert backend.requests is not None
    fed_back = {q.problem_id: prompt_text(q) for q in backend.requests if q.round == 1}
    assert "hunter2" not in fed_back["environ"] and "\nNone\n" in fed_back["environ"]
    assert len(fed_back["flood"]) < len(fed_back["honest"]) + 1500
    assert "more characters of output not shown" in fed_back["flood"]


async def test_every_stream_at_size_one_still_finishes_with_rounds_and_samples(tmp_path):
    records = []
    for i in range(6):
        records.append({"id": f"p{i}", "round": 0, "text": cell(f"print({i} * 2)")})
        records.append({"id": f"p{i}", "round": 1, "text": f"\\boxed{{{i * 2}}}"})
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = tir_config(
        run={"max_in_flight": 2, "queue_size": 1, "verify_workers": 1},
        generation={"samples": 3, "prompt_style": "tir"},
        sandbox={"pool_size": 1},
    )
    out = await solve_all(cfg, backend, [{"id": f"p{i}", "problem": f"q{i}"} for i in range(6)])
    assert {k: r.answer for k, r in out.items()} == {f"p{i}": i * 2 for i in range(6)}
    assert all(r.cells == 3 for r in out.values())


async def test_early_stop_cancels_the_other_samples_wherever_they_are(tmp_path):
    records = [
        {"id": "p", "sample": 0, "round": 0, "text": "\\boxed{5}"},
        {"id": "p", "sample": 1, "round": 0, "text": "\\boxed{5}"},
        {"id": "p", "sample": 2, "round": 0, "text": "\\boxed{9}", "seconds": 30},  # generating
        {"id": "p", "sample": 3, "round": 0, "text": cell("import time\ntime.sleep(30)")},  # in the sandbox
        {"id": "p", "sample": 3, "round": 1, "text": "\\boxed{9}"},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = tir_config(
        generation={"samples": 4},
        vote={"early_stop": 2},
        run={"max_in_flight": 1},
        sandbox={"cell_timeout_s": 60.0},
    )
    started = anyio.current_time()
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(20):
            r = await p.solve({"id": "p", "problem": "x"})
            while p.runner.inference.stats.in_flight:
                await anyio.sleep(0.01)
        assert anyio.current_time() - started < 20
        assert p.runner.sandbox is not None and p.runner.sandbox.stats.cells <= 1
    assert r.answer == 5 and r.early_stop and r.status == "ok"
    assert r.to_json()["early_stop"] is True


async def test_a_weighted_vote_prefers_clean_code_and_ties_break_by_sample_index(tmp_path):
    records = [
        {"id": "p", "sample": 0, "round": 0, "text": "\\boxed{3}"},
        {"id": "p", "sample": 1, "round": 0, "text": "\\boxed{3}"},
        {"id": "p", "sample": 2, "round": 0, "text": cell("print(2 + 2)")},
        {"id": "p", "sample": 2, "round": 1, "text": "\\boxed{4}"},
        {"id": "p", "sample": 3, "round": 0, "text": cell("print(2 + 2)")},
        {"id": "p", "sample": 3, "round": 1, "text": "\\boxed{4}"},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = tir_config(generation={"samples": 4})
    heavy = await solve_all(cfg.replace(vote={"code_weight": 2.0}), backend, [{"id": "p", "problem": "x"}])
    even = await solve_all(cfg.replace(vote={"code_weight": 1.0}), backend, [{"id": "p", "problem": "x"}])
    assert heavy["p"].answer == 4  # 2 + 2 against 1 + 1
    assert even["p"].answer == 3  # 2 against 2: the answer of the lower sample index


async def test_time_budget_answers_every_problem_and_ends_on_time(tmp_path):
    records = [{"id": f"p{i}", "round": 0, "text": f"\\boxed{{{i}}}", "seconds": 0.6} for i in range(40)]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = small_config(
        time={"budget_s": 3.0, "expected_problems": 40, "margin_s": 0.3, "base_s": 0.8},
        run={"max_in_flight": 2},
    )
    started = anyio.current_time()
    out = await solve_all(cfg, backend, [{"id": f"p{i}", "problem": f"q{i}"} for i in range(40)])
    elapsed = anyio.current_time() - started
    assert len(out) == 40 and all(r.answer is not None for r in out.values())
    solved = [r for r in out.values() if r.status == "ok"]
    late = [r for r in out.values() if r.status == "fallback"]
    assert solved and late and len(solved) + len(late) == 40
    assert elapsed < 3.0 + 1.5


async def test_time_ahead_raises_the_samples_and_an_early_stop_frees_queued_ones_without_a_slot(tmp_path):
    records = [
        {"id": "p1", "round": 0, "text": "\\boxed{1}"},
        {"id": "p2", "round": 0, "text": "\\boxed{2}"},
        {"id": "p3", "sample": 0, "round": 0, "text": "\\boxed{5}"},
        {"id": "p3", "sample": 1, "round": 0, "text": "\\boxed{5}"},
        {"id": "p3", "round": 0, "text": "\\boxed{9}", "seconds": 30},
    ]
    backend = ReplayBackend.load(write_replay(tmp_path / "r.jsonl", records))
    cfg = small_config(
        generation={"samples": 2},
        run={"max_in_flight": 1},  # 2 request slots
        vote={"early_stop": 2},
        time={"budget_s": 100.0, "expected_problems": 3, "max_samples": 6},
    )
    async with Pipeline(cfg, backend=backend) as p:
        with anyio.fail_after(20):
            out = {r.id: r async for r in p.stream({"id": f"p{i}", "problem": f"q{i}"} for i in (1, 2, 3))}
            while p.runner.inference.stats.in_flight:
                await anyio.sleep(0.01)
        skipped = p.runner.inference.stats.skipped
    # p3 started with ~99 s left for 1 problem against an even 33 s: 6 samples instead of 2
    assert out["p3"].answer == 5 and out["p3"].early_stop
    assert out["p3"].finish == {"answer": 2, "cancelled": 4}
    assert skipped >= 2  # samples 4 and 5 were still waiting for a slot: cancelled without taking one
