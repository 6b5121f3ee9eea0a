"""Tests for evaluate.py and report.py: the answer metrics on tricky cases (the RL reward uses them too), the question
loader's errors, the summary and tables, and one end-to-end run of a tiny model through a real retrieval server
process."""
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluate as ev  # noqa: E402
import report  # noqa: E402
import tools as tools_mod  # noqa: E402
from evaluate import cover_em, exact_match, extract_answer, f1, format_ok, normalize_answer  # noqa: E402

# -----------------------------------------------------------------------------
# normalize_answer / exact_match / f1 / cover_em


def test_normalize_squad_rules():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  A\tB\nC ") == "b c"  # "a" is an article even in upper case


def test_normalize_unicode():
    assert normalize_answer("Pandora’s Piñata") == normalize_answer("Pandora's Piñata") == "pandoras piñata"
    assert normalize_answer("ＵＳＡ １２") == "usa 12"  # NFKC: full-width letters and digits
    assert normalize_answer("Beyoncé — “Halo”") == "beyoncé halo"  # Unicode dash and quotes are punctuation
    assert normalize_answer("Piñata", strip_accents=True) == "pinata"
    assert exact_match("Pinata", ["Piñata"]) == 0.0  # accents kept by default (SQuAD behaviour)
    assert exact_match("Pinata", ["Piñata"], strip_accents=True) == 1.0


def test_numbers_punctuation_deleted_not_spaced():
    """SQuAD deletes punctuation, so a thousands separator vanishes: "1,000" == "1000" (and "1.5" == "15")."""
    assert exact_match("1,000", ["1000"]) == 1.0
    assert exact_match("1.5", ["15"]) == 1.0
    assert exact_match("1 000", ["1000"]) == 0.0


def test_aliases_and_case():
    golds = ["United Kingdom", "UK", "Great Britain"]
    assert exact_match("the uk", golds) == 1.0
    assert exact_match("United Kingdom of GB", golds) == 0.0
    assert f1("United Kingdom of GB", golds) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert exact_match("UK", "UK") == 1.0  # a bare string is one alias


def test_f1_max_over_aliases_and_yes_no():
    assert f1("Barack Obama", ["Obama", "Barack Hussein Obama"]) == pytest.approx(max(2 * 0.5 * 1 / 1.5, 0.8))
    assert f1("yes it is", ["yes"]) == 0.0  # HotpotQA rule: yes/no must match exactly
    assert f1("no", ["yes"]) == 0.0
    assert f1("yes", ["Yes."]) == 1.0


def test_empty_prediction_and_empty_golds():
    for metric in (exact_match, f1, cover_em):
        assert metric(None, ["Paris"]) == 0.0
        assert metric("", ["Paris"]) == 0.0
        assert metric("the", ["The"]) == 0.0  # both normalise to "": not a match
        assert metric("Paris", []) == 0.0
        assert metric("Paris", ["", "the", "Paris"]) == 1.0  # empty aliases are skipped, real ones still count


def test_cover_em_whole_words():
    assert cover_em("It was in Paris, France.", ["Paris"]) == 1.0
    assert cover_em("unknown", ["no"]) == 0.0  # substring inside a word does not count
    assert cover_em("Paris", ["Paris, France"]) == 0.0
    assert exact_match("It was in Paris", ["Paris"]) == 0.0


# -----------------------------------------------------------------------------
# extract_answer / format_ok


def test_extract_last_boxed_after_think():
    assert extract_answer("<think> hmm \\boxed{A} </think> so \\boxed{B} or rather \\boxed{C}") == "C"
    assert extract_answer("<think> \\boxed{A} </think> no box here") is None  # boxed before </think> not counted
    assert extract_answer("<think> x </think>\\boxed{ f(\\frac{1}{2}) }") == "f(\\frac{1}{2})"  # nested braces
    assert extract_answer("</think> \\boxed{\\text{Paris}}") == "Paris"
    assert extract_answer("</think> \\boxed {Rome}") == "Rome"
    assert extract_answer("</think> \\boxed{A} \\boxed{trunc") == "A"  # truncated last box is not an answer
    assert extract_answer("</think> \\boxed{}") == ""
    assert extract_answer("") is None


def test_extract_without_think_close_needs_flag():
    text = "<think> I guess \\boxed{Paris}"
    assert extract_answer(text) is None
    assert extract_answer(text, require_think_close=False) == "Paris"
    assert extract_answer("a </think> \\boxed{B}", require_think_close=False) == "B"


def test_format_ok():
    good = "<think> r <begin_search> q </end_search>\n<search_result>\nresult 1: x\n</search_result>\n r </think>\n" \
           "The answer is \\boxed{x}"
    assert format_ok(good) == (True, "ok")
    assert format_ok("<think> r \\boxed{x}") == (False, "no </think>")
    assert format_ok("<think> r </think> <begin_search> q </end_search> \\boxed{x}") == (False, "action after </think>")
    assert format_ok("<think> r </think> \\boxed{x} <calculator_result> 3 </calculator_result>")[0] is False
    assert format_ok("<think> \\boxed{x} </think> the answer is x") == (False, "no \\boxed{} after </think>")


