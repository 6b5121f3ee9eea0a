#!/bin/bash
# One RL recipe from a run's SFT-1&2&3 over seeds: train_rl.py with run.sh's tiny RL flags plus the recipe's, run.sh's
# evaluate.py line on the test split, then each seed's paired gain over SFT-1&2&3 and their mean (sd)
# (bench/paired.py): the lines RUNS.md's RL experiments of 2026-12-03 ran by hand, as one command. Seeds in
# parallel, one thread each (2 cores: two at a time, ~35-45 min a seed for 85-115 steps).
#   bash bench/rl_seeds.sh out/tiny_1203 out/ctl60 --sim-steps 55 --real-steps 60 --questions train_unknown.jsonl \
#     --real-questions rl_known.jsonl --sim-real-tools search calculator --kl-coef 0 --no-grpo-std-norm
#   SEEDS="0" RL="--prompts-per-step 2 --group-size 2 --max-new-tokens 64" EVAL="--limit 12" \
#     bash bench/rl_seeds.sh RUN OUT --sim-steps 0 --real-steps 1      (a smoke run)
# Writes OUT/seedN (the checkpoint), OUT/seedN_eval (evaluate.py), OUT/seedN.log; prints the paired lines.
# One thread a seed (OMP_NUM_THREADS=1), as run.sh's RL lanes on 2 cores: on another thread count a seed is another
# run (README "Reproducibility"), so keep it at 1 to repeat a recorded seed.
set -eu
RUN=$1; OUT=$2; shift 2
PY=${PY:-.venv/bin/python}; SEEDS=${SEEDS:-0 1 2}; PARALLEL=${PARALLEL:-2}
TINY_RL="--prompts-per-step 8 --group-size 4 --oversample 3 --lr 3e-5 --max-new-tokens 384 --ppo-epochs 2"
BF16=""; grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && BF16="--bf16"  # as run.sh decides
RL=${RL:-$TINY_RL --minibatches 2 --temperature 1.0 $BF16}  # run.sh's tiny RL line
EVAL=${EVAL:---batch-size 128 --max-new-tokens 384}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
W=$RUN/world; mkdir -p "$OUT"
seed() {  # seed N RECIPE...: its RL run and its evaluation, each skipped when already there
  local n=$1 d=$OUT/seed$1; shift
  [ -e "$d/config.json" ] || $PY train_rl.py --init "$RUN/sft123" --data "$W" --out "$d" --seed "$n" $RL "$@" \
    > "$d.log" 2>&1
  [ -e "${d}_eval/results.json" ] || $PY evaluate.py --model "$d" --mode agent --label "seed$n" \
    --questions "$W/test.jsonl" --corpus "$W/corpus.jsonl" --template short --out "${d}_eval" --seed 0 $EVAL \
    >> "$d.log" 2>&1
}
running=0
for s in $SEEDS; do
  seed "$s" "$@" || { echo "seed $s FAILED: $OUT/seed$s.log" >&2; exit 1; } &
  running=$((running + 1)); if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
$PY bench/paired.py "$RUN/eval/sft-123" $(for s in $SEEDS; do echo "$OUT/seed${s}_eval"; done)
