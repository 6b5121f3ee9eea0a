"""
Does a policy decide to act from what it knows? At the first action of each trajectory in an evaluate.py
predictions.jsonl (the response cut just before " <begin_search>"), the probability the checkpoint gives acting there
(the space that starts " <begin_search>") and answering from memory (" I", as in the teacher's " I know ..."), split by
the question's "known" field. A policy that uses its knowledge gives " I" a much higher probability on known questions;
SmolLM2 after a base stage that taught the known facts (2026-11-30) gave it 0.13 on known and 0.15 on unknown ones.

    python bench/act_decision.py out/smollm2/sft2 --predictions out/smollm2/eval/sft-2/predictions.jsonl
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import load  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("checkpoints", nargs="+", help="save_pretrained dirs")
p.add_argument("--predictions", nargs="+", required=True, help="evaluate.py predictions.jsonl files (prompt, "
               "trajectory, known)")
args = p.parse_args()

rows = [json.loads(line) for path in args.predictions for line in open(path)]
rows = [r for r in rows if "<begin_search>" in r["trajectory"]]
for ckpt in args.checkpoints:
    model, tok = load(ckpt)
    model.eval()
    act, know = (tok.encode(t, add_special_tokens=False)[0] for t in (" ", " I"))
    probs = {True: [], False: []}  # known -> [(p act, p " I")]
    for r in rows:
        before = r["trajectory"][:r["trajectory"].index("<begin_search>")].rstrip(" ")
        ids = tok.encode(r["prompt"], add_special_tokens=False) + tok.encode(before, add_special_tokens=False)
        with torch.no_grad():
            p_next = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        probs[bool(r["known"])].append((p_next[act].item(), p_next[know].item()))
    for known, ps in probs.items():
        if ps:
            print(f"{ckpt} | {'known' if known else 'unknown'} ({len(ps)}) | p(act) {sum(a for a, _ in ps) / len(ps):.3f}"
                  f" | p(' I') {sum(b for _, b in ps) / len(ps):.3f}")
