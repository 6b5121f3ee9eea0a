"""train_sft.py: masks, the stage-1 loss against a hand computation, data errors, length dropping, batching, and
short runs (2-process torchrun == 1 process, resume == uninterrupted, checkpoints load with from_pretrained).
A throwaway word-level tokenizer and a 2-layer width-64 Llama keep the whole file at a few seconds of compute."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import tools
import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the city of ada was founded by bob in 1901 where born lives capital band company who what when is "
         "i need to search for it . result 1 : 2 3 answer so know boxed { } \\ x y z").split()


def make_record(rng, n_actions):
    """A trajectory: reasoning, n_actions searches with their observations, an answer."""
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    segments = []
    for _ in range(n_actions):
        segments.append({"kind": "policy", "text": f"{words(rng.randint(2, 8))} {tools.action_open('search')} "
                                                   f"{words(3)} {tools.action_close('search')}"})
        segments.append({"kind": "obs", "text": tools.format_observation("search", f"result 1 : {words(rng.randint(3, 12))}")})
    segments.append({"kind": "policy", "text": f"{words(rng.randint(2, 6))} {tools.THINK_CLOSE} answer \\boxed{{ ada }}"})
    return {"id": str(rng.random()), "question": f"who {words(rng.randint(2, 6))} ?", "golden_answers": ["ada"],
            "segments": segments}


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """DIR with tokenizer/, base.jsonl, sft_mix.jsonl, sft_pairs.jsonl, and init/: a tiny Llama checkpoint."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "data"
    data.mkdir()
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + tools.special_tokens() + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<eos>", "<unk>"] + tools.special_tokens())
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(data / "tokenizer")

    rng = random.Random(0)
    write_jsonl(data / "sft_mix.jsonl", [make_record(rng, rng.randint(0, 3)) for _ in range(24)])
    pairs = []
    for _ in range(16):
        acted, guessed = make_record(rng, 1)["segments"], make_record(rng, 0)["segments"]
        pairs.append({"id": "p", "question": "who was born in ada ?", "golden_answers": ["ada"],
                      "prefix": [{"kind": "policy", "text": "i need to know the city"}],
                      "chosen": acted, "rejected": guessed})
    write_jsonl(data / "sft_pairs.jsonl", pairs)
    write_jsonl(data / "base.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))}
                                      for _ in range(40)])

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    return {"root": root, "data": str(data), "init": str(root / "init"), "tok": tok}


