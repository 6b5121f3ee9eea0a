"""world_model.py: the world model never receives a gold answer (signature and a spy on every token the model sees
during a real train + serve run), collect's split, the fidelity metrics on hand cases, a tiny model that memorises its
calls, and the served tool (batched == one at a time, odd queries never crash). A byte-level BPE trained on the test's
own texts and a 2-layer width-64 Llama keep the whole file at a few seconds of compute."""
import inspect
import json

import pytest
import torch
from transformers import LlamaForCausalLM

import data
import model as M
import world_model as W
from evaluate import normalize_answer

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)


def obs(*passages):
    """AutoCoA's observation text from (title, text) pairs."""
    return "\n".join(f'result {i}: "{t}"\n{x}' for i, (t, x) in enumerate(passages, 1))


# A world where every gold answer is a string no observation contains: a leak is visible in any model input.
CALLS = [
    {"tool": "search", "args": "who founded Velmor Works", "split": "train",
     "observation": obs(("Velmor Works", "Velmor Works was founded by Ada Rell in 1931."),
                        ("Velmor Works", "Velmor Works is headquartered in Dorn.")),
     "question": "Which city was the founder of Velmor Works born in?", "golden_answers": ["Quillane"]},
    {"tool": "search", "args": "where is Velmor Works headquartered", "split": "train",
     "observation": obs(("Velmor Works", "Velmor Works is headquartered in Dorn."),
                        ("Velmor Works", "Velmor Works was founded by Ada Rell in 1931.")),
     "question": "Where is the company whose founder is Ada Rell?", "golden_answers": ["Zephyrholm"]},
    {"tool": "search", "args": "where was Ada Rell born", "split": "train",
     "observation": obs(("Ada Rell", "Ada Rell was born in Tarsk."), ("Ada Rell", "Ada Rell was born in 1902.")),
     "question": "How old was Ada Rell when Velmor Works was founded?", "golden_answers": ["Xantippe Oyle"]},
    {"tool": "search", "args": "when was Ada Rell born", "split": "train",
     "observation": obs(("Ada Rell", "Ada Rell was born in 1902."), ("Ada Rell", "Ada Rell was born in Tarsk.")),
     "question": "In which year was the Velmor founder born?", "golden_answers": ["Wuthering Vale"]},
    {"tool": "search", "args": "which label are The Kors signed to", "split": "dev",
     "observation": obs(("The Kors", "The Kors is signed to Brin Labs."), ("The Kors", "The Kors was formed in Omst.")),
     "question": "Which label signed the band formed in Omst?", "golden_answers": ["Yarrowby"]},
]
GOLDS = [g for c in CALLS for g in c["golden_answers"]] + [c["question"] for c in CALLS]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DIR with tokenizer/ and calls.jsonl (the CALLS above, leaky fields included, as a careless log would have)."""
    root = tmp_path_factory.mktemp("wm")
    texts = [W.wm_prompt(c["tool"], c["args"]) + c["observation"] for c in CALLS] + GOLDS
    data.train_tokenizer(texts * 4, 400).save_pretrained(root / "tokenizer")
    with open(root / "calls.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in CALLS)
    return root


def tiny(world, seed=0):
    return M.load("tiny", tokenizer=str(world / "tokenizer"), config_overrides=SMALL, seed=seed)


# -----------------------------------------------------------------------------
# The world model never receives a gold answer


@pytest.fixture(scope="module")
def tok(world):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(world / "tokenizer")


def test_input_builder_takes_only_the_call(tok):
    """The one builder of the world model's input has no parameter through which a question or answer could come, and
    a training example's loss covers exactly the observation and its closing tag."""
    assert list(inspect.signature(W.wm_prompt).parameters) == ["tool", "args"]
    assert list(inspect.signature(W.policy_sim_segments).parameters) == ["tokenizer", "tool", "args", "template"]
    ids, loss_mask, _ = W.wm_example(tok, CALLS[0])
    prompt = tok.decode([i for i, m in zip(ids, loss_mask) if m == 0])
    target = tok.decode([i for i, m in zip(ids, loss_mask) if m == 1])
    assert prompt == "<begin_search> who founded Velmor Works </end_search>\n<search_result>\n"
    assert target == CALLS[0]["observation"] + "\n</search_result>"