def test_format_ok_checks_response_not_prompt():
    """Regression (SPEC 5): the original checked prompt+response; the prompt's own instructions contain </think>-like
    text and a \\boxed{}, so a response with no format at all still passed. Checking the response alone, it fails."""
    prompt = "Use <think></think> tags ... final answer in the format \\boxed{YOUR_ANSWER}.\n<think>"
    response = "I do not know"
    assert format_ok(prompt + response)[0] is True  # what the original saw
    assert format_ok(response) == (False, "no </think>")


# -----------------------------------------------------------------------------
# load_questions


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_load_questions_errors_name_file_line_field(tmp_path):
    ok = json.dumps({"id": 1, "question": "q?", "golden_answers": ["a"]})
    cases = [("{not json", "invalid JSON"), (json.dumps({"id": 2, "question": "q?"}), "field 'golden_answers'"),
             (json.dumps({"id": 2, "question": "q?", "golden_answers": "a"}), "field 'golden_answers'"),
             (json.dumps({"id": 2, "question": "", "golden_answers": ["a"]}), "field 'question'"),
             (json.dumps({"id": 1, "question": "other?", "golden_answers": ["a"]}), "repeats line 1")]
    for bad, message in cases:
        path = write_lines(tmp_path / "q.jsonl", [ok, bad])
        with pytest.raises(ValueError, match=rf"q\.jsonl:2: .*{message}"):
            ev.load_questions(path)


def test_load_questions_duplicates(tmp_path):
    """Ids are unique per dataset (the authors' file reuses "dev_265" across datasets); an exact duplicate line (their
    TriviaQA has one) is counted once, a conflicting one is an error (tested above)."""
    rows = [{"id": "x", "question": "q?", "golden_answers": ["a"], "dataset": d} for d in ("NQ", "HotpotQA", "NQ")]
    got = ev.load_questions(write_lines(tmp_path / "q.jsonl", [json.dumps(r) for r in rows]))
    assert [q["dataset"] for q in got] == ["NQ", "HotpotQA"]


def test_load_questions_limit_per_dataset(tmp_path):
    rows = [{"id": f"{d}{i}", "question": "q?", "golden_answers": ["a"], "dataset": d} for d in "AB" for i in range(4)]
    path = write_lines(tmp_path / "q.jsonl", [json.dumps(r) for r in rows] + [""])
    got = ev.load_questions(path, limit=2)
    assert [q["id"] for q in got] == ["A0", "A1", "B0", "B1"]
    assert len(ev.load_questions(path)) == 8


# -----------------------------------------------------------------------------
# evaluate() with a scripted engine: the bookkeeping (groups, averages, Figure-3 buckets, tool counters, samples)


def text_prompt(ids):
    return "".join(map(chr, ids))


class ScriptedRollout:
    def __init__(self, text, num_actions, real_calls, stop_reason="eos"):
        self.text, self.num_actions, self.real_calls, self.stop_reason = text, num_actions, real_calls, stop_reason
        self.sim_obs = 0
        self.policy_text = text  # the scripted texts hold no observation


class CharTokenizer:
    """Enough of a tokenizer for evaluate(): one id per character."""
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


@pytest.fixture
def scripted_engine(monkeypatch):
    """Replace model.build_prompt / engine.rollout: the answer and the number of searches are read from the question
    ("... ANSWER=x ACTIONS=n"); the fake engine makes n real registry calls per row when env == "real". The real
    model.wrap_prompt stays (evaluate.user_turn wraps the react and workflow prompts with it)."""
    import types
    from model import wrap_prompt
    seen = {}

    def build_prompt(tokenizer, question, template="short"):
        return f"[{template}] {question}\n<think>"

    def rollout(model, tokenizer, prompts, tools, env="real", **kw):
        seen.setdefault("envs", []).append(env)
        seen.setdefault("kw", []).append(kw)
        outs = []
        for ids in prompts:
            text = "".join(map(chr, ids))
            if "grading an answer" in text:  # the LLM judge: says yes to Paris and Milan only
                yes = any(f"Predicted answer: {a}\n" in text for a in ("Paris", "Milan"))
                outs.append(ScriptedRollout(" Yes." if yes else "no", {}, 0))
                continue
            answer = text.split("ANSWER=")[1].split()[0]
            n = int(text.split("ACTIONS=")[1][0])
            calls = tools([("search", f"q{i}") for i in range(n)]) if env == "real" and n else []
            text = f" thinking </think>\nThe answer is \\boxed{{{answer}}}"
            if "Blade Runner" in text_prompt(ids):  # ReAct prompt: the model goes on to invent a next example
                text += "\n\nQuestion: Who else? <think> </think> \\boxed{Wrong}"
            outs.append(ScriptedRollout(text, {"search": n}, len(calls)))
        return outs

    monkeypatch.setitem(sys.modules, "model", types.SimpleNamespace(build_prompt=build_prompt, wrap_prompt=wrap_prompt))
    monkeypatch.setitem(sys.modules, "engine", types.SimpleNamespace(rollout=rollout))
    return seen


