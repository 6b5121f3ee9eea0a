#!/bin/bash
# The simulated-vs-real step reward of a checkpoint on the SAME prompts (issue 14's ">= 0.7x"): train_rl.py twice at
# lr 0 (the policy never moves), same seed, so every step rolls out the same prompts with the same sampling seeds;
# one run's observations are written by the policy itself (--sim-context call, run.sh's simulated steps), the other's
# come from the real tools (--sim-real-tools). Prints each step's mean reward over every rollout of both runs, the
# means and their ratio. run.sh's tiny RL line, --oversample 3: 24 prompts x 4 samples a step.
#   bash bench/sim_real_reward.sh out/tiny/sft123 out/tiny/world train_unknown.jsonl OUT [STEPS]
set -eu
INIT=$1; W=$2; Q=$3; OUT=$4; STEPS=${5:-8}
PY=${PY:-.venv/bin/python}
BF16=""; grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && BF16="--bf16"  # as run.sh decides
RL="--prompts-per-step 8 --group-size 4 --oversample 3 --max-new-tokens 384 --ppo-epochs 1 --minibatches 2"
RL="$RL --temperature 1.0 $BF16"  # run.sh's sampling temperature
RL="$RL --lr 0 --kl-coef 0 --seed 0 --sim-steps $STEPS --real-steps 0 --questions $Q"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
[ -e "$OUT/sim/config.json" ] || $PY train_rl.py --init "$INIT" --data "$W" --out "$OUT/sim" $RL \
  --sim-context call > "$OUT/sim.log" 2>&1
[ -e "$OUT/real/config.json" ] || $PY train_rl.py --init "$INIT" --data "$W" --out "$OUT/real" $RL \
  --sim-real-tools search calculator > "$OUT/real.log" 2>&1
$PY - "$OUT" <<'EOF'
import json, sys
runs = {env: [json.loads(line) for line in open(f"{sys.argv[1]}/{env}/metrics.jsonl")] for env in ("sim", "real")}
for s, r in zip(runs["sim"], runs["real"]):
    print(f"step {s['step']} | sim reward {s['reward']:.3f} (actions {s['actions']:.2f}) | real {r['reward']:.3f} "
          f"(actions {r['actions']:.2f}, {r['real_calls']} real calls)")
mean = {env: sum(m["reward"] for m in rows) / len(rows) for env, rows in runs.items()}
print(f"mean step reward: simulated {mean['sim']:.3f}, real {mean['real']:.3f}, ratio {mean['sim'] / mean['real']:.2f}x")
EOF
