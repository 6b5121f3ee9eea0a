"""
Table 1 cells of evaluation runs minus a base run on the same questions (paired bootstrap 95%, report.cell_ci): how
RUNS.md's "RL on questions SFT never saw" gains were printed (each RL checkpoint's evaluate.py dir vs SFT-1&2&3's).

    python bench/paired.py out/tiny/eval/sft-123 out/tiny/exp/eval_E2 out/tiny/exp/eval_E8

With more than one eval dir (seeds of one recipe, bench/rl_seeds.sh) it also prints each cell's mean gain and sd.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("base", help="evaluate.py output dir of the base row (results.json + predictions.jsonl)")
p.add_argument("evals", nargs="+", help="evaluate.py output dirs to compare with it")
p.add_argument("--cells", nargs="+", default=["avg", "unknown_multihop", "known", "comparison", "known_no_action"],
               help="Table 1 cells to print")
args = p.parse_args()

base = report.world_cells(report.read_eval(args.base)[1])
gains = {c: [] for c in args.cells}  # cell -> each eval's paired gain (EM points)
for eval_dir in args.evals:
    cells = report.world_cells(report.read_eval(eval_dir)[1])
    paired = {c: report.cell_ci(cells, c, base) for c in args.cells}
    print(eval_dir, "|", " | ".join(f"{c} {report._ci(report.cell_ci(cells, c))} gain {report._ci(paired[c], True)}"
                                    for c in args.cells))
    for c in args.cells:
        gains[c].append(100 * paired[c]["value"])
if len(args.evals) > 1:  # the evals as seeds of one recipe: the mean gain and its spread over them
    print(f"mean (sd) of the gain over {len(args.evals)}:", " | ".join(
        f"{c} {np.mean(g):+.2f} ({np.std(g, ddof=1):.2f})" for c, g in gains.items()))
