"""
Stage 3's world-model calls plus calls about every KNOWN entity (12-03 experiment, RUNS.md): `world_model.py collect`
keeps the teacher's calls, which name the known entities of 23% of rl_known.jsonl's entity mentions, so the policy as
its own simulator invents their facts (answer-fact recall 3.1% on the calls of known-question RL steps,
bench/sim_recall.py). Here each known entity (data.py's base_facts.jsonl: the base model's facts) gets the teacher's
most frequent queries for its type (those of tool_calls.jsonl), answered by the real BM25 search, as train calls.

    python bench/known_wm_calls.py out/tiny_1203 out/tiny_1203/wm_calls_known.jsonl
    python train_sft.py --stage 3 ... --wm-calls out/tiny_1203/wm_calls_known.jsonl   # RUNS.md: the exact line
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from server import split_results  # noqa: E402
from tools import make_tools  # noqa: E402
from world_model import passage_title  # noqa: E402

TEMPLATES = {"city": ["which country is {e} in"],
             "person": ["when was {e} born", "where was {e} born", "which company does {e} work for",
                        "{e} works employed", "{e} birth year born"],
             "company": ["who founded {e}", "when was {e} founded", "where is {e} headquartered",
                         "{e} founded opened year", "{e} founder founded", "{e} headquartered head office"],
             "band": ["which label is {e} signed to", "where was {e} formed"]}
KIND = [(re.compile(r"^(.+?) is a city in "), "city"), (re.compile(r"^(.+?) was born in "), "person"),
        (re.compile(r"^(.+?) was founded by "), "company"), (re.compile(r"^(.+?) is signed to "), "band")]

p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
p.add_argument("run", help="a run.sh output dir: RUN/world/{base_facts,corpus}.jsonl and RUN/wm_calls.jsonl")
p.add_argument("out", help="RUN/wm_calls.jsonl's rows + the known-entity calls (split train)")
args = p.parse_args()

entities = {}  # known entity -> type, from the first sentence of each base_facts document
for line in open(os.path.join(args.run, "world", "base_facts.jsonl")):
    text = json.loads(line)["text"]
    for rx, kind in KIND:
        m = rx.match(text)
        if m:
            entities[m.group(1)] = kind
old = [json.loads(line) for line in open(os.path.join(args.run, "wm_calls.jsonl"))]
have = {c["args"].lower() for c in old}
tools = make_tools(corpus=os.path.join(args.run, "world", "corpus.jsonl"))
queries = [t.format(e=e) for e, kind in entities.items() for t in TEMPLATES[kind] if t.format(e=e).lower() not in have]
observations = tools([("search", q) for q in queries])
new = [{"tool": "search", "args": q, "observation": o, "entity": passage_title(split_results(o)[0]),
        "question_split": "train", "split": "train", "entity_seen": True} for q, o in zip(queries, observations) if o.startswith("result 1")]
with open(args.out, "w") as f:
    for c in old + new:
        f.write(json.dumps(c) + "\n")
counts = {k: list(entities.values()).count(k) for k in TEMPLATES}
print(f"{len(entities)} known entities ({counts}) -> {len(new)} new calls; {len(old)} + {len(new)} -> {args.out}")
