#!/usr/bin/env bash
# The first GPU run in one command (docs/cuda.md, "The GPU check"): builds adaptive_lr's CUDA
# kernels for the GPU present, runs every test marked `cuda` (the CUDA and Triton backends' own
# tests and the generic tests on the device, CUDA graphs and host syncs included), runs
# compute-sanitizer on a short stepping script where it works, benchmarks the step time, and
# writes OUT_DIR/report.md beside the raw files. It uses the machine's own python3 (the one that
# holds a CUDA torch; $PYTHON overrides it): no venv, no downloads. Each stage stops at its own
# time limit, and every stage has ended DEADLINE (460) seconds after the start: within 8 minutes.
#
#   bash scripts/gpu_check.sh [OUT_DIR]             (default: out/gpu_check)
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]   no GPU needed: the driver, report included,
#                                                   with the CUDA stages skipped
set -uo pipefail
dry_run=false
if [ "${1:-}" = --dry-run ]; then
  dry_run=true
  shift
fi
out=$(realpath -m "${1:-$(dirname "$0")/../out/gpu_check}")  # before the cd below
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
# time limits in seconds (environment overrides: a slower machine, or the dry-run test); the tests
# and the sanitizer also stop where the benchmark's time would begin (see `limit` below)
: "${DEADLINE:=460}" "${LIMIT_BUILD:=150}" "${LIMIT_TESTS:=300}" "${LIMIT_SANITIZER:=150}"
: "${LIMIT_BENCH:=100}" "${TEST_TIMEOUT:=150}"  # TEST_TIMEOUT: per test (tests/conftest.py)

if [ -n "$(ls -A "$out" 2>/dev/null)" ] && [ ! -f "$out/stages.tsv" ]; then
  echo "gpu_check: $out holds files of something else: give an empty or new OUT_DIR" >&2
  exit 2
fi
if ! cuda=$("$py" -c 'import torch; print(torch.cuda.is_available(), torch.__version__)' 2>&1)
then
  echo "gpu_check: $py cannot import torch: $cuda" >&2
  exit 2
fi
if [ "${cuda%% *}" != True ] && ! $dry_run; then
  echo "gpu_check: no CUDA device visible to $py (torch ${cuda#* }): this check needs a GPU" \
       "machine. 'bash scripts/gpu_check.sh --dry-run' runs its driver without one." >&2
  exit 2
fi

