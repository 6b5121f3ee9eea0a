"""
Evaluate a model on open-domain QA as the paper's Table 1 and Figure 3 do: this file runs the model and scores each
answer (EM, F1, cover-EM, an optional LLM judge; the RL reward imports the same metrics), report.py aggregates.

Modes (one engine, engine.rollout, for all of them):
  agent      the model acts inside its chain of thought; actions run against the real tools (the agent model rows).
  no-action  "model only": actions are not executed (the engine answers "Tools are disabled"), the model must answer.
  react      agentic-workflow baseline for instruction models: ReAct, 2 in-context examples in AutoCoA tags, real tools.
  workflow   for models that cannot follow instructions: the question's top-k passages in the prompt, no actions run.
  agent-sim  the model writes every observation itself (RL stage 1's simulation): agent minus agent-sim = its EM cost.

Departures from the paper / the authors' scripts, and why:
  - The paper judges with Qwen2.5-14B-Instruct and does not print its judge prompt; --judge takes any local HF causal LM
    and asks a short yes/no question (JUDGE_PROMPT below), majority of --judge-votes samples.
  - The format check looks at the RESPONSE only (the original checked prompt+response, so it could never fail).
  - Normalisation is SQuAD's plus NFKC and Unicode punctuation: "Pandora’s" == "Pandora's", full-width digits match
    ASCII. Punctuation is deleted, not replaced by a space, exactly as SQuAD does: "1,000" == "1000" (and, the price
    of it, "1.5" == "15"). Accents are kept (SQuAD / FlashRAG behaviour); --strip-accents makes "Pinata" == "Piñata".
  - An empty (normalised) prediction scores 0 everywhere and a gold alias that normalises to "" is ignored: otherwise
    "\\boxed{the}" would exactly match a gold "The".
  - cover-EM asks for the normalised gold as a whole-word substring of the normalised prediction, so gold "no" is not
    "covered" by "unknown". "mention" is the same test on the response as the policy wrote it (thinking included): a
    loose diagnostic for models that never write \boxed{} (no-action baselines), not an accuracy.
  - --limit takes the first N questions of each dataset (file order), so runs with the same --limit are comparable.
    Ids need only be unique per dataset (the authors' test file reuses them: "dev_265"); an exact duplicate line is
    counted once (their TriviaQA has one, dev_2063, hence "501").
  - react and workflow prompts carry their own instruction (not nested in --template); react scores the response up to
    the first "\nQuestion:" after </think>, where a few-shot model starts inventing the next example.

Usage:
  python evaluate.py --model CKPT --questions data/test.jsonl --corpus data/corpus.jsonl --mode agent --out runs/eval
  python evaluate.py --model smollm2 --questions ../shared/data/autocoa_test.jsonl --mode no-action \\
      --template autocoa --limit 5 --out runs/smollm2_noaction
  python evaluate.py --model Qwen/Qwen2.5-7B-Instruct --questions Q.jsonl --url http://127.0.0.1:8080 --api flashrag \\
      --mode react --judge Qwen/Qwen2.5-14B-Instruct --judge-votes 3 --out runs/react --device cuda
Inference only, single-process: for several GPUs run one per checkpoint (CUDA_VISIBLE_DEVICES=i python evaluate.py ...).
In-process (run.sh / train_rl.py):  summary, predictions = evaluate(model, tokenizer, questions, tools, "agent")
"""
import itertools
import re
import string
import sys
import time
import unicodedata
from collections import Counter, defaultdict

from report import format_results_md, summarize, write_outputs
from tools import THINK_CLOSE, make_tools, read_jsonl

# -----------------------------------------------------------------------------
# Answer metrics (SPEC 5 and 8): pure functions of strings

_PUNCT = set(string.punctuation)


