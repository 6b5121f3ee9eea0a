"""
How far RL could move a checkpoint by sharpening what it already samples: Table 1 cells as pass@k (the unbiased
estimator of Chen et al. 2021 from n samples a question) of `evaluate.py --n-samples N --temperature T` runs. GRPO
learns only from groups whose samples differ in reward, so a question no sample answers gives it nothing to
reinforce; pass@k of the sampling policy is the reach of RL that sharpens (Yue et al. 2025), greedy EM its start.
maj@N (the EM of each question's most frequent normalised answer among its N samples) is where sharpening alone ends:
a gain beyond it needs RL to make a minority answer the majority one.

    python evaluate.py --model out/tiny/sft123 --mode agent --questions out/tiny/world/test.jsonl \\
        --corpus out/tiny/world/corpus.jsonl --template short --batch-size 128 --max-new-tokens 384 \\
        --n-samples 8 --temperature 0.6 --out out/tiny/pass8/sft123
    python bench/pass_at_k.py out/tiny/pass8/sft123 out/tiny/pass8/rl_real123 --greedy out/tiny/eval/sft-123
"""
import argparse
import os
import sys
from collections import Counter
from math import comb

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402
from evaluate import normalize_answer  # noqa: E402


def pass_at_k(n, c, k):
    """P(at least one of k samples drawn without replacement from n, c of them correct, is correct)."""
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_em(samples):
    """EM of the most frequent normalised answer among a question's samples (a tie: the one sampled first)."""
    answers = [normalize_answer(s["prediction"] or "") for s in samples]
    return samples[answers.index(Counter(answers).most_common(1)[0][0])]["em"]


p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("evals", nargs="+", help="evaluate.py output dirs run with --n-samples N > 1")
p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="k values (each <= the runs' N)")
p.add_argument("--greedy", default=None, help="a greedy evaluate.py dir of the same questions, printed first")
p.add_argument("--cells", nargs="+", default=["avg", "unknown_multihop", "known"], help="Table 1 cells to print")
args = p.parse_args()


def cells_line(cells):
    return " | ".join(f"{c} {report._ci(report.cell_ci(cells, c))}" for c in args.cells)


if args.greedy:
    print(f"{args.greedy} greedy |", cells_line(report.world_cells(report.read_eval(args.greedy)[1])))
for eval_dir in args.evals:
    records = report.read_eval(eval_dir)[1]
    assert all("samples" in r for r in records), f"{eval_dir}: no per-sample records (run with --n-samples > 1)"
    n = len(records[0]["samples"])
    known = [r for r in records if r.get("known")]
    acts = [sum(s["num_actions"] > 0 for s in r["samples"]) for r in known]
    print(f"{eval_dir}: {len(records)} questions x {n} samples | known questions with >= 1 sample acting "
          f"{100 * sum(a > 0 for a in acts) / len(known):.1f}%, samples acting "
          f"{100 * sum(acts) / (n * len(known)):.1f}%")
    right = [sum(s["em"] for s in r["samples"]) for r in records]
    minority = [r for r, c in zip(records, right) if 0 < c <= n / 2]  # what RL must turn into majority answers
    known_m = [r for r in minority if r.get("known")]
    print(f"  {len(minority)} questions with 1-{n // 2} right samples: {len(known_m)} known (an acting sample right on "
          f"{sum(any(s['em'] and s['num_actions'] for s in r['samples']) for r in known_m)}), "
          f"{sum(r['type'] == 'comparison' for r in minority)} comparisons")
    for k in args.ks:
        assert k <= n, f"k {k} > {n} samples in {eval_dir}"
        at_k = [{**r, "em": pass_at_k(n, int(c), k)} for r, c in zip(records, right)]
        print(f"  pass@{k} |", cells_line(report.world_cells(at_k)))
    print(f"  maj@{n} |", cells_line(report.world_cells([{**r, "em": majority_em(r["samples"])} for r in records])))
