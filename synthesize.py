"""
SFT data synthesis, AutoCoA paper section 3.2.1, from any teacher model and any retriever: questions JSONL ({"id",
"question","golden_answers",...}) + a teacher + tools -> the files train_sft.py reads unchanged (data.py's rows):
    OUT/sft_cot.jsonl, sft_coa.jsonl, sft_mix.jsonl (1 CoT : 5 CoA)   {"id","question","golden_answers",...,"segments"}
    OUT/sft_pairs.jsonl                          {"id","question","golden_answers","prefix","chosen","rejected","case"}
    OUT/summary.json   acceptance per kind and per dataset/type, reject reasons, actions per trajectory, tokens
Segments [{"kind": "policy"|"obs", "text"}] are the RESPONSE after the prompt's "<think>". CoT: the teacher reasons
under a prompt that forbids tools; CoA: under the authors' instruction, real tools answer (--cot/--coa-prompt-file).

Teachers. `--teacher NAME|DIR`: any HF causal LM through engine.rollout; segments are the runs of its obs_mask, each
decoded once, never re-tokenised (summary.json: the share that re-encode to the teacher's ids). `--teacher-url URL`:
an OpenAI-compatible /v1/completions server (vLLM, SGLang); the client sends every action close tag as a stop string,
closes the action, runs the tool, appends the observation and goes on; a server error stops the run (URL, status).
Acceptance: finished (eos, not a forced answer), evaluate.format_ok, CoT did not act and CoA did, right (EM of
evaluate.extract_answer, or F1 >= --min-f1), all read from the teacher's own text (observations blanked); the best per
question and kind is kept (max(EM, F1), then fewest tokens). --keep-all skips every check (smoke tests only).
CoT+A pairs. Case "act" (a CoA sample accepted, no CoT sample): the prefix is the best CoA trajectory's reasoning
before its first action open tag, its first knowledge gap (HF: the longest token prefix ending there); chosen = the
rest; rejected = the teacher continuing the SAME prefix after the CoT prompt, if it does not act, is well formed and
wrong. Case "no_act" (a CoT sample accepted, no CoA sample): the prefix of a well-formed, acting, wrong CoA sample;
chosen = a right tool-free continuation after the CoT prompt; rejected = the acting rest (--pair-samples tries each).
Departures from the paper: it does not say how it "inserts or removes the action trigger at a specific point"; we cut
at the first action and get the other branch by continuing the prefix under the no-tool prompt (under the CoA prompt a
teacher mostly acts again). It samples CoT and CoA from disjoint 10k-question halves; here every question gets both
(the pairs need them): pass disjoint question files to follow it.
Long jobs: one fsync'd line per question in OUT/records.jsonl; a rerun (same arguments, or --fresh) skips the ids
there and rebuilds the files; seeds are per (question, kind, sample), so a resumed run samples what one run would.

Commands:
  python synthesize.py --questions ../shared/data/hotpotqa_train.jsonl --limit 20 --teacher smollm2 \\
      --corpus corpus.jsonl --samples 2 --max-new-tokens 256 --out out/synth_smollm2
  python synthesize.py --questions Q.jsonl --teacher-url http://127.0.0.1:8000 --teacher-model \\
      deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --teacher-tokenizer deepseek-ai/DeepSeek-R1-Distill-Qwen-32B \\
      --url http://127.0.0.1:8080 --api flashrag --samples 4 --max-new-tokens 4096 --max-context 16384 --out out/synth
(Inference only, one process, no torchrun form: serve the teacher with vLLM/SGLang to use several GPUs.)
"""
import argparse
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import tools
from evaluate import exact_match, extract_answer, f1, format_ok, load_questions
from teacher import sft_mix
from tools import LIMIT_MESSAGE, THINK_CLOSE, TOOL_NAMES, action_close, format_observation, write_atomic

