"""synthesize.py: paper 3.2.1 data synthesis. A tiny random Llama on the embedded world is the HF teacher (it never
answers right, so those runs use --keep-all); a scripted completions server (real HTTP on loopback) is the
hand-controllable teacher that exercises the acceptance filter and the CoT+A pairs; a second server serves the tiny
model by greedy decoding with stop strings, as vLLM would; a third answers HTTP 500. train_sft.py trains on the output."""
import contextlib
import dataclasses
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import data
import engine as E  # noqa: E402
import model as M
import synthesize
import train_sft
from tools import THINK_CLOSE, action_close, action_open, format_observation

WORLD = ["--people", "60", "--companies", "24", "--bands", "12", "--cities", "12", "--train", "40", "--dev", "10",
         "--test", "10", "--vocab-size", "400", "--renamed-copies", "0"]
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)
FILES = ("sft_cot.jsonl", "sft_coa.jsonl", "sft_mix.jsonl", "sft_pairs.jsonl", "summary.json")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def contents(out):
    return {name: open(os.path.join(out, name), encoding="utf-8").read() for name in FILES}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    data.build(["--out", str(root / "world")] + WORLD)
    model, tok = M.load("tiny", tokenizer=str(root / "world" / "tokenizer"), config_overrides=SMALL)
    M.save(model, tok, str(root / "teacher"), {})
    return {"root": root, "world": str(root / "world"), "teacher": str(root / "teacher"),
            "corpus": str(root / "world" / "corpus.jsonl"), "train": str(root / "world" / "train.jsonl")}


@contextlib.contextmanager
def server(answer):
    """A real HTTP server on a free loopback port; answer(method, path, body) -> (status, JSON object)."""
    class Handler(BaseHTTPRequestHandler):
        def reply(self, body):
            code, obj = answer(self.command, self.path, body)
            raw = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self.reply(None)

        def do_POST(self):
            self.reply(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def completion(text, finish, n_tokens):
    return {"choices": [{"text": text, "finish_reason": finish}], "usage": {"completion_tokens": n_tokens}}


def apply_stops(text, stops):
    """What a completions server does with stop strings: cut before the first one (it is not returned)."""
    hits = [text.index(s) for s in stops or [] if s in text]
    return (text[:min(hits)], "stop") if hits else (text, "stop")

# ----------------------------------------------------------------------------------------------------------------------
# The scripted teacher: per question, what the CoT prompt and the CoA prompt answer


CORPUS = [{"id": "0", "contents": '"Ada Vell"\nAda Vell was born in Lyon.'},
          {"id": "1", "contents": '"Bo Kran"\nBo Kran was born in Oslo.'}]
QUESTIONS = [  # id, question, gold, CoT answer, CoA answer (None: CoA writes no </think>), CoT acts
    ("act", "Where was Ada Vell born?", "Lyon", "Paris", "Lyon", False),     # CoA right, CoT wrong -> pair "act"
    ("no_act", "Where was Bo Kran born?", "Oslo", "Oslo", "Rome", False),    # CoT right, CoA wrong -> pair "no_act"
    ("both", "Where is Lyon?", "France", "France", "France", False),        # both right: rows, no pair
    ("format", "Where is Oslo?", "Norway", "Norway", None, True),           # CoA unformatted, CoT acts: no rows
    ("wrong", "Who is Ada Vell?", "a chemist", "a baker", "a pilot", False),  # both wrong: no rows
]
SCRIPT = {q: (gold, cot, coa, cot_acts) for _, q, gold, cot, coa, cot_acts in QUESTIONS}


def scripted(log):
    def answer(method, path, body):
        if method == "GET":
            return 200, {"data": [{"id": "scripted"}]}
        prompt = body["prompt"]
        kind, question = re.match(r"(COT|COA): (.*)\n", prompt).groups()
        log.append(question)
        _, cot, coa, cot_acts = SCRIPT[question]
        response = prompt.split("<think>", 1)[1]
        subject = question.split(" born")[0].split(" ", 2)[-1].rstrip("?")
        act = f" I need a fact about {subject}. {action_open('search')} {subject} {action_close('search')} and more"
        if kind == "COT":
            text = act if cot_acts and "_result>" not in response else \
                f" I think it is {cot}. {THINK_CLOSE}\nThe answer is \\boxed{{{cot}}}"
        elif "_result>" not in response:
            text = act
        else:
            text = f" So it is {coa}. {THINK_CLOSE}\nThe answer is \\boxed{{{coa}}}" if coa else " So I am done."
        text, finish = apply_stops(text, body.get("stop"))
        return 200, completion(text, finish, len(text.split()))
    return answer


@pytest.fixture()
def scripted_setup(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"id": i, "question": q, "golden_answers": [g], "type": i}
                                       for i, q, g, *_ in QUESTIONS])
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    (tmp_path / "cot.txt").write_text("COT: {question}\n")
    (tmp_path / "coa.txt").write_text("COA: {question}\n")
    return lambda url, out, *extra: [
        "--questions", str(tmp_path / "q.jsonl"), "--teacher-url", url, "--corpus", str(tmp_path / "corpus.jsonl"),
        "--cot-prompt-file", str(tmp_path / "cot.txt"), "--coa-prompt-file", str(tmp_path / "coa.txt"),
        "--samples", "2", "--max-new-tokens", "200", "--out", str(out), *extra]


