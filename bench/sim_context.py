"""
The policy as its own world model, in two contexts: greedy EM on the same questions with the real tool, with
observations the policy writes inside its own trajectory (evaluate.py's agent-sim, the paper's RL stage 1), and with
observations it writes from the call alone (train_rl.py --sim-context call: common.policy_world_model_tools, whose
calculator is the real one). Prints EM overall and per question type; the ratios are to the real tool's EM.
Measured 2026-12-01 on the tiny SFT-1&2&3 (RUNS.md "The simulator's context").

    OMP_NUM_THREADS=2 python bench/sim_context.py --model out/tiny/sft123 --data out/tiny/world --file train.jsonl
"""
import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import policy_world_model_tools, read_rows  # noqa: E402
from evaluate import evaluate  # noqa: E402
from model import checkpoint_template, load  # noqa: E402
from tools import make_tools  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--model", required=True, help="policy checkpoint (save_pretrained dir)")
p.add_argument("--data", required=True, help="data.py dir: the question file and corpus.jsonl")
p.add_argument("--file", default="train.jsonl", help="question file in --data (rl.jsonl: questions SFT never saw)")
p.add_argument("--limit", type=int, default=240, help="its first N questions")
p.add_argument("--batch-size", type=int, default=64, help="evaluate.py batch size")
args = p.parse_args()

policy, tokenizer = load(args.model, add_action_tokens=True)
template = checkpoint_template(args.model, None)
questions = read_rows(os.path.join(args.data, args.file), ("question", "golden_answers"))[:args.limit]
corpus = os.path.join(args.data, "corpus.jsonl")
runs = [("real tool", make_tools(corpus=corpus), "agent"),
        ("in the trajectory", make_tools(corpus=corpus), "agent-sim"),  # no tool reached: the policy writes it
        ("from the call", policy_world_model_tools(policy, tokenizer, template), "agent")]
real_em = None
for name, tools, mode in runs:
    t = time.time()
    _, records = evaluate(policy, tokenizer, questions, tools, mode, template=template, batch_size=args.batch_size,
                          max_new_tokens=384, progress=False)
    by_type = defaultdict(list)
    for r in records:
        by_type[r["type"]].append(r["em"])
    em = 100 * sum(r["em"] for r in records) / len(records)
    real_em = real_em or em
    print(f"{name:>18}: EM {em:.1f} ({em / real_em:.2f}x) | " + " | ".join(
        f"{k} {100 * sum(v) / len(v):.0f}" for k, v in sorted(by_type.items())) + f" | {time.time() - t:.0f} s")