COT_TEMPLATE = """You are an intelligent reasoning assistant. Answer the user's question using only your own knowledge: you have no tools, so never search and never write <begin_search> or any other tool tag. Think step by step inside <think></think>, then give your final answer in the format \\boxed{YOUR_ANSWER}.

Now, please answer the user's question below: 
{question}

"""
TOOLS_DISABLED = "Tools are disabled. Answer from your own knowledge."  # model.TOOLS_DISABLED (no torch import here)
ACTION_OPEN = re.compile(r"<begin_(\w+)>")
RESUME_KEYS = ("questions", "teacher", "teacher_url", "samples", "temperature", "top_p", "seed", "max_new_tokens",
               "coa_prompt_file", "cot_prompt_file", "min_f1", "keep_all", "pair_samples")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    # Data
    p.add_argument("--questions", required=True, help="questions JSONL {id, question, golden_answers, ...}")
    p.add_argument("--limit", type=int, default=0, help="use the first N questions of the file (0: all)")
    p.add_argument("--out", required=True, help="output dir (records.jsonl, sft_*.jsonl, summary.json)")
    p.add_argument("--fresh", action="store_true", help="discard OUT/records.jsonl and start over")
    p.add_argument("--stop-after", type=int, default=0, help="stop after N new questions (simulates an interruption)")
    # Teacher
    p.add_argument("--teacher", default=None, help="HF causal LM: 'smollm2', a hub name or a save_pretrained dir")
    p.add_argument("--teacher-url", default=None, help="OpenAI-compatible /v1/completions server")
    p.add_argument("--teacher-model", default=None, help="--teacher-url: model name (default: first of /v1/models)")
    p.add_argument("--teacher-tokenizer", default=None, help="--teacher-url: tokenizer whose chat template to use")
    p.add_argument("--teacher-concurrency", type=int, default=8, help="--teacher-url: trajectories in flight at once")
    p.add_argument("--teacher-timeout", type=float, default=600, help="--teacher-url: seconds per HTTP request")
    p.add_argument("--add-action-tokens", action="store_true", help="--teacher: tags as special tokens (if trained so)")
    p.add_argument("--device", default=None, help="--teacher: cpu or cuda (default: cuda when there is one)")
    # Prompts
    p.add_argument("--coa-prompt-file", default=None, help="CoA instruction with {question} (default: the authors')")
    p.add_argument("--cot-prompt-file", default=None, help="CoT instruction with {question} (default: COT_TEMPLATE)")
    # Tools
    p.add_argument("--corpus", default=None, help="JSONL corpus {id, contents} for the in-process BM25 search")
    p.add_argument("--url", default=None, help="retrieval server instead of --corpus")
    p.add_argument("--api", default="flashrag", choices=["flashrag", "searchr1"], help="retrieval server API")
    p.add_argument("--topk", type=int, default=3, help="passages per search (SPEC: 3)")
    # Sampling
    p.add_argument("--samples", type=int, default=4, help="trajectories per question and kind (CoT, CoA)")
    p.add_argument("--pair-samples", type=int, default=2, help="tool-free continuations tried per pair (0: no pairs)")
    p.add_argument("--batch-questions", type=int, default=8, help="questions per batch (x samples rows per call)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0: greedy, needs --samples 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per trajectory (forced answer too)")
    p.add_argument("--max-context", type=int, default=4096, help="prompt + response tokens (--teacher)")
    p.add_argument("--answer-tokens", type=int, default=32, help="tokens kept for a forced answer (Algorithm 1)")
    p.add_argument("--max-actions", type=int, default=10, help="actions per trajectory before the limit message")
    p.add_argument("--seed", type=int, default=0, help="base seed (per question/kind/sample seeds derive from it)")
    # Acceptance and mix
    p.add_argument("--min-f1", type=float, default=1.0, help="accept a non-EM answer if its F1 >= this (1: EM only)")
    p.add_argument("--keep-all", action="store_true", help="accept every trajectory (smoke tests, untrained teachers)")
    p.add_argument("--mix-ratio", type=int, default=5, help="CoA rows per CoT row in sft_mix.jsonl (paper: 5)")
    args = p.parse_args(argv)
    assert (args.teacher is None) != (args.teacher_url is None), "give exactly one of --teacher and --teacher-url"
    assert args.samples >= 1 and args.batch_questions >= 1 and args.pair_samples >= 0, "sizes must be positive"
    assert args.samples == 1 or args.temperature > 0, "--samples > 1 needs --temperature > 0 (greedy repeats itself)"
    assert 0 < args.answer_tokens < args.max_new_tokens, "--answer-tokens must be in (0, --max-new-tokens)"
    return args


