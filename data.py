"""
The embedded default world: a small fictional multi-hop world, its search corpus, a tokenizer, the question splits and
the data every training stage needs, all generated on a laptop CPU in seconds with no download.

Why a synthetic world: the paper's phenomena (learning WHEN and HOW to act, and to predict what the tool will answer)
need facts no pretrained model can know, a corpus where retrieval is good but not perfect, and knowledge split into
"known" (in the base model's training text) and "unknown" (only in the corpus), as in paper Appendix A. Wikipedia + a
7B model do not fit a 2-core CPU and 30 minutes; short, regular texts let a ~3M-parameter model learn this world.

The world: countries, cities, people, companies and bands, linked by teacher.RELATIONS. Every entity lives in one
pool: "known" (its facts go into base.jsonl, the pretrained model's knowledge) or "train"/"dev"/"test" (its facts are
ONLY in the corpus). Relations leave a pool only towards the known pool, so no test question names what a training
question named, and no training trajectory (SFT stage 3 trains on its observations) shows a test-pool fact.

The corpus (FlashRAG JSONL, contents = '"Title"\\ntext') states each fact once or twice among similar names and
"mention" passages: BM25 top-3 for a natural query is usually right but not always, and a query about the wrong entity
really fails. Questions (teacher.make_question): 1- to 4-hop (2Wiki-style noun phrases), comparison and arithmetic,
each with golden_answers, type, hops and known (every needed fact is known); teacher.py answers them.

Departures from the paper (why): a generated world instead of Wikipedia + a 2021 dump (CPU budget, see above); BM25
instead of e5 dense retrieval (no download); the teacher is a script, not a prompted large model (determinism, and its
observations are real by construction); the known/unknown split is by entity pool, not by date; renamed copies of
the CoA data for the tiny model, which has no pretrained copying skill (teacher.py, "Renamed copies").

Outputs: CONTRACT.md "data.py" (+ rl.jsonl with --rl). Same seed -> same bytes; every file is written atomically.

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
from functools import partial

import teacher
import tools
from model import build_prompt
from teacher import COMPANY_SUFFIXES, RELATIONS, make_word
from tools import write_atomic

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
    p.add_argument("--known-frac", type=float, default=0.12, help="share of entities in the known pool (base.jsonl)")
    p.add_argument("--pool-split", type=float, nargs=3, default=[0.64, 0.12, 0.24], metavar=("TRAIN", "DEV", "TEST"),
                   help="how the unknown entities are split into train/dev/test pools")
    # Questions
    p.add_argument("--train", type=int, default=1500, help="number of train questions")
    p.add_argument("--dev", type=int, default=200, help="number of dev questions")
    p.add_argument("--test", type=int, default=300, help="number of test questions drawn with the others")
    p.add_argument("--test-extra", type=int, default=0, help="more test questions, drawn after everything else from "
                   "their own RNG, so no other file changes with them (run.sh: 900, 1,200 in all)")
    p.add_argument("--rl", type=int, default=0, help="questions for RL alone (rl.jsonl; train and known entities, "
                   "drawn last: every other file is the same bytes), never SFT data (paper 4.2: RL's own problems)")
    p.add_argument("--known-questions", type=float, default=0.2,
                   help="share of train questions whose every fact is known (pure-CoT data); dev/test use 1/3")
    p.add_argument("--base-fact-repeats", type=int, default=2, help="phrasings of each known fact in base.jsonl")
    # Teacher
    p.add_argument("--topk", type=int, default=3, help="passages per search (SPEC: 3)")
    p.add_argument("--max-tries", type=int, default=3, help="search reformulations the teacher tries per fact")
    p.add_argument("--mix-ratio", type=int, default=5, help="CoA trajectories per CoT trajectory in sft_mix.jsonl")
    p.add_argument("--renamed-copies", type=int, default=4, help="renamed copies of each CoA trajectory in "
                   "sft_mix_renamed.jsonl (teacher.py 'Renamed copies'); 0: none")
    # Tokenizer
    p.add_argument("--vocab-size", type=int, default=1000, help="BPE vocabulary size (special tokens included; the "
                   "300 year tokens come on top); small on purpose (train_tokenizer)")
    p.add_argument("--prompt-template", default="short", help="model.build_prompt template of the base text")
    args = p.parse_args(argv)
    assert args.people >= 40 and args.companies >= 20 and args.bands >= 10 and args.cities >= 10, \
        "world too small: need --people >= 40, --companies >= 20, --bands >= 10, --cities >= 10"
    assert 0 < args.known_frac < 0.5, "--known-frac must be in (0, 0.5)"
    assert abs(sum(args.pool_split) - 1) < 1e-6, "--pool-split must sum to 1"
    return args

# ----------------------------------------------------------------------------------------------------------------------
# Names (teacher.make_word), pools and question types (what each type asks: teacher.CHAINS and teacher.make_question)

JOBS = ["painter", "chemist", "pilot", "teacher", "baker", "engineer", "writer", "singer", "farmer", "doctor"]
POOLS = ["known", "train", "dev", "test"]
QTYPES = ["1hop", "2hop", "3hop", "4hop", "comparison", "arithmetic"]
TYPE_SHARE = {"1hop": 0.22, "2hop": 0.24, "3hop": 0.16, "4hop": 0.1, "comparison": 0.14, "arithmetic": 0.14}


def unique_words(rng, n, syllables, taken):
    out = []
    while len(out) < n:
        w = make_word(rng, rng.choice(syllables))
        if w not in taken and len(w) <= 9:
            taken.add(w)
            out.append(w)
    return out

# ----------------------------------------------------------------------------------------------------------------------
# The world


def pick_in_pool(world, by_type, kind, subject, rng):
    """A random entity of this kind that `subject` may point to: its own pool or the known pool (module docstring)."""
    pool = world[subject]["pool"]
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
    by_type["country"] = unique_words(rng, args.countries, [2, 3], taken)
    world.update({c: {"type": "country", "pool": "known"} for c in by_type["country"]})
    sizes = {kind: pool_sizes(n) for kind, n in
             (("city", args.cities), ("person", args.people), ("company", args.companies), ("band", args.bands))}
    for pool in POOLS:
        # Name parts per pool (no train query finds a test passage by a shared word); shared in a pool: the distractors
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

    pick = partial(pick_in_pool, world, by_type, rng=rng)
    for c in by_type["city"]:
        world[c]["located_in"] = rng.choice(by_type["country"])
    for p in by_type["person"]:
        e = world[p]
        e["born_in"], e["birth_year"] = pick("city", p), str(rng.randint(1900, 1979))
        e["job"] = rng.choice(JOBS)
    for p in by_type["person"]:  # after all people exist
        world[p]["employer"] = pick("company", p)
    for c in by_type["company"]:
        e = world[c]
        e["founded_by"], e["headquartered_in"] = pick("person", c), pick("city", c)
        # founded 20-60 years after the founder's birth: arithmetic answers are positive and plausible
        e["founded_year"] = str(int(world[e["founded_by"]]["birth_year"]) + rng.randint(20, 60))
    for b in by_type["band"]:
        e = world[b]
        e["signed_to"], e["formed_in"] = pick("company", b), pick("city", b)
    return world, by_type

# ----------------------------------------------------------------------------------------------------------------------
# Corpus


def make_corpus(world, by_type, rng):
    """Passages [{"id","contents"}] and, per fact (subject, relation), the ids of the passages that state it."""
    texts = []  # (title, text, facts stated)
    for kind in ("city", "person", "company", "band"):
        for s in by_type[kind]:
            e = world[s]
            for r in [r for r, v in RELATIONS.items() if v[0] == kind]:
                for t in rng.sample(RELATIONS[r][4], 2 if rng.random() < 0.5 else 1):
                    texts.append((s, t.format(s=s, o=e[r]), [(s, r)]))
            if kind == "person":
                # a combined passage (two facts) and a job sentence, which mentions no asked fact
                if rng.random() < 0.4:
                    texts.append((s, f"{s} was born in {e['born_in']} in {e['birth_year']}.",
                                  [(s, "born_in"), (s, "birth_year")]))
                texts.append((s, f"{s} worked as a {e['job']}.", []))
    # Mention passages: an entity appears, no asked fact about it does (the title is the other entity).
    pick = partial(pick_in_pool, world, by_type, rng=rng)
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
        passages.append({"id": str(i), "contents": f'"{title}"\n{text}'})
        for f in facts:
            stating[f].append(str(i))
    return passages, stating

# ----------------------------------------------------------------------------------------------------------------------
# Questions


def make_split(world, heads_of, split, n, known_share, seen_questions, rng):
    """n questions for one split. Known questions are few per type (4-hop needs a fully known band chain): dev and
    test are built first and must get their quota; train makes up the known ones it cannot get with unknown ones."""
    out, shortfall = [], 0
    for qtype in QTYPES:
        n_type = round(n * TYPE_SHARE[qtype]) if qtype != QTYPES[-1] else n - len(out)
        n_known = round(n_type * known_share)
        for want_known, count in ((True, n_known), (False, n_type - n_known)):
            pool = "known" if want_known else split
            count += shortfall  # the known questions train could not make, else 0
            made, tries = 0, 0
            while made < count and tries < 50 * count + 500:
                tries += 1
                q = teacher.make_question(world, heads_of[pool], qtype, pool, want_known, rng)
                # known questions may repeat across splits only if the question text differs
                if q is not None and q["question"] not in seen_questions:
                    seen_questions.add(q["question"])
                    out.append(q)
                    made += 1
            if made < count and not (split == "train" and want_known):
                raise SystemExit(f"could not make {count} {qtype} questions (known={want_known}) for {split}: "
                                 "world too small, raise --people/--companies/--bands")
            shortfall = count - made
    rng.shuffle(out)
    for i, q in enumerate(out):
        q["id"] = f"{split}_{i}"
    return out

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer

YEARS = range(1800, 2100)  # single tokens; world years are 1900-2039, renamed copies shift them by <= 30 (teacher.py)


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE, action tags as single tokens, every year 1800-2099 one token, other digits split one by one.

    Why a small vocabulary (--vocab-size): with a large one whole names become tokens, and a test entity's name is
    made of tokens no training text contains, which a small model cannot copy from a result. Test-answer tokens never
    seen in sft_mix+base (default world): 1.3% at 1000, 5% at 1500, 60% at 3000; 0.2% at 600, with 21% more tokens
    per trajectory. Why whole years: the model must COPY a year from a result; alone they made no measurable
    difference, stage 3 on the renamed copies did (README "What the 3.5M-parameter model needed")."""
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
# Everything above, in order, written to --out


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
    # the world as the teacher sees it (teacher.py)
    env = {"world": world, "by_type": by_type, "index": index, "search": tools.search_tool(index, k=args.topk),
           "calc": tools.calculator, "stating": stating, "args": args}

    # --- questions: every question text unique across splits
    heads_of = {pool: {kind: [n for n in names if world[n]["pool"] == pool] for kind, names in by_type.items()}
                for pool in POOLS}  # heads_of[pool][kind]: the entities a question of that pool may name
    seen = set()
    test = make_split(world, heads_of, "test", args.test, 1 / 3, seen, rng)
    dev = make_split(world, heads_of, "dev", args.dev, 1 / 3, seen, rng)
    splits = {"train": make_split(world, heads_of, "train", args.train, args.known_questions, seen, rng),
              "dev": dev, "test": test}

    # --- the scripted teacher on every question; its SFT data and its tool calls (teacher.py)
    runs, teacher_accuracy, guess_accuracy = teacher.run_all(splits, env)
    cot, coa, pairs, mix, mix_renamed = teacher.sft_data(splits["train"], runs, env)
    tool_calls = teacher.tool_calls(splits, runs)

    # --- base text: known facts in prose (several phrasings) + pure-CoT QA on known train questions
    base_facts = []
    for kind in ("city", "person", "company", "band"):
        rels = [r for r, v in RELATIONS.items() if v[0] == kind]
        base_facts += [" ".join(RELATIONS[r][4][rep % len(RELATIONS[r][4])].format(s=s, o=world[s][r]) for r in rels)
                       for s in by_type[kind] if world[s]["pool"] == "known" for rep in range(args.base_fact_repeats)]
    # The tokenizer sees only train-side text, as a real one never saw tomorrow's entities (see train_tokenizer)
    train_side = [p["contents"] for p in passages if world[p["contents"].split("\n")[0].strip('"')]["pool"]
                  in ("known", "train")]
    # None: no chat template, so the tokenizer can be trained on the exact prompt before it exists
    prompt_of = lambda question: build_prompt(None, question, args.prompt_template)  # noqa: E731
    texts_for_tokenizer = (train_side + base_facts + [prompt_of("")] + [q["question"] for q in splits["train"]]
                           + ["".join(s["text"] for s in row["segments"]) for row in cot + coa])
    tokenizer = train_tokenizer(texts_for_tokenizer, args.vocab_size)
    base = [{"text": t} for t in base_facts]
    base += [{"text": prompt_of(row["question"]) + "".join(s["text"] for s in row["segments"])} for row in cot]
    random.Random(args.seed + 4).shuffle(base)

    # --- --test-extra, then --rl: drawn last from their own RNGs, so every other file is the same bytes (see --help)
    extra = make_split(world, heads_of, "test", args.test_extra, 1 / 3, seen, random.Random(args.seed + 5))
    splits["test"] = splits["test"] + [{**q, "id": f"test_{i}"} for i, q in enumerate(extra, len(splits["test"]))]
    rl = make_split(world, heads_of, "train", args.rl, args.known_questions, seen, random.Random(args.seed + 6))
    if rl:
        splits["rl"] = [{**q, "id": f"rl_{i}"} for i, q in enumerate(rl)]

    # --- token lengths (what the trainers will see), summary
    lengths = defaultdict(list)
    for row in coa + cot:
        n = sum(len(tokenizer(s["text"], add_special_tokens=False)["input_ids"]) for s in row["segments"])
        lengths[row["type"] + ("_cot" if row in cot else "")].append(n)
    # train calls whose observation shows a test-pool entity (shared words: "Group", "head office"; kept rare)
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
        "teacher": teacher_accuracy,
        "no_tool_accuracy_unknown_by_type": guess_accuracy,
        "sft": {"cot": len(cot), "coa": len(coa), "mix": len(mix), "mix_renamed": len(mix_renamed), "pairs": len(pairs),
                "pairs_known": sum(p["known"] for p in pairs), "base_docs": len(base), "tool_calls": len(tool_calls)},
        "mean_response_tokens": {k: round(sum(v) / len(v), 1) for k, v in sorted(lengths.items())},
        "vocab_size": len(tokenizer),
        "train_calls_showing_test_entity": leaked,
    }

    # --- write everything (each file atomically); questions without their internal "plan" and "named"
    out, keys = args.out, ("id", "question", "golden_answers", "type", "hops", "known")
    questions = {split: [{k: q[k] for k in keys} for q in qs] for split, qs in splits.items()}
    files = {"corpus": passages, **questions,
             # the simulated RL steps' prompts (run.sh): the policy as simulator answers known questions from memory
             "train_unknown": [q for q in questions["train"] if not q["known"]],
             # --rl: its known questions, the real RL steps' prompts (run.sh): where the policy's memory is often wrong
             # and its simulator, which replays that memory, cannot show that a search would do better
             **({"rl_known": [q for q in questions["rl"] if q["known"]]} if "rl" in questions else {}),
             "base": base, "base_facts": [{"text": t} for t in base_facts],  # the same bytes with any questions
             "sft_cot": cot, "sft_coa": coa, "sft_mix": mix, "sft_mix_renamed": mix_renamed, "sft_pairs": pairs,
             "sft_pairs_decision": teacher.decision_pairs(pairs)[0], "tool_calls": tool_calls}
    for name, rows in files.items():
        write_atomic(os.path.join(out, f"{name}.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                 for r in rows))
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
    print(f"{'split':6} | " + " | ".join(types))
    for split, c in s["questions"].items():
        print(f"{split:6} | " + " | ".join(f"{c.get(t, 0):>{len(t)}}" for t in types) + f" | total {sum(c.values())}")
    print(f"{'split':6} | teacher acc | first-query top-3 hit | searches/q | no-tool acc (unknown)")
    for split, t in s["teacher"].items():
        print(f"{split:6} | {t['accuracy']:11.3f} | {t['first_query_top3_hit']:22.3f} | "
              f"{t['searches_per_question']:10.2f} | {t['no_tool_accuracy_unknown']:.3f}")
    print(f"no-tool acc on unknown questions by type (chance): {s['no_tool_accuracy_unknown_by_type']}")
    print(f"train tool calls whose observation shows a test entity: {s['train_calls_showing_test_entity']}")
    print(f"sft: {s['sft']}")
    print(f"mean response tokens: {s['mean_response_tokens']}")
    print(f"built in {s['seconds']} s")


if __name__ == "__main__":
    print_summary(build(sys.argv[1:]))
