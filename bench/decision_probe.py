"""Is "known vs unknown" linearly readable from a checkpoint's hidden state at the decision (issue 16, target 3)?
A logistic-regression probe per 5th layer on the last prompt+prefix token of stage-1 pairs cut at the decision
(bench/decision_pairs.py make): fit on the first 300 train pairs, accuracy on the held-out ones. Measured 2026-11-30
(README "Latest run (smollm2 preset)"): the fact base 80-86% held-out from layer 5 on; SmolLM2 before it 62-85%
(so part of the cue is in the names themselves).

    python bench/decision_probe.py out/smollm2_dec/base --pairs out/decision_pairs
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_prompt, load  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("checkpoint", help="save_pretrained dir, or smollm2")
p.add_argument("--pairs", required=True, help="dir with train.jsonl and held.jsonl from bench/decision_pairs.py make")
p.add_argument("--n-train", type=int, default=300, help="train pairs the probe is fitted on")
args = p.parse_args()

model, tok = load(args.checkpoint)
model.eval()


def features(rows):
    """(N, layers + 1, d) hidden states at the last prefix token, (N,) 1.0 for known."""
    H = []
    for r in rows:
        ids = tok.encode(build_prompt(tok, r["question"]), add_special_tokens=False)
        ids += tok.encode("".join(s["text"] for s in r["prefix"]), add_special_tokens=False)
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        H.append(torch.stack([h[0, -1] for h in hidden]))
    return torch.stack(H), torch.tensor([float(r["known"]) for r in rows])


read = lambda name: [json.loads(line) for line in open(os.path.join(args.pairs, name))]  # noqa: E731
H_train, y_train = features(read("train.jsonl")[:args.n_train])
H_held, y_held = features(read("held.jsonl"))
for layer in range(0, H_train.shape[1], 5):
    mu, sd = H_train[:, layer].mean(0), H_train[:, layer].std(0) + 1e-5
    X, X_held = (H_train[:, layer] - mu) / sd, (H_held[:, layer] - mu) / sd
    w, b = torch.zeros(X.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y_train) + 1e-2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        acc = [((Z @ w + b > 0).float() == y).float().mean().item() for Z, y in ((X, y_train), (X_held, y_held))]
    print(f"{args.checkpoint} | layer {layer} | train acc {acc[0]:.2f} | held-out acc {acc[1]:.2f}")
