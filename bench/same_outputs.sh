#!/usr/bin/env bash
# Behaviour check for refactors: run the same short pipeline (world -> base LM -> SFT stage 2 -> RL GRPO and PPO, sim
# then real -> evaluate) at git revision REF and at the working tree, then compare every output: metrics rows (minus
# wall-clock fields), weights (bytes of model.safetensors), the real-call logs and the predictions.
#   bash bench/same_outputs.sh REF            # e.g. bash bench/same_outputs.sh 320a64d
# Prints "identical" per output and exits 1 on the first difference. CPU, about 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:?usage: bash bench/same_outputs.sh REF}
ROOT=$(pwd)
WORK=$(mktemp -d)
trap 'git -C "$ROOT" worktree remove --force "$WORK/ref" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
git worktree add --detach -q "$WORK/ref" "$REF"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY="$ROOT/.venv/bin/python"

pipeline() {  # $1: source tree, $2: output dir
  local src=$1 out=$2
  (cd "$src"
   $PY data.py --out "$out/world" --seed 0 >/dev/null
   $PY train_sft.py --stage base --init tiny --data "$out/world" --out "$out/base" --max-steps 4 --batch-size 16 \
     --micro-batch 8 --max-len 256 --device cpu >/dev/null
   $PY train_sft.py --stage 2 --init "$out/base" --data "$out/world" --out "$out/sft2" --max-steps 3 --batch-size 8 \
     --micro-batch 4 --device cpu >/dev/null
   local mb=--micro-batch
   grep -q -- '"--micro-batch-size"' train_rl.py && mb=--micro-batch-size  # the flag's name before the refactor
   for algo in grpo ppo; do
     $PY train_rl.py --init "$out/sft2" --data "$out/world" --out "$out/rl_$algo" --algo $algo --sim-steps 1 \
       --real-steps 1 --prompts-per-step 4 --group-size 2 --max-new-tokens 64 --lr 1e-4 --device cpu \
       $mb 2 >/dev/null
   done
   $PY evaluate.py --model "$out/rl_grpo" --mode agent --questions "$out/world/test.jsonl" \
     --corpus "$out/world/corpus.jsonl" --template short --limit 2 --batch-size 16 --max-new-tokens 64 \
     --device cpu --out "$out/eval" >/dev/null)
}

pipeline "$WORK/ref" "$WORK/a"
pipeline "$ROOT" "$WORK/b"

same() { if cmp -s "$1" "$2"; then echo "identical  ${1#$WORK/a/}"; else echo "DIFFERENT  ${1#$WORK/a/}"; exit 1; fi; }
rows() {  # metrics rows without wall-clock fields, keys sorted
  $PY -c "import json,sys
drop = {'tok_per_s','tokens_per_s','rollout_s','update_s'}
for line in open(sys.argv[1]):
    print(json.dumps({k: v for k, v in sorted(json.loads(line).items()) if k not in drop}))" "$1"
}
for d in base sft2 rl_grpo rl_ppo; do
  same "$WORK/a/$d/model.safetensors" "$WORK/b/$d/model.safetensors"
  rows "$WORK/a/$d/metrics.jsonl" > "$WORK/a/$d/m.txt"; rows "$WORK/b/$d/metrics.jsonl" > "$WORK/b/$d/m.txt"
  same "$WORK/a/$d/m.txt" "$WORK/b/$d/m.txt"
done
for algo in grpo ppo; do same "$WORK/a/rl_$algo/real_calls.jsonl" "$WORK/b/rl_$algo/real_calls.jsonl"; done
same "$WORK/a/eval/predictions.jsonl" "$WORK/b/eval/predictions.jsonl"
echo "same outputs: $REF == working tree"
