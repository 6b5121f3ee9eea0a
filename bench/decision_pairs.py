"""Does a policy decide to act from what it knows, measured on stage-1 pairs cut at the decision (issue 16, target 3).
`make`: from a world's sft_pairs.jsonl, pairs whose chosen and rejected continuations are cut after their first
sentence or action (" I know X is signed to Y." vs " <begin_search> ... </end_search>"), 250 known + 250 unknown for
training (train_sft.py --stage 1 --train-file) and 50 + 50 held out. `measure`: on the held-out pairs, the
probability a checkpoint gives " I" (answering from memory) and " " (the space before <begin_search>) right after the
prefix, split by known / unknown. A policy that uses its knowledge gives " I" a much higher probability on known pairs.
Measured on SmolLM2 (2026-11-30, README "Latest run (smollm2 preset)"): after 32 steps x 16 of stage 1 on the train
pairs from the fact base, " I" 0.982 on known and 0.979 on unknown held-out prefixes.

    python bench/decision_pairs.py make out/smollm2/world out/decision_pairs
    python train_sft.py --stage 1 --init CKPT --data out/smollm2/world --train-file out/decision_pairs/train.jsonl \
        --out out/p_dec1 --epochs 1 --batch-size 16 --micro-batch 8 --lr 1e-4
    python bench/decision_pairs.py measure out/p_dec1 --pairs out/decision_pairs/held.jsonl
"""
import argparse
import json
import os
import random
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_prompt, load  # noqa: E402


def cut(pair, at):
    """The pair with chosen and rejected cut after their first policy segment's first sentence or action (at
    "sentence"), or after its first word (at "word": " I" vs the " " before <begin_search>, the decision alone)."""
    def first(segments):
        text = segments[0]["text"]
        end = re.search(r"</end_search>|\.(?= |$)" if at == "sentence" else r" ?[^\s<]+| ", text)
        return [{"kind": "policy", "text": text[:end.end()] if end else text}]
    return {**pair, "chosen": first(pair["chosen"]), "rejected": first(pair["rejected"])}


p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
sub = p.add_subparsers(dest="command", required=True)
p_make = sub.add_parser("make", help="cut pairs: OUT/train.jsonl (250 + 250), OUT/held.jsonl (50 + 50)")
p_make.add_argument("world", help="data.py output dir (its sft_pairs.jsonl)")
p_make.add_argument("out", help="output dir")
p_make.add_argument("--at", choices=["sentence", "word"], default="sentence",
                    help="cut after the first sentence or action, or after the first word (the decision token alone)")
p_measure = sub.add_parser("measure", help="p(' I') vs p(act) after the prefix of held-out pairs")
p_measure.add_argument("checkpoints", nargs="+", help="save_pretrained dirs")
p_measure.add_argument("--pairs", required=True, help="held.jsonl from `make`")
args = p.parse_args()

if args.command == "make":
    rows = [json.loads(line) for line in open(os.path.join(args.world, "sft_pairs.jsonl"))]
    random.Random(0).shuffle(rows)
    known, unknown = [r for r in rows if r["known"]], [r for r in rows if not r["known"]]
    train, held = known[:250] + unknown[:250], known[250:300] + unknown[250:300]
    random.Random(1).shuffle(train)
    os.makedirs(args.out, exist_ok=True)
    for name, part in (("train", train), ("held", held)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(cut(r, args.at)) + "\n" for r in part)
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