def make_questions():
    specs = [("NQ", "Paris", "Paris", 0), ("NQ", "Rome", "Milan", 1), ("HotpotQA", "Oslo", "Oslo", 2),
             ("HotpotQA", "Lima", "Lima", 7)]
    return [{"id": str(i), "dataset": d, "question": f"Where? ANSWER={a} ACTIONS={n}", "golden_answers": [g]}
            for i, (d, g, a, n) in enumerate(specs)]


def test_evaluate_bookkeeping(scripted_engine):
    tools = tools_mod.ToolRegistry({"search": lambda qs: [f"result 1: {q}" for q in qs]})
    summary, preds = ev.evaluate(None, CharTokenizer(), make_questions(), tools, "agent", batch_size=3, progress=False)
    assert [p["em"] for p in preds] == [1.0, 0.0, 1.0, 1.0]
    assert summary["by_dataset"]["NQ"]["em"] == 0.5 and summary["by_dataset"]["HotpotQA"]["em"] == 1.0
    assert summary["average"]["em"] == 0.75 and summary["overall"]["em"] == 0.75  # macro == micro here (2 + 2)
    assert summary["overall"]["num_actions"] == pytest.approx(10 / 4)
    b = summary["by_actions"]
    assert (b["0"]["n"], b["1"]["n"], b["2"]["n"], b["5+"]["n"], b["3"]["n"]) == (1, 1, 1, 1, 0)
    assert b["1"]["success_rate"] == 0.0 and b["5+"]["success_rate"] == 1.0 and b["3"]["success_rate"] is None
    assert summary["format_checks"] == {"ok": 4} and summary["stop_reasons"] == {"eos": 4}
    assert [p["mention"] for p in preds] == [1.0, 0.0, 1.0, 1.0]  # "Milan" mentions no gold
    # q0..q6 are cached after the first batch, so real calls < requests; both deltas are counted
    assert summary["tool_calls"]["requests"] == 10 and summary["tool_calls"]["engine_real_calls"] == 10
    assert summary["tool_calls"]["real_calls"] + summary["tool_calls"]["cache_hits"] == 10
    assert summary["tool_calls"]["real_calls"] == tools.real_calls == 7
    assert preds[0]["prompt"].startswith("[autocoa] Where?") and preds[0]["prediction"] == "Paris"
    assert scripted_engine["kw"][0]["greedy"] is True
    assert scripted_engine["envs"] == ["real", "real"]  # 4 questions, batch 3


def test_evaluate_modes(scripted_engine):
    tools = tools_mod.ToolRegistry({"search": lambda qs: [f"result 1: doc for {q}" for q in qs]})
    qs = make_questions()[:2]
    summary, preds = ev.evaluate(None, CharTokenizer(), qs, None, "no-action", progress=False)
    assert scripted_engine["envs"][-1] == "none" and summary["tool_calls"]["requests"] == 0
    summary, preds = ev.evaluate(None, CharTokenizer(), qs, tools, "workflow", progress=False)
    assert scripted_engine["envs"][-1] == "none" and summary["tool_calls"]["real_calls"] == 2
    assert "result 1: doc for Where? ANSWER=Paris" in preds[0]["prompt"]
    summary, preds = ev.evaluate(None, CharTokenizer(), qs, tools, "react", progress=False)
    assert preds[0]["prompt"].count("<begin_search>") >= 3 and preds[0]["prompt"].count("Question:") == 3
    assert preds[0]["prompt"].endswith("ANSWER=Paris ACTIONS=0\n<think>")  # the trained template's newline
    assert "Wrong" in preds[0]["trajectory"] and preds[0]["prediction"] == "Paris"  # the invented example is cut
    summary, preds = ev.evaluate(None, CharTokenizer(), qs, None, "agent-sim", progress=False)
    assert scripted_engine["envs"][-1] == "sim" and summary["tool_calls"]["requests"] == 0
    with pytest.raises(ValueError, match="needs tools"):
        ev.evaluate(None, CharTokenizer(), qs, None, "agent", progress=False)
    with pytest.raises(ValueError, match="temperature"):
        ev.evaluate(None, CharTokenizer(), qs, tools, "agent", n_samples=2, progress=False)


def test_evaluate_n_samples_average(scripted_engine, tmp_path):
    tools = tools_mod.ToolRegistry({"search": lambda qs: ["r"] * len(qs)})
    summary, preds = ev.evaluate(None, CharTokenizer(), make_questions(), tools, "agent", n_samples=3,
                                 temperature=0.6, batch_size=5, progress=False)
    assert all(len(p["samples"]) == 3 for p in preds)
    assert sum(b["n"] for b in summary["by_actions"].values()) == 12
    assert scripted_engine["kw"][0]["greedy"] is False and scripted_engine["kw"][0]["temperature"] == 0.6
    report.write_outputs(str(tmp_path), summary, preds, label="x")
    assert json.loads((tmp_path / "results.json").read_text())["n_samples"] == 3
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_judge_majority_and_missing_predictions(scripted_engine):
    tools = tools_mod.ToolRegistry({"search": lambda qs: ["r"] * len(qs)})
    summary, preds = ev.evaluate(None, CharTokenizer(), make_questions(), tools, "agent", progress=False,
                                 judge=(None, CharTokenizer()), judge_votes=3)
    assert [p["judge"] for p in preds] == [1, 1, 0, 0]  # the judge disagrees with EM on purpose: Milan != Rome
    assert summary["overall"]["judge"] == 0.5 and summary["by_dataset"]["NQ"]["judge"] == 1.0
    assert "/ 100.0" in report.format_table([("run", summary)])
    verdicts = ev.judge_answers(None, CharTokenizer(), [("q", ["Paris"], None), ("q", ["Paris"], "Paris")], votes=1)
    assert verdicts == [0, 1]  # no prediction: 0 without asking


