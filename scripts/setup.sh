#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment: torch 2.13.0 (CPU build, from the
# machine's disk), the test/demo dependencies, and adaptive_lr with its C++ extension built in
# place. Safe to run again. Usage: source-free, `bash scripts/setup.sh`; env ADAPTIVE_LR_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${ADAPTIVE_LR_VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
# pip warns about local index paths that do not exist on this machine; they are harmless noise
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
quiet "${pip[@]}" install torch==2.13.0 -r requirements-dev.txt
# no build isolation: an isolated build would fetch a multi-GB CUDA torch and compile against it;
# the venv's bin on PATH, so that torch's extension builder finds its ninja and compiles the
# kernel sources in parallel (without it: one file at a time)
PATH="$(cd "$venv" && pwd)/bin:$PATH" quiet "${pip[@]}" install --no-build-isolation -e .
echo "set-up done: $("$venv/bin/python" -c 'import torch, adaptive_lr; print("torch", torch.__version__, "| backends on cpu:", adaptive_lr.available_backends("cpu"))')"
