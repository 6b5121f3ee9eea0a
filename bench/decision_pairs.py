"""Does a policy decide to act from what it knows, measured on stage-1 pairs cut at the decision (issue 16, target 3).
`make`: from a world's sft_pairs.jsonl, teacher.decision_pairs: 250 known + 250 unknown pairs for training
(train_sft.py --stage 1 --train-file) and 50 + 50 held out, chosen and rejected cut after their first word
(" I" vs the " " before <begin_search>; --at sentence: after the first sentence or action). `measure`: on the
held-out pairs, the probability a checkpoint gives " I" (answering from memory) and " " (acting) right after the
prefix, split by known / unknown. A policy that uses its knowledge gives " I" a much higher probability on known pairs.
Measured on SmolLM2 from the fact base (2026-11-30, README "Latest run (smollm2 preset)"), stage 1 at lr 1e-4:
  cut after a sentence, 32 steps x 16:  " I" 0.982 on known and 0.979 on unknown held-out prefixes
  cut after the word, 32 steps x 16:    0.388 vs 0.367;  96 steps x 16 (3 passes): 1.000 vs 0.005

    python bench/decision_pairs.py make out/smollm2/world out/decision_pairs
    python train_sft.py --stage 1 --init CKPT --data out/smollm2/world --train-file out/decision_pairs/train.jsonl \
        --out out/p_dec --epochs 3 --batch-size 16 --micro-batch 8 --lr 1e-4
    python bench/decision_pairs.py measure out/p_dec --pairs out/decision_pairs/held.jsonl
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_prompt, load  # noqa: E402
from teacher import decision_pairs  # noqa: E402


p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
sub = p.add_subparsers(dest="command", required=True)
p_make = sub.add_parser("make", help="cut pairs: OUT/train.jsonl (250 + 250), OUT/held.jsonl (50 + 50)")
p_make.add_argument("world", help="data.py output dir (its sft_pairs.jsonl)")
p_make.add_argument("out", help="output dir")
p_make.add_argument("--at", choices=["sentence", "word"], default="word",
                    help="cut after the first sentence or action, or after the first word (the decision token alone)")
p_measure = sub.add_parser("measure", help="p(' I') vs p(act) after the prefix of held-out pairs")
p_measure.add_argument("checkpoints", nargs="+", help="save_pretrained dirs")
p_measure.add_argument("--pairs", required=True, help="held.jsonl from `make`")
args = p.parse_args()

if args.command == "make":
    rows = [json.loads(line) for line in open(os.path.join(args.world, "sft_pairs.jsonl"))]
    train, held = decision_pairs(rows, at=args.at)
    os.makedirs(args.out, exist_ok=True)
    for name, part in (("train", train), ("held", held)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"{args.out}/{name}.jsonl: {len(part)} pairs ({sum(r['known'] for r in part)} known)")
else:
    rows = [json.loads(line) for line in open(args.pairs)]
    for ckpt in args.checkpoints:
        model, tok = load(ckpt)
        model.eval()
        know, act = (tok.encode(t, add_special_tokens=False)[0] for t in (" I", " "))
        probs = {True: [], False: []}  # known -> [(p " I", p act)]
        for r in rows:
            ids = tok.encode(build_prompt(tok, r["question"]), add_special_tokens=False)
            ids += tok.encode("".join(s["text"] for s in r["prefix"]), add_special_tokens=False)
            with torch.no_grad():
                p_next = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
            probs[bool(r["known"])].append((p_next[know].item(), p_next[act].item()))
        for known, ps in probs.items():
            print(f"{ckpt} | {'known' if known else 'unknown'} ({len(ps)}) | "
                  f"p(' I') {sum(a for a, _ in ps) / len(ps):.3f} | p(act) {sum(b for _, b in ps) / len(ps):.3f}")