def run_args(world, out, *extra):
    return ["--init", world["init"], "--data", world["data"], "--out", str(out), "--device", "cpu",
            "--micro-batch", "2", "--batch-size", "4", "--lr", "3e-3", "--warmup-ratio", "0.25", *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# masks and losses

def test_stage2_masks_exactly_observations_stage3_none(world):
    tok, path = world["tok"], os.path.join(world["data"], "sft_mix.jsonl")
    stage2, _ = train_sft.load_examples(tok, "2", path, 512)
    stage3, _ = train_sft.load_examples(tok, "3", path, 512)
    records = [json.loads(line) for line in open(path)]
    assert len(stage2) == len(stage3) == len(records)
    for record, [(ids2, loss2, obs2)], [(ids3, loss3, obs3)] in zip(records, stage2, stage3):
        assert ids2 == ids3 and obs2 == obs3
        prompt_len = len(ids2) - sum(loss3)  # stage 3 trains everything after the prompt
        assert loss3 == [0] * prompt_len + [1] * (len(ids3) - prompt_len)
        # stage 2 = stage 3 minus exactly the observation tokens
        assert [a - b for a, b in zip(loss3, loss2)] == obs2
        # and the observation tokens are the observations' own tokenisation, in order (token-in, token-out)
        obs_ids = [t for seg in record["segments"] if seg["kind"] == "obs"
                   for t in tok(seg["text"], add_special_tokens=False)["input_ids"]]
        assert [t for t, o in zip(ids2, obs2) if o] == obs_ids
        assert ids2[-1] == tok.eos_token_id and loss2[-1] == 1  # the eos that ends the response is trained


def test_cut_pairs_get_no_eos(world, tmp_path):
    """A stage-1 pair cut at the decision ("cut": true, teacher.decision_pairs) must not teach the answer to end after
    its first word; a whole continuation ends with the trained EOS."""
    tok = world["tok"]
    pair = json.loads(open(os.path.join(world["data"], "sft_pairs.jsonl")).readline())
    write_jsonl(tmp_path / "cut.jsonl", [pair, {**pair, "cut": True}])
    (whole, cut), _ = train_sft.load_examples(tok, "1", str(tmp_path / "cut.jsonl"), 512)
    for j in range(2):  # chosen, rejected
        assert whole[j][0][-1] == tok.eos_token_id and whole[j][1][-1] == 1
        assert cut[j][0] == whole[j][0][:-1] and cut[j][1] == whole[j][1][:-1]


def test_stage1_loss_equals_hand_computation(world):
    tok, alpha = world["tok"], 0.2
    pairs, _ = train_sft.load_examples(tok, "1", os.path.join(world["data"], "sft_pairs.jsonl"), 512)
    model = AutoModelForCausalLM.from_pretrained(world["init"]).eval()
    batch = pairs[:3]
    P = []
    for j in range(2):  # chosen rows, then rejected rows, padded as in training
        ids, attention, loss_mask, _ = train_sft.collate([pair[j] for pair in batch], tok.pad_token_id, "cpu")
        with torch.no_grad():
            logp = train_sft.token_logprobs(model(input_ids=ids, attention_mask=attention).logits, ids)
        P.append(train_sft.mean_logprob(logp, loss_mask[:, 1:].float()))
    P_chosen, P_rejected = P
    L = train_sft.contrastive_loss(P_chosen, P_rejected, alpha)

    def P_by_hand(row, context_len):
        x = torch.tensor([row[0]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)  # unpadded, on its own
        # continuation tokens: positions context_len .. end, each predicted from the position before
        terms = [logprobs[t - 1, row[0][t]].item() for t in range(context_len, len(row[0])) if row[1][t]]
        return sum(terms) / len(terms)

    for i, (chosen, rejected) in enumerate(batch):
        context_len = next(t for t in range(len(chosen[0])) if chosen[0][t] != rejected[0][t] or chosen[1][t])
        Pc, Pr = P_by_hand(chosen, context_len), P_by_hand(rejected, context_len)
        expected = -math.log(1 / (1 + math.exp(-(Pc - Pr)))) + alpha * -Pc
        assert P_chosen[i].item() == pytest.approx(Pc, abs=1e-4)
        assert P_rejected[i].item() == pytest.approx(Pr, abs=1e-4)
        assert L[i].item() == pytest.approx(expected, abs=1e-4)


def test_stage1_context_is_not_trained(world):
    """Only the continuation enters P(x|c): prompt and shared prefix tokens have loss_mask 0, in both rows."""
    tok = world["tok"]
    pairs, _ = train_sft.load_examples(tok, "1", os.path.join(world["data"], "sft_pairs.jsonl"), 512)
    for chosen, rejected in pairs:
        first_c, first_r = chosen[1].index(1), rejected[1].index(1)
        assert first_c == first_r and chosen[0][:first_c] == rejected[0][:first_r]
        prefix_ids = tok("i need to know the city", add_special_tokens=False)["input_ids"]
        assert chosen[0][first_c - len(prefix_ids):first_c] == prefix_ids


# -----------------------------------------------------------------------------
# data errors, length dropping, batching

@pytest.mark.parametrize("line, field", [
    ('{"question": "q", "segments": [', "invalid JSON"),
    ('{"segments": []}', "'question'"),
    ('{"question": "q", "segments": [{"kind": "tool", "text": "x"}]}', "'segments[0]'"),
    ('{"question": 3, "segments": []}', "'question'"),
])
def test_malformed_line_names_file_line_and_field(world, tmp_path, line, field):
    good = json.dumps(make_record(random.Random(1), 1))
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [good, "", line])
    with pytest.raises(ValueError) as e:
        train_sft.load_examples(world["tok"], "2", str(path), 512)
    assert f"{path}:3" in str(e.value) and field in str(e.value)


def test_non_utf8_line_names_file_and_line(world, tmp_path):
    """Regression (issue 13): a line that is not UTF-8 gave a bare UnicodeDecodeError, naming neither file nor line."""
    good = json.dumps(make_record(random.Random(1), 1)).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + '{"question": "caf\u00e9", "segments": []}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as e:
        train_sft.load_examples(world["tok"], "2", str(path), 512)
    assert f"{path}:3" in str(e.value) and "UTF-8" in str(e.value)


def test_over_max_len_dropped_and_counted_never_cut(world):
    tok, path = world["tok"], os.path.join(world["data"], "sft_mix.jsonl")
    full, _ = train_sft.load_examples(tok, "2", path, 10_000)
    lengths = sorted(len(ex[0][0]) for ex in full)
    max_len = lengths[len(lengths) // 2]
    kept, dropped = train_sft.load_examples(tok, "2", path, max_len)
    assert dropped == sum(n > max_len for n in lengths) > 0
    assert len(kept) + dropped == len(full)
    assert all(len(ex[0][0]) <= max_len and ex[0][0][-1] == tok.eos_token_id for ex in kept)
    # stage 1 drops a pair when either continuation is too long
    pairs, _ = train_sft.load_examples(tok, "1", os.path.join(world["data"], "sft_pairs.jsonl"), 10_000)
    longest = [max(len(r[0]) for r in ex) for ex in pairs]
    _, dropped = train_sft.load_examples(tok, "1", os.path.join(world["data"], "sft_pairs.jsonl"), sorted(longest)[8])
    assert dropped == sum(n > sorted(longest)[8] for n in longest)


def test_base_stage_packs_blocks_or_keeps_one_row_per_document(world):
    tok, path = world["tok"], os.path.join(world["data"], "base.jsonl")
    with open(path) as f:
        docs = [tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for line in f]
    packed, _ = train_sft.load_examples(tok, "base", path, 64)
    assert [i for ex in packed for i in ex[0][0]] == [i for d in docs for i in d]  # the stream, cut into blocks
    assert all(len(ex[0][0]) == 64 for ex in packed[:-1])
    limit = sorted(len(d) for d in docs)[len(docs) // 2]
    rows, dropped = train_sft.load_examples(tok, "base", path, limit, pack=False)
    assert [ex[0][0] for ex in rows] == [d for d in docs if len(d) <= limit]
    assert dropped == sum(len(d) > limit for d in docs) > 0
    assert all(ex[0][1] == [1] * len(ex[0][0]) and not any(ex[0][2]) for ex in rows)  # every token trained, no obs


def test_epoch_batches_cover_data_and_group_by_length():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(203)]
    batches = train_sft.epoch_batches(lengths, 8, 8, seed=0, epoch=0)
    assert batches == train_sft.epoch_batches(lengths, 8, 8, seed=0, epoch=0)
    assert batches != train_sft.epoch_batches(lengths, 8, 8, seed=0, epoch=1)
    assert all(len(b) == 8 for b in batches) and len(batches) == math.ceil(203 / 8)
    assert sorted(set(i for b in batches for i in b)) == list(range(203))
    pad = sum(max(lengths[i] for i in b[k:k + 2]) * 2 - sum(lengths[i] for i in b[k:k + 2])
              for b in batches for k in range(0, 8, 2)) / sum(max(lengths[i] for i in b[k:k + 2]) * 2
                                                               for b in batches for k in range(0, 8, 2))
    assert pad < 0.15


# -----------------------------------------------------------------------------
# runs

def test_resume_equals_uninterrupted_and_checkpoint_loads(world):
    root = world["root"]
    base = run_args(world, root / "full", "--stage", "2", "--max-steps", "4")
    train_sft.main(train_sft.parse_args(base))
    cut = run_args(world, root / "cut", "--stage", "2", "--max-steps", "4")
    train_sft.main(train_sft.parse_args(cut + ["--max-steps-this-run", "2"]))
    assert not os.path.exists(root / "cut" / "config.json") and os.path.exists(root / "cut" / "resume" / "trainer_state.pt")
    train_sft.main(train_sft.parse_args(cut + ["--resume"]))

    full, resumed = read_metrics(root / "full"), read_metrics(root / "cut")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["obs_loss"] == pytest.approx(b["obs_loss"], abs=1e-6)
    assert full[-1]["loss"] < full[0]["loss"]
    model_full = AutoModelForCausalLM.from_pretrained(root / "full")
    model_cut = AutoModelForCausalLM.from_pretrained(root / "cut")
    for (name, p), q in zip(model_full.state_dict().items(), model_cut.state_dict().values()):
        assert torch.equal(p, q), name
    assert json.load(open(root / "full" / "run_args.json"))["stage"] == "2"


class Killed(BaseException):
    """A kill: a BaseException, so no `except Exception` in the code under test can swallow it."""


@pytest.fixture(scope="module")
def full_run(world):
    """An uninterrupted stage-2 run of 4 steps: the reference every interrupted run must end equal to."""
    out = world["root"] / "kill_full"
    train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", "2", "--max-steps", "4")))
    return out


def assert_same_run(full, out, trained_in_rerun=None, allowed=None):
    """OUT ends as the uninterrupted run: same weights, every step's metrics row exactly once and in order, same
    losses, OUT/resume/ at the last step (common.py's format) and nothing left beside OUT (no OUT.tmp-*, OUT.final...)
    or beside resume/."""
    rows, reference = read_metrics(out), read_metrics(full)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    for a, b in zip(reference, rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    for (name, p), q in zip(AutoModelForCausalLM.from_pretrained(full).state_dict().items(),
                            AutoModelForCausalLM.from_pretrained(out).state_dict().values()):
        assert torch.equal(p, q), name
    assert json.load(open(os.path.join(out, "run_args.json")))["stage"] == "2"
    assert torch.load(os.path.join(out, "resume", "trainer_state.pt"), weights_only=False)["step"] == 4
    assert not {".resume.tmp", "resume.old"} & set(os.listdir(out))
    assert [f for f in os.listdir(os.path.dirname(out)) if f.startswith(os.path.basename(out) + ".")] == []


def arm_kill(monkeypatch, k):
    """From the final save on (save_resume of the last step, then save_final), the k-th file-system step (a rename, a
    replace, a tree removal, model.save itself) and every one after it raise Killed: the save stops there and no
    cleanup runs, as after a SIGKILL. Returns a dict whose "fired" says whether the kill came (k past the last step:
    no kill). The runs here save no state before the final one, so the first save_resume call arms it."""
    state = {"armed": False, "n": 0, "fired": False}

    def guard(fn, arms=False):
        def wrapped(*a, **kw):
            state["armed"] = state["armed"] or arms
            if state["armed"]:
                if state["n"] >= k:
                    state["fired"] = True
                    raise Killed(f"killed at step {k} of the final save")
                state["n"] += 1
            return fn(*a, **kw)
        return wrapped
    import common
    for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    monkeypatch.setattr(train_sft, "save_resume", guard(train_sft.save_resume, arms=True))
    monkeypatch.setattr(common, "save", guard(common.save))
    return state


def steps_trained(output):
    return [int(line.split()[1].split("/")[0]) for line in output.splitlines() if line.startswith("step ")]


@pytest.mark.parametrize("saved_state", [True, False])
def test_kill_anywhere_in_the_final_save_then_resume(world, full_run, monkeypatch, capsys, saved_state):
    """Regression (issue 13): model.save replaced the whole OUT dir and the metrics were written back after it, so a
    kill in between left OUT without metrics.jsonl (or no OUT at all, only OUT.old-*/ckpt) and --resume retrained from
    scratch. A kill at every file-system step of the final save, then a rerun with --resume: the rerun never redoes a
    step saved in OUT/resume/ (it finishes a complete final save instead of training), and OUT ends equal to the
    uninterrupted run with each metrics row exactly once. saved_state=False: a run without --save-every (no resume/:
    redoing every step is the only way, but the rows must still come out once)."""
    root = world["root"] / f"kills_{saved_state}"
    if saved_state:  # OUT/resume/ at step 2, metrics rows 1-2
        train_sft.main(train_sft.parse_args(run_args(world, root / "start", "--stage", "2", "--max-steps", "4",
                                                     "--max-steps-this-run", "2")))
    k = 0
    while True:
        out = root / f"k{k}" / "out"
        os.makedirs(out.parent)
        if saved_state:
            shutil.copytree(root / "start", out)
        with monkeypatch.context() as m:
            kill = arm_kill(m, k)
            try:
                train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", "2", "--max-steps", "4",
                                                             *(["--resume"] if saved_state else []))))
            except Killed:
                pass
        if not kill["fired"]:
            assert k >= 4, "the final save should have several steps"
            break
        capsys.readouterr()
        train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", "2", "--max-steps", "4", "--resume")))
        trained = steps_trained(capsys.readouterr().out)
        if saved_state:
            assert set(trained) <= {3, 4}, f"kill at {k}: the rerun redid steps {trained}"
        assert_same_run(full_run, str(out))
        k += 1
    assert_same_run(full_run, str(out))