def test_no_gold_answer_reaches_the_model(world, tok, monkeypatch):
    """Spy on every token sequence the model is run on (training forward passes and served generation) during the real
    CLI train run and a served batch. The calls file carries each question and gold answer, as a careless log would;
    none may appear in what the model sees. The spy is checked to be live: the observations DO appear."""
    seen = []
    forward = LlamaForCausalLM.forward

    def spy(self, input_ids=None, *args, **kwargs):
        if input_ids is not None:
            seen.extend(input_ids.tolist())
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", spy)
    monkeypatch.setattr(M, "TINY_CONFIG", {**M.TINY_CONFIG, **SMALL})
    out = world / "wm_cli"
    W.main(W.parse_args(["train", "--calls", str(world / "calls.jsonl"), "--init", "tiny", "--tokenizer",
                         str(world / "tokenizer"), "--out", str(out), "--epochs", "2", "--batch-size", "2",
                         "--device", "cpu"]))
    registry = W.load_world_model_tools(str(out), max_obs_tokens=8)
    registry([("search", c["args"]) for c in CALLS] + [("calculator", "1 + 1")])
    texts = [tok.decode([t for t in row if t != tok.pad_token_id]) for row in seen]
    assert any("Ada Rell was born in Tarsk" in t for t in texts), "spy saw no training observation: not live"
    assert any(t == W.wm_prompt("search", CALLS[4]["args"]) for t in texts), "spy saw no served prompt"
    for gold in GOLDS:
        assert not any(gold in t for t in texts), f"gold text {gold!r} reached the world model"
    # and the checkpoint is loadable as a plain HF model
    assert LlamaForCausalLM.from_pretrained(out).config.hidden_size == SMALL["hidden_size"]
    assert json.load(open(out / "run_args.json"))["calls"].endswith("calls.jsonl")


# -----------------------------------------------------------------------------
# collect: dedup, failed calls dropped, split flags measured