def test_format_table_two_runs(scripted_engine):
    tools = tools_mod.ToolRegistry({"search": lambda qs: ["r"] * len(qs)})
    s1, _ = ev.evaluate(None, CharTokenizer(), make_questions(), tools, "agent", progress=False)
    s2, _ = ev.evaluate(None, CharTokenizer(), make_questions()[:2], tools, "agent", progress=False)
    table = report.format_table([("full", s1), ("nq only", s2)]).splitlines()
    assert table[0] == "| run | NQ | HotpotQA | Avg |"
    assert table[2] == "| full | 50.0 | 100.0 | 75.0 |"
    assert table[3] == "| nq only | 50.0 | - | 50.0 |"


# -----------------------------------------------------------------------------
# End to end: a real retrieval server process, a tiny random model, the CLI


CORPUS = [("Paris", "Paris is the capital of France."), ("Rome", "Rome is the capital of Italy."),
          ("Oslo", "Oslo is the capital of Norway."), ("Lima", "Lima is the capital of Peru."),
          ("Nile", "The Nile is a river in Africa.")]


def make_tokenizer(path):
    """A throwaway byte-level BPE tokenizer with the action tags as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<eos>"] + tools_mod.special_tokens()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for _, t in CORPUS] * 3 + ["What is the capital of the answer?"], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            additional_special_tokens=specials[2:]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def retrieval_server(tmp_path_factory):
    """`python server.py` on a free loopback port (--port 0: the server prints the one it bound)."""
    corpus = write_lines(tmp_path_factory.mktemp("server") / "corpus.jsonl",
                         [json.dumps({"id": str(i), "contents": f'"{t}"\n{x}'}) for i, (t, x) in enumerate(CORPUS)])
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--corpus", corpus,
                             "--host", "127.0.0.1", "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, f"server did not start: {line!r}"
        url = line.split("http://")[1].split("/retrieve")[0]
        url = f"http://{url}"
        for _ in range(50):  # the line is printed before serve_forever(): wait for /health
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_end_to_end_tiny_model_real_server(tmp_path, retrieval_server):
    tokenizer_dir = make_tokenizer(tmp_path / "tok")
    questions = [{"id": f"q{i}", "dataset": "toy" if i % 2 else "toy2", "question": f"What is the capital of {c}?",
                  "golden_answers": [t]} for i, (t, c) in enumerate([("Paris", "France"), ("Rome", "Italy"),
                                                                      ("Oslo", "Norway"), ("Lima", "Peru")])]
    qfile = write_lines(tmp_path / "q.jsonl", [json.dumps(q) for q in questions])
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", "tiny", "--tokenizer", tokenizer_dir,
           "--questions", qfile, "--url", retrieval_server, "--api", "flashrag", "--mode", "agent", "--out", str(out),
           "--template", "short", "--max-new-tokens", "40", "--answer-tokens", "8", "--batch-size", "3", "--limit", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    md = (out / "results.md").read_text()
    assert results["n_questions"] == len(preds) == 2  # --limit 1 per dataset, two datasets
    assert set(results["by_dataset"]) == {"toy", "toy2"} and "| toy2 |" in md
    for m in [results["overall"], results["average"], *results["by_dataset"].values()]:
        assert 0.0 <= m["em"] <= m["cover_em"] + 1e-9 <= 1.0 + 1e-9 and 0.0 <= m["f1"] <= 1.0
    assert results["overall"]["em"] == pytest.approx(sum(p["em"] for p in preds) / len(preds))
    assert sum(b["n"] for b in results["by_actions"].values()) == len(preds)
    assert results["tool_calls"]["engine_real_calls"] == sum(p["real_calls"] for p in preds)
    assert results["tool_calls"]["requests"] == results["tool_calls"]["engine_real_calls"]  # registry == engine
    assert results["tool_calls"]["requests"] <= sum(sum(p["actions"].values()) for p in preds)  # limit: no call
    assert results["args"]["url"] == retrieval_server
    for p, q in zip(preds, [questions[0], questions[1]]):
        assert p["id"] == q["id"] and q["question"] in p["prompt"] and p["golden_answers"] == q["golden_answers"]
        assert p["stop_reason"] in ("eos", "max_new_tokens", "max_context", "forced_answer")


def test_workflow_mode_calls_the_server(tmp_path, retrieval_server):
    """The fixed workflow retrieves once per question with the question itself: the server's passages end up in the
    prompt and the registry counts one real call per question."""
    import model as model_mod
    model, tokenizer = model_mod.load("tiny", tokenizer=make_tokenizer(tmp_path / "tok"))
    registry = tools_mod.make_tools(url=retrieval_server, api="searchr1")
    questions = [{"id": "a", "question": "capital of Norway", "golden_answers": ["Oslo"]},
                 {"id": "b", "question": "river in Africa", "golden_answers": ["Nile"]}]
    summary, preds = ev.evaluate(model, tokenizer, questions, registry, "workflow", template="short",
                                 max_new_tokens=24, answer_tokens=4, progress=False)
    assert summary["tool_calls"]["real_calls"] == 2 and summary["tool_calls"]["engine_real_calls"] == 0
    assert "Oslo is the capital of Norway." in preds[0]["prompt"] and "The Nile is a river" in preds[1]["prompt"]


def scripted_tiny_model(tmp_path, script):
    """A real tiny Llama whose logits are overwritten by a forward hook so that token `a` is always followed by
    script[a] (a bigram script; anything else is followed by eos). With a word-level tokenizer this makes the engine
    run a known trajectory: act, get the real observation, answer. The engine itself is untouched."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import model as model_mod
    specials = ["<pad>", "<eos>", "[UNK]"] + tools_mod.special_tokens()
    words = sorted({w for pair in script.items() for w in pair if w not in specials})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="[UNK]",
                                   additional_special_tokens=specials[3:])
    fast.add_tokens(["\\boxed{"])  # one token, so the decoded answer reads "\boxed{ Oslo }"
    fast.save_pretrained(tmp_path / "wordtok")
    model, tokenizer = model_mod.load("tiny", tokenizer=str(tmp_path / "wordtok"),
                                      config_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                            num_key_value_heads=2, intermediate_size=64))
    vocab = tokenizer.get_vocab()
    next_id = torch.full((len(tokenizer),), tokenizer.eos_token_id)
    for a, b in script.items():
        next_id[vocab[a]] = vocab[b]

    def hook(module, args, kwargs, output):
        logits = torch.full_like(output.logits, -1e4)  # (B, T', V); the engine may keep only the last T' positions
        ids = kwargs["input_ids"][:, -logits.shape[1]:]  # (B, T')
        output.logits = logits.scatter(-1, next_id[ids].unsqueeze(-1), 1e4)
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model, tokenizer


