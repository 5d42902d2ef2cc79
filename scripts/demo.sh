#!/usr/bin/env bash
# Set up, then run the main job: a short real training demo (AdamW vs ActiveAdamW at a
# too-small learning rate on scikit-learn's digits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv=${ADAPTIVE_LR_VENV:-.venv}
"$venv/bin/python" -m adaptive_lr.demo
