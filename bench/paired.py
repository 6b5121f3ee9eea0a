"""
Table 1 cells of evaluation runs minus a base run on the same questions (paired bootstrap 95%, report.cell_ci): how
RUNS.md's "RL on questions SFT never saw" gains were printed (each RL checkpoint's evaluate.py dir vs SFT-1&2&3's).

    python bench/paired.py out/tiny/eval/sft-123 out/tiny/exp/eval_E2 out/tiny/exp/eval_E8
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("base", help="evaluate.py output dir of the base row (results.json + predictions.jsonl)")
p.add_argument("evals", nargs="+", help="evaluate.py output dirs to compare with it")
p.add_argument("--cells", nargs="+", default=["avg", "unknown_multihop", "known", "comparison", "known_no_action"],
               help="Table 1 cells to print")
args = p.parse_args()

base = report.world_cells(report.read_eval(args.base)[1])
for eval_dir in args.evals:
    cells = report.world_cells(report.read_eval(eval_dir)[1])
    print(eval_dir, "|", " | ".join(f"{c} {report._ci(report.cell_ci(cells, c))} gain "
                                    f"{report._ci(report.cell_ci(cells, c, base), True)}" for c in args.cells))
