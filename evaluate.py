"""
Evaluate a model on open-domain QA the way the paper's Table 1 and Figure 3 do: EM (and F1, cover-EM, an optional
LLM judge) per dataset and averaged, actions per question, real tool calls, and success rate by number of actions.

The answer metrics (normalize_answer, exact_match, f1, cover_em, extract_answer, format_ok) live here and are imported
by train_rl.py, so the RL reward and the evaluation score the same thing.

Modes (one engine, engine.rollout, for all of them):
  agent      the model acts inside its chain of thought; actions run against the real tools (the agent model rows).
  no-action  "model only": actions are not executed (the engine answers "Tools are disabled"), the model must answer.
  react      the agentic-workflow baseline for instruction models: ReAct prompting with 2 in-context examples written
             in the AutoCoA tag format, then the same engine with real tools.
  workflow   a fixed workflow for models that cannot follow instructions: retrieve top-k with the question itself,
             put the documents in the prompt, let the model answer (its actions, if any, are not executed).
  agent-sim  the model acts and writes every observation itself (RL stage 1's simulated environment, the internal
             world model): compare with agent to see what the simulation costs in EM, with zero real calls.

Departures from the paper / the authors' scripts, and why:
  - The paper judges with Qwen2.5-14B-Instruct and does not print its judge prompt; --judge takes any local HF causal LM
    and asks a short yes/no question (JUDGE_PROMPT below), majority of --judge-votes samples.
  - The format check looks at the RESPONSE only (the original checked prompt+response, so it could never fail).
  - Normalisation is SQuAD's (lowercase, drop punctuation and a/an/the, collapse spaces) plus NFKC and Unicode
    punctuation, so "Pandora’s" == "Pandora's" and full-width digits match ASCII. Punctuation is deleted, not
    replaced by a space, exactly as SQuAD does: "1,000" == "1000" (and, the price of it, "1.5" == "15").
    Accents are kept by default (SQuAD / FlashRAG behaviour); --strip-accents makes "Pinata" == "Piñata".
  - An empty (normalised) prediction scores 0 everywhere and a gold alias that normalises to "" is ignored: otherwise
    "\\boxed{the}" would exactly match a gold "The".
  - cover-EM asks for the normalised gold as a whole-word substring of the normalised prediction, so gold "no" is not
    "covered" by "unknown". "mention" is the same test on the whole response (thinking and observations included): a
    loose diagnostic for models that never write \boxed{} (no-action baselines), not an accuracy.
  - --limit takes the first N questions of each dataset (file order), so runs with the same --limit are comparable.
    Ids need only be unique per dataset (the authors' test file reuses them); an exact duplicate line is counted once.
  - react and workflow prompts carry their own instruction (they are not nested in --template); in react mode the
    response is scored up to the first "\nQuestion:" after </think>, where a few-shot model starts inventing the next
    example (predictions.jsonl keeps the full text).

Usage:
  python evaluate.py --model CKPT --questions data/test.jsonl --corpus data/corpus.jsonl --mode agent --out runs/eval
  python evaluate.py --model smollm2 --questions ../shared/data/autocoa_test.jsonl --mode no-action \\
      --template autocoa --limit 5 --out runs/smollm2_noaction
  python evaluate.py --model Qwen/Qwen2.5-7B-Instruct --questions Q.jsonl --url http://127.0.0.1:8080 --api flashrag \\
      --mode react --judge Qwen/Qwen2.5-14B-Instruct --judge-votes 3 --out runs/react --device cuda
Evaluation is inference only and single-process; for several GPUs run one evaluate.py per checkpoint
(CUDA_VISIBLE_DEVICES=i python evaluate.py ...), no torchrun needed.
In-process (run.sh / train_rl.py):  summary, predictions = evaluate(model, tokenizer, questions, tools, "agent")
"""
import json
import os
import re
import string
import sys
import time
import unicodedata
from collections import Counter, defaultdict

import numpy as np

from tools import THINK_CLOSE, THINK_OPEN, read_jsonl, write_atomic

# -----------------------------------------------------------------------------
# Answer metrics (SPEC 5 and 8). Pure functions of strings: train_rl.py imports these.

_PUNCT = set(string.punctuation)


def normalize_answer(s, strip_accents=False):
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace (+ NFKC)."""
    s = unicodedata.normalize("NFKC", s).lower()
    if strip_accents:
        s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    # ASCII punctuation (SQuAD) plus every Unicode punctuation character (curly quotes, dashes, CJK marks).
    s = "".join(c for c in s if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _golds(golds, strip_accents):
    """Normalised gold aliases; one that normalises to "" (e.g. "The") can never be matched."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    return [g for g in (normalize_answer(g, strip_accents) for g in golds) if g]


def exact_match(pred, golds, strip_accents=False):
    """1.0 if the normalised prediction equals any normalised gold alias, else 0.0 (None / empty pred -> 0.0)."""
    p = normalize_answer(pred, strip_accents) if pred else ""
    return float(bool(p) and p in _golds(golds, strip_accents))