def test_agent_mode_acts_through_the_real_server(tmp_path, retrieval_server):
    """A scripted policy searches "Norway" once, reads the real server's passage and answers Oslo: the observation is
    in the trajectory, one action per question, one real call for two identical searches (the registry dedupes), and
    the Figure-3 table puts both rollouts in the 1-action bucket."""
    tags = {t: t for t in tools_mod.special_tokens()}
    script = {tags["<think>"]: "<begin_search>", "<begin_search>": "Norway", "Norway": "</end_search>",
              "</search_result>": "</think>", "</think>": "\\boxed{", "\\boxed{": "Oslo", "Oslo": "}"}
    model, tokenizer = scripted_tiny_model(tmp_path, script)
    registry = tools_mod.make_tools(url=retrieval_server, api="flashrag")
    questions = [{"id": "a", "question": "capital of Norway", "golden_answers": ["Oslo"], "type": "t1"},
                 {"id": "b", "question": "capital of Peru", "golden_answers": ["Lima"], "type": "t2"}]
    summary, preds = ev.evaluate(model, tokenizer, questions, registry, "agent", template="short",
                                 max_new_tokens=40, answer_tokens=8, progress=False)
    assert [p["prediction"] for p in preds] == ["Oslo", "Oslo"] and [p["em"] for p in preds] == [1.0, 0.0]
    assert "Oslo is the capital of Norway." in registry.cache[("search", "Norway")]  # the server's answer...
    assert "<search_result> [UNK] [UNK] [UNK] [UNK] Oslo" in preds[0]["trajectory"]  # ...seen through a word vocab
    assert preds[0]["format_ok"] == 1.0
    assert [p["num_actions"] for p in preds] == [1, 1] and [p["stop_reason"] for p in preds] == ["eos", "eos"]
    assert summary["tool_calls"]["requests"] == 2 and summary["tool_calls"]["real_calls"] == 1
    assert summary["by_actions"]["1"] == {"n": 2, "correct": 1.0, "success_rate": 0.5}
    assert summary["by_type"]["t1"]["em"] == 1.0 and summary["average"]["em"] == 0.5