def test_kill_between_metrics_row_and_resume_state(world, full_run, monkeypatch):
    """Regression (issue 13): the metrics row of step 3 was written, then the kill came while saving OUT/resume/ at
    step 3; --resume went back to step 2 and appended step 3's row a second time (rows 1, 2, 3, 3, 4)."""
    out = world["root"] / "kill_resume_state"
    args = run_args(world, out, "--stage", "2", "--max-steps", "4", "--save-every", "1")
    calls = []
    original = train_sft.save_resume

    def save_or_die(model, tok, out, args, state, state_dict=None):
        calls.append(state["step"])
        if state["step"] == 3:
            raise Killed("killed while saving the step-3 state")
        original(model, tok, out, args, state, state_dict)
    with monkeypatch.context() as m:
        m.setattr(train_sft, "save_resume", save_or_die)
        with pytest.raises(Killed):
            train_sft.main(train_sft.parse_args(args))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    train_sft.main(train_sft.parse_args(args + ["--resume"]))
    assert_same_run(full_run, str(out))
    # --resume on a finished run leaves it as it is; a run without --resume starts over, rows not appended
    train_sft.main(train_sft.parse_args(args + ["--resume"]))
    assert_same_run(full_run, str(out))
    train_sft.main(train_sft.parse_args(args))
    assert_same_run(full_run, str(out))