mkdir -p "$out"
rm -f "$out"/*  # a previous check's files
export out py TEST_TIMEOUT
failed=0

# record STAGE STATUS SECONDS LIMIT NOTE: one row of the report's stage table
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$out/stages.tsv"; }

# staged NAME LIMIT NOTE COMMAND...: runs COMMAND under its time limit, records how it ended.
# timeout signals its whole process group, so a stage's background processes stop with it.
staged() {
  local name=$1 limit=$2 note=$3 start=$SECONDS rc status
  shift 3
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=passed ;;
    124 | 137) status="stopped at its time limit" ;;
    *) status="failed (exit $rc)" ;;
  esac
  record "$name" "$status" "$((SECONDS - start))" "$limit" "$note"
  [ "$rc" = 0 ]
}

skipped() { record "$1" "skipped" 0 "" "$2"; }

# limit MAX RESERVE: MAX seconds, or fewer so that RESERVE seconds remain before the DEADLINE
limit() {
  local left=$((DEADLINE - SECONDS - $2))
  echo $((left < $1 ? (left > 1 ? left : 1) : $1))
}

# ---- machine -----------------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')   cores: $(nproc)   dry run: $dry_run"
  "$py" - <<'EOF'
import importlib.util, torch
print("python", __import__("platform").python_version(), "| torch", torch.__version__,
      "| CUDA", torch.version.cuda, "| triton", importlib.util.find_spec("triton") and
      __import__("triton").__version__)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB,"
          f" L2 {props.L2_cache_size / 2**20:.0f} MiB")
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | grep -i version
} > "$out/info.txt" 2>&1
cat "$out/info.txt"

# ---- build: the extension for this GPU only, every core, against the installed torch ------------
# shellcheck disable=SC2317  # run as `timeout ... bash -c build` (exported)
build() {
  local cuda_bin
  if [ -z "${CUDA_HOME:-}" ]; then  # the toolkit the nvcc on PATH runs from (it may be a wrapper)
    cuda_bin=$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p')
    export CUDA_HOME=${cuda_bin%/bin}
  fi
  TORCH_CUDA_ARCH_LIST=$("$py" -c \
    'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  export TORCH_CUDA_ARCH_LIST MAX_JOBS
  MAX_JOBS=$(nproc)
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  start=$SECONDS
  # no index, no dependencies, no isolation: nothing is downloaded, the installed torch is used
  PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --no-index --no-deps --no-build-isolation \
    --disable-pip-version-check -e . &&
    echo "built in $((SECONDS - start)) s" &&
    "$py" -c 'import adaptive_lr
for name in ("cuda", "triton"):
    print(name, "on cuda:", adaptive_lr.backends.unavailable_reason(name, "cuda") or "available")'
}

# ---- tests on the device, in parallel shards (each writes junit XML) ----------------------------
# shellcheck disable=SC2317  # run as `timeout ... bash -c tests` (exported)
tests() {
  local generic=(tests/test_amp.py tests/test_checkpoint.py tests/test_compile.py
                 tests/test_bad_input.py)
  local own=(tests/test_cuda_backend.py tests/test_triton_backend.py tests/test_backend_parity.py
             tests/test_properties.py)
  local file ignored=() shard name pids=() rc=0 shards
  for file in "${generic[@]}" "${own[@]}"; do ignored+=(--ignore="$file"); done
  # "<name> <pytest arguments>": every test marked cuda, in every file, runs in one shard; the
  # long ones (many Triton compiles) alone, so that a per-test stop loses no other file's results
  shards=("cuda_backend ${own[0]}" "triton_backend ${own[1]}" "parity ${own[2]}"
          "properties ${own[3]}" "generic ${generic[*]}" "other tests ${ignored[*]}")
  for shard in "${shards[@]}"; do
    name=${shard%% *}
    # shellcheck disable=SC2086  # the shard's files and options are words
    # a file that cannot be imported on this machine is reported, the shard's others still run
    ADAPTIVE_LR_TEST_TIMEOUT=$TEST_TIMEOUT "$py" -m pytest -q -s -p no:cacheprovider -m cuda \
      --continue-on-collection-errors --junitxml="$out/junit-$name.xml" ${shard#* } \
      > "$out/pytest-$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid"
    case $? in 0 | 5) ;; *) rc=1 ;; esac  # 5: no test of that shard is marked cuda
  done
  return "$rc"
}

# ---- compute-sanitizer on a short stepping script, where it works -------------------------------
# shellcheck disable=SC2317  # run as `timeout ... bash -c sanitizer` (exported)
sanitizer() {
  local tool pids=() rc=0 smoke=(--tool memcheck --error-exitcode 9 "$py" -c
    "import torch; torch.ones(4, device='cuda').add_(1); torch.cuda.synchronize()")
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer is not installed on this machine: not run." \
      > "$out/sanitizer-status.txt"
    return 0
  fi
  if ! timeout 60 compute-sanitizer "${smoke[@]}" > "$out/sanitizer-smoke.txt" 2>&1; then
    echo "compute-sanitizer does not work on this machine (a one-kernel torch script fails" \
         "under it, see sanitizer-smoke.txt): not run." > "$out/sanitizer-status.txt"
    return 0
  fi
  echo "compute-sanitizer works here; scripts/gpu_sanitize_steps.py under each tool:" \
    > "$out/sanitizer-status.txt"
  for tool in memcheck racecheck synccheck initcheck; do
    # without the caching allocator every tensor is its own allocation: out-of-bounds is visible
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$py" scripts/gpu_sanitize_steps.py > "$out/sanitizer-$tool.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || rc=1
  done
  return "$rc"
}

# ---- the stages, in order -----------------------------------------------------------------------
export -f build tests sanitizer  # for the `bash -c` that timeout runs
if $dry_run; then
  skipped build "dry run"
else
  staged build "$LIMIT_BUILD" "for this GPU only, $(nproc) jobs (build.log)" bash -c build \
    > "$out/build.log" 2>&1 || failed=1
  tail -n 2 "$out/build.log"
fi

if $dry_run; then
  staged tests "$(limit "$LIMIT_TESTS" "$LIMIT_BENCH")" \
    "dry run: the cuda-marked tests on the CPU (they skip)" bash -c tests || failed=1
  staged sanitizer "$(limit "$LIMIT_SANITIZER" "$LIMIT_BENCH")" \
    "dry run: the sanitized script on the CPU, no sanitizer" \
    "$py" scripts/gpu_sanitize_steps.py cpu > "$out/sanitizer-dry-run.txt" 2>&1 || failed=1
else
  # correctness only, so they share the device; the benchmark below runs alone
  staged tests "$(limit "$LIMIT_TESTS" "$LIMIT_BENCH")" "per-test limit $TEST_TIMEOUT s" \
    bash -c tests &
  tests_pid=$!
  staged sanitizer "$(limit "$LIMIT_SANITIZER" "$LIMIT_BENCH")" "beside the tests" \
    bash -c sanitizer || failed=1
  wait "$tests_pid" || failed=1
fi

# ---- step-time benchmark: 10M and 100M params, real models' tensor lists ------------------------
# shellcheck disable=SC2317  # run as `timeout ... bash -c bench` (exported)
bench() {  # two runs, each writing its JSON: a stop in the second keeps the first's numbers
  local common=(-m adaptive_lr.benchmark --dtypes float32 --rounds 3 --steps-per-round 4)
  if $dry_run; then
    "$py" "${common[@]}" --device cpu --sizes 1M --layouts 4 --backends cpu --rounds 1 \
      --steps-per-round 1 --json "$out/bench-1M.json" > "$out/bench-1M.md" 2>&1
    return
  fi
  local rc=0
  "$py" "${common[@]}" --device cuda --sizes 10M gpt2-small bert-base resnet50 \
    --layouts 4 200 --json "$out/bench-10M-models.json" > "$out/bench-10M-models.md" 2>&1 || rc=1
  # 100M: the default (compact) state only, to stay inside the stage's time
  "$py" "${common[@]}" --device cuda --sizes 100M --layouts 4 200 --state-precision compact \
    --json "$out/bench-100M.json" > "$out/bench-100M.md" 2>&1 || rc=1
  return "$rc"
}

export -f bench
export dry_run
staged bench "$(limit "$LIMIT_BENCH" 0)" \
  "$($dry_run && echo "dry run: 1M params on the CPU" || echo "alone on the device")" \
  bash -c bench || failed=1

"$py" scripts/gpu_check_report.py "$out" || failed=1
echo "gpu_check: report in $out/report.md (took $SECONDS s)"
exit $failed
