"""
A world model of the tools: a small causal LM fine-tuned on logged real tool calls (query -> observation) that stands in
for the search tool anywhere a tool is accepted, and a fidelity report for every simulator we use (this separate world
model, and a policy used as its own world model as in the paper's SFT stage 3 / RL stage 1). Subcommands: collect the
real calls (deduplicated, split train / held-out), train, serve (server.py's HTTP API), eval (fact recall, token F1 and
reward agreement on held-out calls, by seen / unseen entity).

The world model never sees a question or a gold answer, by construction: wm_prompt(tool, args) is the ONLY builder of
its input and takes nothing else (ZeroSearch's simulator prompt carries the gold answer; a simulator that knows the
answer makes RL against it a leak, not an exploration). `collect` keeps only tool, args and observation of each call,
and tests/test_world_model.py spies on every token sequence the model runs on during a train and a serve run.

Answer-bearing facts (what "fact recall" counts), concretely: the queried entity is the title of the real observation's
top-1 passage (BM25's best match; in the embedded world every query names its entity). The facts are the attribute
values in the bodies of the real top-3 passages about that entity: maximal runs of capitalised words (names, places)
and numbers (years), minus the entity's own name and anything the query already spells (restating the query is not
knowledge). "when was Dinarn Parner born" -> result 1 "was born in Fenkrorth", result 2 "was born in 1970" ->
facts {fenkrorth, 1970}: the answer (1970) and the other values the real tool returned about the same entity. Fact
recall: per call, the share of facts found as whole words in the simulated observation (fact_recall), averaged;
"all_facts": the share of calls with every fact recalled; "top1_recall": only the real top-1 passage's facts.

How this departs from the paper, and why:
  - The paper has no separate world model: the policy is its own (SFT stage 3). This file adds a small one, like
    ZeroSearch's simulator but without the answer in its prompt, and measures both on the same held-out calls.
  - Only "search" is simulated: the calculator stays real (computation is cheap and exact; simulating it adds errors).
  - Generation is greedy (a deterministic simulator makes rewards comparable with the real tool's).
  - "Seen" is measured, not declared (collect). The report also prints a "ceiling": the recall a perfect memoriser of
    the training observations would reach (a fact the world model was never shown can only be guessed, hallucinated).

Commands:
  python world_model.py collect --data DIR --out DIR/wm_calls.jsonl [--rollout-logs runs/rl/real_calls.jsonl ...]
  python world_model.py collect --data DIR --out DIR/wm_calls.jsonl --known-calls   # + calls on the known entities
  python world_model.py train --calls DIR/wm_calls.jsonl --init tiny --tokenizer DIR/tokenizer --out runs/wm
  python world_model.py eval --wm runs/wm --policy runs/sft3 --data DIR --out runs/wm_eval   # --calls: default the wm's
  python world_model.py serve --ckpt runs/wm --port 8081      # then: tools.py search --url http://127.0.0.1:8081 "q"
A pretrained init: train ... --init smollm2 --lr 5e-5 --device cuda; too big for one GPU: torchrun --nproc_per_node=N
world_model.py train ... --fsdp. In-process (train_rl.py --world-model): common.load_world_model_tools("runs/wm")
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import defaultdict

import torch

import common
import engine
import fsdp
import model as M
from common import (CALL_FIELDS, check_fields, json_type, load_world_model_tools, policy_sim_segments, read_rows,
                    simulate, wm_prompt)
from evaluate import exact_match, extract_answer, f1, normalize_answer
from server import serve_tool, split_results
from teacher import RELATIONS
from tools import BM25Index, action_close, action_open, make_tools, result_close, write_atomic

# -----------------------------------------------------------------------------
# The world model's training example

def wm_example(tokenizer, call):
    """call {"tool", "args", "observation"} -> (ids, loss_mask, obs_mask) of model.encode_segments (the one mask rule):
    <begin_search> QUERY </end_search>\\n<search_result>\\n (mask 0, wm_prompt) OBS\\n</search_result> (mask 1)."""
    segments = [{"kind": "prompt", "text": wm_prompt(call["tool"], call["args"])},
                {"kind": "policy", "text": f"{call['observation']}\n{result_close(call['tool'])}"}]
    return M.encode_segments(tokenizer, segments)


# -----------------------------------------------------------------------------
# Fidelity metrics (pure functions of strings, tested on hand cases)

def passage_title(passage):
    """'"Title"\\ntext' -> 'Title' (FlashRAG contents); the first line when it is not quoted."""
    first = passage.split("\n", 1)[0].strip()
    return first[1:-1] if len(first) >= 2 and first[0] == first[-1] == '"' else first


FACT = re.compile(r"\b(?:[A-Z][\w'-]*(?:\s+(?:of\s+|de\s+|the\s+)?[A-Z][\w'-]*)*|\d[\d,.]*\d|\d)\b")
# capitalised sentence openers ("He", "In") are not values
SENTENCE_OPENERS = frozenset("he she it they his her its their in on at after before during this that these those "
                             "there when while as by from with for".split())


def answer_facts(query, real_observation, top_k=3):
    """The answer-bearing facts (module docstring) of a real search observation for this query, in its top_k."""
    passages = split_results(real_observation)
    if not passages:
        return []
    entity = passage_title(passages[0])
    skip = set(normalize_answer(query).split()) | set(normalize_answer(entity).split())
    facts = []
    for passage in passages[:top_k]:
        if passage_title(passage) != entity or "\n" not in passage:
            continue
        for m in FACT.finditer(passage.split("\n", 1)[1]):
            words = [w for w in normalize_answer(m.group()).split() if w not in skip]
            if words and not (len(words) == 1 and words[0] in SENTENCE_OPENERS):
                facts.append(" ".join(words))
    return list(dict.fromkeys(facts))


def fact_recall(facts, simulated_observation):
    """Fraction of facts whose normalised text occurs (as whole words) in the normalised simulated observation."""
    if not facts:
        return None
    sim = f" {normalize_answer(simulated_observation)} "
    return sum(f" {fact} " in sim for fact in facts) / len(facts)


def token_f1(simulated_observation, real_observation):
    """SQuAD token F1 between the two observation texts (evaluate.f1, so normalisation is the project's one)."""
    return f1(simulated_observation, [real_observation])


# -----------------------------------------------------------------------------
# collect: real calls -> deduplicated JSONL with a train / held-out split

def query_key(args):
    """When two calls are the same query: case and runs of whitespace aside."""
    return " ".join(str(args).lower().split())


def read_calls(tool_calls, rollout_logs=()):
    """Real calls from the teacher's tool_calls.jsonl and RL rollout logs (a log row is a call or holds a list of them
    under "calls"). Rows marked "simulated": true are skipped: a simulator's output is not the world."""
    rows = read_rows(tool_calls, fields=CALL_FIELDS)
    if not rows:  # the teacher always calls tools: an empty file is a wrong path or a failed run upstream
        raise ValueError(f"{tool_calls}: no calls (the file is empty)")
    for path in rollout_logs:  # an empty log is fine: a run with only simulated steps makes no real calls
        for row in read_rows(path):
            calls = row.get("calls", [row])
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise ValueError(f"{row['_where']}: field 'calls' must be a list of objects, got {json_type(calls)}")
            for i, call in enumerate(calls):
                check_fields(call, CALL_FIELDS, row["_where"], "field" if call is row else f"calls[{i}] field")
                if not call.get("simulated", False):
                    rows.append({**call, "_where": row["_where"]})
    return rows


def split_calls(rows, tools=("search",), heldout_frac=0.1, unseen_frac=0.05, seed=0):
    """Deduplicate by (tool, normalised args), drop failed calls, then split into train / held-out.
    - Calls logged for questions outside the training split (data.py's "split" field: dev) are held out whole: their
      entities live in another pool of the world, the natural "unseen" set.
    - The entity of a call is the title of its real top-1 passage. A fraction unseen_frac of the remaining entities
      goes wholly to held-out; then single calls of entities that keep other calls in train are held out until
      heldout_frac of the training-question calls is: the "seen" set.
    - entity_seen is then MEASURED, not assumed: a held-out call is seen when its real top-1 passage occurs in some
      training observation (BM25 ranks one passage for many queries, so a held-out entity may still have been seen)."""
    calls, keys = [], set()
    for row in rows:
        key = (row["tool"], query_key(row["args"]))
        passages = split_results(row["observation"])
        if row["tool"] not in tools or key in keys or not passages:  # no passages: an error or "No results found."
            continue
        keys.add(key)
        calls.append({"tool": row["tool"], "args": str(row["args"]).strip(), "observation": row["observation"],
                      "entity": passage_title(passages[0]), "question_split": row.get("split", "train")})
    rng = random.Random(seed)
    heldout = {i for i, c in enumerate(calls) if c["question_split"] != "train"}
    by_entity = defaultdict(list)
    for i, call in enumerate(calls):
        if i not in heldout:
            by_entity[call["entity"]].append(i)
    entities = sorted(by_entity)
    rng.shuffle(entities)
    n_unseen = round(unseen_frac * len(entities))
    heldout |= {i for e in entities[:n_unseen] for i in by_entity[e]}
    target = len(heldout) + round(heldout_frac * sum(len(v) for v in by_entity.values()))
    for e in entities[n_unseen:]:  # one call per entity, entities in shuffled order, while the budget lasts
        if len(heldout) >= target:
            break
        if len(by_entity[e]) >= 2:
            heldout.add(rng.choice(by_entity[e]))
    train_passages = {p for i, c in enumerate(calls) if i not in heldout for p in split_results(c["observation"])}
    for i, call in enumerate(calls):
        call["split"] = "heldout" if i in heldout else "train"
        call["entity_seen"] = split_results(call["observation"])[0] in train_passages if i in heldout else True
    print(f"collect: {len(rows)} rows -> {len(calls)} unique calls | {len(calls) - len(heldout)} train | "
          f"{len(heldout)} held-out ({sum(c['split'] == 'heldout' and c['entity_seen'] for c in calls)} of them seen)")
    return calls


def known_entity_calls(base_facts, corpus, calls):
    """Search calls about every KNOWN entity (data.py's base_facts.jsonl, the base model's facts in prose), split train:
    for each relation of its type, the teacher's first two query forms (teacher.RELATIONS), answered by the real search.
    Why: the teacher's calls name few known entities (23% of rl_known.jsonl's entity mentions, 2026-12-03), so stage 3
    taught the policy to simulate them for the unknown entities only: as its own simulator it recalled 3.1% of the
    answer facts on the calls of all-real RL's known-question steps (67.2% on held-out seen calls; bench/sim_recall.py,
    RUNS.md). A query already in `calls` is skipped; so is an entity with an "unseen" held-out call (it stays
    unseen)."""
    forms = [(re.compile("^" + re.escape(f).replace(r"\{s\}", "(?P<s>.+?)").replace(r"\{o\}", ".+?")), v[0])
             for v in RELATIONS.values() for f in v[4]]  # the corpus phrasings, subject type
    entities = {}  # known entity -> type, from the first sentence of each base_facts row
    for row in read_rows(base_facts, fields=("text",)):
        hit = next(((m["s"], kind) for rx, kind in forms if (m := rx.match(row["text"]))), None)
        if hit is None:
            raise ValueError(f"{row['_where']}: no teacher.RELATIONS phrasing starts this text: {row['text'][:80]!r}")
        entities.setdefault(*hit)
    have = {query_key(c["args"]) for c in calls}
    unseen = {c["entity"] for c in calls if c["split"] == "heldout" and not c["entity_seen"]}
    queries = [form.format(s=e) for e, kind in entities.items() if e not in unseen
               for v in RELATIONS.values() if v[0] == kind for form in v[5][:2]]
    queries = [q for q in queries if query_key(q) not in have]
    observations = make_tools(corpus=corpus)([("search", q) for q in queries])
    new = [{"tool": "search", "args": q, "observation": o, "entity": passage_title(split_results(o)[0]),
            "question_split": "known", "split": "train", "entity_seen": True}
           for q, o in zip(queries, observations) if split_results(o)]
    print(f"collect: {len(entities)} known entities -> {len(new)} calls about them (split train)")
    return new


# -----------------------------------------------------------------------------
# train: a causal LM on  call -> observation, loss on the observation only

def train_world_model(model, tokenizer, calls, *, epochs=3, batch_size=16, lr=1e-3, warmup_ratio=0.05, max_len=512,
                      seed=0, log_every=10, bucket_batches=8):
    """Teacher-forced cross-entropy on the observation tokens of wm_example(call) (SFT stage 2's loss), AdamW, warmup
    then cosine, on common.py's batches, padding and log-probs."""
    examples = [wm_example(tokenizer, c) for c in calls]  # (ids, loss_mask, obs_mask) rows
    examples = [ex for ex in examples if len(ex[0]) <= max_len]  # never cut: a cut would end mid-observation
    assert examples, f"no call fits in --max-len {max_len}"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = math.ceil(epochs * steps_per_epoch)
    print(f"train: {len(examples)} calls ({len(calls) - len(examples)} dropped as longer than {max_len} tokens) | "
          f"batch {batch_size} | {steps_per_epoch} steps/epoch, {total} steps | lr {lr:g}", flush=True)
    lengths = [len(ex[0]) for ex in examples]
    losses, t0 = [], time.time()
    model.train()
    for step in range(total):
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0:
            batches = common.epoch_batches(lengths, batch_size, bucket_batches, seed, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * common.lr_factor(step, total, int(warmup_ratio * total), "cosine", 0.1)
        batch = [examples[i] for i in batches[step % steps_per_epoch]]
        ids, attention, loss_mask, _ = common.collate(batch, pad, device)
        logp = common.token_logprobs(model(input_ids=ids, attention_mask=attention).logits, ids)  # (B, T-1)
        mask = loss_mask[:, 1:].float()  # (B, T-1): 1 where the next token is observation text
        loss = -(logp * mask).sum() / mask.sum()  # mean NLL of the observation tokens
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fsdp.clip_grad_norm(model.parameters(), 1.0)  # the global norm, of FSDP shards too
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == total:
            recent = losses[-log_every:]
            print(f"step {step + 1}/{total} | epoch {epoch + 1} | loss {sum(recent) / len(recent):.4f} | "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} | {time.time() - t0:.0f} s", flush=True)
    model.eval()
    return losses


# -----------------------------------------------------------------------------
# eval: fidelity of a simulator on held-out calls, and reward agreement of one policy under real vs simulated tools

def fidelity_rows(calls, simulated, simulator, train_text=None):
    """Per held-out call: its answer-bearing facts, their recall in the simulated observation, token F1 to the real,
    and the "ceiling": their recall in train_text {entity: its training passages, joined}."""
    rows = []
    for call, sim in zip(calls, simulated):
        facts = answer_facts(call["args"], call["observation"])
        rows.append({"simulator": simulator, "args": call["args"], "entity": call["entity"],
                     "entity_seen": call["entity_seen"], "facts": facts, "fact_recall": fact_recall(facts, sim),
                     "top1_recall": fact_recall(answer_facts(call["args"], call["observation"], top_k=1), sim),
                     "ceiling": fact_recall(facts, (train_text or {}).get(call["entity"], "")),
                     "f1": token_f1(sim, call["observation"]), "simulated": sim, "real": call["observation"]})
    return rows


def mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize_fidelity(rows):
    out = {}
    for bucket, keep in (("seen", True), ("unseen", False), ("all", None)):
        rs = [r for r in rows if keep is None or r["entity_seen"] == keep]
        out[bucket] = {"n": len(rs), "fact_recall": mean(r["fact_recall"] for r in rs),
                       "ceiling": mean(r["ceiling"] for r in rs),
                       "all_facts": mean(None if r["fact_recall"] is None else float(r["fact_recall"] == 1)
                                         for r in rs),
                       "top1_recall": mean(r["top1_recall"] for r in rs), "f1": mean(r["f1"] for r in rs)}
    return out


BUCKETS = ("seen", "unseen", "no_search")  # reward agreement, by what the real rollout's searches returned


def reward_agreement(policy, tokenizer, questions, real_tools, simulators, index, train_passages, template="short",
                     max_new_tokens=256, max_obs_tokens=192):
    """Greedy rollouts of one policy on the same questions with the real tools and with each simulator
    {name: (tools, env)}: fraction of questions whose EM reward is the same. A question counts as "seen" when every
    search of its REAL rollout has its top-1 passage among the world model's training observations."""
    texts = [M.build_prompt(tokenizer, q["question"], template) for q in questions]
    prompts = [M.encode_segments(tokenizer, [{"kind": "prompt", "text": t}])[0] for t in texts]

    def rewards(tools, env):
        runs = engine.rollout(policy, tokenizer, prompts, tools, env=env, greedy=True,
                              max_new_tokens=max_new_tokens, sim_obs_tokens=max_obs_tokens)
        return [exact_match(extract_answer(r.policy_text) or "", q["golden_answers"])
                for r, q in zip(runs, questions)], runs

    real_rewards, real_runs = rewards(real_tools, "real")
    search = re.compile(re.escape(action_open("search")) + r"(.*?)" + re.escape(action_close("search")), re.S)
    buckets = []
    for r in real_runs:
        queries = [q.strip() for q in search.findall(r.text)]
        hits = index.search(queries, 1) if queries else []
        seen = all(h and h[0][0]["contents"].strip() in train_passages for h in hits)
        buckets.append("no_search" if not queries else "seen" if seen else "unseen")
    out = {"real_em": mean(real_rewards), "n": len(questions)}
    for name, (tools, env) in simulators.items():
        sim_rewards, _ = rewards(tools, env)
        same = [float(a == b) for a, b in zip(real_rewards, sim_rewards)]
        out[name] = {"em": mean(sim_rewards), "agreement": mean(same),
                     **{f"agreement_{b}": mean(s for s, bb in zip(same, buckets) if bb == b)
                        for b in BUCKETS}, **{f"n_{b}": buckets.count(b) for b in BUCKETS}}
    return out


# -----------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="World model of the tools: collect, train, serve, eval")
    sub = parser.add_subparsers(dest="command", required=True)
    data = dict(help="data.py output dir (tool_calls.jsonl; eval: also dev.jsonl, corpus.jsonl)")
    device = dict(default=common.default_device(), help="cpu or cuda (default: cuda if there is one)")
    p = sub.add_parser("collect", help="real calls -> deduplicated JSONL with a train / held-out split")
    p.add_argument("--data", **data)
    p.add_argument("--rollout-logs", nargs="*", default=[], help="JSONL logs of real calls from RL rollouts")
    p.add_argument("--tools", nargs="+", default=["search"], help="tools to model (the calculator stays real)")
    p.add_argument("--heldout-frac", type=float, default=0.1, help="share of training-question calls held out (seen)")
    p.add_argument("--unseen-frac", type=float, default=0.05, help="share of entities held out whole (unseen)")
    p.add_argument("--known-calls", action="store_true",
                   help="also search every known entity (base_facts.jsonl) with the teacher's query forms: train calls")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--out", required=True, help="output JSONL of calls")
    p = sub.add_parser("train", help="fine-tune a causal LM on call -> observation")
    p.add_argument("--calls", required=True, help="output of `collect` (rows with split == train are used)")
    p.add_argument("--init", default="tiny", help="tiny | smollm2 | HF dir or name")
    p.add_argument("--tokenizer", help="tokenizer dir (required for --init tiny: data.py's DIR/tokenizer)")
    p.add_argument("--out", required=True, help="checkpoint dir (written atomically by model.save)")
    p.add_argument("--device", **device)
    p.add_argument("--epochs", type=float, default=24, help="passes over the calls (memorising takes many)")
    p.add_argument("--batch-size", type=int, default=16, help="calls per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (tiny preset; pretrained model: ~5e-5)")
    p.add_argument("--max-len", type=int, default=384, help="max tokens of call + observation (longer: dropped)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--fsdp", action="store_true", help="shard over torchrun's ranks (FSDP2): memory only, same batches")
    p = sub.add_parser("serve", help="serve the world model behind server.py's HTTP retrieval API")
    p.add_argument("--ckpt", required=True, help="world model checkpoint")
    p.add_argument("--device", **device)
    p.add_argument("--max-obs-tokens", type=int, default=192, help="longest simulated observation in tokens")
    p.add_argument("--batch-size", type=int, default=16, help="queries per generate call")
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8081, help="port (0 = a free one)")
    p = sub.add_parser("eval", help="fidelity of the world model and of a policy as its own world model")
    p.add_argument("--data", **data)
    p.add_argument("--calls", help="output of `collect`; default: the --calls the world model was trained on")
    p.add_argument("--wm", help="world model checkpoint")
    p.add_argument("--policy", help="policy checkpoint, evaluated as its own world model and for reward agreement")
    p.add_argument("--template", default=None, choices=["short", "autocoa"],
                   help="the policy's prompt (default: the one --policy was trained with, its run_args.json)")
    p.add_argument("--device", **device)
    p.add_argument("--max-obs-tokens", type=int, default=192, help="longest simulated observation in tokens")
    p.add_argument("--batch-size", type=int, default=16, help="queries per generate call")
    p.add_argument("--max-calls", type=int, default=200, help="held-out calls per bucket (seen / unseen)")
    p.add_argument("--questions", type=int, default=32, help="dev questions for reward agreement (0 = skip)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="rollout length for reward agreement")
    p.add_argument("--out", required=True, help="output dir: fidelity.json, fidelity_calls.jsonl")
    return parser.parse_args(argv)


def print_table(report):
    print(f"{'simulator':<14} {'bucket':<7} {'n':>5} {'fact_recall':>11} {'ceiling':>8} {'all_facts':>9} "
          f"{'top1_recall':>11} {'token_f1':>8}")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for name, buckets in report["fidelity"].items():
        for bucket, m in buckets.items():
            print(f"{name:<14} {bucket:<7} {m['n']:>5} {fmt(m['fact_recall']):>11} {fmt(m['ceiling']):>8} "
                  f"{fmt(m['all_facts']):>9} {fmt(m['top1_recall']):>11} {fmt(m['f1']):>8}")
    if ra := report.get("reward_agreement"):
        print(f"reward agreement on {ra['n']} dev questions (real-tool EM {fmt(ra['real_em'])}):")
        for name, m in ((k, v) for k, v in ra.items() if isinstance(v, dict)):
            print(f"  {name:<14} EM {fmt(m['em'])} | same reward {fmt(m['agreement'])} | " + " | ".join(
                f"{b.replace('_', ' ')} {fmt(m['agreement_' + b])} (n={m['n_' + b]})" for b in BUCKETS))


def main(args):
    if args.command == "collect":
        assert args.data, "collect needs --data DIR (its tool_calls.jsonl)"
        path = os.path.join(args.data, "tool_calls.jsonl")
        rows = read_calls(path, args.rollout_logs)
        calls = split_calls(rows, tuple(args.tools), args.heldout_frac, args.unseen_frac, args.seed)
        if not calls:  # an empty output would only fail later, in train, far from its cause
            raise ValueError(f"{', '.join([path, *args.rollout_logs])}: none of the {len(rows)} calls is a usable "
                             f"{'/'.join(args.tools)} call (all failed, empty or another tool); nothing written")
        if args.known_calls:
            calls += known_entity_calls(os.path.join(args.data, "base_facts.jsonl"),
                                        os.path.join(args.data, "corpus.jsonl"), calls)
        write_atomic(args.out, "".join(json.dumps(c) + "\n" for c in calls))
        print(f"wrote {args.out}")

    elif args.command == "train":
        rows = read_rows(args.calls, CALL_FIELDS + ("split",))
        calls = [c for c in rows if c["split"] == "train"]
        if not calls:
            why = "no rows with split == train" if rows else "no calls (the file is empty)"
            raise ValueError(f"{args.calls}: {why}")
        torch.manual_seed(args.seed)
        assert args.init != "tiny" or args.tokenizer, "--init tiny needs --tokenizer DIR (data.py's DIR/tokenizer)"
        rank, world, device, _ = common.setup_distributed(args.device) if args.fsdp else (0, 1, args.device, False)
        if rank:
            sys.stdout = open(os.devnull, "w")
        model, tokenizer = M.load(args.init, tokenizer=args.tokenizer, device=device, add_action_tokens=True,
                                  seed=args.seed)
        fsdp.check_memory(model.config, device, rank == 0, world, args.batch_size, args.max_len, args.fsdp, None)
        model = fsdp.shard(model, device) if args.fsdp else model
        train_world_model(model, tokenizer, calls, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          max_len=args.max_len, seed=args.seed, log_every=args.log_every)
        weights = fsdp.full_state_dict(model)  # FSDP: gathered to rank 0 (every rank calls it), else None
        if rank == 0:
            M.save(model, tokenizer, args.out, {**vars(args), "calls": os.path.abspath(args.calls)}, weights)
            print(f"saved {args.out}")
        del model  # before the group goes: see common.teardown_distributed
        common.teardown_distributed()

    elif args.command == "serve":
        tools = load_world_model_tools(args.ckpt, args.max_obs_tokens, args.device, args.batch_size)
        serve_tool(tools, args.host, args.port)

    elif args.command == "eval":
        assert args.wm or args.policy, "eval needs --wm and/or --policy"
        calls_path = args.calls or (args.wm and json.load(open(os.path.join(args.wm, "run_args.json"))).get("calls"))
        assert calls_path, "give --calls (the output of `collect` the world model was trained on)"
        calls = read_rows(calls_path, ("tool", "args", "observation", "split", "entity", "entity_seen"))
        train_passages = {p for c in calls if c["split"] == "train" for p in split_results(c["observation"])}
        train_text = defaultdict(str)
        for p in sorted(train_passages):
            train_text[passage_title(p)] += p + "\n"
        heldout = [c for c in calls if c["split"] == "heldout"]
        heldout = ([c for c in heldout if c["entity_seen"]][:args.max_calls]
                   + [c for c in heldout if not c["entity_seen"]][:args.max_calls])
        simulated, wm_tools = {}, None  # simulator name -> its observation of each held-out call
        if args.wm:
            wm_tools = load_world_model_tools(args.wm, args.max_obs_tokens, args.device, args.batch_size)
            simulated["world_model"] = wm_tools([(c["tool"], c["args"]) for c in heldout])
        if args.policy:
            policy, tokenizer = M.load(args.policy, device=args.device, add_action_tokens=True)
            args.template = M.checkpoint_template(args.policy, args.template)
            prompts = [M.encode_segments(tokenizer, policy_sim_segments(tokenizer, c["tool"], c["args"],
                                                                        args.template))[0] for c in heldout]
            simulated["policy_as_wm"] = simulate(policy, tokenizer, prompts, "search", args.max_obs_tokens,
                                                 args.batch_size)
        report, details = {"calls": calls_path, "fidelity": {}, "args": vars(args)}, []
        for name, observations in simulated.items():
            rows = fidelity_rows(heldout, observations, name, train_text)
            report["fidelity"][name] = summarize_fidelity(rows)
            details += rows
        if args.policy and args.questions:
            assert args.data, "reward agreement needs --data DIR (dev.jsonl, corpus.jsonl)"
            questions = read_rows(os.path.join(args.data, "dev.jsonl"), ("question", "golden_answers"))[:args.questions]
            index = BM25Index.from_jsonl(os.path.join(args.data, "corpus.jsonl"))
            simulators = {"policy_as_wm": (make_tools(corpus=index), "sim")}
            if wm_tools is not None:
                simulators["world_model"] = (wm_tools, "real")  # the engine sees the world model as a real tool
            report["reward_agreement"] = reward_agreement(policy, tokenizer, questions, make_tools(corpus=index),
                                                          simulators, index, train_passages, args.template,
                                                          args.max_new_tokens, args.max_obs_tokens)
        write_atomic(os.path.join(args.out, "fidelity.json"), json.dumps(report, indent=2) + "\n")
        write_atomic(os.path.join(args.out, "fidelity_calls.jsonl"), "".join(json.dumps(r) + "\n" for r in details))
        print_table(report)
        print(f"wrote {os.path.join(args.out, 'fidelity.json')}")


if __name__ == "__main__":
    main(parse_args())