def seed_of(args, qid, kind, i):
    """Per (question, kind, sample) seed: a row samples the same whatever batch it lands in (resume == one run)."""
    return (args.seed * 1_000_003 + zlib.crc32(f"{qid}/{kind}/{i}".encode())) % (2 ** 31)


def wrap(tokenizer, template, question):
    """model.build_prompt for any instruction text: chat template if the tokenizer has one, then <think>."""
    from model import wrap_prompt
    return wrap_prompt(tokenizer, template.replace("{question}", question))  # not str.format: templates have {}

# ----------------------------------------------------------------------------------------------------------------------
# Teachers: prompt(template, question) -> prompt P (token ids or text); P + prefix (same type) continues a trajectory;
# run([(P, seed)], registry, env) -> trajectories {"segments", "pieces", "text", "actions", "stop", "tokens"}, where
# pieces[i] is segment i as the teacher produced it (token ids for --teacher, text for --teacher-url).


class HFTeacher:
    def __init__(self, args):
        import engine
        import model as M
        from common import default_device  # the one default device rule of every script
        self.M, self.engine, self.args = M, engine, args
        self.model, self.tok = M.load(args.teacher, device=args.device or default_device(),
                                      add_action_tokens=args.add_action_tokens)

    def prompt(self, template, question):
        return self.tok(wrap(self.tok, template, question), add_special_tokens=False).input_ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def run(self, jobs, registry, env):
        a = self.args
        rolls = self.engine.rollout(self.model, self.tok, [p for p, _ in jobs], registry if env == "real" else None,
                                    env=env, max_new_tokens=a.max_new_tokens, max_actions=a.max_actions,
                                    max_context=a.max_context, answer_tokens=a.answer_tokens,
                                    temperature=a.temperature or 1.0, top_p=a.top_p, greedy=a.temperature <= 0,
                                    seed=[s for _, s in jobs])
        out = []
        for r in rolls:
            ids, obs = list(r.response_ids), list(r.obs_mask)
            if ids and ids[-1] == self.tok.eos_token_id and r.stop_reason in ("eos", "forced_answer"):
                ids, obs = ids[:-1], obs[:-1]  # train_sft appends eos itself
            segments, pieces, start, exact = [], [], 0, 0
            for t in range(1, len(ids) + 1):  # runs of equal obs_mask: obs = observation, policy = everything else
                if t == len(ids) or obs[t] != obs[start]:
                    text = self.decode(ids[start:t])
                    segments.append({"kind": "obs" if obs[start] else "policy", "text": text})
                    pieces.append(ids[start:t])
                    redo = (self.M.encode_observation(self.tok, text) if obs[start]  # what train_sft will do
                            else self.tok.encode(text, add_special_tokens=False))
                    exact += redo == ids[start:t]
                    start = t
            out.append({"segments": segments, "pieces": pieces, "text": r.text, "actions": sum(r.num_actions.values()),
                        "stop": r.stop_reason, "tokens": len(r.response_ids), "exact": [exact, len(segments)]})
        return out

    def split(self, ids, pos):
        """The longest token prefix of a policy segment whose text ends at or before character pos -> (its ids, its
        text, the rest's text)."""
        k = 0
        while k < len(ids) and len(self.decode(ids[:k + 1])) <= pos:
            k += 1
        return ids[:k], self.decode(ids[:k]), self.decode(ids[k:])


class TeacherError(RuntimeError):  # the teacher server is down or answers errors: stop with its URL and status
    pass


