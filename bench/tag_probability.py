"""
Does a checkpoint predict its added tag tokens where they belong? For each tag, over its positions in the first N
trajectories of an SFT file (teacher-forced, one forward per trajectory): the mean probability the model gives the tag
there and the share of those positions where the tag is the top token. This is how the added-tag init in
model._init_added_embeddings was chosen (SmolLM2-135M, 2026-11-30: after 8 stage-2 steps the mean-of-pieces init gave
"<begin_search>" p 0.05 and top 0%, the first-piece init p 0.16 and top 61%).

    python bench/tag_probability.py out/smollm2/sft12 --data out/smollm2/world/sft_mix.jsonl
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_prompt, encode_segments, load  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("checkpoints", nargs="+", help="save_pretrained dirs with the tags as tokens")
p.add_argument("--data", required=True, help="trajectories with segments (sft_mix.jsonl of data.py)")
p.add_argument("--limit", type=int, default=30, help="first N trajectories")
p.add_argument("--tags", nargs="+", default=["<begin_search>", "</end_search>", "</think>"], help="tags to score")
args = p.parse_args()

rows = [json.loads(line) for line in open(args.data)][:args.limit]
for ckpt in args.checkpoints:
    model, tok = load(ckpt)
    model.eval()
    tag_ids = {tag: tok.convert_tokens_to_ids(tag) for tag in args.tags}
    probs = {tag: [] for tag in args.tags}
    top = {tag: [] for tag in args.tags}
    for row in rows:
        ids = encode_segments(tok, [{"kind": "prompt", "text": build_prompt(tok, row["question"], "short")}]
                              + row["segments"])[0]
        with torch.no_grad():
            p_next = model(torch.tensor([ids])).logits[0].float().softmax(-1)  # (T, V): p(token t+1 | ..t)
        for tag, tid in tag_ids.items():
            for pos in (i for i, x in enumerate(ids) if x == tid and i > 0):
                probs[tag].append(float(p_next[pos - 1, tid]))
                top[tag].append(int(p_next[pos - 1].argmax()) == tid)
    cells = [f"{tag} p {sum(probs[tag]) / len(probs[tag]):.3f} top {sum(top[tag]) / len(top[tag]):.0%} "
             f"(n {len(probs[tag])})" for tag in args.tags if probs[tag]]
    print(f"{ckpt}: " + " | ".join(cells), flush=True)
