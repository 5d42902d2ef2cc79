#!/usr/bin/env bash
# Set up, then run the main job: a short real training demo (AdamW vs ActiveAdamW at a
# too-small learning rate on scikit-learn's digits) and a quick step-time table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${ADAPTIVE_LR_VENV:-.venv}
"$venv/bin/python" -m adaptive_lr.demo
echo
echo "Step time (quick run; the full table: python -m adaptive_lr.benchmark):"
"$venv/bin/python" -m adaptive_lr.benchmark --sizes 1M 10M --dtypes float32 --rounds 3 --steps-per-round 3
