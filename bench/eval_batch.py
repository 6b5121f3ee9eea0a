"""
Benchmark: evaluate.py's throughput against its --batch-size, on a real checkpoint and question file. The engine runs
one batch to its longest row (no refill), so each batch pays for its slowest question and for a Python step per token:
on a tiny model that fixed cost is most of a step, and a larger batch spreads it over more rows. Prints questions/min
per batch size, the ratio to the first (the baseline, run first in the same process, after one warm-up batch), and
how many greedy trajectories differ from the baseline's (a different batch shape may round differently).

    OMP_NUM_THREADS=2 python bench/eval_batch.py --model out/tiny/sft123 --data out/tiny/world --limit 512 \\
        --batch-sizes 64 128 256
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import evaluate, load_questions  # noqa: E402
from model import checkpoint_template, load  # noqa: E402
from tools import make_tools  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--model", required=True, help="checkpoint (save_pretrained dir)")
p.add_argument("--data", required=True, help="data.py dir: test.jsonl and corpus.jsonl")
p.add_argument("--limit", type=int, default=512, help="first N test questions")
p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256], help="the first is the baseline")
p.add_argument("--max-new-tokens", type=int, default=384, help="as run.sh's tiny preset")
args = p.parse_args()

model, tok = load(args.model)
questions = load_questions(os.path.join(args.data, "test.jsonl"))[:args.limit]
template = checkpoint_template(args.model)
kw = dict(template=template, max_new_tokens=args.max_new_tokens, progress=False)
evaluate(model, tok, questions[:8], make_tools(corpus=os.path.join(args.data, "corpus.jsonl")), "agent",
         batch_size=8, **kw)  # warm-up: the corpus index, allocator, kernels
base_rate, base_pred = None, None
for batch_size in args.batch_sizes:
    tools = make_tools(corpus=os.path.join(args.data, "corpus.jsonl"))  # a fresh cache: every run calls the tool alike
    t0 = time.time()
    summary, records = evaluate(model, tok, questions, tools, "agent", batch_size=batch_size, **kw)
    rate = len(questions) / (time.time() - t0) * 60
    preds = [r["trajectory"] for r in records]
    base_rate, base_pred = base_rate or rate, base_pred or preds
    differ = sum(a != b for a, b in zip(preds, base_pred))
    print(f"batch {batch_size:4d}: {rate:7.1f} questions/min ({rate / base_rate:.2f}x batch {args.batch_sizes[0]}) | "
          f"EM {summary['overall']['em']:.3f} | trajectories differing from the baseline's: {differ}/{len(preds)}",
          flush=True)
