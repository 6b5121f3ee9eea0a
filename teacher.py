"""
The embedded world's scripted teacher, the stand-in for the paper's R1-32B teacher: a library module data.py calls, no
command of its own (synthesize.py is the same stage for real questions and a real teacher model). The world's
language lives here too (names, relations, questions), so the world, its questions and the teacher share it.

The scripted teacher answers with the REAL tools (BM25 over the corpus data.py writes, the calculator): a one-line
plan of the facts the question needs ("Plan: label, then founder, then birth year."), then each fact recalled if its
subject is known, else searched and, when not in the top-3, searched again (natural question -> name + relation
words -> name alone, the title form). Its trajectories are the SFT data (CONTRACT.md "data.py": CoT on known
questions, CoA on the others, their mix, its renamed copies, the pairs) and its real calls on train and dev questions
the world model's (tool_calls.jsonl). A CoT+A pair's prefix stops where the reasoning meets the first knowledge gap:
    unknown: chosen = act and end right, rejected = guess without acting and end wrong.
    known:   chosen = answer from memory (right), rejected = an unnecessary search (also right), not a wrong guess:
             the pair should differ only in the decision to act, which is what stage 1 teaches; a wrong guess
             would teach "be right", which the unknown pairs already do.
Departure from the paper: a script, not a prompted large model (why: data.py's docstring).

The teacher takes `env`, the world as it sees it (data.py builds it):
    world, by_type    the entities {name: {"type","pool",relation: value}} and the names per type
    index, search     the BM25 index over the corpus and the search tool on it; calc: the calculator tool
    stating           per fact (subject, relation), the ids of the passages that state it
    args              data.py's arguments (--topk, --max-tries, --mix-ratio, --renamed-copies, --seed)
"""
import random
import re
from collections import Counter, defaultdict

from tools import THINK_CLOSE, action_close, action_open, format_observation

# ----------------------------------------------------------------------------------------------------------------------
# Names: built from a small syllable set, so the names are fictional and the BPE vocabulary stays small

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "vel"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "or", "ar", "en"]
CODAS = ["", "", "", "n", "r", "s", "l", "m", "th"]
COMPANY_SUFFIXES = ["Works", "Labs", "Systems", "Group", "Studios", "Motors", "Foods", "Press"]


def make_word(rng, syllables):
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1))
    return (word + rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)).capitalize()

# ----------------------------------------------------------------------------------------------------------------------
# Relations: question phrasing, reasoning phrasing, corpus phrasings, teacher queries. One table, so the teacher, the
# corpus and the questions can never disagree on a relation.

RELATIONS = {
    # name: (subject type, object type, noun for "I need the NOUN of X", question "wh" form, corpus phrasings,
    #        query forms tried in order: natural question, name + relation words, name alone)
    "born_in": ("person", "city", "birthplace", "Where was {s} born?",
                ["{s} was born in {o}.", "{s} is a native of {o}."],
                ["where was {s} born", "{s} born native", "{s}"]),
    "birth_year": ("person", "year", "birth year", "In what year was {s} born?",
                   ["{s} was born in {o}.", "The birth year of {s} is {o}."],
                   ["when was {s} born", "{s} birth year born", "{s}"]),
    "employer": ("person", "company", "employer", "Which company does {s} work for?",
                 ["{s} works for {o}.", "{s} is employed by {o}."],
                 ["which company does {s} work for", "{s} works employed", "{s}"]),
    "founded_by": ("company", "person", "founder", "Who founded {s}?",
                   ["{s} was founded by {o}.", "{o} is the founder of {s}."],
                   ["who founded {s}", "{s} founder founded", "{s}"]),
    "headquartered_in": ("company", "city", "headquarters", "In which city is {s} headquartered?",
                         ["{s} is headquartered in {o}.", "The head office of {s} is in {o}."],
                         ["where is {s} headquartered", "{s} headquartered head office", "{s}"]),
    "founded_year": ("company", "year", "founding year", "In what year was {s} founded?",
                     ["{s} was founded in {o}.", "{s} opened its doors in {o}."],
                     ["when was {s} founded", "{s} founded opened year", "{s}"]),
    "signed_to": ("band", "company", "label", "Which label is {s} signed to?",
                  ["{s} is signed to {o}.", "{s} records for the label {o}."],
                  ["which label is {s} signed to", "{s} label signed records", "{s}"]),
    "formed_in": ("band", "city", "home city", "In which city was {s} formed?",
                  ["{s} was formed in {o}.", "{s} started out in {o}."],
                  ["where was {s} formed", "{s} formed started", "{s}"]),
    "located_in": ("city", "country", "country", "In which country is {s}?",
                   ["{s} is a city in {o}.", "{s} lies in {o}."],
                   ["which country is {s} in", "{s} city country lies", "{s}"]),
}
# Canonical sentence the teacher writes once it has a fact (from memory or from a result).
FACT_SENTENCE = {r: v[4][0] for r, v in RELATIONS.items()}