def test_acceptance_filter_and_pairs_with_a_scripted_teacher(tmp_path, scripted_setup, world):
    """Only right, well-formed, finished trajectories are kept (CoT must not act, CoA must); the two pair cases are
    split at the CoA trajectory's first action open tag, the other branch continuing the same prefix under the CoT
    prompt; train_sft.py stages 1 and 2 train on the output unchanged."""
    log = []
    with server(scripted(log)) as url:
        summary = synthesize.main(scripted_setup(url, tmp_path / "out"))
    out = tmp_path / "out"
    cot, coa, pairs = (read_jsonl(out / f"sft_{k}.jsonl") for k in ("cot", "coa", "pairs"))
    assert [r["id"] for r in cot] == ["no_act", "both"] and [r["id"] for r in coa] == ["act", "both"]
    assert summary["reject_reasons"]["cot"] == {"accepted": 4, "wrong": 4, "acted": 2}
    assert summary["reject_reasons"]["coa"] == {"accepted": 4, "wrong": 4, "format: no </think>": 2}
    assert summary["acceptance"]["coa"]["question_rate"] == 0.4 and summary["actions_per_trajectory"]["coa_accepted"] == 1
    seg = coa[0]["segments"]
    assert [s["kind"] for s in seg] == ["policy", "obs", "policy"]
    assert seg[0]["text"] == f" I need a fact about Ada Vell. {action_open('search')} Ada Vell {action_close('search')}"
    assert seg[1]["text"] == format_observation("search", 'result 1: "Ada Vell"\nAda Vell was born in Lyon.')
    by_case = {p["case"]: p for p in pairs}
    assert set(by_case) == {"act", "no_act"} and summary["pairs"] == {
        "candidates": 2, "kept": 2, "act": 1, "no_act": 1, "continuation_tokens": summary["pairs"]["continuation_tokens"]}
    act = by_case["act"]
    assert act["prefix"] == [{"kind": "policy", "text": " I need a fact about Ada Vell. "}]
    assert act["chosen"][0]["text"].startswith(action_open("search")) and "\\boxed{Lyon}" in act["chosen"][-1]["text"]
    assert act["rejected"] == [{"kind": "policy", "text": f" I think it is Paris. {THINK_CLOSE}\nThe answer is \\boxed{{Paris}}"}]
    no_act = by_case["no_act"]
    assert "\\boxed{Oslo}" in no_act["chosen"][-1]["text"] and "\\boxed{Rome}" in no_act["rejected"][-1]["text"]
    mix = read_jsonl(out / "sft_mix.jsonl")
    assert len(mix) == 3 and {r["id"] for r in mix} <= {"act", "both", "no_act"}
    for stage in ("1", "2"):
        train_sft.main(train_sft.parse_args([
            "--stage", stage, "--init", world["teacher"], "--data", str(out), "--out", str(tmp_path / f"sft{stage}"),
            "--device", "cpu", "--batch-size", "2", "--micro-batch", "1", "--max-steps", "1"]))
        assert os.path.exists(tmp_path / f"sft{stage}" / "config.json")


def test_resume_skips_done_ids_and_gives_the_same_files(tmp_path, scripted_setup):
    log = []
    with server(scripted(log)) as url:
        synthesize.main(scripted_setup(url, tmp_path / "full"))
        synthesize.main(scripted_setup(url, tmp_path / "part", "--stop-after", "3", "--batch-questions", "2"))
        assert len(read_jsonl(tmp_path / "part" / "records.jsonl")) == 3
        with open(tmp_path / "part" / "records.jsonl", "a") as f:
            f.write('{"id": "torn')  # a crash mid-line: cut off on the next run
        log.clear()
        synthesize.main(scripted_setup(url, tmp_path / "part", "--batch-questions", "2"))
        assert set(log) == {q for i, q, *_ in QUESTIONS if i in ("format", "wrong")}  # only the two not done
        assert contents(tmp_path / "part") == contents(tmp_path / "full")
        log.clear()
        synthesize.main(scripted_setup(url, tmp_path / "part", "--batch-questions", "2"))  # all done: no request
        assert log == [] and contents(tmp_path / "part") == contents(tmp_path / "full")
        with pytest.raises(SystemExit, match="--samples"):
            synthesize.main(scripted_setup(url, tmp_path / "part", "--batch-questions", "2", "--samples", "3"))