def normalize_answer(s, strip_accents=False):
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace (+ NFKC)."""
    s = unicodedata.normalize("NFKC", s).lower()
    if strip_accents:
        s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    s = "".join(c for c in s if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _normalized(pred, golds, strip_accents):
    golds = [golds] if isinstance(golds, str) else golds
    return (normalize_answer(pred, strip_accents) if pred else "",
            [g for g in (normalize_answer(g, strip_accents) for g in golds) if g])


def exact_match(pred, golds, strip_accents=False):
    p, golds = _normalized(pred, golds, strip_accents)
    return float(bool(p) and p in golds)


def f1(pred, golds, strip_accents=False):
    """SQuAD token F1, max over gold aliases. Like HotpotQA's scorer, yes/no/noanswer must match exactly."""
    p, golds = _normalized(pred, golds, strip_accents)
    best = 0.0
    for g in golds if p else []:
        if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
            continue
        same = sum((Counter(p.split()) & Counter(g.split())).values())
        if same:
            precision, recall = same / len(p.split()), same / len(g.split())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cover_em(pred, golds, strip_accents=False):
    p, golds = _normalized(pred, golds, strip_accents)
    return float(bool(p) and any(f" {g} " in f" {p} " for g in golds))


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
            found = _TEXT_WRAP.sub(r"\1", text[m.end():i - 1].strip()).strip()  # \boxed{\text{Paris}} -> Paris
    return found


def extract_answer(text, require_think_close=True):
    """The answer: the last \\boxed{...} after </think>, or None. Without </think> (a format break) None, unless
    require_think_close=False: then the last \\boxed{...} anywhere (lenient scoring; RL stays strict)."""
    head, sep, tail = text.partition(THINK_CLOSE)
    if not sep:
        return None if require_think_close else _last_boxed(text)
    return _last_boxed(tail)


_ACTION_TAG = re.compile(r"<begin_\w+>|</end_\w+>|<\w+_result>|</\w+_result>")
_RESULT_TAG = re.compile(r"</?\w+_result>")
_ANSWERED_ACTION = re.compile(r"</end_(\w+)>\s*<\1_result>.*?</\1_result>", re.S)  # an action + its observation


def format_ok(response_text):
    """(ok, reason): </think>, then a \\boxed{} and no action/observation tag; a result block only right after an action
    of its tool. Pass Rollout.policy_text: a passage holding "</think>" or "\\boxed{X}" must not change the score."""
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
    """Question JSONL -> list of dicts (the first `limit` per group, see --limit); bad lines: ValueError (file:line)."""
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
        key = (q.get("dataset"), q["id"])
        if key in seen:
            first, first_line = seen[key]
            if first != q:
                raise ValueError(f"{where}: field 'id' {q['id']!r} repeats line {first_line} with other content")
            print(f"warning: {where}: exact duplicate of line {first_line}, skipped", file=sys.stderr)
            continue
        seen[key] = (q, where.rsplit(":", 1)[1])
        questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions")
    if limit is not None:  # the first `limit` of each "dataset" (else "type", else of all)
        rank = defaultdict(itertools.count)
        questions = [q for q in questions if next(rank[q.get("dataset", q.get("type"))]) < limit]
    return questions


# -----------------------------------------------------------------------------
# Prompts per mode

# ReAct baseline (paper 4.2): the facts are real, the observations as short as a real retriever's
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
    """model.wrap_prompt of a prompt with its own instruction (react, workflow): ends "...\n<think>" like every mode."""
    from model import wrap_prompt  # lazy, as in evaluate()
    return wrap_prompt(tokenizer, text if text.endswith("\n") else text + "\n")


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
# LLM judge (paper 4.1: "LLM-based accuracy")

JUDGE_PROMPT = """You are grading an answer to a question. Decide whether the predicted answer means the same as one of the gold answers (different wording, spelling or detail level is fine; a different entity or number is not).

Question: {question}
Gold answers: {golds}
Predicted answer: {prediction}

Is the predicted answer correct? Reply with one word: yes or no."""


