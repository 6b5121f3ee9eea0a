"""
Does a checkpoint predict its added tag tokens where they belong? For each tag, over its positions in the first N
trajectories of an SFT file (teacher-forced, one forward per trajectory), counted only where the policy writes the tag
(loss mask 1: never where the prompt names it, as the short template does for every tool): the mean probability the
model gives the tag there, the share of those positions where it is the top token, and the mean probability of each
other scored tag at the same positions (a rival: `<begin_search>` where a calculator call opens, issue 16's arithmetic
defect). Prompts use each checkpoint's own template (run_args.json). This is how the added-tag init in
model._init_added_embeddings was chosen (SmolLM2-135M, 2026-11-30: after 8 stage-2 steps the mean-of-pieces init gave
"<begin_search>" p 0.05 and top 0%, the first-piece init p 0.16 and top 61%).

    python bench/tag_probability.py out/smollm2/sft12 --data out/smollm2/world/sft_mix.jsonl
    python bench/tag_probability.py out/smollm2/sft2 out/smollm2/sft12 --data out/smollm2/world/sft_mix.jsonl \
        --limit 300 --tags "<begin_calculator>" "<begin_search>"
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_prompt, checkpoint_template, encode_segments, load  # noqa: E402

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
    template = checkpoint_template(ckpt)
    tag_ids = {tag: tok.convert_tokens_to_ids(tag) for tag in args.tags}
    probs = {tag: {other: [] for other in args.tags} for tag in args.tags}  # probs[tag][other]: p(other) where tag is
    top = {tag: [] for tag in args.tags}
    for row in rows:
        prompt = {"kind": "prompt", "text": build_prompt(tok, row["question"], template)}
        ids, loss_mask, _ = encode_segments(tok, [prompt] + row["segments"])
        with torch.no_grad():
            p_next = model(torch.tensor([ids])).logits[0].float().softmax(-1)  # (T, V): p(token t+1 | ..t)
        for tag, tid in tag_ids.items():
            for pos in (i for i, x in enumerate(ids) if x == tid and i > 0 and loss_mask[i]):  # the policy's own tag
                for other, oid in tag_ids.items():
                    probs[tag][other].append(float(p_next[pos - 1, oid]))
                top[tag].append(int(p_next[pos - 1].argmax()) == tid)
    cells = []
    for tag in (t for t in args.tags if top[t]):
        mean = {other: sum(v) / len(v) for other, v in probs[tag].items()}
        rivals = "".join(f", {other} {mean[other]:.3f}" for other in args.tags if other != tag)
        cells.append(f"{tag} p {mean[tag]:.3f} top {sum(top[tag]) / len(top[tag]):.0%} (n {len(top[tag])}{rivals})")
    print(f"{ckpt}: " + " | ".join(cells), flush=True)
