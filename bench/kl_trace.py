"""Where a spike of RL's k3 KL comes from: train_rl.py run as given (e.g. one step), every update's policy_loss call
traced, the three masked tokens whose log-prob fell furthest below the reference's printed per call.

  python bench/kl_trace.py --init out/tiny/sft123 --data out/tiny/world --out /tmp/kl --sim-steps 0 --real-steps 1 \\
      --prompts-per-step 8 --group-size 4 --oversample 3 --lr 3e-5 --max-new-tokens 384 --bf16 [--warmup-steps 5]

2026-12-02, the tiny SFT-1&2&3 (RUNS.md "Learning-rate warmup"): at lr 3e-5 the last micro-batch, after three optimizer
steps, holds a token sampled at log-prob -0.64 now at -17.65 (ref - logp 17.01); with --warmup-steps 5 the largest
gap of the step is 3.33.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_rl  # noqa: E402

policy_loss, calls = train_rl.policy_loss, []


def traced(logp, old_logp, ref_logp, advantages, entropy, mask, num_tokens, *args, **kwargs):
    gap = (ref_logp - logp).detach().masked_fill(~mask.bool(), -1e9)  # (B, T): how far below the reference
    values, flat = gap.flatten().topk(3)
    rows, cols = flat // gap.shape[1], flat % gap.shape[1]
    calls.append([(round(float(v), 2), int(r), int(c), round(float(ref_logp[r, c]), 2), round(float(old_logp[r, c]), 2),
                   round(float(advantages[r, c]), 2)) for v, r, c in zip(values, rows, cols)])
    return policy_loss(logp, old_logp, ref_logp, advantages, entropy, mask, num_tokens, *args, **kwargs)


if __name__ == "__main__":
    train_rl.policy_loss = traced
    try:
        train_rl.main(sys.argv[1:])
    finally:
        for j, top in enumerate(calls):
            if top[0][0] > 1:
                print(f"policy_loss call {j}: (ref - logp, row, position, ref logp, old logp, advantage) {top}")
        print("largest ref - logp per call:", [top[0][0] for top in calls])