def f1(pred, golds, strip_accents=False):
    """SQuAD token F1, max over gold aliases. Like HotpotQA's scorer, yes/no/noanswer must match exactly."""
    p = normalize_answer(pred, strip_accents) if pred else ""
    best = 0.0
    for g in _golds(golds, strip_accents):
        if not p or (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
            continue
        common = Counter(p.split()) & Counter(g.split())
        same = sum(common.values())
        if same:
            precision, recall = same / len(p.split()), same / len(g.split())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cover_em(pred, golds, strip_accents=False):
    """1.0 if some normalised gold occurs in the normalised prediction as whole words, else 0.0."""
    p = normalize_answer(pred, strip_accents) if pred else ""
    return float(bool(p) and any(f" {g} " in f" {p} " for g in _golds(golds, strip_accents)))


_BOXED = re.compile(r"\\boxed\s*\{")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|textit|mathrm|mbox)\s*\{(.*)\}$", re.S)


def _last_boxed(text):
    """Content of the last complete \\boxed{...} in text (nested braces matched), or None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:  # a truncated "\boxed{abc" (ran out of tokens) is not an answer
            found = text[m.end():i - 1].strip()
    if found is not None:
        found = _TEXT_WRAP.sub(r"\1", found).strip()  # \boxed{\text{Paris}} -> Paris
    return found


def extract_answer(text, require_think_close=True):
    """The answer: the last \\boxed{...} after </think> (None when there is none).
    A response without </think> breaks the format: it yields None unless require_think_close=False, in which case the
    last \\boxed{...} anywhere counts (lenient scoring for models that never close their thought; RL stays strict)."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        return None if require_think_close else _last_boxed(text)
    return _last_boxed(tail)


_ACTION_TAG = re.compile(r"<begin_\w+>|</end_\w+>|<\w+_result>|</\w+_result>")
_RESULT_TAG = re.compile(r"</?\w+_result>")
_ANSWERED_ACTION = re.compile(r"</end_(\w+)>\s*<\1_result>.*?</\1_result>", re.S)  # an action + its observation


def format_ok(response_text):
    """(ok, reason) for the RESPONSE only: needs </think>, no action/observation tag after it, a \\boxed{} after it,
    and every result block right after an action of its tool. Pass the POLICY's text (Rollout.policy_text: observation
    contents removed by the engine's masks), never text search over observations: a passage holding "</think>" or
    "\\boxed{X}" must not change the score. A result tag anywhere else was written by the policy: a fabricated
    observation, a format violation."""
    head, sep, tail = response_text.partition(THINK_CLOSE)
    if not sep:
        return False, "no </think>"
    if _ACTION_TAG.search(tail):
        return False, "action after </think>"
    if _RESULT_TAG.search(_ANSWERED_ACTION.sub(" ", head)):
        return False, "observation written by the policy"
    if _last_boxed(tail) is None:
        return False, "no \\boxed{} after </think>"
    return True, "ok"


# -----------------------------------------------------------------------------
# Questions

def load_questions(path, limit=None):
    """Shared question JSONL -> list of dicts. Bad lines raise ValueError naming file, line and field.
    limit keeps the first `limit` questions of each group: "dataset" when present, else "type", else all."""
    questions, seen = [], {}
    for where, q in read_jsonl(path):
        for field in ("id", "question", "golden_answers"):
            if field not in q:
                raise ValueError(f"{where}: missing field '{field}'")
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string")
        golds = q["golden_answers"]
        if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
            raise ValueError(f"{where}: field 'golden_answers' must be a non-empty list of strings")
        q["id"] = str(q["id"])
        key = (q.get("dataset"), q["id"])  # ids repeat across datasets in the authors' test file ("dev_265")
        if key in seen:
            first, first_where = seen[key]
            first_line = first_where.rsplit(":", 1)[1]
            if first != q:
                raise ValueError(f"{where}: field 'id' {q['id']!r} repeats line {first_line} with other content")
            # the authors' file has one exact duplicate (TriviaQA dev_2063, hence "501"): count it once
            print(f"warning: {where}: exact duplicate of line {first_line}, skipped", file=sys.stderr)
            continue
        seen[key] = (q, where)
        questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions")
    if limit is not None:
        taken = Counter()
        kept = []
        for q in questions:
            key = q.get("dataset", q.get("type"))
            if taken[key] < limit:
                taken[key] += 1
                kept.append(q)
        questions = kept
    return questions


# -----------------------------------------------------------------------------
# Prompts per mode

# ReAct baseline (paper 4.2, "agent workflow"): two in-context examples in the AutoCoA tag format, so the same engine
# executes the actions. The facts are real and the observations are short, as a real retriever would return them.
REACT_EXAMPLES = """Answer the question. Think inside <think> </think>. When you need a fact, search for it by writing <begin_search> your query </end_search>; the results will appear inside <search_result> </search_result>. You may search several times. After </think>, give the final answer as \\boxed{ANSWER}.

Question: What is the capital of Australia?
<think> I should check the capital of Australia. <begin_search> capital of Australia </end_search>
<search_result>
result 1: "Canberra"
Canberra is the capital city of Australia. Founded following the federation of the colonies of Australia as the seat of government for the new nation, it is the country's largest inland city.
</search_result>
The capital of Australia is Canberra. </think>
The answer is \\boxed{Canberra}

Question: Who wrote the novel that the film Blade Runner is based on?
<think> First I need the novel that Blade Runner is based on. <begin_search> Blade Runner film based on novel </end_search>
<search_result>
result 1: "Blade Runner"
Blade Runner is a 1982 science fiction film directed by Ridley Scott. It is an adaptation of the 1968 novel "Do Androids Dream of Electric Sheep?"
</search_result>
The novel is "Do Androids Dream of Electric Sheep?". Now I need its author. <begin_search> Do Androids Dream of Electric Sheep? author </end_search>
<search_result>
result 1: "Do Androids Dream of Electric Sheep?"
Do Androids Dream of Electric Sheep? is a dystopian science fiction novel by the American writer Philip K. Dick, first published in 1968.
</search_result>
The author is Philip K. Dick. </think>
The answer is \\boxed{Philip K. Dick}

Question: {question}"""