def test_react_and_workflow_prompts_end_like_the_trained_template():
    """Regression (issue 13): react and workflow prompts ended "Question: X<think>", without the newline the trained
    template puts before <think> (model.SHORT_TEMPLATE ends "Question: {question}\n"; build_prompt appends <think>).
    Every mode's prompt must end "Question: X\n<think>", with a chat template too (the newline inside the user turn)."""
    import model as model_mod
    registry = tools_mod.ToolRegistry({"search": lambda qs: [f"result 1: doc for {q}" for q in qs]})
    qs = [{"id": "0", "question": "Where is Oslo?", "golden_answers": ["Norway"]}]
    trained = model_mod.build_prompt(CharTokenizer(), qs[0]["question"], "short")
    assert trained.endswith("Question: Where is Oslo?\n<think>")
    for mode in ("react", "workflow", "agent"):
        [prompt] = ev.make_prompts(CharTokenizer(), qs, mode, registry, "short", model_mod.build_prompt)
        assert prompt.endswith("Question: Where is Oslo?\n<think>"), (mode, prompt[-40:])
        assert not prompt.endswith("\n\n<think>")

    class ChatTokenizer(CharTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"
    for mode in ("react", "workflow", "agent"):
        [prompt] = ev.make_prompts(ChatTokenizer(), qs, mode, registry, "short", model_mod.build_prompt)
        assert prompt.endswith("Question: Where is Oslo?\n</user><assistant><think>"), (mode, prompt[-40:])


def test_template_defaults_to_the_checkpoints(tmp_path, capsys):
    """Regression (issue 13): --template defaulted to "autocoa" while train_sft.py defaults to "short", so a checkpoint
    evaluated without the flag silently got a prompt it never saw. Without --template the checkpoint's run_args.json
    template is used (model.checkpoint_template); the flag still overrides it."""
    import model as model_mod
    assert ev.get_args(["--model", "m", "--questions", "q", "--out", "o", "--mode", "no-action"]).template is None
    model, tokenizer = model_mod.load("tiny", tokenizer=make_tokenizer(tmp_path / "tok"), config_overrides=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64))
    ckpt = str(tmp_path / "ckpt")
    model_mod.save(model, tokenizer, ckpt, {"stage": "2", "template": "short"})
    qfile = write_lines(tmp_path / "q.jsonl", [json.dumps({"id": "a", "question": "capital of Norway",
                                                            "golden_answers": ["Oslo"]})])
    base = ["--model", ckpt, "--questions", qfile, "--mode", "no-action", "--max-new-tokens", "2",
            "--answer-tokens", "1"]
    short = model_mod.build_prompt(tokenizer, "capital of Norway", "short")
    autocoa = model_mod.build_prompt(tokenizer, "capital of Norway", "autocoa")
    for extra, expected, name in (([], short, "short"), (["--template", "autocoa"], autocoa, "autocoa")):
        out = tmp_path / f"out_{name}"
        ev.main(base + extra + ["--out", str(out)])
        [pred] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert pred["prompt"] == expected
        assert json.loads((out / "results.json").read_text())["args"]["template"] == name


def test_cli_tools_requirements(capsys):
    base = ["--model", "tiny", "--questions", "q.jsonl", "--out", "o"]
    assert ev.get_args(base + ["--mode", "no-action"]).corpus is None  # model only: no corpus, no server
    assert ev.get_args(base + ["--mode", "agent-sim"]).url is None
    for bad in (["--mode", "agent"], ["--mode", "workflow"], ["--mode", "no-action", "--n-samples", "4"],
                ["--mode", "agent", "--corpus", "c.jsonl", "--url", "http://x"]):
        with pytest.raises(SystemExit):
            ev.get_args(base + bad)
    assert "needs --corpus or --url" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Table 1 error bars: bootstrap intervals, RL row minus its start, Figure 3 buckets


def test_bootstrap_ci_hand_cases():
    assert report.bootstrap_ci([[1.0] * 10]) == (1.0, 1.0)  # all correct: no spread to resample
    assert report.bootstrap_ci([]) == (None, None)
    widths = []
    for n in (20, 200):
        lo, hi = report.bootstrap_ci([[1.0, 0.0] * (n // 2)])
        assert lo < 0.5 < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 10x the questions, ~3x narrower
    assert 0.25 < widths[0] < 0.55  # normal approximation: 2 * 1.96 * sqrt(0.25 / 20) = 0.44
    assert report.bootstrap_ci([[1.0, 0.0, 1.0]]) == report.bootstrap_ci([[1.0, 0.0, 1.0]])  # fixed seed


def _pred(i, t, em, known=False, actions=1):
    return {"id": f"q{i}", "type": t, "known": known, "em": em, "num_actions": actions}


def test_paired_diff_identical_rows_is_zero(tmp_path):
    preds = [_pred(i, t, float(i % 2), known=i % 3 == 0, actions=i % 6)
             for i, t in enumerate(report.WORLD_COLUMNS * 5)]
    for label in ("sft-12", "sft-12+rl-real"):
        d = tmp_path / "eval" / label
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"args": {"model": str(tmp_path / label), "mode": "agent"}}))
        lines = [json.dumps(p) + "\n" for p in preds]
        (d / "predictions.jsonl").write_text("".join(lines if label == "sft-12" else lines[::-1]))
    md, rows, extras = report.world_table(str(tmp_path), ["sft-12", "sft-12+rl-real"])
    p = extras["paired"]["sft-12+rl-real"]
    assert p["start"] == "sft-12"
    assert p["avg"] == {"value": 0.0, "lo": 0.0, "hi": 0.0, "n": 30}
    m = p["unknown_multihop"]
    assert (m["value"], m["lo"], m["hi"]) == (0, 0, 0) and m["n"] == 10  # unknown (i % 3 != 0) 2/3/4-hop
    iv = extras["intervals"]["sft-12"]["avg"]
    assert iv["value"] == pytest.approx(rows["sft-12"]["avg"]) and iv["lo"] <= iv["value"] <= iv["hi"] and iv["n"] == 30
    assert "+0.0 [0.0, 0.0]" in md and set(extras["fig3"]) == {"sft-12", "sft-12+rl-real"}


