"""One line per variant of bench/stage3_sweep.sh, in Table 1's cells (report.world_cells): dev EM on all
unknown-entity questions, on unknown multi-hop (2-4 hop) and on known ones, the share of known ones answered without
acting, and the policy's fact recall as its own world model on held-out calls about seen entities (world_model.py eval).

    python bench/stage3_sweep.py out/stage3_sweep
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report import WORLD_COLUMNS, read_eval, world_cells  # noqa: E402


def mean(scores):
    return 100 * sum(scores) / max(1, len(scores))


root = sys.argv[1]
for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.exists(os.path.join(d, "wm_eval", "fidelity.json")):
        print(f"{name}: not finished (see {d}/*.log)")
        continue
    cells = world_cells(read_eval(os.path.join(d, "dev"))[1])
    unknown = [s for t in WORLD_COLUMNS for s in cells[t].values()]
    recall = json.load(open(os.path.join(d, "wm_eval", "fidelity.json")))["fidelity"]["policy_as_wm"]["seen"]
    print(f"{name}: dev EM unknown {mean(unknown):.1f} (n {len(unknown)}), unknown multi-hop "
          f"{mean(cells['unknown_multihop'].values()):.1f} (n {len(cells['unknown_multihop'])}), known "
          f"{mean(cells['known'].values()):.1f} (n {len(cells['known'])}), known without acting "
          f"{mean(cells['known_no_action'].values()):.1f}% | policy as world model, seen-entity fact recall "
          f"{100 * recall['fact_recall']:.1f}% (n {recall['n']})")