WORKFLOW_PROMPT = """Answer the question using the documents below. Give the final answer as \\boxed{{ANSWER}}.

Documents:
{documents}

Question: {question}"""


def user_turn(tokenizer, text):
    """model.wrap_prompt (chat template when there is one, then <think>) for a prompt that brings its own instruction:
    the react and workflow prompts are not nested inside the --template instruction. The text ends with a newline, as
    the trained template does ("Question: {question}\n"), so the prompt ends "...\n<think>" in every mode. A copy of
    wrap_prompt's three lines, not an import: this part of evaluate.py imports without torch, and the tests swap
    model.py out."""
    if not text.endswith("\n"):
        text += "\n"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return text + THINK_OPEN


def make_prompts(tokenizer, questions, mode, tools, template, build_prompt):
    """Prompt text per question. workflow retrieves top-k with the question itself (one batched registry call)."""
    if mode == "react":
        return [user_turn(tokenizer, REACT_EXAMPLES.replace("{question}", q["question"])) for q in questions]
    if mode == "workflow":
        docs = tools([("search", q["question"]) for q in questions])
        return [user_turn(tokenizer, WORKFLOW_PROMPT.format(documents=d, question=q["question"]))
                for d, q in zip(docs, questions)]
    return [build_prompt(tokenizer, q["question"], template=template) for q in questions]


# -----------------------------------------------------------------------------
# LLM judge (paper 4.1: "LLM-based accuracy"; the paper does not print its judge prompt, this is a short one)

JUDGE_PROMPT = """You are grading an answer to a question. Decide whether the predicted answer means the same as one of the gold answers (different wording, spelling or detail level is fine; a different entity or number is not).

Question: {question}
Gold answers: {golds}
Predicted answer: {prediction}

Is the predicted answer correct? Reply with one word: yes or no."""


def judge_answers(judge_model, judge_tokenizer, items, votes=1, batch_size=8, seed=0):
    """items: (question, golds, prediction) -> list of 0/1, majority of `votes` (greedy when votes == 1).
    A missing prediction is 0 without asking."""
    from engine import rollout
    asks = [i for i, (_, _, p) in enumerate(items) if p]
    texts = []
    for i in asks:
        question, golds, prediction = items[i]
        content = JUDGE_PROMPT.format(question=question, golds=" | ".join(golds), prediction=prediction)
        if getattr(judge_tokenizer, "chat_template", None):
            content = judge_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                          add_generation_prompt=True)
        else:
            content += "\nAnswer:"
        texts.append(content)
    ids = [judge_tokenizer(t, add_special_tokens=False).input_ids for t in texts for _ in range(votes)]
    said_yes = []
    for start in range(0, len(ids), batch_size):
        # 64 tokens: room for "yes"/"no" before the engine's forced-answer reserve (answer_tokens + tags) kicks in
        outs = rollout(judge_model, judge_tokenizer, ids[start:start + batch_size], None, env="none",
                       max_new_tokens=64, answer_tokens=8, greedy=votes == 1, temperature=0.7, seed=seed + start)
        for o in outs:  # the verdict is the first word after any thinking, tags and punctuation removed
            reply = re.sub(r"<[^>]*>", " ", o.text.split(THINK_CLOSE)[-1]).lower()
            said_yes.append(re.sub(r"[^a-z]", " ", reply).split()[:1] == ["yes"])
    verdict = [0] * len(items)
    for k, i in enumerate(asks):
        verdict[i] = int(sum(said_yes[k * votes:(k + 1) * votes]) * 2 > votes)
    return verdict


# -----------------------------------------------------------------------------
# Evaluation: one engine call per batch, then scoring and summaries

MODES = ("agent", "no-action", "workflow", "react", "agent-sim")
ENV_OF_MODE = {"agent": "real", "react": "real", "no-action": "none", "workflow": "none", "agent-sim": "sim"}
NEEDS_TOOLS = ("agent", "react", "workflow")
ACTION_BUCKETS = ("0", "1", "2", "3", "4", "5+")  # one run's results.json / results.md
FIG3_BUCKETS = ("0", "1", "2", "3", "4+")  # paper Figure 3 in the run.sh table (few questions take 5+ actions)