def test_paired_diff_matches_by_id():
    """A question only one row answered is left out; the difference is taken on the same questions."""
    a = report.world_cells([_pred(0, "1hop", 1.0), _pred(1, "1hop", 1.0), _pred(2, "1hop", 0.0)])
    b = report.world_cells([_pred(2, "1hop", 0.0), _pred(0, "1hop", 0.0)])
    assert report.cell_ci(a, "1hop", b) == {"value": 0.5, "lo": 0.0, "hi": 1.0, "n": 2}


def test_success_by_actions_buckets():
    preds = [_pred(0, "1hop", 1.0, actions=0), _pred(1, "1hop", 0.0, actions=0), _pred(2, "1hop", 1.0, actions=2),
             _pred(3, "1hop", 1.0, actions=4), _pred(4, "1hop", 0.0, actions=9),
             {"id": "q5", "samples": [{"em": 1.0, "num_actions": 3}, {"em": 0.0, "num_actions": 3}]}]
    b = report.success_by_actions(preds)
    assert {k: v["n"] for k, v in b.items()} == {"0": 2, "1": 0, "2": 1, "3": 2, "4+": 2}
    assert {k: v["success_rate"] for k, v in b.items()} == {"0": 0.5, "1": None, "2": 1.0, "3": 0.5, "4+": 0.5}


def test_no_figure3_modes_match_evaluate():
    """report.py imports nothing from evaluate.py (evaluate.py's CLI imports report.py, and a cycle is what we avoid),
    so the two modes it leaves out of Figure 3 are named there again: pinned here to evaluate.ENV_OF_MODE."""
    assert set(report.NO_ACTION_MODES) == {mode for mode, env in ev.ENV_OF_MODE.items() if env == "none"}


def _eval_dir(d, preds, model_dir, real_calls=None, steps=(("real", 0.0),)):
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"args": {"model": str(model_dir), "mode": "agent"}}))
    (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    if real_calls is not None:  # what train_rl.py leaves in its checkpoint: a row per step
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "env": env, "reward": r, "real_calls_total": real_calls}) + "\n"
            for i, (env, r) in enumerate(steps)))


def test_paired_script_mean_and_spread_by_hand(tmp_path):
    """bench/paired.py (bench/rl_seeds.sh's last step): each eval's paired gain, then their mean and sample sd."""
    qs = report.WORLD_COLUMNS * 2  # 2 unknown questions a type: avg = mean over the 6 types
    _eval_dir(tmp_path / "base", [_pred(i, t, 0.0) for i, t in enumerate(qs)], tmp_path / "m")
    for name, n_right in (("half", 6), ("all", 12)):  # one of each type's two right (+50), every one (+100)
        _eval_dir(tmp_path / name, [_pred(i, t, float(i < n_right)) for i, t in enumerate(qs)], tmp_path / "m")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "paired.py"), str(tmp_path / "base"),
                          str(tmp_path / "half"), str(tmp_path / "all"), "--cells", "avg"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "gain +50.0 [" in out[0] and "gain +100.0 [100.0, 100.0]" in out[1]
    assert out[2] == "mean (sd) of the gain over 2: avg +75.00 (35.36)"


def test_bench_rl_lines_match_run_sh():
    """bench/rl_seeds.sh and bench/sim_real_reward.sh copy run.sh's tiny RL line (a bash script cannot import it):
    rl_seeds.sh all of it, sim_real_reward.sh its rollout flags (it trains at lr 0 for one pass), or their numbers
    describe another recipe."""
    def rl_flags(name, lines=None):  # {flag: value} of the file's RL=... assignments (the first `lines` of them)
        text = open(os.path.join(ROOT, name)).read()
        assignments = re.findall(r"^\s*(?:TINY_)?RL=(.*)$", text, re.M)[:lines]
        return dict(re.findall(r"--([a-z-]+) ([0-9.e-]+)\b", " ".join(assignments)))
    run_sh = rl_flags("run.sh", lines=2)  # the tiny preset's two RL lines (the smollm2 preset's come later)
    assert run_sh["temperature"] == "1.0" and run_sh["oversample"] == "3"  # the parse found the tiny line
    assert rl_flags("bench/rl_seeds.sh") == run_sh
    rollout = ("prompts-per-step", "group-size", "oversample", "max-new-tokens", "minibatches", "temperature")
    sim_real = rl_flags("bench/sim_real_reward.sh")
    assert {k: sim_real[k] for k in rollout} == {k: run_sh[k] for k in rollout}