def judge_answers(judge_model, judge_tokenizer, items, votes=1, batch_size=8, seed=0):
    """items: (question, golds, prediction) -> 0/1 each, majority of `votes` (greedy if 1); no prediction: 0 unasked."""
    from engine import rollout
    asks = [i for i, (_, _, p) in enumerate(items) if p]
    chat, texts = getattr(judge_tokenizer, "chat_template", None), []
    for question, golds, prediction in (items[i] for i in asks):
        content = JUDGE_PROMPT.format(question=question, golds=" | ".join(golds), prediction=prediction)
        texts.append(judge_tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                         add_generation_prompt=True) if chat else content + "\nAnswer:")
    ids = [judge_tokenizer(t, add_special_tokens=False).input_ids for t in texts for _ in range(votes)]
    said_yes = []
    for start in range(0, len(ids), batch_size):
        # 64 tokens: room for "yes"/"no" before the engine's forced-answer reserve (answer_tokens + tags) kicks in
        outs = rollout(judge_model, judge_tokenizer, ids[start:start + batch_size], None, env="none",
                       max_new_tokens=64, answer_tokens=8, greedy=votes == 1, temperature=0.7, seed=seed + start)
        for o in outs:  # the verdict is the first word after any thinking, tags and punctuation removed
            reply = re.sub(r"<[^>]*>", " ", o.text.split(THINK_CLOSE)[-1]).lower()
            said_yes.append(re.sub(r"[^a-z]", " ", reply).split()[:1] == ["yes"])
    yes = {i: sum(said_yes[k * votes:(k + 1) * votes]) for k, i in enumerate(asks)}
    return [int(yes.get(i, 0) * 2 > votes) for i in range(len(items))]


# -----------------------------------------------------------------------------
# Evaluation: one engine call per batch, then scoring (report.summarize aggregates)

MODES = ("agent", "no-action", "workflow", "react", "agent-sim")
ENV_OF_MODE = {"agent": "real", "react": "real", "no-action": "none", "workflow": "none", "agent-sim": "sim"}
NEEDS_TOOLS = ("agent", "react", "workflow")


def tool_counters(tools):  # tools.ToolRegistry's cumulative counters
    if tools is None:
        return {"requests": 0, "real_calls": 0, "paid_calls": 0, "cache_hits": 0, "errors": 0}
    return {"requests": sum(tools.counts.values()), "real_calls": tools.real_calls, "paid_calls": tools.paid_calls,
            "cache_hits": tools.cache_hits, "errors": tools.errors}


def evaluate(model, tokenizer, questions, tools, mode, *, template="autocoa", n_samples=1, temperature=0.0,
             top_p=1.0, batch_size=8, max_new_tokens=512, max_actions=10, max_context=2048, answer_tokens=32, seed=0,
             strip_accents=False, lenient_think=False, judge=None, judge_votes=1, progress=True):
    """Run `questions` through the engine in `mode` and score them -> (summary dict, prediction records).
    tools: a ToolRegistry or None (NEEDS_TOOLS); judge: (model, tokenizer) of an LLM judge or None.
    temperature 0 = greedy; with n_samples > 1 every metric is the mean over the samples (the paper's averaged EM)."""
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
    outs, t0 = {}, time.time()
    for start in tqdm(range(0, len(jobs), batch_size), desc=f"eval {mode}", unit="batch", disable=not progress):
        chunk = jobs[start:start + batch_size]
        rolls = rollout(model, tokenizer, [prompt_ids[qi] for qi, _ in chunk], tools if env == "real" else None,
                        env=env, max_new_tokens=max_new_tokens, max_actions=max_actions, max_context=max_context,
                        answer_tokens=answer_tokens, temperature=temperature or 1.0, top_p=top_p,
                        greedy=temperature <= 0, seed=seed + start)
        outs.update(zip(chunk, rolls))

    predictions = []
    for qi, q in enumerate(questions):
        samples = []
        for si in range(n_samples):
            r, golds = outs[(qi, si)], q["golden_answers"]
            answer_text = r.policy_text  # the policy's own tokens: tool output never supplies the answer or the format
            if mode == "react":  # cut an invented next example (the trajectory keeps it)
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
                  "trajectory": samples[0]["text"],
                  **{k: samples[0][k] for k in ("prediction", "stop_reason", "format", "actions")}}
        for k in ("em", "f1", "cover_em", "mention", "format_ok", "answered", "num_actions", "real_calls"):
            record[k] = samples[0][k] if n_samples == 1 else sum(s[k] for s in samples) / n_samples
        if n_samples > 1:
            record["samples"] = samples
        predictions.append((record, samples))

    if judge is not None:
        items = [(r["question"], r["golden_answers"], s["prediction"]) for r, ss in predictions for s in ss]
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
# CLI

