#!/usr/bin/env bash
# Set up the environment (once) and run the test suite on CPU. Usage: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch, transformers, tokenizers, numpy, tqdm, pytest" 2>/dev/null \
  || .venv/bin/pip install -q -r requirements.txt
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q tests "$@"