# Question types: relation chains, head type first. A chain [r1, r2, ...] asks r_last of (... r2 of (r1 of head)).
CHAINS = {
    "1hop": [["born_in"], ["birth_year"], ["employer"], ["founded_by"], ["headquartered_in"], ["founded_year"],
             ["signed_to"], ["formed_in"], ["located_in"]],
    "2hop": [["founded_by", "born_in"], ["founded_by", "birth_year"], ["headquartered_in", "located_in"],
             ["born_in", "located_in"], ["employer", "founded_by"], ["employer", "headquartered_in"],
             ["signed_to", "founded_by"], ["signed_to", "headquartered_in"], ["formed_in", "located_in"]],
    "3hop": [["founded_by", "born_in", "located_in"], ["signed_to", "founded_by", "born_in"],
             ["signed_to", "headquartered_in", "located_in"], ["signed_to", "founded_by", "birth_year"],
             ["employer", "headquartered_in", "located_in"], ["employer", "founded_by", "born_in"]],
    "4hop": [["signed_to", "founded_by", "born_in", "located_in"], ["employer", "founded_by", "born_in", "located_in"],
             ["founded_by", "employer", "headquartered_in", "located_in"]],
}

# ----------------------------------------------------------------------------------------------------------------------
# Questions and their plans: make_question writes the plan, the teacher follows it


def make_question(world, heads, qtype, pool, want_known, rng):
    """One question dict (with the internal fields "plan" and "named") or None if this draw does not fit.
    heads[kind]: the entities of this kind a question of this pool may name."""
    if qtype in CHAINS:
        chain = rng.choice(CHAINS[qtype])
        head = rng.choice(heads[RELATIONS[chain[0]][0]])
        steps, s, np = [], head, head  # steps: (subject, relation, object)
        for r in chain:
            steps.append((s, r, world[s][r]))
            question = RELATIONS[r][3].format(s=np)  # the last one stays: "Who founded the label of The Morvans?"
            s, np = world[s][r], f"the {RELATIONS[r][2]} of {np}"
        answers = [steps[-1][2]]
        named = [head]
        plan = {"kind": "chain", "steps": steps}
    elif qtype == "comparison":
        kind, rel, verb = rng.choice([("person", "birth_year", "was born"), ("company", "founded_year", "was founded")])
        a, b = rng.sample(heads[kind], 2)
        ya, yb = int(world[a][rel]), int(world[b][rel])
        if ya == yb:
            return None
        question = f"{'Who' if kind == 'person' else 'Which'} {verb} first, {a} or {b}?"
        answers = [a if ya < yb else b]
        named = [a, b]
        plan = {"kind": "comparison", "steps": [(a, rel, world[a][rel]), (b, rel, world[b][rel])], "verb": verb}
    else:  # arithmetic: a person and a company (its founder or not) of the same pool
        c = rng.choice(heads["company"])
        p = world[c]["founded_by"] if rng.random() < 0.5 else rng.choice(heads["person"])
        yp, yc = int(world[p]["birth_year"]), int(world[c]["founded_year"])
        if yc <= yp or world[p]["pool"] != pool:
            return None
        question = f"How many years after {p} was born was {c} founded?"
        answers = [str(yc - yp), f"{yc - yp} years"]
        named = [p, c]
        plan = {"kind": "arithmetic", "steps": [(p, "birth_year", str(yp)), (c, "founded_year", str(yc))]}
    known = all(world[s]["pool"] == "known" for s, _, _ in plan["steps"])
    if known != want_known:
        return None
    return {"question": question, "golden_answers": answers, "type": qtype, "hops": len(plan["steps"]),
            "known": known, "plan": plan, "named": named}

# ----------------------------------------------------------------------------------------------------------------------
# The scripted teacher


