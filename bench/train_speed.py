"""
Benchmark: the levers on the tiny preset's training speed, issue 14's 30-minute budget (run.sh's SFT stages are ~2/3 of
its time). Times SFT-shaped steps (micro-batch 8 x 256 tokens, forward, loss, backward, AdamW) of run.sh's tiny model
in eager float32, the baseline, first in the same process; then the same model under torch.compile (inductor; its
compile time reported apart) and smaller shapes of it (--shapes LAYERS:WIDTH, eager). Prints tokens/s and the ratio to
the baseline. Random tokens: the speed of a step does not depend on which ids it sees.

    OMP_NUM_THREADS=1 python bench/train_speed.py --tokenizer out/tiny/world/tokenizer --shapes 2:256 4:192 4:128
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import load  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("--tokenizer", required=True, help="the tokenizer dir data.py writes (OUT/world/tokenizer)")
p.add_argument("--steps", type=int, default=15, help="timed steps per variant, after --warmup steps")
p.add_argument("--warmup", type=int, default=3, help="untimed steps first (torch.compile compiles in the first)")
p.add_argument("--shapes", nargs="*", default=["2:256", "4:192"], help="LAYERS:WIDTH variants, eager (MLP 2.69x)")
p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
args = p.parse_args()


def measure(overrides=None, compile_it=False):
    """-> (tokens/s over the timed steps, seconds of the warm-up steps, parameters)"""
    model, tok = load("tiny", tokenizer=args.tokenizer, seed=0, config_overrides=overrides)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_it else model
    ids = torch.randint(len(tok.all_special_ids), len(tok), (8, 256), generator=torch.Generator().manual_seed(0))

    def step():
        logits = forward(input_ids=ids).logits  # (8, 256, V)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.time()
    for _ in range(args.warmup):
        step()
    warm = time.time() - t0
    t0 = time.time()
    for _ in range(args.steps):
        step()
    return args.steps * ids.numel() / (time.time() - t0), warm, sum(q.numel() for q in model.parameters())


variants = [("eager, run.sh's tiny (baseline)", None, False)]
if not args.no_compile:
    variants.append(("torch.compile, run.sh's tiny", None, True))
for shape in args.shapes:
    layers, width = (int(v) for v in shape.split(":"))
    overrides = dict(num_hidden_layers=layers, hidden_size=width, intermediate_size=round(width * 2.6875),
                     num_attention_heads=width // 64, num_key_value_heads=width // 64)
    variants.append((f"eager, {layers} layers x {width}", overrides, False))
print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
base = None
for name, overrides, compile_it in variants:
    rate, warm, n = measure(overrides, compile_it)
    base = base or rate
    print(f"{name:36s} | {n / 1e6:.2f}M params | {rate:7.0f} tokens/s | {rate / base:.2f}x | warm-up {warm:.1f} s",
          flush=True)