def test_requirements_pin_the_transformers_the_code_needs():
    """Regression (issue 13): requirements.txt allowed transformers>=4.46, but model.load calls
    from_pretrained(dtype=...), which transformers knows from 4.56 on. The pinned range must exclude what cannot run
    the code and include the installed (tested) version."""
    import transformers
    from packaging.requirements import Requirement
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        [line] = [line for line in f if line.startswith("transformers")]
    spec = Requirement(line.strip()).specifier
    assert "4.55.4" not in spec and "4.56.0" in spec
    assert transformers.__version__ in spec, f"installed transformers {transformers.__version__} outside {spec}"


def test_wm_calls_become_one_action_trajectories_with_trained_observations(world, tmp_path, capsys):
    """Stage 3 as the internal world model: world_model.py collect's split-train calls, each the query as the question,
    one action and the real observation (trained); held-out calls never; --train-copies / --wm-calls-copies repeat."""
    calls = [{"tool": "search", "args": "who founded ada", "observation": "result 1 : bob founded ada", "split": "train"},
             {"tool": "search", "args": "when was bob born", "observation": "result 1 : 1901", "split": "heldout"},
             {"tool": "search", "args": "where is ada", "observation": "result 1 : ada is a city", "split": "train"}]
    write_jsonl(tmp_path / "calls.jsonl", calls)
    records = train_sft.call_trajectories(str(tmp_path / "calls.jsonl"))
    assert [r["question"] for r in records] == ["who founded ada", "where is ada"]
    assert records[0]["segments"] == [
        {"kind": "policy", "text": f" {tools.action_open('search')} who founded ada {tools.action_close('search')}"},
        {"kind": "obs", "text": tools.format_observation("search", "result 1 : bob founded ada")}]
    write_jsonl(tmp_path / "bad.jsonl", [calls[0], {k: v for k, v in calls[2].items() if k != "split"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'split'"):
        train_sft.call_trajectories(str(tmp_path / "bad.jsonl"))
    tok = world["tok"]
    [[(ids, loss, obs)]], _ = train_sft.encode_trajectories(tok, records[:1], "3", 512)
    obs_ids = tok(records[0]["segments"][1]["text"], add_special_tokens=False)["input_ids"]
    assert [t for t, o in zip(ids, obs) if o] == obs_ids and all(l for l, o in zip(loss, obs) if o)

    out = world["root"] / "stage_3_wm_calls"
    train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", "3", "--max-steps", "1", "--train-copies", "2",
                                                 "--wm-calls", str(tmp_path / "calls.jsonl"),
                                                 "--wm-calls-copies", "3")))
    n_mix = sum(1 for _ in open(os.path.join(world["data"], "sft_mix.jsonl")))
    assert f": {2 * n_mix + 3 * 2} sequences" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="stage 3"):
        train_sft.main(train_sft.parse_args(run_args(world, tmp_path / "s2", "--stage", "2", "--max-steps", "1",
                                                     "--wm-calls", str(tmp_path / "calls.jsonl"))))