def solve(q, env, act=True, rng=None, world=None):
    """One question's segments (response only), answer, tool calls and first-query hits; act=False guesses every
    unknown fact (rng) instead. "gap": the policy text up to the first unknown fact, where a CoT+A pair's prefix stops.
    env: the module docstring's; world overrides env["world"] (known pairs)."""
    world = world or env["world"]
    args, stating = env["args"], env["stating"]
    segments, calls, first_hits, gap = [], [], [], None
    plan = q["plan"]

    # The plan line: after each fact the model reads its next step (or "." : answer now) here instead of re-parsing the
    # question; without it the tiny model ran on past a 1-hop answer into a 2-hop chain (README: dev EM 11.7% -> 30%).
    nouns = [RELATIONS[rel][2] for _, rel, _ in plan["steps"]]
    if plan["kind"] == "chain":
        plan_text = " Plan: " + ", then ".join(nouns) + "."
    else:
        (a, _, _), (b, _, _) = plan["steps"]
        last = "compare" if plan["kind"] == "comparison" else "subtract"
        plan_text = f" Plan: {nouns[0]} of {a}, then {nouns[1]} of {b}, then {last}."
    text = plan_text

    def flush_policy():
        nonlocal text
        if text:
            segments.append({"kind": "policy", "text": text})
        text = ""

    def get_fact(subject, rel):
        nonlocal text, gap
        text += f" I need the {RELATIONS[rel][2]} of {subject}."
        truth = world[subject][rel]
        if world[subject]["pool"] == "known":
            text += " I know " + FACT_SENTENCE[rel].format(s=subject, o=truth)
            return truth
        if gap is None:
            gap = text  # no action happened before the first unknown fact, so this is the whole prefix
        if not act:
            kind = RELATIONS[rel][1]
            # a uniform guess of the right type (so accuracy is chance), from the subject's own pool or the known pool
            # (so no test name leaks into a rejected continuation); pairs drop the lucky guesses
            cands = ([str(y) for y in range(1900, 2040)] if kind == "year" else
                     [n for n in env["by_type"][kind] if world[n]["pool"] in ("known", world[subject]["pool"])])
            guess = rng.choice(cands)
            text += " I think " + FACT_SENTENCE[rel].format(s=subject, o=guess)
            return guess
        for t, form in enumerate(RELATIONS[rel][5][:args.max_tries]):
            query = form.format(s=subject)
            if t > 0:
                text += " The results do not say."
            text += f" {action_open('search')} {query} {action_close('search')}"
            flush_policy()
            results = env["index"].search([query], k=args.topk)[0]
            obs = env["search"]([query])[0]
            calls.append({"tool": "search", "args": query, "observation": obs, "subject": subject})
            segments.append({"kind": "obs", "text": format_observation("search", obs)})
            # does a top-k passage state the fact? (read by meaning, as a careful human would)
            found = any(doc["id"] in stating[(subject, rel)] for doc, _ in results[:args.topk])
            if t == 0:
                first_hits.append(found)
            if found:
                text += FACT_SENTENCE[rel].format(s=subject, o=truth)
                return truth
        text += " I could not find it."
        return None

    if plan["kind"] == "chain":
        s = plan["steps"][0][0]
        for _, rel, _ in plan["steps"]:
            s = get_fact(s, rel)
            if s is None:
                break
        answer = s
    else:  # comparison, or arithmetic (b's year minus a's)
        (a, rel_a, _), (b, rel_b, _) = plan["steps"]
        ya, yb = get_fact(a, rel_a), get_fact(b, rel_b)
        if ya is None or yb is None:
            answer = None
        elif plan["kind"] == "comparison":
            answer = a if int(ya) < int(yb) else b
            early, late = sorted((ya, yb), key=int)
            text += f" {early} is before {late}, so {answer} {plan['verb']} first."
        elif act and not q["known"]:
            expr = f"{yb} - {ya}"
            text += f" I need {expr}. {action_open('calculator')} {expr} {action_close('calculator')}"
            flush_policy()
            obs = env["calc"]([expr])[0]
            calls.append({"tool": "calculator", "args": expr, "observation": obs, "subject": None})
            segments.append({"kind": "obs", "text": format_observation("calculator", obs)})
            answer = obs.strip()
            text += f"So the difference is {answer}."
        else:  # from memory, the reasoning model does the subtraction itself
            answer = str(int(yb) - int(ya))
            text += f" {yb} - {ya} = {answer}."
    answer = answer if answer is not None else "unknown"
    text += f" {THINK_CLOSE}\nThe answer is \\boxed{{{answer}}}"
    flush_policy()
    # Glue: a policy segment right after an observation starts without the leading space (the obs ends in "\n").
    for i in range(1, len(segments)):
        if segments[i]["kind"] == "policy" and segments[i - 1]["kind"] == "obs":
            segments[i]["text"] = segments[i]["text"].lstrip(" ")
    return {"segments": segments, "answer": answer, "calls": calls, "first_hits": first_hits, "gap": gap,
            "plan_text": plan_text}


