"""data.py and teacher.py: the embedded world and its scripted teacher. One small world is built once per module (and
a second time for determinism)."""
import json
import os
import random
import re

import pytest

import data
import teacher
import tools

SMALL = ["--people", "150", "--companies", "60", "--bands", "40", "--cities", "20", "--train", "200", "--dev", "40",
         "--test", "90", "--vocab-size", "600"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    summary = data.build(["--out", out] + SMALL)
    args = data.get_args(["--out", out] + SMALL)
    entities, by_type = data.make_world(args, random.Random(args.seed))  # make_world is the seed's first consumer
    d = {name: read_jsonl(os.path.join(out, name + ".jsonl"))
         for name in ("corpus", "train", "dev", "test", "base", "sft_cot", "sft_coa", "sft_mix", "sft_pairs",
                      "tool_calls", "sft_mix_renamed", "base_facts", "sft_pairs_decision")}
    return {"out": out, "summary": summary, "entities": entities, "by_type": by_type, **d}


def names_regex(names):
    # word boundaries: "Kato Vel" must not match inside "Kato Velmor"
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b")


def trajectory_text(segments):
    return "".join(s["text"] for s in segments)


def boxed_answer(text):
    after = text.split(tools.THINK_CLOSE)[-1]
    found = re.findall(r"\\boxed\{([^}]*)\}", after)
    return found[-1] if found else None


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = str(tmp_path / "again")
    data.build(["--out", again] + SMALL)
    a, b = all_files(world["out"]), all_files(again)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs between two builds with the same seed"
    other = str(tmp_path / "other")
    data.build(["--out", other, "--seed", "1"] + SMALL)
    assert all_files(other)["corpus.jsonl"] != a["corpus.jsonl"]


def test_test_extra_adds_test_questions_and_changes_no_other_file(world, tmp_path):
    """--test-extra N (run.sh: 900): N more test questions drawn after everything else, from their own RNG, so every
    other file is the same bytes and the first --test questions are the same ones; ids continue, all texts unique."""
    more = str(tmp_path / "more")
    data.build(["--out", more, "--test-extra", "60"] + SMALL)
    a, b = all_files(world["out"]), all_files(more)
    assert sorted(a) == sorted(b)
    for name in a:
        if name not in ("test.jsonl", "summary.json"):
            assert a[name] == b[name], f"{name} changed with --test-extra"
    old = [json.loads(line) for line in a["test.jsonl"].splitlines()]
    new = [json.loads(line) for line in b["test.jsonl"].splitlines()]
    assert len(old) == 90 and len(new) == 150 and new[:90] == old
    assert [q["id"] for q in new] == [f"test_{i}" for i in range(150)]
    texts = {json.loads(line)["question"] for name in ("train.jsonl", "dev.jsonl") for line in b[name].splitlines()}
    assert len({q["question"] for q in new}) == 150 and not texts & {q["question"] for q in new}


def test_rl_questions_are_new_and_change_no_other_file(world, tmp_path):
    """--rl N: N questions for RL alone (rl.jsonl), drawn after everything else (after --test-extra's too): every other
    file but summary.json is the same bytes, and no question text of any other split, SFT's included, repeats there."""
    rl = str(tmp_path / "rl")
    data.build(["--out", rl, "--rl", "40"] + SMALL)
    a, b = all_files(world["out"]), all_files(rl)
    assert sorted(b) == sorted([*a, "rl.jsonl", "rl_known.jsonl"])
    for name in a:
        if name != "summary.json":
            assert a[name] == b[name], f"{name} changed with --rl"
    qs = [json.loads(line) for line in b["rl.jsonl"].splitlines()]
    assert [q["id"] for q in qs] == [f"rl_{i}" for i in range(40)] and all(q["golden_answers"] for q in qs)
    others = {json.loads(line)["question"] for name in ("train.jsonl", "dev.jsonl", "test.jsonl")
              for line in b[name].splitlines()}
    assert len({q["question"] for q in qs}) == 40 and not others & {q["question"] for q in qs}
    assert json.loads(b["summary.json"])["questions"]["rl"]
    known = [line for line in b["rl.jsonl"].splitlines(keepends=True) if json.loads(line)["known"]]
    assert 0 < len(known) < 40 and b["rl_known.jsonl"] == b"".join(known)  # rl.jsonl's known lines, in order


def test_train_unknown_is_train_without_known_questions(world):
    """train_unknown.jsonl (run.sh's simulated RL prompts) is train.jsonl's lines whose question is not known, in order
    and byte for byte (what `grep -v '"known": true' train.jsonl` gives)."""
    files = all_files(world["out"])
    lines = files["train.jsonl"].splitlines(keepends=True)
    unknown = [line for line in lines if not json.loads(line)["known"]]
    assert 0 < len(unknown) < len(lines) and files["train_unknown.jsonl"] == b"".join(unknown)


def test_layout_and_fields(world):
    for name in ("corpus.jsonl", "summary.json", "tokenizer/tokenizer.json"):
        assert os.path.exists(os.path.join(world["out"], name))
    assert not [n for n in os.listdir(world["out"]) if n.startswith(".tmp")], "temporary files left behind"
    for p in world["corpus"]:
        assert set(p) == {"id", "contents"} and re.match(r'^"[^"\n]+"\n\S', p["contents"])
    qtypes = set(data.QTYPES)
    for split in ("train", "dev", "test"):
        assert len({q["id"] for q in world[split]}) == len(world[split])
        for q in world[split]:
            assert set(q) == {"id", "question", "golden_answers", "type", "hops", "known"}
            assert q["type"] in qtypes and 1 <= q["hops"] <= 4 and q["golden_answers"]
    # test has every type with both known and unknown questions
    assert {(q["type"], q["known"]) for q in world["test"]} == {(t, k) for t in qtypes for k in (True, False)}
    questions = [q["question"] for s in ("train", "dev", "test") for q in world[s]]
    assert len(set(questions)) == len(questions), "a question text repeats across splits"


def test_no_test_entity_leaks_into_training_text(world):
    """Test-unknown questions name only test-pool entities; no training question, reasoning text or base document ever
    names a test-pool entity. Observations are what BM25 really returned, so a reformulated query ("X Group
    headquartered head office") can pull in another pool's passage through shared words: that must stay rare, and
    summary.json must count it honestly."""
    ents = world["entities"]
    test_pool = names_regex([n for n, e in ents.items() if e["pool"] == "test"])
    policy = lambda segs: "".join(s["text"] for s in segs if s["kind"] == "policy")  # noqa: E731
    train_side = ([q["question"] for q in world["train"]] + [r["text"] for r in world["base"]]
                  + [policy(r["segments"]) for r in world["sft_mix"] + world["sft_cot"] + world["sft_coa"]
                     + world["sft_mix_renamed"]]
                  + [policy(r["prefix"] + r["chosen"] + r["rejected"]) for r in world["sft_pairs"]]
                  + [c["args"] for c in world["tool_calls"]])
    leaks = [t for t in train_side if test_pool.search(t)]
    assert not leaks, f"test entity in training text: {leaks[0][:200]}"
    train_calls = [c for c in world["tool_calls"] if c["split"] == "train"]
    obs_leaks = sum(bool(test_pool.search(c["observation"])) for c in train_calls)
    assert obs_leaks == world["summary"]["train_calls_showing_test_entity"]
    assert obs_leaks <= 0.02 * len(train_calls), f"{obs_leaks} of {len(train_calls)} train calls show a test entity"
    unknown_named = set()
    for q in world["test"]:
        if not q["known"]:
            unknown_named |= set(test_pool.findall(q["question"]))
            assert test_pool.search(q["question"]), f"test unknown question names no test entity: {q}"
    train_named = {n for q in world["train"] for n in names_regex(unknown_named).findall(q["question"])}
    assert not train_named
    assert {c["split"] for c in world["tool_calls"]} == {"train", "dev"}


def test_base_has_known_facts_only(world):
    ents = world["entities"]
    base = "\n".join(r["text"] for r in world["base"])
    unknown = names_regex([n for n, e in ents.items() if e["pool"] != "known"])
    assert not unknown.search(base), "an unknown entity is named in base.jsonl"
    for name, e in ents.items():
        if e["pool"] == "known" and e["type"] == "person":
            assert teacher.FACT_SENTENCE["born_in"].format(s=name, o=e["born_in"]) in base
    # base QA documents are the exact training prompt (model.build_prompt) followed by a pure-CoT response
    from model import build_prompt
    qa = [r["text"] for r in world["base"] if "\nQuestion: " in r["text"]]
    cot = {build_prompt(None, r["question"]) + trajectory_text(r["segments"]) for r in world["sft_cot"]}
    assert qa and set(qa) == cot
    # base_facts.jsonl (a pretrained model's base stage) is exactly the prose part of base.jsonl
    assert sorted(r["text"] for r in world["base_facts"]) == sorted(r["text"] for r in world["base"]
                                                                  if "\nQuestion: " not in r["text"])


def test_observations_are_what_the_tools_return(world):
    """Re-run every teacher call: each observation segment equals format_observation(tool, real tool output)."""
    index = tools.BM25Index.from_jsonl(os.path.join(world["out"], "corpus.jsonl"))
    run = {"search": tools.search_tool(index, k=3), "calculator": tools.calculator}
    pattern = re.compile(r"<begin_(\w+)> (.*?) </end_\1>$")
    segment_lists = ([r["segments"] for r in world["sft_coa"] + world["sft_mix"]]
                     + [r["prefix"] + r["chosen"] for r in world["sft_pairs"]]
                     + [r["prefix"] + r["rejected"] for r in world["sft_pairs"]])
    checked = 0
    for segs in segment_lists:
        for prev, seg in zip(segs, segs[1:]):
            if seg["kind"] != "obs":
                continue
            m = pattern.search(prev["text"])
            assert prev["kind"] == "policy" and m, f"observation not preceded by an action: {prev['text'][-80:]}"
            tool, arg = m.group(1), m.group(2)
            assert seg["text"] == tools.format_observation(tool, run[tool]([arg])[0])
            checked += 1
    for c in world["tool_calls"]:
        assert c["observation"] == run[c["tool"]]([c["args"]])[0]
    assert checked > len(world["sft_coa"])


def test_trajectory_format_and_teacher_answers(world):
    for r in world["sft_cot"] + world["sft_coa"]:
        segs = r["segments"]
        text = trajectory_text(segs)
        assert segs[0]["kind"] == "policy" and not text.startswith(tools.THINK_OPEN)  # the prompt ends with <think>
        assert text.count(tools.THINK_CLOSE) == 1 and segs[-1]["kind"] == "policy"
        assert all(a["kind"] != b["kind"] for a, b in zip(segs, segs[1:])), "segments must alternate"
        assert boxed_answer(text) in r["golden_answers"]
        assert ("<begin_" in text) == (r in world["sft_coa"]), "CoA rows act, CoT rows never do"
    n_cot_in_mix = sum(r["id"] in {c["id"] for c in world["sft_cot"]} for r in world["sft_mix"])
    assert n_cot_in_mix == len(world["sft_coa"]) // 5 and len(world["sft_mix"]) == len(world["sft_coa"]) + n_cot_in_mix
    # arithmetic unknown questions go through the calculator
    assert any("<begin_calculator>" in trajectory_text(r["segments"]) for r in world["sft_coa"])


def test_teacher_accuracy_and_no_tool_chance(world):
    for split, t in world["summary"]["teacher"].items():
        assert t["accuracy"] > 0.95, f"{split}: teacher accuracy {t['accuracy']}"
        # retrieval is good but not perfect: the teacher's first query sometimes misses and it must reformulate
        assert 0.5 < t["first_query_top3_hit"] < 1.0, f"{split}: first query hit rate {t['first_query_top3_hit']}"
        # forbidden to act, the teacher guesses unknown facts: chance (comparisons are 50/50, the rest ~1/|type|)
        assert t["no_tool_accuracy_unknown"] < 0.3, f"{split}: no-tool accuracy {t['no_tool_accuracy_unknown']}"


def test_renamed_copies(world):
    """sft_mix_renamed = sft_mix + 4 renamed copies of each CoA row (CoT rows repeated): in each copy no train-pool name
    word is left, no other pool's word appears, names map one to one, recalled known facts are untouched, years from
    observations move by one offset (calculator results stay true) and the answer is still the golden one."""
    ents, mix = world["entities"], {r["id"]: r for r in world["sft_mix"]}
    words = {pool: {w for n, e in ents.items() if e["pool"] == pool for w in n.split()} for pool in data.POOLS}
    train_only = words["train"] - words["known"] - {"The", *teacher.COMPANY_SUFFIXES}
    rows = world["sft_mix_renamed"]
    assert len(rows) == 5 * len(mix)
    copies = 0
    for r in rows:
        src = mix[r["id"].split("_renamed")[0]]
        if r["id"] == src["id"]:
            assert r == src
            continue
        copies += 1
        assert [s["kind"] for s in r["segments"]] == [s["kind"] for s in src["segments"]]
        text = r["question"] + trajectory_text(r["segments"])
        found = set(re.findall(r"\b[A-Z][a-z]+\b", text))
        assert not found & train_only, f"train name left in {r['id']}: {found & train_only}"
        assert not found & (words["dev"] | words["test"]) - words["known"] - words["train"]
        mapping = {}
        for a, b in zip(re.findall(r"\b[A-Z][a-z]+\b", src["question"] + trajectory_text(src["segments"])),
                        re.findall(r"\b[A-Z][a-z]+\b", text)):
            assert mapping.setdefault(a, b) == b, f"{a} renamed two ways in {r['id']}"
        assert len(set(mapping.values())) == len(mapping), f"two names renamed to one in {r['id']}"
        recalled = lambda t: re.findall(r"I know [^.]*\.", t)  # noqa: E731
        assert len(recalled(text)) == len(recalled(trajectory_text(src["segments"])))
        for a, b in zip(recalled(trajectory_text(src["segments"])), recalled(text)):
            assert re.findall(r"\d+", a) == re.findall(r"\d+", b)  # known facts keep their years
        offsets = {int(b) - int(a) for a, b in zip(teacher.YEAR.findall(trajectory_text(src["segments"])),
                                                   teacher.YEAR.findall(trajectory_text(r["segments"])))}
        assert len(offsets - {0}) <= 1
        for prev, seg in zip(r["segments"], r["segments"][1:]):
            m = re.search(r"<begin_calculator> (.*?) </end_calculator>$", prev["text"])
            if m:
                assert seg["text"] == tools.format_observation("calculator", tools.calculator([m.group(1)])[0])
        assert boxed_answer(trajectory_text(r["segments"])) in r["golden_answers"]
    assert copies == 4 * len(world["sft_coa"])


def test_contrastive_pairs(world):
    for r in world["sft_pairs"]:
        prefix, chosen, rejected = (trajectory_text(r[k]) for k in ("prefix", "chosen", "rejected"))
        assert prefix.rstrip().endswith(".") and "<begin_" not in prefix
        assert boxed_answer(chosen) in r["golden_answers"]
        if r["known"]:  # chosen answers from memory; rejected searches needlessly (and is right too)
            assert "<begin_" not in chosen and chosen.startswith(" I know")
            assert rejected.startswith(" <begin_search>") and boxed_answer(rejected) in r["golden_answers"]
        else:  # chosen acts right at the gap; rejected guesses without acting and ends wrong
            assert chosen.startswith(" <begin_search>")
            assert "<begin_" not in rejected and boxed_answer(rejected) not in r["golden_answers"]
    assert {r["known"] for r in world["sft_pairs"]} == {True, False}


def test_decision_pairs_differ_only_in_the_decision_token(world):
    """sft_pairs_decision.jsonl (teacher.decision_pairs: the smollm2 preset's stage 1): pairs of sft_pairs.jsonl, up
    to 250 known and 250 unknown, each cut after its first word: the whole contrast is " I" (answer from memory) vs
    " " (before <begin_search>)."""
    full = {r["id"]: r for r in world["sft_pairs"]}
    rows = world["sft_pairs_decision"]
    assert rows == teacher.decision_pairs(world["sft_pairs"])[0]
    for known in (True, False):  # 250 of each where the world has them
        assert sum(r["known"] == known for r in rows) == min(250, sum(r["known"] == known for r in full.values())) > 0
    for r in rows:
        answer, act = (" I", " ") if r["known"] else (" ", " I")
        assert trajectory_text(r["chosen"]) == answer and trajectory_text(r["rejected"]) == act
        assert r["cut"] is True  # train_sft stage 1 adds no EOS after a cut continuation
        assert {k: v for k, v in r.items() if k not in ("chosen", "rejected", "cut")} == \
            {k: v for k, v in full[r["id"]].items() if k not in ("chosen", "rejected")}
        assert trajectory_text(full[r["id"]]["chosen"]).startswith(trajectory_text(r["chosen"]))


def test_golden_answers_reachable_from_corpus(world):
    corpus = [p["contents"] for p in world["corpus"]]
    years = {}  # title -> set of years its passages state
    for c in corpus:
        title = c.split("\n")[0].strip('"')
        years.setdefault(title, set()).update(int(y) for y in re.findall(r"\b\d{4}\b", c.split("\n", 1)[1]))
    text = "\n".join(corpus)
    for split in ("train", "dev", "test"):
        for q in world[split]:
            if q["type"] == "arithmetic":
                p, c = re.match(r"How many years after (.+) was born was (.+) founded\?", q["question"]).groups()
                assert int(q["golden_answers"][0]) in {yc - yp for yc in years[c] for yp in years[p]}, q
            else:
                assert re.search(r"\b" + re.escape(q["golden_answers"][0]) + r"\b", text), q


def test_a_bad_query_fails(world):
    """Asking about the wrong entity (a same-first-name neighbour) does not retrieve the asked fact."""
    ents, index = world["entities"], tools.BM25Index(world["corpus"])
    people = world["by_type"]["person"]
    misses = 0
    for p in people[:40]:
        other = next(o for o in people if o != p)
        hits = [doc["contents"] for doc, _ in index.search([f"where was {other} born"], k=3)[0]]
        misses += not any(f"{p} was born in {ents[p]['born_in']}" in h for h in hits)
    assert misses == 40


def test_tokenizer(world):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(world["out"], "tokenizer"))
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.pad_token_id != tok.eos_token_id
    for tag in tools.special_tokens():
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == tag
    text = trajectory_text(world["sft_coa"][0]["segments"])
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    # a year is one token (the model copies it from results), other numbers are split digit by digit
    for y in (1900, 1957, 2013, 1870, 2069):
        ids = tok.encode(f"born in {y}.", add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids).count(str(y)) == 1 and tok.decode(ids) == f"born in {y}."
    assert len(tok.encode("13", add_special_tokens=False)) == 2


def test_bad_sizes_fail_clearly(tmp_path):
    with pytest.raises(AssertionError, match="world too small"):
        data.get_args(["--out", str(tmp_path), "--people", "5"])
    with pytest.raises(SystemExit, match="could not make"):
        data.build(["--out", str(tmp_path), "--people", "40", "--companies", "20", "--bands", "10", "--cities", "10",
                    "--train", "4000"])