def test_seeds_report_mean_and_spread_by_hand(tmp_path):
    """run.sh --rl-seed N: each RL row's avg EM and its gain over the start, per seed and as mean (sample sd) over the
    seeds found (0 = the main run's eval/, N = OUT/seedN/eval/); real calls read from each checkpoint's metrics."""
    qs = report.WORLD_COLUMNS * 2  # 12 unknown questions, 2 per type: avg = mean over the 6 types (known: none)
    start = [_pred(i, t, 0.0) for i, t in enumerate(qs)]
    for label in ("sft-12", "sft-123"):
        _eval_dir(tmp_path / "eval" / label, start, tmp_path / label)
    right = {0: 6, 1: 12}  # seed 0: one of the two questions of every type right (50%); seed 1: all (100%)
    for seed, n_right in right.items():
        root = tmp_path if seed == 0 else tmp_path / f"seed{seed}"
        for label in report.RL_START:
            preds = [_pred(i, t, float(i < n_right)) for i, t in enumerate(qs)]
            _eval_dir(root / "eval" / label, preds, root / label, real_calls=10 * (seed + 1))
    (tmp_path / "seed2" / "eval").mkdir(parents=True)  # a seed still running: left out
    md, data = report.seeds_report(str(tmp_path))
    assert data["seeds"] == [0, 1]
    s = data["summary"]["sft-123+rl-sim-real"]
    assert s["avg"]["values"] == pytest.approx([50.0, 100.0]) and s["avg"]["mean"] == pytest.approx(75.0)
    assert s["avg"]["std"] == pytest.approx(35.355, abs=1e-3)  # sample sd of (50, 100)
    assert s["avg_gain"]["mean"] == pytest.approx(75.0) and s["real_calls"]["values"] == [10, 20]
    assert "| **sft-12+rl-real** | mean (sd) | 75.0 (35.4) | +75.0 (35.4) |" in md
    # run.sh --control: its rows join once every seed has them, with sim->real's share of their gain and calls
    all_right = [_pred(i, t, 1.0) for i, t in enumerate(qs)]
    for seed in (0, 1):
        root = tmp_path if seed == 0 else tmp_path / f"seed{seed}"
        for label in report.CONTROL:
            _eval_dir(root / "eval" / label, all_right, root / label, real_calls=100)
        md, data = report.seeds_report(str(tmp_path))
        assert ("sft-123+rl-sim-real-ctl" in data["summary"]) == (seed == 1)
    assert data["summary"]["sft-123+rl-sim-real-ctl"]["avg_gain"]["values"] == pytest.approx([100.0, 100.0])
    assert ("sft-123+rl-sim-real vs its all-real control sft-123+rl-sim-real-ctl: 75% of the gain (+75.0 vs +100.0) "
            "with 15.0% of the real calls (15 vs 100)") in md


def test_curve_report_compares_simulated_steps_with_the_same_real_steps(tmp_path):
    """run.sh --curve: each point's simulated steps' mean reward over that of the SAME steps (same seed: same prompts) of
    the all-real run; the all-real point has none. Rewards by hand: 4 steps in all, all-real 0.8 0.4 0.6 1.0."""
    qs = report.WORLD_COLUMNS
    _eval_dir(tmp_path / "eval" / "sft-123", [_pred(i, t, 0.0) for i, t in enumerate(qs)], tmp_path / "sft-123")
    steps = {0: [("sim-call", 0.4)] * 4,
             1: [("sim", 0.2), ("sim", 0.4), ("sim", 0.6), ("real", 1.0)],
             2: [("sim-call", 0.6), ("sim-call", 0.2), ("real", 0.6), ("real", 0.6)],
             3: [("sim", 0.3)] * 2 + [("real", 1.0)] * 2,
             6: [("real", 0.8), ("real", 0.4), ("real", 0.6), ("real", 1.0)]}
    for k, label in report.CURVE.items():  # k = 6: the main run's row; the rest: OUT/curve/
        root = tmp_path if k == 6 else tmp_path / "curve"
        model = tmp_path / ("rl_real123" if k == 6 else f"curve/real{k}")
        _eval_dir(root / "eval" / label, [_pred(i, t, 1.0) for i, t in enumerate(qs)], model, real_calls=k,
                  steps=steps[k])
    md, rows = report.curve_report(str(tmp_path))
    s = {k: rows[f"{k}/6"]["sim_step_reward"] for k in report.CURVE}
    assert s[6] is None and s[0] == pytest.approx({"sim": 0.4, "real": 0.7, "steps": 4})
    assert s[1] == pytest.approx({"sim": 0.4, "real": 0.6, "steps": 3}) and s[2]["real"] == pytest.approx(0.6)
    assert "0.400 / 0.700 = 0.57x (4 steps)" in md and rows["6/6"]["avg_gain"]["value"] == pytest.approx(1.0)


def test_rl_real_calls_found_from_any_working_directory(tmp_path, monkeypatch):
    """evaluate.py records --model as given (run.sh: relative to the repo root); report.py run from elsewhere still
    finds the checkpoint's metrics.jsonl (it once read 0 real calls, silently, when not run from the repo root)."""
    repo = tmp_path / "repo"
    preds = [_pred(i, t, 1.0) for i, t in enumerate(report.WORLD_COLUMNS)]
    _eval_dir(repo / "out/run/eval/row", preds, repo / "out/run/rl", real_calls=42)
    results = repo / "out/run/eval/row/results.json"
    results.write_text(json.dumps({"args": {"model": "out/run/rl", "mode": "agent"}}))  # relative, as run.sh writes it
    monkeypatch.chdir(tmp_path)
    args, predictions = report.read_eval(str(repo / "out/run/eval/row"))
    assert args["model"] == str(repo / "out/run/rl")
    assert report.world_row(predictions, args["model"])["rl_real_calls"] == 42
