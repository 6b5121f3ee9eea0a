"""
The embedded default world: a small fictional multi-hop world, its search corpus, a tokenizer, the question splits and
the data every training stage needs, all generated on a laptop CPU in seconds with no download.

Why a synthetic world. The paper's phenomena (a reasoning model that must learn WHEN to act, HOW to act, and to predict
what the tool will answer) need (a) facts no pretrained model can know, (b) a corpus where retrieval is good but not
perfect, and (c) knowledge that is split into "known" (in the base model's training text) and "unknown" (only in the
corpus), as in paper Appendix A. Real Wikipedia + a 7B model do not fit a 2-core CPU and a 30-minute budget, so we
generate a world with those properties and keep every text short and regular, so a ~3M-parameter model can learn it.

The world. Countries, cities, people, companies and bands with relations
    person  --born_in-->  city        person  --birth_year-->   year            person  --employer--> company
    company --founded_by--> person    company --headquartered_in--> city    company --founded_year--> year
    band    --signed_to--> company    band    --formed_in--> city           city    --located_in--> country
Every entity lives in one pool: "known" (its facts go into base.jsonl, the stand-in for the pretrained reasoning model's
knowledge) or "train"/"dev"/"test" (its facts are ONLY in the corpus). Relations never leave a pool except towards the
known pool, so a test question about unknown entities names nothing that a training question named, and no training
trajectory (whose observations SFT stage 3 trains on) carries a fact about a test-pool entity.

The corpus (FlashRAG JSONL, contents = '"Title"\\ntext'): each fact in one or two phrasings, some passages combining two
facts, and distractors: people share first names and family names, companies share name stems ("Velmor Works",
"Velmor Labs"), bands echo company stems, and "mention" passages name an entity without any asked fact. So BM25 top-3
for a natural query is usually right but not always, and a query about the wrong entity really fails.

Questions: 1-hop, 2-hop bridge, 3-hop, 4-hop (compositional, 2Wiki-style noun phrases), comparison ("Who was born first,
X or Y?") and arithmetic ("How many years after X was born was Y founded?", solved with the calculator tool).
Each has golden_answers, type, hops (facts needed) and known (every needed fact is known).

The scripted teacher answers with the REAL tools (tools.BM25Index over the corpus written here, tools.calculator):
it first writes a one-line plan of the facts the question needs ("Plan: label, then founder, then birth year."), then
for each fact on the chain it recalls it if the subject is known, else it searches; when the fact is not in the top-3
it reformulates (natural question -> name + relation words -> name alone, the title form). Observations are exactly
what the tool returned, wrapped by tools.format_observation. Its trajectories are the SFT data:
    sft_cot.jsonl    pure CoT (no tools) on known questions
    sft_coa.jsonl    CoA (tools) on the other questions
    sft_mix.jsonl    1 CoT : 5 CoA (paper 3.2.1)
    sft_mix_renamed.jsonl  sft_mix + renamed copies of its CoA rows (tiny preset, stages 2 and 3; "Renamed copies")
    sft_pairs.jsonl  CoT+A contrastive pairs: the prefix stops where the reasoning meets the first knowledge gap.
                     unknown: chosen = act and end right, rejected = guess without acting and end wrong.
                     known:   chosen = answer from memory (right), rejected = an unnecessary search (also right).
                     We chose "unnecessary search" over "wrong guess" for the known rejected side: the pair should
                     differ only in the decision to act, which is what stage 1 teaches; a wrong guess would teach
                     "be right", which the unknown pairs already do.
Segments hold the RESPONSE only: model.build_prompt() ends with "<think>", so the first policy segment starts after it.

Departures from the paper (why): a generated world instead of Wikipedia + a 2021 dump (CPU budget, see above); BM25
instead of e5 dense retrieval (no download); the teacher is a script, not a prompted large model (determinism, and its
observations are real by construction); the known/unknown split is by entity pool, not by date; renamed copies of
the CoA data for the tiny model, which has no pretrained copying skill (see "Renamed copies").

Tokenizer: byte-level BPE trained on train-side text only (known + train pools), digits split one by one, pad/eos
every tool tag (tools.special_tokens()) as single special tokens, every year 1800-2099 one token (see
train_tokenizer); small vocabulary on purpose (see --vocab-size).

Outputs (CONTRACT.md "data.py"): corpus.jsonl, tokenizer/, train/dev/test.jsonl, base.jsonl, sft_cot/coa/mix/pairs.jsonl,
tool_calls.jsonl (teacher calls on train and dev questions, never test, with an extra "split" field), summary.json.
Same seed -> same bytes. Every file is written to a temporary name and renamed.

Run:
    python data.py --out out/world                 # default sizes, < 1 minute on one CPU core
    python data.py --out out/small --people 150 --companies 60 --bands 40 --cities 20 --train 200 --dev 40 --test 90
(Pure CPU preprocessing: there is no torchrun form; run it once before the torchrun training scripts.)
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict

import tools
from tools import THINK_CLOSE, action_close, action_open, format_observation, write_atomic

# ----------------------------------------------------------------------------------------------------------------------
# Arguments

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    # Output
    p.add_argument("--out", required=True, help="output directory (created; files inside are replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    # World
    p.add_argument("--countries", type=int, default=8, help="number of countries (all known: they carry no facts)")
    p.add_argument("--cities", type=int, default=60, help="number of cities")
    p.add_argument("--people", type=int, default=700, help="number of people")
    p.add_argument("--companies", type=int, default=280, help="number of companies")
    p.add_argument("--bands", type=int, default=200, help="number of bands")
    p.add_argument("--known-frac", type=float, default=0.12,
                   help="share of entities in the known pool (their facts go into base.jsonl)")
    p.add_argument("--pool-split", type=float, nargs=3, default=[0.64, 0.12, 0.24], metavar=("TRAIN", "DEV", "TEST"),
                   help="how the unknown entities are split into train/dev/test pools")
    # Questions
    p.add_argument("--train", type=int, default=1500, help="number of train questions")
    p.add_argument("--dev", type=int, default=200, help="number of dev questions")
    p.add_argument("--test", type=int, default=300, help="number of test questions")
    p.add_argument("--known-questions", type=float, default=0.2,
                   help="share of train questions whose every fact is known (pure-CoT data); dev/test use 1/3")
    p.add_argument("--base-fact-repeats", type=int, default=2,
                   help="how many phrasings of each known fact base.jsonl carries (memorisation needs repetition)")
    # Teacher
    p.add_argument("--topk", type=int, default=3, help="passages per search (SPEC: 3)")
    p.add_argument("--max-tries", type=int, default=3, help="search reformulations the teacher tries per fact")
    p.add_argument("--mix-ratio", type=int, default=5, help="CoA trajectories per CoT trajectory in sft_mix.jsonl")
    p.add_argument("--renamed-copies", type=int, default=4,
                   help="renamed copies of each CoA trajectory in sft_mix_renamed.jsonl ('Renamed copies'); 0: none")
    # Tokenizer
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="BPE vocabulary size (special tokens included; the 300 year tokens come on top). "
                        "Small on purpose: with a large one whole names "
                        "become tokens, and a test entity's name is made of tokens no training text contains, which "
                        "a small model cannot copy from a result. Test-answer tokens that never occur in sft_mix+base "
                        "(default world, measured): 1.3%% at 1000, 5%% at 1500, 60%% at 3000; 0.2%% at 600, but with "
                        "21%% more tokens per trajectory")
    p.add_argument("--prompt-template", default="short", help="template name passed to model.build_prompt for base text")
    args = p.parse_args(argv)
    assert args.people >= 40 and args.companies >= 20 and args.bands >= 10 and args.cities >= 10, \
        "world too small: need --people >= 40, --companies >= 20, --bands >= 10, --cities >= 10"
    assert 0 < args.known_frac < 0.5, "--known-frac must be in (0, 0.5)"
    assert abs(sum(args.pool_split) - 1) < 1e-6, "--pool-split must sum to 1"
    return args

# ----------------------------------------------------------------------------------------------------------------------
# Names: built from a small syllable set, so the names are fictional and the BPE vocabulary stays small

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "vel"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "or", "ar", "en"]
CODAS = ["", "", "", "n", "r", "s", "l", "m", "th"]
COMPANY_SUFFIXES = ["Works", "Labs", "Systems", "Group", "Studios", "Motors", "Foods", "Press"]
JOBS = ["painter", "chemist", "pilot", "teacher", "baker", "engineer", "writer", "singer", "farmer", "doctor"]


def make_word(rng, syllables):
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables - 1))
    return (word + rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)).capitalize()


def unique_words(rng, n, syllables, taken):
    out = []
    while len(out) < n:
        w = make_word(rng, rng.choice(syllables))
        if w not in taken and len(w) <= 9:
            taken.add(w)
            out.append(w)
    return out

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
    "1hop": [["born_in"], ["birth_year"], ["employer"], ["founded_by"], ["headquartered_in"], ["founded_year"], ["signed_to"],
             ["formed_in"], ["located_in"]],
    "2hop": [["founded_by", "born_in"], ["founded_by", "birth_year"], ["headquartered_in", "located_in"],
             ["born_in", "located_in"], ["employer", "founded_by"], ["employer", "headquartered_in"],
             ["signed_to", "founded_by"], ["signed_to", "headquartered_in"], ["formed_in", "located_in"]],
    "3hop": [["founded_by", "born_in", "located_in"], ["signed_to", "founded_by", "born_in"],
             ["signed_to", "headquartered_in", "located_in"], ["signed_to", "founded_by", "birth_year"],
             ["employer", "headquartered_in", "located_in"], ["employer", "founded_by", "born_in"]],
    "4hop": [["signed_to", "founded_by", "born_in", "located_in"], ["employer", "founded_by", "born_in", "located_in"],
             ["founded_by", "employer", "headquartered_in", "located_in"]],
}
POOLS = ["known", "train", "dev", "test"]
QTYPES = ["1hop", "2hop", "3hop", "4hop", "comparison", "arithmetic"]
TYPE_SHARE = {"1hop": 0.22, "2hop": 0.24, "3hop": 0.16, "4hop": 0.1, "comparison": 0.14, "arithmetic": 0.14}

# ----------------------------------------------------------------------------------------------------------------------
# The world


def pick_in_pool(world, by_type, kind, pool, rng):
    """A random entity of this kind that a `pool` entity may point to: its own pool or the known pool (see docstring),
    so nothing about a test entity ever appears next to a train entity, in a fact or in a distractor."""
    allowed = ("known",) if pool == "known" else (pool, "known")
    cands = [n for n in by_type[kind] if world[n]["pool"] in allowed]
    if pool != "known" and rng.random() < 0.75:  # mostly same-pool, so unknown chains stay mostly unknown
        same = [n for n in cands if world[n]["pool"] == pool]
        cands = same or cands
    return rng.choice(cands)


def make_world(args, rng):
    """Entities {name: {"type", "pool", relation: value, ...}} and the list of names per type."""
    def pool_sizes(n):
        n_known = max(2, round(n * args.known_frac))
        rest = n - n_known
        n_train, n_dev = round(rest * args.pool_split[0]), round(rest * args.pool_split[1])
        return {"known": n_known, "train": n_train, "dev": n_dev, "test": rest - n_train - n_dev}

    taken, world = set(), {}
    by_type = {kind: [] for kind in ("country", "city", "person", "company", "band")}
    for c in unique_words(rng, args.countries, [2, 3], taken):
        world[c] = {"type": "country", "pool": "known"}
        by_type["country"].append(c)
    sizes = {kind: pool_sizes(n) for kind, n in
             (("city", args.cities), ("person", args.people), ("company", args.companies), ("band", args.bands))}
    for pool in POOLS:
        # Each pool has its own name parts, so a query about a train entity cannot retrieve a test entity's passage
        # by a shared name word (that would leak test facts into training observations). Within a pool, few first
        # names, family names shared by 2-3 people and company stems shared by 2-3 companies ("Velmor Works",
        # "Velmor Labs") are the "similar names" distractors.
        n_people, n_companies = sizes["person"][pool], sizes["company"][pool]
        firsts = unique_words(rng, max(3, n_people // 12), [2], taken)
        families = unique_words(rng, max(3, n_people // 2), [2, 3], taken)
        stems = unique_words(rng, max(3, n_companies * 2 // 3), [2, 3], taken)
        makers = {"city": lambda: make_word(rng, rng.choice([2, 3])),
                  "person": lambda: f"{rng.choice(firsts)} {rng.choice(families)}",
                  "company": lambda: f"{rng.choice(stems)} {rng.choice(COMPANY_SUFFIXES)}",
                  # bands echo company stems ("The Velmors") or get a fresh word
                  "band": lambda: f"The {rng.choice(stems) if rng.random() < 0.4 else make_word(rng, 2)}s"}
        for kind, make in makers.items():
            made, tries = 0, 0
            while made < sizes[kind][pool]:
                tries += 1
                if tries > 100 * sizes[kind][pool] + 100:
                    raise SystemExit(f"ran out of distinct {kind} names for pool {pool}: lower the world sizes")
                name = make()
                if name not in taken and len(name.split()[-1]) <= 10:
                    taken.add(name)
                    world[name] = {"type": kind, "pool": pool}
                    by_type[kind].append(name)
                    made += 1

    def pick(kind, pool):
        return pick_in_pool(world, by_type, kind, pool, rng)

    countries, people, companies, bands = (by_type[k] for k in ("country", "person", "company", "band"))
    for c in by_type["city"]:
        world[c]["located_in"] = rng.choice(countries)
    for p in people:
        e = world[p]
        e["born_in"], e["birth_year"], e["job"] = pick("city", e["pool"]), str(rng.randint(1900, 1979)), rng.choice(JOBS)
    for p in people:  # after all people exist
        world[p]["employer"] = pick("company", world[p]["pool"])
    for c in companies:
        e = world[c]
        e["founded_by"], e["headquartered_in"] = pick("person", e["pool"]), pick("city", e["pool"])
        # founded 20-60 years after the founder's birth: arithmetic answers are positive and plausible
        e["founded_year"] = str(int(world[e["founded_by"]]["birth_year"]) + rng.randint(20, 60))
    for b in bands:
        e = world[b]
        e["signed_to"], e["formed_in"] = pick("company", e["pool"]), pick("city", e["pool"])
    return world, by_type

# ----------------------------------------------------------------------------------------------------------------------
# Corpus


def make_corpus(world, by_type, rng):
    """Passages [{"id","contents"}] and, per fact (subject, relation), the ids of the passages that state it."""
    texts = []  # (title, text, facts stated)
    for kind in ("city", "person", "company", "band"):
        for s in by_type[kind]:
            e = world[s]
            rels = [r for r, v in RELATIONS.items() if v[0] == kind]
            for r in rels:
                phrasings = RELATIONS[r][4]
                chosen = rng.sample(phrasings, 2 if rng.random() < 0.5 else 1)
                for t in chosen:
                    texts.append((s, t.format(s=s, o=e[r]), [(s, r)]))
            if kind == "person":
                # a combined passage (two facts) and a job sentence, which mentions no asked fact
                if rng.random() < 0.4:
                    texts.append((s, f"{s} was born in {e['born_in']} in {e['birth_year']}.",
                                  [(s, "born_in"), (s, "birth_year")]))
                texts.append((s, f"{s} worked as a {e['job']}.", []))
    # Mention passages: an entity appears, no asked fact about it does (the title is the other entity).
    def pick(kind, subject):
        return pick_in_pool(world, by_type, kind, world[subject]["pool"], rng)

    for p in by_type["person"]:
        if rng.random() < 0.5:
            texts.append((p, f"{p} once visited {pick('city', p)} on a long trip.", []))
    for c in by_type["company"]:
        texts.append((c, f"{c} sponsored a concert by {pick('band', c)}.", []))
        if rng.random() < 0.5:
            texts.append((c, f"{c} hired {pick('person', c)} as a {rng.choice(JOBS)}.", []))
    for b in by_type["band"]:
        texts.append((b, f"{b} played a show in {pick('city', b)}.", []))
    rng.shuffle(texts)
    passages, stating = [], defaultdict(list)
    for i, (title, text, facts) in enumerate(texts):
        pid = str(i)
        passages.append({"id": pid, "contents": f'"{title}"\n{text}'})
        for f in facts:
            stating[f].append(pid)
    return passages, stating

# ----------------------------------------------------------------------------------------------------------------------
# Questions


def noun_phrase(head, chain):
    """'the founder of the label of The Morvans' for chain [signed_to, founded_by] (all but the last relation)."""
    np = head
    for r in chain:
        np = f"the {RELATIONS[r][2]} of {np}"
    return np


def resolve(world, head, chain):
    """Walk the chain; returns the list of (subject, relation, object) steps."""
    steps, s = [], head
    for r in chain:
        o = world[s][r]
        steps.append((s, r, o))
        s = o
    return steps


def make_question(world, heads_of, qtype, pool, want_known, rng):
    """One question dict (with the internal fields "plan" and "named") or None if this draw does not fit.
    heads_of[(kind, pool)]: the entities a question of this pool may name."""
    def heads(kind):
        return heads_of[(kind, pool)]

    if qtype in CHAINS:
        chain = rng.choice(CHAINS[qtype])
        head = rng.choice(heads(RELATIONS[chain[0]][0]))
        steps = resolve(world, head, chain)
        question = RELATIONS[chain[-1]][3].format(s=noun_phrase(head, chain[:-1]))
        answers = [steps[-1][2]]
        named = [head]
        plan = {"kind": "chain", "steps": steps}
    elif qtype == "comparison":
        kind, rel, verb = rng.choice([("person", "birth_year", "was born"), ("company", "founded_year", "was founded")])
        a, b = rng.sample(heads(kind), 2)
        ya, yb = int(world[a][rel]), int(world[b][rel])
        if ya == yb:
            return None
        question = f"{'Who' if kind == 'person' else 'Which'} {verb} first, {a} or {b}?"
        answers = [a if ya < yb else b]
        named = [a, b]
        plan = {"kind": "comparison", "steps": [(a, rel, world[a][rel]), (b, rel, world[b][rel])], "verb": verb}
    else:  # arithmetic: a person and a company (its founder or not) of the same pool
        c = rng.choice(heads("company"))
        p = world[c]["founded_by"] if rng.random() < 0.5 else rng.choice(heads("person"))
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


def make_split(world, heads_of, split, n, known_share, seen_questions, rng):
    """n questions for one split; unknown ones name only entities of this split's pool, known ones the known pool.
    Known questions are few per type (4-hop needs a fully known band chain): dev and test are built first and must get
    their quota; train fills what known questions it cannot get with unknown ones (counted in "known_shortfall")."""
    out, shortfall = [], 0
    for qtype in QTYPES:
        n_type = round(n * TYPE_SHARE[qtype]) if qtype != QTYPES[-1] else n - len(out)
        n_known = round(n_type * known_share)
        for want_known, count in ((True, n_known), (False, n_type - n_known)):
            pool = "known" if want_known else split
            count += shortfall if not want_known else 0
            made, tries = 0, 0
            while made < count:
                tries += 1
                if tries > 50 * count + 500:
                    if split == "train" and want_known:
                        shortfall = count - made
                        break
                    raise SystemExit(f"could not make {count} {qtype} questions (known={want_known}) for {split}: "
                                     "world too small, raise --people/--companies/--bands")
                q = make_question(world, heads_of, qtype, pool, want_known, rng)
                # known questions may repeat across splits only if the question text differs
                if q is None or q["question"] in seen_questions:
                    continue
                seen_questions.add(q["question"])
                out.append(q)
                made += 1
        shortfall = 0
    rng.shuffle(out)
    for i, q in enumerate(out):
        q["id"] = f"{split}_{i}"
    return out

# ----------------------------------------------------------------------------------------------------------------------
# The scripted teacher


def fact_found(results, stating, subject, rel, topk):
    """Does any of the top-k passages state this fact? (the teacher reads like a careful human: by passage meaning)"""
    ids = set(stating[(subject, rel)])
    return any(doc["id"] in ids for doc, _ in results[:topk])


def teacher(q, env, act=True, rng=None, world=None):
    """Solve one question. Returns segments (response only), the answer, the tool calls and per-step info.

    act=True: recall known facts, search the others (reformulating when a result lacks the fact), use the calculator.
    act=False: never act; an unknown fact is guessed with a random entity of the right type (rng), i.e. chance.
    env: {"world","by_type","index","search","calc","stating","args"}; world overrides env["world"] (known pairs).
    "gap" is the policy text up to the first unknown fact: where a CoT+A pair's prefix stops; "plan_text" the opening
    plan line."""
    world = world or env["world"]
    args, stating = env["args"], env["stating"]
    segments, text, calls, first_hits, gap = [], "", [], [], None
    plan = q["plan"]

    # The plan: the facts the question needs, in order, written before any of them. After each fact the model
    # finds where it stands in this one line and reads the next step, or "." (answer now), instead of re-parsing the
    # question: the tiny model otherwise ran on past a 1-hop answer into a 2-hop chain. Measured (60 dev questions,
    # stage 2 from the base model, renamed copies, equal compute): EM 11.7% without the plan line, 30.0% with it.
    nouns = [RELATIONS[rel][2] for _, rel, _ in plan["steps"]]
    if plan["kind"] == "chain":
        text = " Plan: " + ", then ".join(nouns) + "."
    else:
        (a, _, _), (b, _, _) = plan["steps"]
        last = "compare" if plan["kind"] == "comparison" else "subtract"
        text = f" Plan: {nouns[0]} of {a}, then {nouns[1]} of {b}, then {last}."
    plan_text = text

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
            found = fact_found(results, stating, subject, rel, args.topk)
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
    elif plan["kind"] == "comparison":
        (a, rel, _), (b, _, _) = plan["steps"]
        ya, yb = get_fact(a, rel), get_fact(b, rel)
        if ya is None or yb is None:
            answer = None
        else:
            answer = a if int(ya) < int(yb) else b
            early, late = (ya, yb) if int(ya) < int(yb) else (yb, ya)
            text += f" {early} is before {late}, so {answer} {plan['verb']} first."
    else:  # arithmetic
        (p, _, _), (c, _, _) = plan["steps"]
        yp, yc = get_fact(p, "birth_year"), get_fact(c, "founded_year")
        if yp is None or yc is None:
            answer = None
        elif act and not q["known"]:
            expr = f"{yc} - {yp}"
            text += f" I need {expr}. {action_open('calculator')} {expr} {action_close('calculator')}"
            flush_policy()
            obs = env["calc"]([expr])[0]
            calls.append({"tool": "calculator", "args": expr, "observation": obs, "subject": None})
            segments.append({"kind": "obs", "text": format_observation("calculator", obs)})
            answer = obs.strip()
            text += f"So the difference is {answer}."
        else:  # from memory, the reasoning model does the subtraction itself
            answer = str(int(yc) - int(yp))
            text += f" {yc} - {yp} = {answer}."
    answer = answer if answer is not None else "unknown"
    text += f" {THINK_CLOSE}\nThe answer is \\boxed{{{answer}}}"
    flush_policy()
    # Glue: a policy segment right after an observation starts without the leading space (the obs ends in "\n").
    for i in range(1, len(segments)):
        if segments[i]["kind"] == "policy" and segments[i - 1]["kind"] == "obs":
            segments[i]["text"] = segments[i]["text"].lstrip(" ")
    return {"segments": segments, "answer": answer, "calls": calls, "first_hits": first_hits, "gap": gap,
            "plan_text": plan_text}

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE, action tags as single tokens, every year 1800-2099 one token, other digits split one by one.

    Why whole years: the tiny model must COPY a year from a search result into its reasoning. With four digit tokens
    it mostly wrote a likely year instead ("founded in 1945." in the result, "founded in 1971." in its reasoning;
    3 of 33 years copied on dev after stage 2); with one token the copy is a single step, like a name piece. Honest
    record: whole years alone did not fix it at stage 2 (1 of 41; dev EM 11.7% vs 13.3% with digits, 60 questions);
    what did was stage 3 on the renamed copies, where results repeat a year the model cannot know (20 of 29 copied,
    see run.sh). We kept whole years (shorter sequences) and did not re-measure digits with that stage 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<eos>"] + tools.special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([str(y) for y in YEARS])  # matched before pre-tokenisation: "1911" is one token anywhere
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=specials[2:])

# ----------------------------------------------------------------------------------------------------------------------
# Renamed copies: the tiny model's stand-in for a pretrained model's skill of copying unseen names
#
# A pretrained LLM already copies a name it has never seen from the question into its query and reads a fact about it
# out of a passage. A 3.5M-parameter model trained from scratch on ~700 train entities does not: it memorises them,
# and on a test question writes a TRAIN name into its query (measured on the unknown dev questions after stage 2 at
# equal compute: the first query named the question's entity for 1 of 38 without renamed copies, 34 of 38 with).
# So sft_mix_renamed.jsonl adds, per CoA trajectory, copies in which every unknown-pool name word is replaced by a
# fresh word (consistently within the copy; never a word of any pool, so no dev/test name appears) and every year
# read from an observation is shifted by one random offset (so differences, orders and calculator results stay true).
# Names and years of known-pool entities stay: they are the base model's knowledge. CoT rows are repeated unchanged,
# keeping the 1 CoT : 5 CoA ratio.
# A renamed copy is the same trajectory in a consistently renamed world (names map one to one, so BM25 ranks the
# renamed passages as it ranked the originals).

YEARS = range(1800, 2100)  # single tokens (train_tokenizer); world years 1900-2039, renamed copies shift them <= 30
NAME_WORD = re.compile(r"\b[A-Z][a-z]+\b")
YEAR = re.compile(r"\b(1[89]\d\d|20\d\d)\b")


class Renamer:
    def __init__(self, world, rng):
        fixed = {"The", *COMPANY_SUFFIXES}
        words = defaultdict(set)
        for name, e in world.items():
            words[e["pool"]].update(w for w in name.split() if w not in fixed)
        self.taken = set().union(*words.values())
        # every unknown name word: train ones, and the rare other-pool word a reformulated query surfaced (counted in
        # summary.json) is gone from the copies too (pools have their own name parts; see make_world)
        self.renamed = self.taken - words["known"]
        self.band_words = {name.split()[1] for name, e in world.items() if e["type"] == "band"}
        self.rng = rng

    def __call__(self, row):
        """A renamed copy of a CoA row ({"question","golden_answers","segments",...}); other fields are kept."""
        rng, fresh = self.rng, {}

        def word(m):
            w = m.group(0)
            if w not in self.renamed:
                return w
            while w not in fresh:
                new = make_word(rng, rng.choice([2, 3]))
                if new not in self.taken and new + "s" not in self.taken and len(new) <= 9 \
                        and new not in fresh.values():
                    fresh[w] = new + ("s" if w in self.band_words else "")
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


def renamed_mix(mix, world, copies, seed):
    """mix + `copies` renamed copies of each CoA row (CoT rows: exact repeats), shuffled."""
    renamer, out = Renamer(world, random.Random(seed)), []
    for row in mix:
        acts = any(s["kind"] == "obs" for s in row["segments"])
        out += [row] + [dict(renamer(row), id=f"{row['id']}_renamed{i}") if acts else row for i in range(copies)]
    random.Random(seed + 1).shuffle(out)
    return out

# ----------------------------------------------------------------------------------------------------------------------
# Writing


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def public(q):
    return {k: q[k] for k in ("id", "question", "golden_answers", "type", "hops", "known")}


def local_build_prompt(question):
    # Fallback only if model.py is missing: same shape as model.build_prompt(template="short").
    return ("Answer the question. Think inside <think> </think>; search with <begin_search> query </end_search> "
            f"when you do not know a fact; give the answer as \\boxed{{answer}}.\nQuestion: {question}\n<think>")


def build(argv=None):
    """Build the whole world into args.out; returns the summary dict. The tests call this with small sizes."""
    args = get_args(argv)
    t0 = time.time()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)

    # --- world, corpus, index
    world, by_type = make_world(args, rng)
    passages, stating = make_corpus(world, by_type, rng)
    index = tools.BM25Index(passages)
    env = {"world": world, "by_type": by_type, "index": index, "search": tools.search_tool(index, k=args.topk),
           "calc": tools.calculator, "stating": stating, "args": args}

    # --- questions: every question text unique across splits
    heads_of = defaultdict(list)
    for kind, names in by_type.items():
        for name in names:
            heads_of[(kind, world[name]["pool"])].append(name)
    seen = set()
    test = make_split(world, heads_of, "test", args.test, 1 / 3, seen, rng)
    dev = make_split(world, heads_of, "dev", args.dev, 1 / 3, seen, rng)
    splits = {"train": make_split(world, heads_of, "train", args.train, args.known_questions, seen, rng),
              "dev": dev, "test": test}
    train_named = {n for q in splits["train"] for n in q["named"]}

    # --- teacher on every question (real tools), and the guessing teacher on unknown ones (chance level)
    stats = {s: Counter() for s in splits}
    runs = {}
    guess_rng, guess_by_type = random.Random(args.seed + 1), defaultdict(list)
    for split, qs in splits.items():
        for q in qs:
            r = teacher(q, env)
            runs[q["id"]] = r
            st = stats[split]
            st["n"] += 1
            st["correct"] += r["answer"] in q["golden_answers"]
            st["first_query"] += len(r["first_hits"])
            st["first_hit"] += sum(r["first_hits"])
            st["searches"] += sum(c["tool"] == "search" for c in r["calls"])
            if not q["known"]:
                g = teacher(q, env, act=False, rng=guess_rng)
                st["unknown"] += 1
                st["guess_correct"] += g["answer"] in q["golden_answers"]
                guess_by_type[q["type"]].append(g["answer"] in q["golden_answers"])
                runs[q["id"]]["guess"] = g

    # --- SFT data from train questions the teacher got right
    cot, coa, pairs = [], [], []
    for q in splits["train"]:
        r = runs[q["id"]]
        if r["answer"] not in q["golden_answers"]:
            continue
        row = {"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"], "type": q["type"],
               "segments": r["segments"]}
        (cot if q["known"] else coa).append(row)
        if q["known"]:
            # chosen = answer from memory; rejected = the same chain, but searching the first fact needlessly
            subject, rel, _ = q["plan"]["steps"][0]
            need = r["plan_text"] + f" I need the {RELATIONS[rel][2]} of {subject}."
            searcher = dict(world[subject], pool="train")  # pretend the subject is unknown, only to script the search
            alt = teacher(q, env, world=dict(world, **{subject: searcher}))
            if alt["answer"] not in q["golden_answers"]:
                continue
            prefix = [{"kind": "policy", "text": need}]
            chosen = [dict(r["segments"][0], text=r["segments"][0]["text"][len(need):])] + r["segments"][1:]
            rejected = [dict(alt["segments"][0], text=alt["segments"][0]["text"][len(need):])] + alt["segments"][1:]
        else:
            g = r["guess"]
            if g["answer"] in q["golden_answers"]:
                continue  # a lucky guess is not a "guess and end wrong" example
            gap = r["gap"]
            assert r["segments"][0]["text"].startswith(gap) and g["segments"][0]["text"].startswith(gap)
            prefix = [{"kind": "policy", "text": gap}]
            chosen = [dict(r["segments"][0], text=r["segments"][0]["text"][len(gap):])] + r["segments"][1:]
            rejected = [dict(g["segments"][0], text=g["segments"][0]["text"][len(gap):])] + g["segments"][1:]
        pairs.append({"id": q["id"], "question": q["question"], "golden_answers": q["golden_answers"],
                      "type": q["type"], "known": q["known"], "prefix": prefix, "chosen": chosen, "rejected": rejected})
    n_cot_mix = min(len(cot), max(1, len(coa) // args.mix_ratio))
    mix = coa + random.Random(args.seed + 2).sample(cot, n_cot_mix)
    random.Random(args.seed + 3).shuffle(mix)
    mix_renamed = renamed_mix(mix, world, args.renamed_copies, args.seed + 5)

    # --- tool calls (train and dev only: test calls would leak test facts into the world model)
    tool_calls = []
    for split in ("train", "dev"):
        for q in splits[split]:
            for c in runs[q["id"]]["calls"]:
                tool_calls.append({"tool": c["tool"], "args": c["args"], "observation": c["observation"],
                                   "entity_seen": c["subject"] in train_named, "split": split})

    # --- base text: known facts in prose (several phrasings) + pure-CoT QA on known train questions
    base_facts = []
    for kind in ("city", "person", "company", "band"):
        for s in by_type[kind]:
            if world[s]["pool"] != "known":
                continue
            rels = [r for r, v in RELATIONS.items() if v[0] == kind]
            for rep in range(args.base_fact_repeats):
                base_facts.append(" ".join(RELATIONS[r][4][rep % len(RELATIONS[r][4])].format(s=s, o=world[s][r])
                                           for r in rels))
    # The tokenizer sees only train-side text (as a real tokenizer never saw tomorrow's entities): with the default
    # small vocabulary, dev/test names then split into pieces that training text contains (see --vocab-size).
    train_side = [p["contents"] for p in passages if world[p["contents"].split("\n")[0].strip('"')]["pool"]
                  in ("known", "train")]
    try:
        from model import build_prompt
        # Our tokenizer has no chat template, so the prompt text does not depend on it: None lets the tokenizer
        # be trained on the exact prompt before it exists.
        prompt_of = lambda question: build_prompt(None, question, args.prompt_template)  # noqa: E731
    except ImportError:  # model.py absent: base text falls back to a local prompt of the same shape
        prompt_of = local_build_prompt
    texts_for_tokenizer = (train_side + base_facts + [prompt_of("")] + [q["question"] for q in splits["train"]]
                           + ["".join(s["text"] for s in row["segments"]) for row in cot + coa])
    tokenizer = train_tokenizer(texts_for_tokenizer, args.vocab_size)
    base = [{"text": t} for t in base_facts]
    base += [{"text": prompt_of(row["question"]) + "".join(s["text"] for s in row["segments"])} for row in cot]
    random.Random(args.seed + 4).shuffle(base)

    # --- token lengths (what the trainers will see), summary
    def n_tokens(segs):
        return sum(len(tokenizer(s["text"], add_special_tokens=False)["input_ids"]) for s in segs)

    lengths = defaultdict(list)
    for row in coa + cot:
        lengths[row["type"] + ("_cot" if row in cot else "")].append(n_tokens(row["segments"]))
    # Retrieval is real, so a reformulated query can surface another pool's passage through shared words
    # ("Group", "head office"): count train calls whose observation shows a test-pool entity (reported, kept rare).
    test_names = [n for n in sorted(world, key=len, reverse=True) if world[n]["pool"] == "test"]
    test_regex = re.compile(r"\b(" + "|".join(re.escape(n) for n in test_names) + r")\b")
    leaked = sum(bool(test_regex.search(c["observation"])) for c in tool_calls if c["split"] == "train")
    counts = {s: dict(sorted(Counter(f"{q['type']}/{'known' if q['known'] else 'unknown'}" for q in qs).items()))
              for s, qs in splits.items()}
    summary = {
        "seed": args.seed,
        "entities": {k: len(v) for k, v in by_type.items()},
        "pools": dict(sorted(Counter(e["pool"] for e in world.values()).items())),
        "corpus_passages": len(passages),
        "questions": counts,
        "teacher": {s: {"accuracy": round(st["correct"] / st["n"], 4),
                        "first_query_top3_hit": round(st["first_hit"] / max(1, st["first_query"]), 4),
                        "searches_per_question": round(st["searches"] / st["n"], 3),
                        "no_tool_accuracy_unknown": round(st["guess_correct"] / max(1, st["unknown"]), 4)}
                    for s, st in stats.items()},
        # all splits; chance is 1/2 for comparisons and about 1/(entities of the answer's type in reach) otherwise
        "no_tool_accuracy_unknown_by_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(guess_by_type.items())},
        "sft": {"cot": len(cot), "coa": len(coa), "mix": len(mix), "mix_renamed": len(mix_renamed), "pairs": len(pairs),
                "pairs_known": sum(p["known"] for p in pairs), "base_docs": len(base), "tool_calls": len(tool_calls)},
        "mean_response_tokens": {k: round(sum(v) / len(v), 1) for k, v in sorted(lengths.items())},
        "vocab_size": len(tokenizer),
        "train_calls_showing_test_entity": leaked,
    }

    # --- write everything (each file atomically)
    out = args.out
    write_jsonl(os.path.join(out, "corpus.jsonl"), passages)
    for split, qs in splits.items():
        write_jsonl(os.path.join(out, f"{split}.jsonl"), [public(q) for q in qs])
    write_jsonl(os.path.join(out, "base.jsonl"), base)
    write_jsonl(os.path.join(out, "sft_cot.jsonl"), cot)
    write_jsonl(os.path.join(out, "sft_coa.jsonl"), coa)
    write_jsonl(os.path.join(out, "sft_mix.jsonl"), mix)
    write_jsonl(os.path.join(out, "sft_mix_renamed.jsonl"), mix_renamed)
    write_jsonl(os.path.join(out, "sft_pairs.jsonl"), pairs)
    write_jsonl(os.path.join(out, "tool_calls.jsonl"), tool_calls)
    tmp_tok = tempfile.mkdtemp(dir=out, prefix=".tmp-tokenizer-")
    os.chmod(tmp_tok, 0o755)
    tokenizer.save_pretrained(tmp_tok)
    shutil.rmtree(os.path.join(out, "tokenizer"), ignore_errors=True)
    os.replace(tmp_tok, os.path.join(out, "tokenizer"))
    write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = round(time.time() - t0, 1)  # printed, not written: the files must not depend on the clock
    return summary


def print_summary(s):
    print(f"world: {s['entities']}  pools: {s['pools']}  corpus: {s['corpus_passages']} passages  "
          f"vocab: {s['vocab_size']}")
    types = [f"{t}/{k}" for t in QTYPES for k in ("known", "unknown")]
    print(f"{'split':6} | " + " | ".join(f"{t:>18}" for t in types[:0]) + " | ".join(f"{t}" for t in types))
    for split, c in s["questions"].items():
        print(f"{split:6} | " + " | ".join(f"{c.get(t, 0):>{len(t)}}" for t in types) + f" | total {sum(c.values())}")
    print(f"{'split':6} | teacher acc | first-query top-{3} hit | searches/q | no-tool acc (unknown)")
    for split, t in s["teacher"].items():
        print(f"{split:6} | {t['accuracy']:11.3f} | {t['first_query_top3_hit']:22.3f} | "
              f"{t['searches_per_question']:10.2f} | {t['no_tool_accuracy_unknown']:.3f}")
    print(f"no-tool acc on unknown questions by type (chance): {s['no_tool_accuracy_unknown_by_type']}")
    print(f"train tool calls whose observation shows a test entity: {s['train_calls_showing_test_entity']}")
    print(f"sft: {s['sft']}")
    print(f"mean response tokens: {s['mean_response_tokens']}")
    if "seconds" in s:
        print(f"built in {s['seconds']} s")


if __name__ == "__main__":
    print_summary(build(sys.argv[1:]))