def test_bf16_autocast_on_cpu_keeps_float32_weights_and_the_loss(world):
    """run.sh trains the tiny preset under bf16 autocast on a CPU with bf16 matmuls: the weights and AdamW stay float32
    (the checkpoint reloads as float32), and the first step's loss, taken before any update, matches float32's to
    bfloat16's precision."""
    losses = {}
    for name, extra in [("fp32", []), ("bf16", ["--bf16"])]:
        out = world["root"] / f"autocast_{name}"
        train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", "2", "--max-steps", "2", *extra)))
        losses[name] = read_metrics(out)[0]["loss"]
        assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2) and losses["bf16"] != losses["fp32"]


def test_a_rerun_writes_the_same_weights_byte_for_byte(world):
    """The same command on the same thread count writes the same weights byte for byte (bf16 autocast included):
    data order, dropout-free steps and init are all seeded. Not promised across thread counts: at run.sh's model size
    a different count sums matmuls in another order and the weights differ in their last bits (measured 2026-12-04,
    README "Reproducibility")."""
    weights = []
    for k in range(2):
        out = world["root"] / f"rerun_{k}"
        train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", "2", "--max-steps", "3", "--bf16")))
        weights.append((out / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
    trained = AutoModelForCausalLM.from_pretrained(world["root"] / "rerun_0").state_dict()
    init = AutoModelForCausalLM.from_pretrained(world["init"]).state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init), "no step was taken: the comparison would be vacuous"


@pytest.mark.parametrize("stage", ["base", "1", "3"])
def test_stage_runs_end_to_end(world, stage):
    out = world["root"] / f"stage_{stage}"
    max_len = "64" if stage == "base" else "1024"  # base packs blocks of max_len tokens
    train_sft.main(train_sft.parse_args(run_args(world, out, "--stage", stage, "--max-steps", "2", "--max-len", max_len)))
    metrics = read_metrics(out)
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    if stage == "1":
        assert {"P_chosen", "P_rejected", "margin", "pair_acc"} <= set(metrics[0])
        assert metrics[0]["margin"] == pytest.approx(metrics[0]["P_chosen"] - metrics[0]["P_rejected"])
    if stage == "3":
        assert any(m["obs_loss"] is not None for m in metrics)
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("stage", ["1", "2"])
def test_two_process_torchrun_matches_one_process(world, stage):
    """The step loss is a sum over the global batch's tokens (stage 1: pairs) divided by their count, so the per-step
    loss, and hence the whole curve, must not depend on how the batch is split across processes."""
    root = world["root"] / f"ddp_{stage}"
    # batch 8 = 2 ranks x micro 2 x 2 accumulation steps: exercises no_sync and the global normaliser
    extra = ("--stage", stage, "--max-steps", "2", "--batch-size", "8")
    train_sft.main(train_sft.parse_args(run_args(world, root / "one", *extra)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_sft.py"), *run_args(world, root / "two", *extra)]
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out; output:\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = read_metrics(root / "one"), read_metrics(root / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in ("loss", "obs_loss", "P_chosen", "P_rejected"):
            assert (a.get(key) is None) == (b.get(key) is None) and a.get(key, 0) == pytest.approx(b.get(key, 0), abs=1e-4)
    for p, q in zip(AutoModelForCausalLM.from_pretrained(root / "one").parameters(),
                    AutoModelForCausalLM.from_pretrained(root / "two").parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_resume_takes_the_newest_complete_state(tmp_path):
    """Regression: a kill after OUT/.resume.tmp was complete (its trainer_state.pt is written last) but before the swap
    left it beside the older OUT/resume, and --resume took the older one (redoing steps the newer had saved)."""
    import common
    for name, step in (("resume", 2), (".resume.tmp", 4)):
        os.makedirs(tmp_path / name)
        torch.save({"step": step}, tmp_path / name / "trainer_state.pt")
    resume_dir = common.resume_point(str(tmp_path), True, True, False)
    assert common.load_resume_state(resume_dir)["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["resume"]