def tool_counters(tools):
    """Cumulative registry counters. real_calls: arguments that reached a tool (cache misses; calculator included),
    paid_calls: those that reached a non-local tool (the paper's cost, as train_rl's real_calls), errors: error
    observations."""
    if tools is None:
        return {"requests": 0, "real_calls": 0, "paid_calls": 0, "cache_hits": 0, "errors": 0}
    return {"requests": sum(tools.counts.values()), "real_calls": tools.real_calls, "paid_calls": tools.paid_calls,
            "cache_hits": tools.cache_hits, "errors": tools.errors}


def success_by_actions(predictions, buckets=FIG3_BUCKETS):
    """Figure 3: per sample, the share answered right (EM) among those with 0, 1, ... actions; the last bucket ("4+",
    or "5+" of ACTION_BUCKETS) takes every larger count."""
    b = {k: {"n": 0, "correct": 0} for k in buckets}
    for r in predictions:
        for s in r.get("samples", [r]):
            k = buckets[min(s["num_actions"], len(buckets) - 1)]
            b[k]["n"] += 1
            b[k]["correct"] += s["em"]
    return {k: {**v, "success_rate": v["correct"] / v["n"] if v["n"] else None} for k, v in b.items()}


def _metrics(records, with_judge):
    """Mean metrics over prediction records (each already averaged over its samples)."""
    n = len(records)
    keys = ["em", "f1", "cover_em", "mention", "format_ok", "answered", "num_actions"]
    keys += ["judge"] if with_judge else []
    return {"n": n, **{k: sum(r[k] for r in records) / max(n, 1) for k in keys}}


def summarize(predictions, with_judge=False):
    """Numbers for results.json from prediction records: overall, per dataset, per type, macro average (the paper's
    Avg = mean over datasets), success by number of actions (Figure 3, counted per sample), stop reasons."""
    summary = {"overall": _metrics(predictions, with_judge)}
    for field in ("dataset", "type"):
        groups = defaultdict(list)
        for r in predictions:
            if field in r:
                groups[str(r[field])].append(r)
        if groups:
            summary[f"by_{field}"] = {g: _metrics(rs, with_judge) for g, rs in groups.items()}
    per_group = summary.get("by_dataset") or summary.get("by_type") or {"all": summary["overall"]}
    summary["average"] = {k: sum(m[k] for m in per_group.values()) / len(per_group)
                          for k in summary["overall"] if k != "n"}
    stops, formats = Counter(), Counter()
    for r in predictions:
        for s in r.get("samples", [r]):
            formats[s["format"]] += 1
            stops[s["stop_reason"]] += 1
    summary["by_actions"] = success_by_actions(predictions, ACTION_BUCKETS)
    summary["stop_reasons"], summary["format_checks"] = dict(stops), dict(formats)
    return summary


