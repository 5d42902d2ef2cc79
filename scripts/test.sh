#!/usr/bin/env bash
# Set up, then run the whole test suite: the C++ unit tests (ctest, torch-free), the CUDA kernels'
# compile check (nvcc, no GPU needed) and pytest (every backend against the reference). Extra
# arguments go to pytest. Exits non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# each phase's time, to see where the command's minutes go
phase() { echo "test.sh: $1 took $((SECONDS - mark)) s"; mark=$SECONDS; }
mark=$SECONDS
# The CUDA kernels are compile-checked by CMake with the toolkit's real nvcc: CUDA_HOME's, else the
# directory the nvcc on PATH runs from (which may be a wrapper script). On CI it must exist.
cuda_args=()
if [ -n "${CUDA_HOME:-}" ]; then
  cuda_args=(-DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
elif command -v nvcc >/dev/null; then
  cuda_bin=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')
  cuda_args=(-DCMAKE_CUDA_COMPILER="$cuda_bin/nvcc")
elif [ "${CI:-}" != true ]; then
  echo "NOTE: nvcc not found (set CUDA_HOME): the CUDA kernels' compile check is SKIPPED"
fi
[ "${CI:-}" = true ] && cuda_args+=(-DADAPTIVE_LR_REQUIRE_CUDA=ON)
cpp_build() {
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release "${cuda_args[@]}" \
    && cmake --build build/cmake -j 2
}
# The C++ build needs no venv, so it runs beside the set-up (whose pip installs keep one core
# busy, not two), in a process group of its own (set -m), which ends with this script however it
# ends (Ctrl-C included)
mkdir -p build
cmake_log=build/cmake-build.log
set -m
cpp_build >"$cmake_log" 2>&1 &
cmake_build=$!
set +m
trap 'kill -- -"$cmake_build" 2>/dev/null || true' EXIT
bash scripts/setup.sh
phase "set-up (the C++ build beside it)"
venv=${ADAPTIVE_LR_VENV:-.venv}
wait "$cmake_build" || { cat "$cmake_log"; echo "test.sh: the C++ build FAILED" >&2; exit 1; }
phase "the rest of the C++ build"
ctest --test-dir build/cmake --output-on-failure
phase "ctest"
# both cores: pytest-xdist's workers take tests as they free up (most tests are single-threaded)
"$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=25 "$@"
phase "pytest"
# The Triton tests again under the oldest supported triton (requirements-dev.txt holds the newest),
# installed beside the venv, not into it; its interpreter needs numpy < 2.4 (docs/triton.md).
oldest=build/triton-3.4.0
[ -d "$oldest/triton-3.4.0.dist-info" ] || "$venv/bin/python" -m pip -q \
  --disable-pip-version-check install --no-deps --target "$oldest" triton==3.4.0 numpy==2.3.5
PYTHONPATH="$oldest" ADAPTIVE_LR_EXPECT_TRITON=3.4.0 "$venv/bin/python" -m pytest -q \
  -p no:cacheprovider -n 2 --dist worksteal \
  -W "ignore:Conversion of an array with ndim:DeprecationWarning" tests/test_triton_backend.py
phase "the Triton tests under triton 3.4"
echo "test.sh: the whole command took $SECONDS s"
