"""
Answer-fact recall (world_model.py's measure) of each policy as its own simulator, from the call alone (train_rl.py
--sim-context call), on two call sets: the real calls an RL run made after a step (the known-question steps of a
sim->real schedule: what a simulator must stand in for there) and world_model.py collect's held-out calls of seen
entities (`world_model.py eval`'s set). 12-03 (RUNS.md): SFT-1&2&3 3.1% / 67.2%; + 679 known-entity calls
(the first version of world_model.py collect --known-calls) in a stage-3 continuation 56.1% / 67.7%.

    python bench/sim_recall.py out/tiny_1203/sft123 --real-calls RL_OUT/real_calls.jsonl --after-step 55 \
        --wm-calls out/tiny_1203/wm_calls.jsonl
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from world_model import answer_facts, fact_recall, query_key  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("checkpoints", nargs="+", help="policies (save_pretrained dirs)")
p.add_argument("--real-calls", required=True, help="train_rl.py's OUT/real_calls.jsonl")
p.add_argument("--after-step", type=int, default=0, help="only its calls of later steps")
p.add_argument("--limit", type=int, default=200, help="first N distinct real calls")
p.add_argument("--wm-calls", required=True, help="world_model.py collect's output (held-out seen calls used)")
p.add_argument("--template", default="short", help="the policy's prompt template")
args = p.parse_args()

rl_calls, keys = [], set()
for line in open(args.real_calls):
    r = json.loads(line)
    key = r["args"].lower()
    answered = r["tool"] == "search" and r["observation"].startswith("result")
    if r["step"] > args.after_step and answered and key not in keys:
        keys.add(key)
        rl_calls.append(r)
rl_calls = rl_calls[:args.limit]
wm_calls = [json.loads(line) for line in open(args.wm_calls)]
seen = [r for r in wm_calls if r["split"] == "heldout" and r["entity_seen"]]
# the RL calls whose query stage 3 trained on (word for word: recall there may be memory) and the others
trained = {query_key(r["args"]) for r in wm_calls if r["split"] == "train"}
is_trained = [query_key(c["args"]) in trained for c in rl_calls]


def report(path, name, recall):
    recall = [x for x in recall if x is not None]
    if recall:
        print(f"{path} | {name}: {len(recall)} calls, answer-fact recall {100 * sum(recall) / len(recall):.1f}%",
              flush=True)


for path in args.checkpoints:
    model, tokenizer = common.load(path, add_action_tokens=True)
    simulator = common.policy_world_model_tools(model, tokenizer, args.template)
    for name, calls in ((f"RL calls after step {args.after_step}", rl_calls), ("held-out seen", seen)):
        observations = simulator([("search", c["args"]) for c in calls])
        recall = [fact_recall(answer_facts(c["args"], c["observation"]), o) for c, o in zip(calls, observations)]
        report(path, name, recall)
        if calls is rl_calls:  # the same calls split by whether stage 3 trained on their query
            report(path, "  of them queries stage 3 trained on", [x for x, t in zip(recall, is_trained) if t])
            report(path, "  of them new queries", [x for x, t in zip(recall, is_trained) if not t])
