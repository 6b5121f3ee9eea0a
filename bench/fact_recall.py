"""
Has a checkpoint memorised the world's known facts? Every sentence of the first N documents of a fact file ("S was
born in O.") is cut before its object; the model completes the cut greedily from that prefix alone (no neighbouring
document, no prompt), and a completion counts when it starts with an object the documents give that prefix ("S was
born in" has two: a city and a year). This measured the SmolLM2 base-stage pilots in the README (2026-11-30, lr
3e-4, 147 prefixes: packed into blocks, 10 passes 32.0%; one row per document, 8 passes 59.2%, 12 passes 63.9%).

    python bench/fact_recall.py out/smollm2/base --facts out/smollm2/world/base_facts.jsonl
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import load  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("checkpoints", nargs="+", help="save_pretrained dirs")
p.add_argument("--facts", required=True, help='{"text"} documents of fact sentences (data.py base_facts.jsonl)')
p.add_argument("--limit", type=int, default=60, help="every other document of the first 2N (one phrasing per fact)")
p.add_argument("--batch-size", type=int, default=32, help="prefixes per generate call")
args = p.parse_args()

objects = defaultdict(set)  # prefix -> every object a document gives it
for line in list(open(args.facts))[:2 * args.limit:2]:
    for sentence in re.split(r"(?<=\.) ", json.loads(line)["text"]):
        m = re.match(r"(.* (?:in|for|by|of|to|is|at|as)) (.+)\.$", sentence)
        if m:
            objects[m.group(1)].add(m.group(2))
prefixes = sorted(objects)
for ckpt in args.checkpoints:
    model, tok = load(ckpt)
    model.eval()
    tok.padding_side = "left"
    hits, misses = 0, []
    for i in range(0, len(prefixes), args.batch_size):
        chunk = prefixes[i:i + args.batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        for prefix, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True).strip()
            ok = any(text.startswith(o) for o in objects[prefix])
            hits += ok
            misses += [] if ok else [f"{prefix} -> {text!r} (want {' or '.join(sorted(objects[prefix]))})"]
    print(f"{ckpt}: recall {hits}/{len(prefixes)} = {hits / len(prefixes):.1%}")
    print("  misses, first 5:\n    " + "\n    ".join(misses[:5]))
