#!/usr/bin/env bash
# Set up, then run the main job: `adaptive-lr demo`, a short real training run (AdamW vs
# ActiveAdamW at a too-small learning rate on scikit-learn's digits) and a quick step-time table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${ADAPTIVE_LR_VENV:-.venv}
"$venv/bin/adaptive-lr" demo "$@"