def get_args(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Evaluate on QA: EM / F1 / cover-EM / LLM judge, actions, tool calls")
    # Model
    p.add_argument("--model", required=True, help="checkpoint dir, 'tiny' (needs --tokenizer), 'smollm2', or HF name")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (required for --model tiny)")
    p.add_argument("--add-action-tokens", action="store_true", help="add think/action/result tags as special tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one, as every script)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: model.load's choice)")
    p.add_argument("--template", choices=["short", "autocoa"], default=None, help="instruction prompt template "
                   "(default: the one --model was trained with, its run_args.json; 'short' for a model without one)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="prompts through the tokenizer's chat template when it has one; --no-chat-template: plain text")
    # Data
    p.add_argument("--questions", required=True, help="question JSONL: {id, question, golden_answers[, dataset, type]}")
    p.add_argument("--limit", type=int, default=None, help="first N questions per dataset (per type without dataset)")
    # Tools
    p.add_argument("--corpus", default=None, help="JSONL corpus for in-process BM25 search (FlashRAG format)")
    p.add_argument("--url", default=None, help="retrieval server URL instead of --corpus")
    p.add_argument("--api", choices=["flashrag", "searchr1"], default="flashrag", help="request shape for --url")
    p.add_argument("--topk", type=int, default=3, help="passages per search")
    p.add_argument("--max-obs-chars", type=int, default=4000, help="tool output past this many chars is cut, visibly")
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
    from model import checkpoint_template, load, prompt_format
    args.device = args.device or default_device()
    args.template = checkpoint_template(args.model, args.template)  # the prompt the checkpoint saw; recorded in args
    dtype = getattr(torch, args.dtype) if args.dtype else None
    questions = load_questions(args.questions, args.limit)
    print(f"{len(questions)} questions from {args.questions}"
          + (f" (first {args.limit} per group)" if args.limit else ""), flush=True)
    model, tokenizer = load(args.model, tokenizer=args.tokenizer, device=args.device, dtype=dtype,
                            add_action_tokens=args.add_action_tokens, chat_template=args.chat_template)
    print(prompt_format(tokenizer, args.template), flush=True)
    model.eval()
    tools = make_tools(corpus=args.corpus, url=args.url, api=args.api, k=args.topk,
                       max_obs_chars=args.max_obs_chars) if args.corpus or args.url else None
    judge = load(args.judge, device=args.device, dtype=dtype) if args.judge else None
    flags = ("template", "n_samples", "temperature", "top_p", "batch_size", "max_new_tokens", "max_actions",
             "max_context", "answer_tokens", "seed", "strip_accents", "lenient_think", "judge_votes")
    summary, predictions = evaluate(model, tokenizer, questions, tools, args.mode, judge=judge,
                                    **{k: getattr(args, k) for k in flags})  # each flag is named as its keyword
    summary["args"] = vars(args)
    write_outputs(args.out, summary, predictions, label=args.label or args.model)
    print(format_results_md(summary, args.label or args.model))
    print(f"{summary['questions_per_minute']:.1f} questions per minute ({args.mode}, batch {args.batch_size})")
    print(f"wrote {args.out}/results.json, results.md, predictions.jsonl")
    return summary


if __name__ == "__main__":
    main()