def test_hf_teacher_end_to_end_on_the_embedded_world_and_resume(world, tmp_path):
    """The tiny random teacher through engine.rollout, sampled with per-row seeds: an interrupted + resumed run writes
    the same files as an uninterrupted one although its batches differ; train_sft stage 2 trains on sft_mix."""
    args = ["--questions", world["train"], "--limit", "4", "--teacher", world["teacher"], "--corpus", world["corpus"],
            "--samples", "2", "--max-new-tokens", "24", "--answer-tokens", "8", "--temperature", "1.0", "--keep-all", "--device", "cpu"]
    summary = synthesize.main(args + ["--out", str(tmp_path / "full")])
    assert summary["files"] == {"sft_cot": 4, "sft_coa": 4, "sft_mix": 5, "sft_pairs": 0}
    assert summary["acceptance"]["coa"]["samples"] == 8 and summary["acceptance"]["cot"]["tokens"] > 0
    for row in read_jsonl(tmp_path / "full" / "sft_coa.jsonl"):
        assert row["segments"] and all(s["kind"] in ("policy", "obs") for s in row["segments"])
    synthesize.main(args + ["--out", str(tmp_path / "part"), "--stop-after", "3", "--batch-questions", "2"])
    synthesize.main(args + ["--out", str(tmp_path / "part"), "--batch-questions", "2"])
    assert contents(tmp_path / "part") == contents(tmp_path / "full")
    # the filter on: a random model is never right, every sample is rejected with its reason, the files still exist
    strict = synthesize.main([a for a in args if a != "--keep-all"] + ["--out", str(tmp_path / "strict")])
    assert strict["files"]["sft_coa"] == 0 and sum(strict["reject_reasons"]["coa"].values()) == 8
    train_sft.main(train_sft.parse_args([
        "--stage", "2", "--init", world["teacher"], "--data", str(tmp_path / "full"), "--out", str(tmp_path / "sft2"),
        "--device", "cpu", "--batch-size", "2", "--micro-batch", "2", "--max-steps", "1"]))


def test_hf_segments_come_from_the_engine_ids(world):
    """Segments are runs of the engine's obs_mask, eos dropped; the pair split keeps the tokens before the open tag."""
    teacher = synthesize.HFTeacher.__new__(synthesize.HFTeacher)
    _, tok = M.load(world["teacher"])
    teacher.tok, teacher.model, teacher.M = tok, None, M
    teacher.args = synthesize.get_args(["--questions", "q", "--out", "o", "--teacher", "t"])
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    policy = enc(f" Find Ada. {action_open('search')} Ada {action_close('search')}")
    obs = enc(format_observation("search", "result 1: x"))
    final = enc(f"Lyon. {THINK_CLOSE}\nThe answer is \\boxed{{Lyon}}")
    ids = policy + obs + final + [tok.eos_token_id]
    mask = [0] * len(policy) + [1] * len(obs) + [0] * (len(final) + 1)
    values = dict(prompt_ids=[1], response_ids=ids, loss_mask=[1 - m for m in mask], obs_mask=mask,
                  logprobs=[0.0] * len(ids), text=tok.decode(ids[:-1]), policy_text="", num_actions={"search": 1},
                  real_calls=1, sim_obs=0, stop_reason="eos")
    roll = E.Rollout(**{f.name: values[f.name] for f in dataclasses.fields(E.Rollout) if f.name in values})
    teacher.engine = type("FakeEngine", (), {"rollout": staticmethod(lambda *a, **k: [roll])})
    traj = teacher.run([([1], 0)], None, "real")[0]
    assert traj["pieces"] == [policy, obs, final] and [s["kind"] for s in traj["segments"]] == ["policy", "obs", "policy"]
    assert [s["text"] for s in traj["segments"]] == [teacher.decode(p) for p in (policy, obs, final)]
    head, prefix, rest = synthesize.split_at_first_action(teacher, traj)
    assert head == policy[:len(head)] and teacher.decode(head) == " Find Ada. " and traj["exact"] == [3, 3]
    assert prefix[0]["text"] + rest[0]["text"] == traj["segments"][0]["text"] and rest[1:] == traj["segments"][1:]
    assert rest[0]["text"].lstrip().startswith(action_open("search"))