def evaluate(model, tokenizer, questions, tools, mode, *, template="autocoa", n_samples=1, temperature=0.0,
             top_p=1.0, batch_size=8, max_new_tokens=512, max_actions=10, max_context=2048, answer_tokens=32, seed=0,
             strip_accents=False, lenient_think=False, judge=None, judge_votes=1, progress=True):
    """Run `questions` through the engine in `mode` and score them -> (summary dict, prediction records).

    tools: a ToolRegistry (required for agent / react / workflow; unused by no-action and agent-sim).
    temperature 0 = greedy; with n_samples > 1 every metric is the mean over the samples (the paper's averaged EM).
    judge: (model, tokenizer) of an LLM judge or None.
    lenient_think: score a \\boxed{} even when </think> is missing (never the default)."""
    from engine import rollout  # lazy: the metrics above must import without torch (train_rl, data)
    from model import build_prompt
    from tqdm import tqdm
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in NEEDS_TOOLS and tools is None:
        raise ValueError(f"mode {mode!r} needs tools (a corpus or a retrieval URL)")
    if n_samples > 1 and temperature <= 0:
        raise ValueError("n_samples > 1 needs temperature > 0 (greedy samples would all be the same)")
    env = ENV_OF_MODE[mode]
    before = tool_counters(tools)

    prompts = make_prompts(tokenizer, questions, mode, tools, template, build_prompt)
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    jobs = [(qi, si) for qi in range(len(questions)) for si in range(n_samples)]
    outs = {}
    batches = range(0, len(jobs), batch_size)
    t0 = time.time()
    for start in tqdm(batches, desc=f"eval {mode}", unit="batch", disable=not progress):
        chunk = jobs[start:start + batch_size]
        rolls = rollout(model, tokenizer, [prompt_ids[qi] for qi, _ in chunk], tools if env == "real" else None,
                        env=env, max_new_tokens=max_new_tokens, max_actions=max_actions, max_context=max_context,
                        answer_tokens=answer_tokens,
                        temperature=temperature or 1.0, top_p=top_p, greedy=temperature <= 0, seed=seed + start)
        outs.update(zip(chunk, rolls))

    predictions = []
    for qi, q in enumerate(questions):
        samples = []
        for si in range(n_samples):
            r, golds = outs[(qi, si)], q["golden_answers"]
            answer_text = r.policy_text  # the policy's own tokens: tool output never supplies the answer or the format
            if mode == "react":  # a few-shot model often goes on to invent the next "Question:"; score up to it
                head, sep, tail = answer_text.partition(THINK_CLOSE)
                answer_text = head + sep + tail.split("\nQuestion:")[0]
            pred = extract_answer(answer_text, require_think_close=not lenient_think)
            ok, reason = format_ok(answer_text)
            samples.append({"text": r.text, "prediction": pred, "em": exact_match(pred, golds, strip_accents),
                            "f1": f1(pred, golds, strip_accents), "cover_em": cover_em(pred, golds, strip_accents),
                            # LaTeX commands become spaces first: "\boxed{Paris}" would normalise to "boxedparis"
                            "mention": cover_em(re.sub(r"\\[a-zA-Z]+", " ", answer_text), golds, strip_accents),
                            "format_ok": float(ok), "format": reason, "answered": float(pred is not None),
                            "num_actions": sum(r.num_actions.values()), "actions": dict(r.num_actions),
                            "real_calls": r.real_calls, "sim_obs": r.sim_obs, "stop_reason": r.stop_reason})
        record = {"id": q["id"], **{k: q[k] for k in ("dataset", "type", "hops", "known") if k in q},
                  "question": q["question"], "golden_answers": q["golden_answers"], "prompt": prompts[qi],
                  "trajectory": samples[0]["text"], "prediction": samples[0]["prediction"],
                  "stop_reason": samples[0]["stop_reason"], "format": samples[0]["format"],
                  "actions": samples[0]["actions"]}
        for k in ("em", "f1", "cover_em", "mention", "format_ok", "answered", "num_actions", "real_calls"):
            record[k] = samples[0][k] if n_samples == 1 else sum(s[k] for s in samples) / n_samples
        if n_samples > 1:
            record["samples"] = samples
        predictions.append((record, samples))

    if judge is not None:
        items = [(q["question"], q["golden_answers"], s["prediction"]) for q, (_, ss) in zip(questions, predictions)
                 for s in ss]
        verdicts = iter(judge_answers(*judge, items, votes=judge_votes, batch_size=batch_size, seed=seed))
        for record, samples in predictions:
            for s in samples:
                s["judge"] = next(verdicts)
            record["judge"] = sum(s["judge"] for s in samples) / n_samples

    records = [r for r, _ in predictions]
    summary = summarize(records, with_judge=judge is not None)
    # registry deltas (the workflow's retrieval included) and the engine's own count of executed actions
    calls = {k: v - before[k] for k, v in tool_counters(tools).items()}
    summary["tool_calls"] = {**calls, "real_calls_per_question": calls["real_calls"] / len(questions),
                             "engine_real_calls": sum(s["real_calls"] for _, ss in predictions for s in ss),
                             "simulated_observations": sum(s["sim_obs"] for _, ss in predictions for s in ss)}
    summary.update(mode=mode, n_questions=len(questions), n_samples=n_samples,
                   questions_per_minute=60 * len(questions) / max(time.time() - t0, 1e-9))  # generation + tools + judge
    return summary, records


# -----------------------------------------------------------------------------
# Tables

def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def format_table(rows, metric="em"):
    """Table-1-like markdown: one row per run, one column per dataset (or type) and Avg.
    rows: list of (label, summary). Cells are `metric` x 100, with "/ judge" appended when the run has a judge."""
    groups = []
    for _, s in rows:
        for g in s.get("by_dataset") or s.get("by_type") or {}:
            if g not in groups:
                groups.append(g)

    def cell(m):
        if m is None:
            return "-"
        return _pct(m[metric]) + (f" / {_pct(m['judge'])}" if "judge" in m else "")

    head = ["run"] + groups + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows:
        per = s.get("by_dataset") or s.get("by_type") or {}
        lines.append("| " + " | ".join([label] + [cell(per.get(g)) for g in groups] + [cell(s["average"])]) + " |")
    return "\n".join(lines)


