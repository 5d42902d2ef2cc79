#!/usr/bin/env bash
# Set up, then run the whole test suite: the C++ unit tests (ctest, torch-free) and pytest (every
# backend against the reference). Extra arguments go to pytest. Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${ADAPTIVE_LR_VENV:-.venv}
start=$SECONDS
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake -j 2 >/dev/null
ctest --test-dir build/cmake --output-on-failure
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
echo "tests took $((SECONDS - start)) s"