def test_teacher_url_against_a_real_model_server(world, tmp_path):
    """--teacher-url with a loopback server that decodes the tiny model greedily and honours stop strings, max_tokens
    and usage; the client's trajectories land in the same files."""
    model, tok = M.load(world["teacher"])
    model.eval()
    calls, used = [], []

    def answer(method, path, body):
        if method == "GET":
            return 200, {"data": [{"id": "tiny"}]}
        assert path == "/v1/completions" and body["model"] == "tiny"
        calls.append(body)
        ids, out, text, finish, hit = tok(body["prompt"], add_special_tokens=False).input_ids, [], "", "length", None
        with torch.no_grad():
            for _ in range(body["max_tokens"]):
                token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if token == tok.eos_token_id:
                    finish = "stop"
                    break
                out.append(token)
                text = tok.decode(out, skip_special_tokens=False)
                hits = [s for s in body.get("stop") or [] if s in text]
                if hits:
                    text, finish, hit = text[:text.index(hits[0])], "stop", hits[0]
                    break
        used.append(len(out))
        return 200, {**completion(text, finish, len(out)), "choices": [  # vLLM also says which stop string ended it
            {"text": text, "finish_reason": finish, "stop_reason": hit}]}

    with server(answer) as url:
        summary = synthesize.main(["--questions", world["train"], "--limit", "3", "--teacher-url", url,
                                   "--teacher-tokenizer", world["teacher"], "--corpus", world["corpus"], "--samples",
                                   "1", "--temperature", "0", "--max-new-tokens", "16", "--answer-tokens", "4",
                                   "--keep-all", "--out", str(tmp_path / "url")])
    assert summary["files"]["sft_coa"] == 3 and summary["files"]["sft_cot"] == 3
    assert all(c["temperature"] == 0 and c["max_tokens"] <= 12 for c in calls)
    first = calls[0]["prompt"]
    assert first.startswith(M.AUTOCOA_TEMPLATE[:40]) or first.startswith(synthesize.COT_TEMPLATE[:40])
    assert first.endswith("<think>")
    assert summary["acceptance"]["cot"]["tokens"] + summary["acceptance"]["coa"]["tokens"] == sum(used) > 0


def test_teacher_server_errors_are_clear(world, tmp_path):
    args = ["--questions", world["train"], "--limit", "2", "--samples", "1", "--temperature", "0", "--keep-all",
            "--out", str(tmp_path / "err"), "--teacher-model", "t"]
    with server(lambda method, path, body: (500, {"error": "CUDA out of memory"})) as url:
        with pytest.raises(SystemExit, match=rf"teacher server {url}/v1/completions answered HTTP 500.*out of memory"):
            synthesize.main(args + ["--teacher-url", url])
    with server(lambda *a: (200, {})) as url:
        pass  # closed: nothing listens on that port any more
    with pytest.raises(SystemExit, match=rf"teacher server {url}/v1/completions unreachable"):
        synthesize.main(args + ["--teacher-url", url])
    assert read_jsonl(tmp_path / "err" / "records.jsonl") == []  # nothing half-done was recorded


def test_judge_rules():
    """Acceptance: finished, well formed, CoT without / CoA with actions, EM or F1 >= --min-f1, read from the
    teacher's own text (an observation that holds an answer does not count)."""
    args = synthesize.get_args(["--questions", "q", "--out", "o", "--teacher", "t", "--min-f1", "0.5"])
    right = f" hm {THINK_CLOSE}\nThe answer is \\boxed{{New York City}}"
    t = lambda text, actions=0, stop="eos": {"segments": [{"kind": "policy", "text": text}], "actions": actions,  # noqa: E731
                                             "stop": stop}
    assert synthesize.judge(t(right), ["New York City"], "cot", args)[:2] == (True, "accepted")
    assert synthesize.judge(t(right), ["New York"], "cot", args)[:2] == (True, "accepted")  # F1 0.8 >= 0.5
    assert synthesize.judge(t(right), ["Boston"], "cot", args)[1] == "wrong"
    assert synthesize.judge(t(right, 1), ["New York City"], "cot", args)[1] == "acted"
    assert synthesize.judge(t(right), ["New York City"], "coa", args)[1] == "no action"
    assert synthesize.judge(t(right, 1, "forced_answer"), ["New York City"], "coa", args)[1] == "unfinished (forced_answer)"
    assert synthesize.judge(t("\\boxed{New York City}", 1), ["New York City"], "coa", args)[1] == "format: no </think>"
    leak = {"segments": [{"kind": "policy", "text": f"a {action_open('search')} q {action_close('search')}"},
                         {"kind": "obs", "text": format_observation("search", f"{THINK_CLOSE} \\boxed{{Boston}}")},
                         {"kind": "policy", "text": f"{THINK_CLOSE} \\boxed{{Paris}}"}], "actions": 1, "stop": "eos"}
    assert synthesize.judge(leak, ["Boston"], "coa", args)[1] == "wrong"
    assert synthesize.judge(leak, ["Paris"], "coa", args)[1] == "accepted"
