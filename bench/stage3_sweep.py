"""One line per variant of bench/stage3_sweep.sh: dev EM on unknown-entity questions (all, multi-hop), on known ones,
the share of known ones answered without acting, and the policy's fact recall as its own world model on held-out
calls about seen entities (world_model.py eval).

    python bench/stage3_sweep.py out/stage3_sweep
"""
import json
import os
import sys

root = sys.argv[1]
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.exists(os.path.join(d, "wm_eval", "fidelity.json")):
        print(f"{name}: not finished (see {d}/*.log)")
        continue
    preds = [json.loads(line) for line in open(os.path.join(d, "dev", "predictions.jsonl"))]
    em = lambda rows: 100 * sum(r["em"] for r in rows) / max(1, len(rows))
    unknown = [r for r in preds if not r["known"]]
    known = [r for r in preds if r["known"]]
    multihop = [r for r in unknown if r["type"] != "1hop"]
    no_action = 100 * sum("<begin_search>" not in r["trajectory"] for r in known) / max(1, len(known))
    recall = json.load(open(os.path.join(d, "wm_eval", "fidelity.json")))["fidelity"]["policy_as_wm"]["seen"]
    print(f"{name}: dev EM unknown {em(unknown):.1f} (n {len(unknown)}), multi-hop {em(multihop):.1f} "
          f"(n {len(multihop)}), known {em(known):.1f} (n {len(known)}), known without acting {no_action:.1f}% | "
          f"policy as world model, seen-entity fact recall {100 * recall['fact_recall']:.1f}% (n {recall['n']})")