def format_results_md(summary, label):
    """results.md: the Table-1 row, the full metric table per group, success by #actions (Figure 3), tool calls."""
    judge = "judge" in summary["overall"]
    cols = ["em", "f1", "cover_em"] + (["judge"] if judge else []) + ["format_ok", "answered", "mention"]
    out = [f"# {label}: {summary['mode']}, {summary['n_questions']} questions x {summary['n_samples']} samples", "",
           f"EM{' / LLM judge' if judge else ''} (%), Avg = mean over groups:", "",
           format_table([(label, summary)]), "",
           "| group | n | " + " | ".join(cols) + " | actions/question |", "|" + "---|" * (len(cols) + 3)]
    groups = {**summary.get("by_dataset", {}), **summary.get("by_type", {}), "overall (micro)": summary["overall"],
              "Avg (macro)": {"n": summary["n_questions"], **summary["average"]}}
    for g, m in groups.items():
        out.append(f"| {g} | {m['n']} | " + " | ".join(_pct(m[c]) for c in cols) + f" | {m['num_actions']:.2f} |")
    out += ["", "Success rate by number of actions (paper Figure 3, per sample):", "",
            "| #actions | " + " | ".join(ACTION_BUCKETS) + " |", "|" + "---|" * (len(ACTION_BUCKETS) + 1),
            "| n | " + " | ".join(str(summary["by_actions"][b]["n"]) for b in ACTION_BUCKETS) + " |",
            "| EM (%) | " + " | ".join(_pct(summary["by_actions"][b]["success_rate"]) for b in ACTION_BUCKETS) + " |",
            "", "Tool calls: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in summary["tool_calls"].items()),
            "Stop reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["stop_reasons"].items())),
            "Format checks: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["format_checks"].items())), ""]
    return "\n".join(out)


def _pyplot():
    """matplotlib.pyplot on a file backend, or None when matplotlib (an optional dependency) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_by_actions(summary, path):
    """Figure 3 as a PNG when matplotlib is installed (optional dependency); returns whether it was written."""
    plt = _pyplot()
    if plt is None:
        return False
    b = summary["by_actions"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(ACTION_BUCKETS, [b[k]["correct"] for k in ACTION_BUCKETS])
    ax1.set(xlabel="#actions", ylabel="correct answers", title="(a) correct by #actions")
    ax2.bar(ACTION_BUCKETS, [100 * (b[k]["success_rate"] or 0) for k in ACTION_BUCKETS])
    ax2.set(xlabel="#actions", ylabel="EM (%)", title="(b) success rate by #actions")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_outputs(out_dir, summary, predictions, label="run"):
    """results.json, results.md, predictions.jsonl (+ by_actions.png when matplotlib is there), each atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                 "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    write_atomic(os.path.join(out_dir, "results.md"), format_results_md(summary, label))
    plot_by_actions(summary, os.path.join(out_dir, "by_actions.png"))
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Table 1 on the embedded world: one row per evaluated checkpoint (run.sh's last step)

WORLD_COLUMNS = ["1hop", "2hop", "3hop", "4hop", "comparison", "arithmetic"]
AVG_OF = WORLD_COLUMNS + ["known"]  # avg = mean of these cells (macro, like the paper's Avg over datasets)
# Each RL row of run.sh and the row of the checkpoint its RL started from (run_args.json "init" of the RL checkpoint)
RL_START = {"sft-12+rl-real": "sft-12", "sft-123+rl-sim": "sft-123", "sft-123+rl-sim-real": "sft-123"}


def world_cells(predictions):
    """The per-question scores behind each Table 1 cell (see world_row): cell -> {(dataset, id): score}."""
    def scores(rows):
        return {(r.get("dataset"), r["id"]): float(r["em"]) for r in rows}
    unknown = [r for r in predictions if not r.get("known")]
    known = [r for r in predictions if r.get("known")]
    cells = {t: scores([r for r in unknown if r.get("type") == t]) for t in WORLD_COLUMNS}
    cells["known"] = scores(known)
    cells["unknown_multihop"] = scores([r for r in unknown if r.get("type") in ("2hop", "3hop", "4hop")])
    cells["known_no_action"] = scores([{**r, "em": r["num_actions"] == 0} for r in known])  # 1 = answered w/o acting
    return cells


def cell_groups(cells, cell):  # the question groups a cell averages: avg the means of AVG_OF, any other cell one
    return [cells[c] for c in (AVG_OF if cell == "avg" else [cell])]  # empty ones (no such question) drop later


def bootstrap_ci(groups, n_boot=1000, seed=0):
    """95% percentile bootstrap of mean-over-groups(mean of group): questions resampled with replacement within each
    group (one group = one cell; AVG_OF = the avg cell; per-question differences = a paired difference of means)."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not groups:
        return None, None
    stats = np.mean([g[rng.integers(0, len(g), (n_boot, len(g)))].mean(1) for g in groups], axis=0)  # (n_boot,)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def cell_ci(cells, cell, base_cells=None):
    """A Table 1 cell with its bootstrap 95% interval -> {value, lo, hi, n questions}; with base_cells (another row),
    the paired difference cell - base cell on the questions both rows answered (matched by dataset and id)."""
    groups = cell_groups(cells, cell)
    base = cell_groups(base_cells, cell) if base_cells else [{}] * len(groups)
    diffs = [[g[k] - b.get(k, 0) for k in sorted(g.keys() & b.keys() if base_cells else g)]
             for g, b in zip(groups, base)]
    diffs = [d for d in diffs if d]
    return {"value": sum(sum(d) / len(d) for d in diffs) / len(diffs) if diffs else None,
            **dict(zip(("lo", "hi"), bootstrap_ci(diffs))), "n": sum(map(len, diffs))}


def plot_fig3(fig3, path):
    """Figure 3 of the run, one line per agent row, as a PNG when matplotlib is installed; returns whether written."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, b in fig3.items():
        ax.plot(FIG3_BUCKETS, [100 * (b[k]["success_rate"] or 0) for k in FIG3_BUCKETS], marker="o", label=label)
    ax.set(xlabel="#actions", ylabel="EM (%)", title="Success rate by number of actions (Figure 3)")
    ax.legend(fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True


def world_row(predictions, model_dir):
    """EM per question type on UNKNOWN-entity questions (the model must act), EM on known-fact questions, their mean,
    EM on unknown multi-hop (2- to 4-hop), the share of known questions answered without acting, and the real tool
    calls RL spent to make this checkpoint (read from the metrics.jsonl train_rl.py leaves in it; 0 without RL)."""
    cells = world_cells(predictions)
    row = {c: sum(v.values()) / len(v) if v else None for c, v in cells.items()}
    present = [row[c] for c in AVG_OF if row[c] is not None]
    row = {**{c: row[c] for c in AVG_OF}, "avg": sum(present) / len(present) if present else None,
           "unknown_multihop": row["unknown_multihop"], "known_no_action": row["known_no_action"]}
    metrics = os.path.join(model_dir, "metrics.jsonl")
    calls = 0
    if os.path.exists(metrics):
        with open(metrics) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        calls = rows[-1].get("real_calls_total", 0) if rows else 0  # SFT checkpoints keep metrics.jsonl too
    row["rl_real_calls"] = calls
    return row


def world_table(run_dir, labels, wall_seconds=None):
    """Read run_dir/eval/LABEL/{results.json,predictions.jsonl} for each label -> (markdown, rows dict, extras dict):
    Table 1, then its 95% bootstrap intervals, each RL row minus its starting row (RL_START), and Figure 3."""
    rows, cells, fig3 = {}, {}, {}
    for label in labels:
        d = os.path.join(run_dir, "eval", label)
        with open(os.path.join(d, "results.json")) as f:
            args = json.load(f)["args"]
        with open(os.path.join(d, "predictions.jsonl")) as f:
            predictions = [json.loads(line) for line in f if line.strip()]
        rows[label], cells[label] = world_row(predictions, args["model"]), world_cells(predictions)
        if ENV_OF_MODE.get(args.get("mode")) != "none":  # agent rows only: model-only and workflow never act
            fig3[label] = success_by_actions(predictions)
    cols = WORLD_COLUMNS + ["known", "avg", "unknown_multihop", "known_no_action"]
    head = ["row"] + cols + ["RL real calls"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        lines.append("| " + " | ".join([label] + [_pct(r[c]) if r[c] is not None else "-" for c in cols]
                                       + [str(r["rl_real_calls"])]) + " |")
    note = ("\nEM (%) on the test split. Type columns: unknown-entity questions (answerable only by acting); known: "
            "questions on facts the base model was taught; known_no_action: share of known questions answered without "
            "acting; RL real calls: real tool calls spent by RL to make the checkpoint.")
    if wall_seconds is not None:
        note += f" Time of all stages (times.tsv): {wall_seconds / 60:.1f} min."

    def ci(value, lo, hi, n=None, signed=False):  # "28.4 [22.1, 35.0]"
        v = "-" if value is None else f"{100 * value:+.1f}" if signed else _pct(value)
        return v if value is None else f"{v} [{_pct(lo)}, {_pct(hi)}]"
    intervals = {label: {c: cell_ci(cells[label], c) for c in cols} for label in labels}
    paired = {label: {"start": start, **{c: cell_ci(cells[label], c, cells[start]) for c in ("avg",
                                                                                         "unknown_multihop")}}
              for label, start in RL_START.items() if label in cells and start in cells}
    md = ["", "## 95% bootstrap intervals (percentile, 1000 resamples of each cell's questions, seed 0)", "",
          "| row | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    md += ["| " + " | ".join([label] + [ci(**iv[c]) for c in cols]) + " |" for label, iv in intervals.items()]
    md += ["", "## RL row minus its starting checkpoint, same questions (paired bootstrap 95%, EM points)", "",
           "| RL row | start | n (avg / multihop) | avg | unknown_multihop |", "|---|---|---|---|---|"]
    md += [f"| {label} | {p['start']} | {p['avg']['n']} / {p['unknown_multihop']['n']} | "
           f"{ci(**p['avg'], signed=True)} | {ci(**p['unknown_multihop'], signed=True)} |"
           for label, p in paired.items()]
    md += ["", "## Figure 3: success rate (EM %, per sample) by number of actions, agent rows (n in brackets)", "",
           "| row | " + " | ".join(FIG3_BUCKETS) + " |", "|" + "---|" * (len(FIG3_BUCKETS) + 1)]
    md += ["| " + " | ".join([label] + [f"{_pct(b[k]['success_rate'])} ({b[k]['n']})" for k in FIG3_BUCKETS]) + " |"
           for label, b in fig3.items()]
    extras = {"intervals": intervals, "paired": paired, "fig3": fig3}
    return "\n".join(lines) + "\n" + note + "\n" + "\n".join(md) + "\n", rows, extras


def table_main(argv):
    import argparse
    p = argparse.ArgumentParser(prog="evaluate.py table", description="Table 1 of a run.sh run from its eval/ dirs")
    p.add_argument("--run", required=True, help="the run directory (out/<run>) holding eval/LABEL/ per row")
    p.add_argument("--rows", nargs="+", required=True, help="row labels, in table order (eval/LABEL must exist)")
    p.add_argument("--wall-seconds", type=float, default=None, help="time of the run's stages, printed under the table")
    args = p.parse_args(argv)
    md, rows, extras = world_table(args.run, args.rows, args.wall_seconds)
    write_atomic(os.path.join(args.run, "results.md"), md)
    write_atomic(os.path.join(args.run, "results.json"),
                 json.dumps({"rows": rows, "wall_seconds": args.wall_seconds, **extras}, indent=2) + "\n")
    png = plot_fig3(extras["fig3"], os.path.join(args.run, "results_fig3.png"))
    print(md)
    print(f"wrote {args.run}/results.md and results.json" + (" and results_fig3.png" if png else ""))


# -----------------------------------------------------------------------------
# CLI

def get_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Evaluate on QA: EM / F1 / cover-EM / LLM judge, actions, tool calls")
    # Model
    p.add_argument("--model", required=True, help="checkpoint dir, 'tiny' (needs --tokenizer), 'smollm2', or HF name")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (required for --model tiny)")
    p.add_argument("--add-action-tokens", action="store_true", help="add the think/action/result tags as special "
                   "tokens to a pretrained tokenizer (as train_sft.py does; new rows start at their pieces' mean)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one, as every script)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: model.load's choice)")
    p.add_argument("--template", choices=["short", "autocoa"], default=None,
                   help="instruction prompt template (default: the one --model was trained with, its run_args.json "
                   "'template'; 'short' for a model without one)")
    # Data
    p.add_argument("--questions", required=True, help="question JSONL: {id, question, golden_answers[, dataset, type]}")
    p.add_argument("--limit", type=int, default=None, help="first N questions per dataset (per type without dataset)")
    # Tools
    p.add_argument("--corpus", default=None, help="JSONL corpus for in-process BM25 search (FlashRAG format)")
    p.add_argument("--url", default=None, help="retrieval server URL instead of --corpus")
    p.add_argument("--api", choices=["flashrag", "searchr1"], default="flashrag", help="request shape for --url")
    p.add_argument("--topk", type=int, default=3, help="passages per search")
    p.add_argument("--max-obs-chars", type=int, default=4000,
                   help="tool output longer than this is cut (visibly: '... [truncated]') before tokenising")
    # Evaluation
    p.add_argument("--mode", choices=MODES, default="agent", help="how the model meets the tools (see the docstring)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per question; metrics are averaged over them")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="rollouts per engine call")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per response (actions included)")
    p.add_argument("--max-actions", type=int, default=10, help="actions per trajectory before the limit message")
    p.add_argument("--max-context", type=int, default=2048, help="prompt + response tokens before a forced answer")
    p.add_argument("--answer-tokens", type=int, default=32, help="tokens reserved for the forced answer (Algorithm 1)")
    p.add_argument("--strip-accents", action="store_true", help="normalise 'Piñata' to 'pinata' before matching")
    p.add_argument("--lenient-think", action="store_true", help="score a \\boxed{} even when </think> is missing")
    p.add_argument("--judge", default=None, help="LLM judge: any local HF causal LM dir or name (off by default)")
    p.add_argument("--judge-votes", type=int, default=1, help="judge samples per answer, majority vote (1 = greedy)")
    # Output
    p.add_argument("--out", required=True, help="output dir: results.json, results.md, predictions.jsonl")
    p.add_argument("--label", default=None, help="row label in the tables (default: --model)")
    args = p.parse_args(argv)
    if args.mode in NEEDS_TOOLS and not (args.corpus or args.url):
        p.error(f"--mode {args.mode} needs --corpus or --url (no-action and agent-sim run without tools)")
    if args.corpus and args.url:
        p.error("give --corpus or --url, not both")
    assert args.n_samples >= 1 and args.judge_votes >= 1, "--n-samples and --judge-votes must be >= 1"
    if args.n_samples > 1 and args.temperature <= 0:
        p.error("--n-samples > 1 needs --temperature > 0")
    return args


def main(argv=None):
    args = get_args(argv)
    import torch
    from common import default_device
    from model import checkpoint_template, load
    args.device = args.device or default_device()
    args.template = checkpoint_template(args.model, args.template)  # the prompt the checkpoint saw; recorded in args
    print(f"template {args.template}", flush=True)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    questions = load_questions(args.questions, args.limit)
    print(f"{len(questions)} questions from {args.questions}"
          + (f" (first {args.limit} per group)" if args.limit else ""), flush=True)
    model, tokenizer = load(args.model, tokenizer=args.tokenizer, device=args.device, dtype=dtype,
                            add_action_tokens=args.add_action_tokens)
    model.eval()
    tools = None
    if args.corpus or args.url:
        from tools import make_tools
        tools = make_tools(corpus=args.corpus, url=args.url, api=args.api, k=args.topk, max_obs_chars=args.max_obs_chars)
    judge = load(args.judge, device=args.device, dtype=dtype) if args.judge else None
    summary, predictions = evaluate(
        model, tokenizer, questions, tools, args.mode, template=args.template, n_samples=args.n_samples,
        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        max_actions=args.max_actions, max_context=args.max_context, answer_tokens=args.answer_tokens, seed=args.seed,
        strip_accents=args.strip_accents, lenient_think=args.lenient_think, judge=judge, judge_votes=args.judge_votes)
    summary["args"] = vars(args)
    write_outputs(args.out, summary, predictions, label=args.label or args.model)
    print(format_results_md(summary, args.label or args.model))
    print(f"{summary['questions_per_minute']:.1f} questions per minute ({args.mode}, batch {args.batch_size})")
    print(f"wrote {args.out}/results.json, results.md, predictions.jsonl")
    return summary


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        table_main(sys.argv[2:])
    else:
        main()
