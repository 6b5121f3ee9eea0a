#!/bin/bash
# The stage-3 sweep behind run.sh's tiny SFT3 (issue 14, README "The internal world model"): from a run's SFT-1&2,
# stage 3 on R copies of the renamed copies + C copies of the teacher's training calls (0.4 of a pass over the
# union, the rest as run.sh), then each checkpoint's dev EM (all 200 dev questions, agent) and its fidelity as its
# own world model (world_model.py eval). Variants run in parallel: one GPU takes all (2026-11-30, H200: ~3 min for
# 5 variants); on 2 CPU cores run one at a time (R_C 4_50 ~23 min of training).
#   bash bench/stage3_sweep.sh out/tiny out/stage3_sweep 1_0 2_0 4_0 1_50 2_50 4_50
#   DEVICE=cpu STEPS="--max-steps 2" DEV_LIMIT="--limit 1" WM_CALLS=4 WM_QUESTIONS=2 bash bench/stage3_sweep.sh RUN OUT 1_2
#     (a smoke run: a few steps, a few questions)
# Then: .venv/bin/python bench/stage3_sweep.py OUT   (one line per variant)
set -u
RUN=$1; OUT=$2; shift 2
PY=${PY:-.venv/bin/python}; DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-}; DEV_LIMIT=${DEV_LIMIT:-}
WM_CALLS=${WM_CALLS:-100}; WM_QUESTIONS=${WM_QUESTIONS:-32}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
W=$RUN/world
[ -e "$RUN/wm_calls.jsonl" ] || $PY world_model.py collect --data "$W" --out "$RUN/wm_calls.jsonl" --seed 0
variant() {  # variant R_C
  local d=$OUT/$1; mkdir -p "$d"
  $PY train_sft.py --stage 3 --init "$RUN/sft12" --data "$W" --out "$d/ckpt" --train-file "$W/sft_mix_renamed.jsonl" \
    --train-copies "${1%_*}" --wm-calls "$RUN/wm_calls.jsonl" --wm-calls-copies "${1#*_}" --epochs 0.4 \
    --batch-size 8 --micro-batch 8 --lr 1e-3 --seed 0 --device "$DEVICE" $STEPS > "$d/train.log" 2>&1 || return
  $PY evaluate.py --model "$d/ckpt" --mode agent --label "$1" --questions "$W/dev.jsonl" --corpus "$W/corpus.jsonl" \
    --template short --out "$d/dev" --seed 0 --batch-size 200 --max-new-tokens 384 --device "$DEVICE" $DEV_LIMIT \
    > "$d/dev.log" 2>&1
  $PY world_model.py eval --policy "$d/ckpt" --data "$W" --calls "$RUN/wm_calls.jsonl" --out "$d/wm_eval" \
    --batch-size 200 --device "$DEVICE" --max-calls "$WM_CALLS" --questions "$WM_QUESTIONS" > "$d/wm_eval.log" 2>&1
  echo "$1 done at $SECONDS s"
}
for v in "$@"; do variant "$v" & done
wait
$PY bench/stage3_sweep.py "$OUT"