class URLTeacher:
    def __init__(self, args):
        self.args, self.lock = args, threading.Lock()
        base = re.sub(r"(/v1)?(/completions)?/*$", "", args.teacher_url) + "/v1"  # URL[/v1][/completions] -> URL/v1
        self.endpoint = base + "/completions"
        self.tok = None
        if args.teacher_tokenizer:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(args.teacher_tokenizer)
        self.name = args.teacher_model or self._request(base + "/models", None)["data"][0]["id"]

    def _request(self, url, body):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.args.teacher_timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            raise TeacherError(f"teacher server {url} answered HTTP {e.code} {e.reason}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise TeacherError(f"teacher server {url} unreachable ({getattr(e, 'reason', e)}); is it up?") from None
        except json.JSONDecodeError as e:
            raise TeacherError(f"teacher server {url} answered non-JSON ({e})") from None

    def prompt(self, template, question):  # text, chat-wrapped by --teacher-tokenizer if given
        return wrap(self.tok, template, question)

    def complete(self, prompt, max_tokens, seed, stop):
        a = self.args
        body = {"model": self.name, "prompt": prompt, "max_tokens": max(1, max_tokens), "temperature": a.temperature,
                "top_p": a.top_p, "seed": seed, "stop": stop or None}
        out = self._request(self.endpoint, body)
        try:
            choice = out["choices"][0]
            text, finish = choice["text"], choice.get("finish_reason")
            if finish == "stop" and "stop_reason" in choice and not isinstance(choice["stop_reason"], str):
                finish = "eos"  # vLLM says which stop ended it: a string = a stop string, None / a token id = eos
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"teacher server {self.endpoint} answered without choices[0].text: {str(out)[:300]}")
        used = (out.get("usage") or {}).get("completion_tokens")
        return text, finish, used if used is not None else max(1, len(text) // 4)  # a server without usage: ~4 chars

    def one(self, prompt, seed, registry, env):
        """One trajectory: generate to an action's close tag (a stop string), act, append the observation, go on."""
        a = self.args
        names = list(dict.fromkeys([*TOOL_NAMES, *(registry.names if registry else [])]))
        stops = [action_close(n) for n in names]
        segments, text, current, actions, tokens, stop = [], "", "", 0, 0, None
        while stop is None:
            piece, finish, used = self.complete(prompt + text, a.max_new_tokens - a.answer_tokens - tokens, seed, stops)
            tokens, current, text = tokens + used, current + piece, text + piece
            opened = list(ACTION_OPEN.finditer(current))
            name = opened[-1].group(1) if opened else None
            if finish == "stop" and name in names and action_close(name) not in current[opened[-1].end():]:
                current += action_close(name)  # the server drops the stop string; an open action means we hit it
                text += action_close(name)
                actions += 1
                argument = current[opened[-1].end():-len(action_close(name))].strip()
                if actions > a.max_actions:
                    observation = LIMIT_MESSAGE
                elif env == "none":
                    observation = TOOLS_DISABLED
                else:
                    with self.lock:  # one registry for all threads: it is not thread-safe
                        observation = registry([(name, argument)])[0]
                segments.append({"kind": "policy", "text": current})
                segments.append({"kind": "obs", "text": format_observation(name, observation)})
                text += segments[-1]["text"]
                current = ""
            elif finish == "length" or tokens >= a.max_new_tokens - a.answer_tokens:
                if THINK_CLOSE in "".join(s["text"] for s in segments if s["kind"] == "policy") + current:
                    stop = "max_new_tokens"
                else:  # force the answer (Algorithm 1, lines 24-27)
                    current += THINK_CLOSE + "\n"
                    piece, _, used = self.complete(prompt + text + THINK_CLOSE + "\n", a.answer_tokens, seed, None)
                    current, text, tokens = current + piece, text + THINK_CLOSE + "\n" + piece, tokens + used
                    stop = "forced_answer"
            else:
                stop = "eos"
        if current:
            segments.append({"kind": "policy", "text": current})
        return {"segments": segments, "pieces": [s["text"] for s in segments], "text": text, "actions": actions,
                "stop": stop, "tokens": tokens, "exact": [0, 0]}

    def run(self, jobs, registry, env):
        with ThreadPoolExecutor(self.args.teacher_concurrency) as pool:
            return list(pool.map(lambda job: self.one(job[0], job[1], registry, env), jobs))

    def split(self, text, pos):
        return text[:pos], text[:pos], text[pos:]

# ----------------------------------------------------------------------------------------------------------------------
# Acceptance and pairs


def policy_text(segments):
    """The text the teacher wrote: each observation replaced by its empty result block (engine.policy_text's rule), so
    a passage holding "</think>" or "\\boxed{X}" never supplies the answer or the format."""
    tags = [re.match(r"\s*<(\w+)_result>", s["text"]) if s["kind"] == "obs" else None for s in segments]
    return "".join(format_observation(tag.group(1), "") if tag else s["text"] for s, tag in zip(segments, tags))


def judge(traj, golds, kind, args):
    """-> (accepted, reason, score). score = max(EM, F1) of the extracted answer (from the teacher's own text)."""
    text = policy_text(traj["segments"])
    pred = extract_answer(text)
    score = max(exact_match(pred, golds), f1(pred, golds))
    if args.keep_all:
        return True, "kept", score
    ok, why = format_ok(text)
    checks = [(traj["stop"] == "eos", f"unfinished ({traj['stop']})"), (ok, f"format: {why}"),
              (kind == "coa" or not traj["actions"], "acted"), (kind == "cot" or traj["actions"], "no action"),
              (exact_match(pred, golds) == 1 or f1(pred, golds) >= args.min_f1, "wrong")]
    reason = next((why for passed, why in checks if not passed), "accepted")
    return reason == "accepted", reason, score


def public(q):
    return {k: q[k] for k in ("id", "question", "golden_answers", "dataset", "type", "level", "known") if k in q}


def split_at_first_action(teacher, traj):
    """-> (prefix piece, prefix segments, rest segments) at the first action open tag, or None (no open tag)."""
    first, piece = traj["segments"][0], traj["pieces"][0]
    found = ACTION_OPEN.search(first["text"]) if first["kind"] == "policy" else None
    if not found:
        return None
    head, head_text, rest_text = teacher.split(piece, found.start())
    prefix = [{"kind": "policy", "text": head_text}] if head_text else []
    return head, prefix, [{"kind": "policy", "text": rest_text}] + traj["segments"][1:]

# ----------------------------------------------------------------------------------------------------------------------
# One batch of questions -> one record per question


def synthesize_batch(batch, teacher, registry, prompts, args):
    k, results = args.samples, {}
    for kind, env in (("cot", "none"), ("coa", "real")):
        jobs = [(prompts[kind](q["question"]), seed_of(args, q["id"], kind, i)) for q in batch for i in range(k)]
        trajs = teacher.run(jobs, registry, env)
        for j, q in enumerate(batch):
            results[(q["id"], kind)] = [(t, *judge(t, q["golden_answers"], kind, args)) for t in trajs[j * k:j * k + k]]
    # CoT+A candidates: (question, case, cut acting trajectory) -> tool-free continuations after the CoT prompt
    candidates = []
    for q in batch:
        cot, coa = results[(q["id"], "cot")], results[(q["id"], "coa")]
        cot_ok, coa_ok = any(r[1] for r in cot), any(r[1] for r in coa)
        if args.keep_all or args.pair_samples == 0 or cot_ok == coa_ok:
            continue
        acting = max((r for r in coa if r[1]), key=lambda r: (r[3], -r[0]["tokens"]))[0] if coa_ok else \
            next((r[0] for r in coa if r[2] == "wrong"), None)  # no_act: a well-formed, finished, acting, wrong one
        cut = acting and split_at_first_action(teacher, acting)
        if cut:
            candidates.append((q, "act" if coa_ok else "no_act", cut))
    jobs = [(prompts["cot"](q["question"]) + cut[0], seed_of(args, q["id"], "pair", i))
            for q, _, cut in candidates for i in range(args.pair_samples)]
    conts = teacher.run(jobs, registry, "none") if jobs else []
    pairs, pair_tokens = {}, Counter()
    for c, (q, case, (_, prefix, rest)) in enumerate(candidates):
        tries = conts[c * args.pair_samples:(c + 1) * args.pair_samples]
        pair_tokens[q["id"]] += sum(t["tokens"] for t in tries)
        for t in tries:
            _, reason, _ = judge(t, q["golden_answers"], "cot", args)
            if reason == ("wrong" if case == "act" else "accepted"):  # finished, well formed, no action, (not) right
                chosen, rejected = (rest, t["segments"]) if case == "act" else (t["segments"], rest)
                pairs[q["id"]] = {**public(q), "prefix": prefix, "chosen": chosen, "rejected": rejected, "case": case}
                break
    records = []
    for q in batch:
        rec = {"id": q["id"], "group": str(q.get("dataset") or q.get("type") or q.get("level") or "all"),
               "pair": pairs.get(q["id"]), "stats": {}}
        for kind in ("cot", "coa"):
            rs = results[(q["id"], kind)]
            kept = [r for r in rs if r[1]]
            best = max(kept, key=lambda r: (r[3], -r[0]["tokens"]))[0] if kept else None
            rec[kind] = {**public(q), "segments": best["segments"], "actions": best["actions"]} if best else None
            rec["stats"][kind] = {"samples": len(rs), "accepted": len(kept), "reasons": dict(Counter(r[2] for r in rs)),
                                  "tokens": sum(r[0]["tokens"] for r in rs), "actions": [r[0]["actions"] for r in rs],
                                  "accepted_actions": [r[0]["actions"] for r in kept],
                                  "exact": [sum(r[0]["exact"][j] for r in rs) for j in (0, 1)]}
        rec["stats"]["pair"] = {"candidate": q["id"] in pair_tokens, "tokens": pair_tokens[q["id"]]}
        records.append(rec)
    return records

# ----------------------------------------------------------------------------------------------------------------------
# Records (append-only, resumable) -> final files


def read_records(path):
    """Complete lines of records.jsonl; a torn last line (a crash mid-write) is cut off the file."""
    raw = open(path, "rb").read() if os.path.exists(path) else b""
    good = raw[:raw.rfind(b"\n") + 1]
    if len(good) != len(raw):
        os.truncate(path, len(good))
    return [json.loads(line) for line in good.decode("utf-8").splitlines() if line.strip()]


def build_outputs(records, args):
    cot, coa, pairs = ([r[k] for r in records if r[k]] for k in ("cot", "coa", "pair"))
    mix = sft_mix(cot, coa, args.mix_ratio, args.seed)  # data.py's rule: 1 CoT per mix_ratio CoA

    def rate(a, b):
        return round(a / b, 4) if b else None

    def acceptance(stats):
        samples, kept = sum(s["samples"] for s in stats), sum(s["accepted"] > 0 for s in stats)
        return {"samples": samples, "accepted": sum(s["accepted"] for s in stats), "questions": len(stats),
                "questions_kept": kept, "sample_rate": rate(sum(s["accepted"] for s in stats), samples),
                "question_rate": rate(kept, len(stats)), "tokens": sum(s["tokens"] for s in stats)}

    kinds, groups = ("cot", "coa"), sorted({r["group"] for r in records})
    coa_actions = [a for r in records for a in r["stats"]["coa"]["actions"]]
    kept_actions = [a for r in records for a in r["stats"]["coa"]["accepted_actions"]]
    summary = {
        "teacher": args.teacher or args.teacher_url, "questions": len(records), "samples": args.samples,
        "acceptance": {k: acceptance([r["stats"][k] for r in records]) for k in kinds},
        "acceptance_by_group": {g: {k: acceptance([r["stats"][k] for r in records if r["group"] == g]) for k in kinds}
                                for g in groups},
        "reject_reasons": {k: dict(sum((Counter(r["stats"][k]["reasons"]) for r in records), Counter()).most_common())
                           for k in kinds},
        "actions_per_trajectory": {"coa_all": rate(sum(coa_actions), len(coa_actions)),
                                   "coa_accepted": rate(sum(kept_actions), len(kept_actions)),
                                   "coa_accepted_histogram": dict(sorted(Counter(map(str, kept_actions)).items()))},
        "pairs": {"candidates": sum(r["stats"]["pair"]["candidate"] for r in records), "kept": len(pairs),
                  "act": sum(p["case"] == "act" for p in pairs), "no_act": sum(p["case"] == "no_act" for p in pairs),
                  "continuation_tokens": sum(r["stats"]["pair"]["tokens"] for r in records)},
        "files": {"sft_cot": len(cot), "sft_coa": len(coa), "sft_mix": len(mix), "sft_pairs": len(pairs)},
    }
    # --teacher: share of segment texts that re-encode to the teacher's own ids (all samples; --teacher-url: none)
    exact = [sum(r["stats"][k]["exact"][j] for r in records for k in ("cot", "coa")) for j in (0, 1)]
    summary["segments_retokenise_exact"] = rate(*exact)
    for name, rows in (("sft_cot", cot), ("sft_coa", coa), ("sft_mix", mix), ("sft_pairs", pairs)):
        write_atomic(os.path.join(args.out, f"{name}.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                     for r in rows))
    write_atomic(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv=None):
    args, t0 = get_args(argv), time.time()
    os.makedirs(args.out, exist_ok=True)
    questions = load_questions(args.questions)[:args.limit or None]
    assert len({q["id"] for q in questions}) == len(questions), f"{args.questions}: ids repeat (needed for resume)"
    records_path, args_path = os.path.join(args.out, "records.jsonl"), os.path.join(args.out, "run_args.json")
    if args.fresh and os.path.exists(records_path):
        os.remove(records_path)
    records = read_records(records_path)
    if records and os.path.exists(args_path):
        before = json.load(open(args_path))
        changed = [k for k in RESUME_KEYS if before.get(k) != vars(args)[k]]
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r}" for k in changed)
            raise SystemExit(f"{records_path} was made with {flags}: rerun with them, or add --fresh")
    write_atomic(args_path, json.dumps(vars(args), indent=2) + "\n")
    done = {r["id"] for r in records}
    todo = [q for q in questions if q["id"] not in done][:args.stop_after or None]
    print(f"{len(questions)} questions, {sum(q['id'] in done for q in questions)} done already, {len(todo)} to run | "
          f"{args.samples} CoT + {args.samples} CoA samples each | out {args.out}")

    registry = tools.make_tools(corpus=args.corpus, url=args.url, api=args.api, k=args.topk)  # neither: calculator
    if not (args.corpus or args.url):
        print("warning: no --corpus or --url: search actions get an unknown-tool observation", file=sys.stderr)
    read = lambda path: open(path, encoding="utf-8").read()  # noqa: E731
    coa = read(args.coa_prompt_file) if args.coa_prompt_file else __import__("model").TEMPLATES["autocoa"]
    templates = {"cot": read(args.cot_prompt_file) if args.cot_prompt_file else COT_TEMPLATE, "coa": coa}
    assert all("{question}" in t for t in templates.values()), "a prompt file has no {question} slot"

    from tqdm import tqdm
    bar, new = tqdm(total=len(todo), desc="synthesize", unit="q"), []
    try:
        teacher = HFTeacher(args) if args.teacher else URLTeacher(args)
        prompts = {kind: (lambda question, t=text: teacher.prompt(t, question)) for kind, text in templates.items()}
        with open(records_path, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), args.batch_questions):
                recs = synthesize_batch(todo[start:start + args.batch_questions], teacher, registry, prompts, args)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
                f.flush()
                os.fsync(f.fileno())  # a question is done once its line is on disk
                new += recs
                bar.update(len(recs))  # acceptance so far: questions with a kept row / questions run
                bar.set_postfix({k: f"{sum(r[k] is not None for r in new)}/{len(new)}" for k in ("cot", "coa", "pair")})
    except TeacherError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        bar.close()
    by_id = {r["id"]: r for r in read_records(records_path)}
    ordered = [by_id[q["id"]] for q in questions if q["id"] in by_id]  # question-file order: same files after a resume
    summary = build_outputs(ordered, args)
    c, o = summary["acceptance"]["cot"], summary["acceptance"]["coa"]
    print(f"{len(ordered)} questions | accepted samples (questions): CoT {c['accepted']}/{c['samples']} "
          f"({c['questions_kept']}), CoA {o['accepted']}/{o['samples']} ({o['questions_kept']}) | pairs "
          f"{summary['pairs']['kept']} | this run: {len(new)} questions in {time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
