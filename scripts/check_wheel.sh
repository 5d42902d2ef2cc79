#!/usr/bin/env bash
# Checks the package as users install it, from a copy of the working tree, in a fresh virtual
# environment that has torch only:
#  1. the wheel that `python -m build --no-isolation --wheel` builds (with adaptive_lr._C) installs,
#     its fused cpu backend runs, and `adaptive-lr --help` and a tiny bench run without the study
#     extra (sweep then says how to get it);
#  2. a plain `pip install .` (an isolated build: torch not importable, no extension, a loud
#     warning) compiles the kernels on first use (the progress line), bit-identical to the wheel's,
#     and loads them from the cache the second time; ADAPTIVE_LR_JIT=0 then gives the reason.
# Builds with the project's .venv (scripts/setup.sh; env ADAPTIVE_LR_VENV). A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
build_python=$(cd "${ADAPTIVE_LR_VENV:-.venv}" && pwd)/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "check_wheel (${SECONDS} s): $*"; }
fail() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
# pip warns about local index paths that do not exist on this machine; they are harmless noise
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }

# the working tree as it is: tracked and untracked files, no ignored ones (.venv, build/, _C)
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
  [ -e "$file" ] && printf '%s\0' "$file"
done | xargs -0 cp --parents -t "$(mkdir -p "$work/src" && echo "$work/src")"
cd "$work"  # not the checkout, whose adaptive_lr/ `python -c` would import

say "building the wheel"
# (the build venv's bin on PATH: torch's extension builder then compiles in parallel with ninja)
PATH="$(dirname "$build_python"):$PATH" "$build_python" -m build --no-isolation --wheel \
  --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; fail "python -m build"; }
rm -rf "$work/src/build" "$work/src/"*.egg-info  # the pip install below builds from scratch

say "a fresh virtual environment with torch only"
python3 -m venv "$work/venv"
python=$work/venv/bin/python
pip=("$python" -m pip -q --disable-pip-version-check)
quiet "${pip[@]}" install --no-compile torch==2.13.0  # no .pyc for all of torch: faster
quiet "${pip[@]}" install "$work"/dist/*.whl
export XDG_CACHE_HOME=$work/cache  # where the kernels compiled on first use go
cat >"$work/step.py" <<'EOF'
"""Ten ActiveAdamW steps on the fused cpu backend; says whether adaptive_lr._C is installed, saves
the params to sys.argv[1], or checks that they are bit-identical to those in sys.argv[2]."""
import importlib.util
import sys

import torch

import adaptive_lr

print("adaptive_lr._C installed:", importlib.util.find_spec("adaptive_lr._C") is not None)
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(n)) for n in (1000, 37, 100_000)]
optimizer = adaptive_lr.ActiveAdamW(params, lr=1e-2, steps_per_epoch=5, backend="cpu")
for _ in range(15):  # gains first change at step 11 (the third epoch)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
if len(sys.argv) > 2:
    assert all(torch.equal(p, s) for p, s in zip(params, torch.load(sys.argv[2]))), "differ"
else:
    torch.save([p.detach() for p in params], sys.argv[1])
EOF
# step.py ARGS..., its stdout into $work/out, its stderr into $work/err
step() { "$python" "$work/step.py" "$@" >"$work/out" 2>"$work/err" || { cat "$work/err"; false; }; }

say "1. the wheel"
step "$work/wheel.pt" || fail "step"
grep -q "_C installed: True" "$work/out" || fail "the wheel has no adaptive_lr._C"
# (torch warns on stderr that there is no numpy; nothing of adaptive_lr may)
! grep -q adaptive_lr "$work/err" || { cat "$work/err"; fail "the wheel wrote to stderr"; }
[ ! -e "$XDG_CACHE_HOME" ] || fail "the wheel compiled kernels although it has adaptive_lr._C"
# (outputs are captured before they are matched: `cmd | grep -q` under pipefail fails whenever
# grep exits at its match before cmd has printed its last line)
"$work/venv/bin/adaptive-lr" --help >"$work/out" || fail "adaptive-lr --help"
grep -q "sweep" "$work/out" || fail "adaptive-lr --help"
"$work/venv/bin/adaptive-lr" bench --sizes 1M --layouts 4 --dtypes float32 --backends cpu \
  --rounds 1 --steps-per-round 1 >"$work/out" || fail "adaptive-lr bench"
grep -q "| ActiveAdamW cpu compact |" "$work/out" || fail "adaptive-lr bench"
if "$work/venv/bin/adaptive-lr" sweep --quick --out "$work/sweep" 2>"$work/err"; then
  fail "sweep ran without the study extra"
fi
grep -q "pip install 'adaptive_lr\[study\]'" "$work/err" || { cat "$work/err"; fail "no hint"; }

say "2. a plain pip install . (pure-Python), the kernels compiled on first use"
quiet "${pip[@]}" uninstall -y adaptive_lr
quiet "${pip[@]}" install ninja==1.13.2
"$python" -m pip install -v --disable-pip-version-check "$work/src" >"$work/pip.log" 2>&1 \
  || { cat "$work/pip.log"; fail "pip install ."; }
grep -q "adaptive_lr._C is NOT built" "$work/pip.log" || fail "setup.py did not warn"
step - "$work/wheel.pt" || fail "first use (or its results differ from the wheel's)"
grep -q "_C installed: False" "$work/out" || fail "not the pure-Python install to check"
grep -q "^adaptive_lr: building the fused CPU kernels for torch" "$work/err" \
  || { cat "$work/err"; fail "no progress line on first use"; }
step - "$work/wheel.pt" || fail "second use"
! grep -q adaptive_lr "$work/err" || { cat "$work/err"; fail "the second use compiled again"; }
ADAPTIVE_LR_JIT=0 XDG_CACHE_HOME=$work/empty-cache "$python" -c "
from adaptive_lr.backends import unavailable_reason
print(unavailable_reason('cpu', 'cpu'))" >"$work/out"
grep -q "ADAPTIVE_LR_JIT=0 turns off compiling" "$work/out" || fail "ADAPTIVE_LR_JIT=0 gives no reason"
say "all checks passed"