def test_collect_split(tmp_path):
    """Duplicates (case and spacing), failed calls, other tools and simulated log rows are dropped; dev-question calls
    are held out; one call per training entity is held out; entity_seen matches its definition; no question travels."""
    rows = [dict(c) for c in CALLS]
    rows += [dict(CALLS[0], args="  WHO founded   velmor works "),  # duplicate after normalisation
             {"tool": "search", "args": "nothing", "observation": "Retrieval failed: server down", "split": "train"},
             {"tool": "calculator", "args": "1 + 1", "observation": "2", "split": "train"}]
    with open(tmp_path / "tool_calls.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(tmp_path / "rl.jsonl", "w") as f:  # a rollout log: real calls kept, simulated ones skipped
        f.write(json.dumps({"calls": [{"tool": "search", "args": "where was The Kors formed",
                                       "observation": obs(("The Kors", "The Kors was formed in Omst.")),
                                       "split": "dev"},
                                      {"tool": "search", "args": "made up", "observation": obs(("X", "X is Y.")),
                                       "simulated": True}]}) + "\n")
    calls = W.split_calls(W.read_calls(tmp_path / "tool_calls.jsonl", [tmp_path / "rl.jsonl"]), heldout_frac=0.5,
                          unseen_frac=0.0, seed=0)
    assert len(calls) == 6 and {c["tool"] for c in calls} == {"search"}
    assert not any("question" in c or "golden_answers" in c for c in calls), "collect must not carry questions on"
    train = [c for c in calls if c["split"] == "train"]
    heldout = [c for c in calls if c["split"] == "heldout"]
    assert {c["args"] for c in heldout} >= {"which label are The Kors signed to", "where was The Kors formed"}
    assert len(heldout) == 4  # 2 dev calls + one per training entity with >= 2 calls (half of 4 train calls)
    train_passages = {p for c in train for p in W.split_results(c["observation"])}
    for c in heldout:
        assert c["entity_seen"] == (W.split_results(c["observation"])[0] in train_passages)
    assert sum(c["entity_seen"] for c in heldout) == 2 and sum(not c["entity_seen"] for c in heldout) == 2


def test_collect_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "tool_calls.jsonl"
    path.write_text(json.dumps(CALLS[0]) + "\n" + json.dumps({"tool": "search", "args": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"tool_calls.jsonl:2: missing field 'observation'"):
        W.read_calls(path)


# -----------------------------------------------------------------------------
# Fidelity metrics on hand cases


def test_answer_facts_and_recall():
    real = obs(("Dinarn Parner", "Dinarn Parner was born in Fenkrorth."),
               ("Dinarn Parner", "Dinarn Parner was born in 1970."),
               ("Dinarn Parnez", "Dinarn Parnez was born in Olk."))  # another entity's passage: not this query's facts
    facts = W.answer_facts("when was Dinarn Parner born", real)
    assert facts == ["fenkrorth", "1970"]
    assert W.answer_facts("when was Dinarn Parner born", real, top_k=1) == ["fenkrorth"]
    assert W.fact_recall(facts, real) == 1.0
    assert W.fact_recall(facts, obs(("Dinarn Parner", "Dinarn Parner was born in 1970 in Tarsk."))) == 0.5
    assert W.fact_recall(facts, "result 1: 19700 Fenkrorthia") == 0.0  # whole words only
    assert W.fact_recall([], real) is None  # no facts: not counted, rather than a free 1.0
    company = obs(("Velmor Works", "Velmor Works was founded by Ada Rell in 1931. It is in New South Dorn."))
    assert W.answer_facts("who founded Velmor Works", company) == ["ada rell", "1931", "new south dorn"]
    assert W.answer_facts("q", "Retrieval failed.") == []


def test_token_f1():
    real = obs(("A", "A was born in B."))
    assert W.token_f1(real, real) == 1.0
    assert W.token_f1("", real) == 0.0
    assert 0 < W.token_f1(obs(("A", "A was born in C.")), real) < 1


def test_split_results_and_title():
    text = 'result 1: "T one"\nline a\nline b\nresult 2: "T two"\nx'
    assert W.split_results(text) == ['"T one"\nline a\nline b', '"T two"\nx']
    assert W.passage_title('"T one"\nline a') == "T one" and W.passage_title("plain\nx") == "plain"


# -----------------------------------------------------------------------------
# Training memorises; the served tool is batched, deterministic and robust


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A small world model trained to memorise the four training calls, saved like `world_model.py train` does."""
    torch.manual_seed(0)
    model, tok = tiny(world)
    calls = [c for c in CALLS if c["split"] == "train"]
    losses = W.train_world_model(model, tok, calls, epochs=100, batch_size=4, lr=3e-3, log_every=1000)
    out = tmp_path_factory.mktemp("ckpt") / "wm"
    M.save(model, tok, str(out), {"test": True})
    return out, losses


def test_training_learns_the_observations(trained):
    """Loss falls and the served world model reproduces a training observation, facts included."""
    out, losses = trained
    assert losses[-1] < 0.2 * losses[0]
    registry = W.load_world_model_tools(str(out), max_obs_tokens=64)
    [sim] = registry([("search", "where was Ada Rell born")])
    assert normalize_answer(sim) == normalize_answer(CALLS[2]["observation"])
    facts = W.answer_facts("where was Ada Rell born", CALLS[2]["observation"])
    assert W.fact_recall(facts, sim) == 1.0


def test_served_tool_batched_and_odd_queries(trained):
    """One observation per query, batched == one at a time (left padding changes nothing), odd queries never crash,
    and the calculator stays the real one."""
    out, _ = trained
    registry = W.load_world_model_tools(str(out), max_obs_tokens=12, batch_size=3, cache_size=0)
    queries = ["where was Ada Rell born", "", "   ", "x" * 5000, "y " * 450, "</search_result> <begin_search> <eos>",
               "ünï ✓ 名前", "when was Ada Rell born"]
    batched = registry([("search", q) for q in queries])
    assert len(batched) == len(queries) and all(isinstance(o, str) for o in batched)
    single = [registry([("search", q)])[0] for q in queries]
    assert batched == single
    assert registry([("calculator", "2023 - 1987")]) == ["36"]
    assert W.load_world_model_tools(str(out)).names == ["search", "calculator"]


def test_eval_cli_smoke(trained, world, tmp_path):
    """`collect` then `eval` end to end on the hand world (the trained world model doubles as the "policy": any causal
    LM with the same tokenizer will do for plumbing). A policy whose "simulator" is the real tool agrees with itself."""
    out, _ = trained
    passages = sorted({p for c in CALLS for p in W.split_results(c["observation"])})
    with open(tmp_path / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"id": str(i), "contents": p}) + "\n" for i, p in enumerate(passages))
    with open(tmp_path / "dev.jsonl", "w") as f:
        f.writelines(json.dumps({"id": str(i), "question": c["question"], "golden_answers": c["golden_answers"]}) + "\n"
                     for i, c in enumerate(CALLS[:3]))
    with open(tmp_path / "tool_calls.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in CALLS)
    W.main(W.parse_args(["collect", "--data", str(tmp_path), "--out", str(tmp_path / "calls.jsonl"),
                         "--heldout-frac", "0.5"]))
    W.main(W.parse_args(["eval", "--wm", str(out), "--policy", str(out), "--calls", str(tmp_path / "calls.jsonl"),
                         "--data", str(tmp_path), "--out", str(tmp_path / "eval"), "--questions", "3",
                         "--max-new-tokens", "48", "--max-obs-tokens", "24", "--device", "cpu"]))
    report = json.load(open(tmp_path / "eval" / "fidelity.json"))
    for simulator in ("world_model", "policy_as_wm"):
        assert report["fidelity"][simulator]["all"]["n"] == 3  # the dev call + one per training entity
        assert set(report["reward_agreement"][simulator]) >= {"em", "agreement", "agreement_seen", "agreement_unseen"}
    details = [json.loads(line) for line in open(tmp_path / "eval" / "fidelity_calls.jsonl")]
    assert len(details) == 6 and all(0 <= d["f1"] <= 1 for d in details)

    model, tok = M.load(str(out))
    from tools import make_tools
    same = W.reward_agreement(model, tok, [json.loads(line) for line in open(tmp_path / "dev.jsonl")],
                              make_tools(corpus=str(tmp_path / "corpus.jsonl")),
                              {"real_again": (make_tools(corpus=str(tmp_path / "corpus.jsonl")), "real")},
                              W.BM25Index.from_jsonl(tmp_path / "corpus.jsonl"), set(), max_new_tokens=48)
    assert same["real_again"]["agreement"] == 1.0


# -----------------------------------------------------------------------------
# Issue 13: bad collect / train inputs fail with file, line and field instead of being silently misread


@pytest.mark.parametrize("bad,message", [
    ({"observation": 7}, r"tool_calls\.jsonl:2: field 'observation' must be a string, got a number"),
    ({"args": None}, r"tool_calls\.jsonl:2: field 'args' must be a string, got null"),  # was the query "None"
    ({"tool": ["search"]}, r"tool_calls\.jsonl:2: field 'tool' must be a string, got a list"),
])
def test_collect_rejects_wrong_field_types(tmp_path, bad, message):
    """An int observation, "args": null and a list as tool name used to be read (and "None" became a query, or it
    crashed deep in split_calls); now collect stops at the line, naming file, line and field, and writes nothing."""
    with open(tmp_path / "tool_calls.jsonl", "w") as f:
        f.write(json.dumps(CALLS[0]) + "\n" + json.dumps({**CALLS[1], **bad}) + "\n")
    out = tmp_path / "wm_calls.jsonl"
    with pytest.raises(ValueError, match=message):
        W.main(W.parse_args(["collect", "--data", str(tmp_path), "--out", str(out)]))
    assert not out.exists()
    with pytest.raises(ValueError, match=message):
        W.read_calls(tmp_path / "tool_calls.jsonl")


def test_collect_rejects_bad_rollout_log_calls(tmp_path):
    """Rollout logs: a call inside "calls" with a wrong type, or "calls" that is not a list of objects."""
    with open(tmp_path / "tool_calls.jsonl", "w") as f:
        f.write(json.dumps(CALLS[0]) + "\n")
    log = tmp_path / "rl.jsonl"
    log.write_text(json.dumps({"calls": [CALLS[1], {**CALLS[2], "args": None}]}) + "\n")
    with pytest.raises(ValueError, match=r"rl\.jsonl:1: calls\[1\] field 'args' must be a string, got null"):
        W.read_calls(tmp_path / "tool_calls.jsonl", [log])
    log.write_text("\n" + json.dumps({"calls": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"rl\.jsonl:2: field 'calls' must be a list of objects, got a string"):
        W.read_calls(tmp_path / "tool_calls.jsonl", [log])
    log.write_text(json.dumps({**CALLS[1], "observation": 3.5}) + "\n")  # a log row that is itself the call
    with pytest.raises(ValueError, match=r"rl\.jsonl:1: field 'observation' must be a string, got a number"):
        W.read_calls(tmp_path / "tool_calls.jsonl", [log])
    log.write_text("")  # an empty rollout log is fine: an RL run with only simulated steps makes no real calls
    assert len(W.read_calls(tmp_path / "tool_calls.jsonl", [log])) == 1


def test_collect_empty_or_unusable_calls_file_writes_nothing(tmp_path):
    """An empty tool_calls.jsonl used to give an empty output file (and a confusing failure later, in train); so did a
    file whose every call failed. Both now name the file and write nothing. A non-UTF-8 line names file and line."""
    (tmp_path / "tool_calls.jsonl").write_text("\n")
    out = tmp_path / "wm_calls.jsonl"
    with pytest.raises(ValueError, match=r"tool_calls\.jsonl: no calls \(the file is empty\)"):
        W.main(W.parse_args(["collect", "--data", str(tmp_path), "--out", str(out)]))
    assert not out.exists()
    (tmp_path / "tool_calls.jsonl").write_text(json.dumps({"tool": "search", "args": "x", "split": "train",
                                                           "observation": "Retrieval failed: down"}) + "\n")
    with pytest.raises(ValueError, match=r"tool_calls\.jsonl: none of the 1 calls is a usable search call"):
        W.main(W.parse_args(["collect", "--data", str(tmp_path), "--out", str(out)]))
    assert not out.exists()
    (tmp_path / "tool_calls.jsonl").write_bytes(json.dumps(CALLS[0]).encode() + b"\n" + b'{"args": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"tool_calls\.jsonl:2: not valid UTF-8"):
        W.main(W.parse_args(["collect", "--data", str(tmp_path), "--out", str(out)]))


@pytest.mark.parametrize("bad,message", [
    ({"observation": 7}, r"calls\.jsonl:2: field 'observation' must be a string, got a number"),
    ({"args": None}, r"calls\.jsonl:2: field 'args' must be a string, got null"),
    ({"tool": ["search"]}, r"calls\.jsonl:2: field 'tool' must be a string, got a list"),
    ({"split": None}, r"calls\.jsonl:2: field 'split' must be a string, got null"),
    (None, r"calls\.jsonl: no calls \(the file is empty\)"),
])
def test_train_rejects_bad_calls_file(tmp_path, bad, message):
    """`train` checks its calls file before loading any model: wrong field types and an empty file name the file (and
    line and field). Before, an empty file failed on a bare assert, and "args": null trained on the query "None"."""
    path = tmp_path / "calls.jsonl"
    path.write_text("" if bad is None else json.dumps(CALLS[0]) + "\n" + json.dumps({**CALLS[1], **bad}) + "\n")
    with pytest.raises(ValueError, match=message):
        W.main(W.parse_args(["train", "--calls", str(path), "--init", "tiny", "--tokenizer", str(tmp_path / "none"),
                             "--out", str(tmp_path / "wm"), "--device", "cpu"]))
    assert not (tmp_path / "wm").exists()


def test_known_entity_calls(tmp_path):
    """collect --known-calls: every base_facts entity (whichever phrasing its row starts with) gets its type's
    teacher.RELATIONS query forms, answered by the real search; a query collect already has is not repeated, an
    entity with an unseen held-out call gets none (it stays unseen), and a row no phrasing explains names its line."""
    facts = ["Kafenl Baisai is a native of Gudar. The birth year of Kafenl Baisai is 1958.",
             "Kafenl Baisai is the founder of Bote Foods. Bote Foods was founded in 1983.",
             "Gudar is a city in Nistar.",
             "Vumes Thedres was born in Gudar."]
    (tmp_path / "base_facts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in facts))
    passages = [f'"{e}"\n{t}' for e, t in [("Kafenl Baisai", "Kafenl Baisai was born in 1958."),
                                           ("Bote Foods", "Bote Foods opened its doors in 1983."),
                                           ("Gudar", "Gudar lies in Nistar."), ("Vumes Thedres", "Vumes Thedres x.")]]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": c}) + "\n" for i, c in enumerate(passages)))
    have = [{"tool": "search", "args": "Who  founded Bote Foods", "entity": "Bote Foods", "split": "train",
             "entity_seen": True},
            {"tool": "search", "args": "Vumes Thedres", "entity": "Vumes Thedres", "split": "heldout",
             "entity_seen": False}]
    rows = W.known_entity_calls(str(tmp_path / "base_facts.jsonl"), str(corpus), have)
    assert all(r["split"] == "train" and r["entity_seen"] for r in rows)
    by_entity = {e: sorted(r["args"] for r in rows if r["entity"] == e) for e in ("Kafenl Baisai", "Bote Foods")}
    assert len(by_entity["Kafenl Baisai"]) == 6 and "when was Kafenl Baisai born" in by_entity["Kafenl Baisai"]
    assert len(by_entity["Bote Foods"]) == 5 and "who founded Bote Foods" not in by_entity["Bote Foods"]
    assert sorted(r["args"] for r in rows if r["entity"] == "Gudar") == ["Gudar city country lies",
                                                                         "which country is Gudar in"]
    assert not any("Vumes" in r["args"] for r in rows) and len(rows) == 13
    assert all(r["observation"].startswith(f'result 1: "{r["entity"]}"') for r in rows)
    (tmp_path / "base_facts.jsonl").write_text(json.dumps({"text": "Gudar is a city in Nistar."}) + "\n"
                                               + json.dumps({"text": "Nothing known."}) + "\n")
    with pytest.raises(ValueError, match="base_facts.jsonl:2"):
        W.known_entity_calls(str(tmp_path / "base_facts.jsonl"), str(corpus), have)