def run_all(splits, env):
    """The teacher on every question and the guessing one on the unknown ones: the runs by question id (the guess under
    "guess"), and summary.json's "teacher" and "no_tool_accuracy_unknown_by_type" entries."""
    runs, accuracy, guess_by_type = {}, {}, defaultdict(list)
    guess_rng = random.Random(env["args"].seed + 1)
    for split, qs in splits.items():
        st, guesses = Counter(), []
        for q in qs:
            runs[q["id"]] = r = solve(q, env)
            st["correct"] += r["answer"] in q["golden_answers"]
            st["first_query"] += len(r["first_hits"])
            st["first_hit"] += sum(r["first_hits"])
            st["searches"] += sum(c["tool"] == "search" for c in r["calls"])
            if not q["known"]:
                r["guess"] = solve(q, env, act=False, rng=guess_rng)
                guesses.append(r["guess"]["answer"] in q["golden_answers"])
                guess_by_type[q["type"]].append(guesses[-1])
        accuracy[split] = {"accuracy": round(st["correct"] / len(qs), 4),
                           "first_query_top3_hit": round(st["first_hit"] / max(1, st["first_query"]), 4),
                           "searches_per_question": round(st["searches"] / len(qs), 3),
                           "no_tool_accuracy_unknown": round(sum(guesses) / max(1, len(guesses)), 4)}
    # guesses by type, all splits: chance is 1/2 for comparisons, about 1/(entities of the type in reach) otherwise
    return runs, accuracy, {t: round(sum(v) / len(v), 4) for t, v in sorted(guess_by_type.items())}

# ----------------------------------------------------------------------------------------------------------------------
# SFT data and tool calls from the runs


def sft_data(train, runs, env):
    """From the train questions the teacher got right: the rows of sft_cot/coa/pairs/mix/mix_renamed.jsonl."""
    args, world = env["args"], env["world"]
    cot, coa, pairs = [], [], []

    def after(run, cut):  # the run's segments past the shared prefix `cut`, which its first segment starts with
        return [dict(run["segments"][0], text=run["segments"][0]["text"][len(cut):])] + run["segments"][1:]

    for q in train:
        r = runs[q["id"]]
        if r["answer"] not in q["golden_answers"]:
            continue
        meta = {"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"], "type": q["type"]}
        (cot if q["known"] else coa).append({**meta, "segments": r["segments"]})
        if q["known"]:
            # rejected: the same chain searching its first fact (whose subject passes for unknown only to script it)
            subject, rel, _ = q["plan"]["steps"][0]
            rejected = solve(q, env, world={**world, subject: dict(world[subject], pool="train")})
            if rejected["answer"] not in q["golden_answers"]:
                continue
            cut = r["plan_text"] + f" I need the {RELATIONS[rel][2]} of {subject}."
        else:
            rejected = r["guess"]
            if rejected["answer"] in q["golden_answers"]:
                continue  # a lucky guess is not a "guess and end wrong" example
            cut = r["gap"]
            assert r["segments"][0]["text"].startswith(cut) and rejected["segments"][0]["text"].startswith(cut)
        pairs.append({**meta, "known": q["known"], "prefix": [{"kind": "policy", "text": cut}],
                      "chosen": after(r, cut), "rejected": after(rejected, cut)})
    mix = sft_mix(cot, coa, args.mix_ratio, args.seed)
    mix_renamed = renamed_mix(mix, world, args.renamed_copies, args.seed + 5)
    return cot, coa, pairs, mix, mix_renamed


def sft_mix(cot, coa, ratio, seed):
    """Paper 3.2.1's mix, shuffled: every CoA row + 1 CoT row per `ratio` of them (>= 1, <= all); synthesize.py too."""
    mix = coa + random.Random(seed + 2).sample(cot, min(len(cot), max(1, len(coa) // ratio)))
    random.Random(seed + 3).shuffle(mix)
    return mix


def cut_pair(pair, at="word"):
    """A stage-1 pair with chosen and rejected cut after their first word (" I" vs the " " before <begin_search>: the
    decision to act alone) or after their first sentence or action (at="sentence")."""
    def first(segments):
        text = segments[0]["text"]
        end = re.search(r"</end_search>|\.(?= |$)" if at == "sentence" else r" ?[^\s<]+| ", text)
        return [{"kind": "policy", "text": text[:end.end()] if end else text}]
    return {**pair, "chosen": first(pair["chosen"]), "rejected": first(pair["rejected"]), "cut": True}


def decision_pairs(pairs, n=250, n_held=50, at="word"):
    """n known + n unknown pairs cut at the decision (stage 1's file) and the next n_held + n_held held out
    (bench/decision_pairs.py); at the first word, all the contrast is on the decision token (README, smollm2 run)."""
    rows = list(pairs)
    random.Random(0).shuffle(rows)
    known, unknown = [r for r in rows if r["known"]], [r for r in rows if not r["known"]]
    train, held = known[:n] + unknown[:n], known[n:n + n_held] + unknown[n:n + n_held]
    random.Random(1).shuffle(train)
    return [cut_pair(r, at) for r in train], [cut_pair(r, at) for r in held]


def tool_calls(splits, runs):
    """The teacher's real calls on train and dev questions (test calls would leak test facts into the world model);
    "entity_seen": the call's subject is named by a train question."""
    train_named = {n for q in splits["train"] for n in q["named"]}
    return [{"tool": c["tool"], "args": c["args"], "observation": c["observation"],
             "entity_seen": c["subject"] in train_named, "split": split}
            for split in ("train", "dev") for q in splits[split] for c in runs[q["id"]]["calls"]]

# ----------------------------------------------------------------------------------------------------------------------
# Renamed copies: the tiny model's stand-in for a pretrained model's skill of copying unseen names
#
# A 3.5M-parameter model trained from scratch memorises the train entities and writes a TRAIN name into its query on a
# test question (README). In a copy every unknown-pool name word becomes a fresh word (one to one, never a word of any
# pool) and every year read from an observation moves by one random offset (differences, orders and calculator results
# stay true). Names and years of known-pool entities stay (the base model's knowledge).

NAME_WORD = re.compile(r"\b[A-Z][a-z]+\b")
YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")  # world years are 1900-2039; a copy shifts them by at most 30


def renamed_mix(mix, world, copies, seed):
    """mix + `copies` renamed copies of each CoA row (CoT rows: exact repeats), shuffled."""
    rng, fixed, words = random.Random(seed), {"The", *COMPANY_SUFFIXES}, defaultdict(set)
    for name, e in world.items():
        words[e["pool"]].update(w for w in name.split() if w not in fixed)
    taken = set().union(*words.values())
    # every unknown name word: train ones, and the rare other-pool one a reformulated query surfaced (summary.json)
    renamed = taken - words["known"]
    band_words = {name.split()[1] for name, e in world.items() if e["type"] == "band"}

    def rename(row):  # a renamed copy of a CoA row
        fresh = {}

        def word(m):
            w = m.group(0)
            if w not in renamed:
                return w
            while w not in fresh:
                new = make_word(rng, rng.choice([2, 3]))
                if new not in taken and new + "s" not in taken and len(new) <= 9 and new not in fresh.values():
                    fresh[w] = new + ("s" if w in band_words else "")
            return fresh[w]

        # shift only years seen in observations and never recalled ("I know X was born in 1931."): known facts stay
        segs = row["segments"]
        recalled = {y for s in segs if s["kind"] == "policy" for sent in re.findall(r"I know [^.]*\.", s["text"])
                    for y in YEAR.findall(sent)}
        shifted = {y for s in segs if s["kind"] == "obs" for y in YEAR.findall(s["text"])} - recalled
        offset = rng.randint(-30, 30)

        def text(t):
            t = NAME_WORD.sub(word, t)
            return YEAR.sub(lambda m: str(int(m.group(0)) + offset) if m.group(0) in shifted else m.group(0), t)

        return dict(row, question=text(row["question"]),
                    golden_answers=[text(a) for a in row["golden_answers"]],
                    segments=[dict(s, text=text(s["text"])) for s in segs])

    out = []
    for row in mix:
        acts = any(s["kind"] == "obs" for s in row["segments"])
        out += [row] + [dict(rename(row), id=f"{row['id']}_renamed{i}") if acts else row for i in range(copies)]
    random.Random(seed + 1).shuffle(out)
    return out
