"""
Benchmark: our rollout engine vs the two ways the peers generate multi-turn agent trajectories, on the same model,
prompts, seed and tool.

  ours      engine.rollout: one KV cache per batch, every row stops at the token that completes </end_NAME>, the
            observation is prefilled into the same cache, the prefix is never re-encoded.
  generate  (a) a loop over HF model.generate with a StoppingCriteria that stops each row at the action close tag; the
            whole context is re-encoded every turn (Search-R1-style loops, most agent repos).
  original  (b) AutoCoA / Search-R1 as released: generate each turn to EOS or the token cap, cut the text at the first
            action, throw the rest away, re-encode.

A random model never acts (nor does SmolLM2 unprompted), so all three methods get the same logits bias (the script):
it writes a calculator and a search action at fixed positions of the context (a function of the next token's position
only), and eos late (eos is suppressed before). With greedy decoding the three methods then produce the same
trajectories up to float noise; the script guarantees 2+ actions per trajectory. Reported: useful generated tokens/s
(tokens kept in the trajectories), the ratio to ours, tokens generated past an action (computed and thrown away), and
forward tokens processed (every token slot the model ran on, padding included). The ratio is also given per CPU second
(process time), which a machine shared with other jobs disturbs much less than wall time.
Where the time goes: each method's time is split into model forward (a timer around the LM's forward), the script's
bias (bench-only work, in every method), our sampling (engine._sample) and the rest: host bookkeeping (the engine's stop
checks, syncs, cache preparation, tool calls, injections; generate's own loop for the baselines).

    OMP_NUM_THREADS=1 python bench/rollout.py                        # tiny preset (~3M params), batch 32, CPU
    OMP_NUM_THREADS=1 python bench/rollout.py --model smollm2        # SmolLM2-135M, batch 32, CPU (~10+ minutes)
    python bench/rollout.py --model smollm2 --device cuda --batch 64  # the real 135M model on a GPU
(No torchrun: a single-process benchmark.)
"""
import argparse
import os
import string
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList  # noqa: E402

import engine as E  # noqa: E402
import model as M  # noqa: E402
from tools import THINK_OPEN, TOOL_NAMES, ToolRegistry, action_close, calculator, format_observation  # noqa: E402
from trajectory import _action_argument  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
# Model
parser.add_argument("--model", default="tiny", help="tiny | smollm2 | any HF dir (the tags are added as tokens)")
parser.add_argument("--device", default="cpu", help="cpu | cuda")
parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
# Rollout
parser.add_argument("--batch", type=int, default=32, help="trajectories per batch")
parser.add_argument("--max-new-tokens", type=int, default=160, help="sampled tokens per trajectory")
parser.add_argument("--period", type=int, default=70, help="the scripted actions repeat every PERIOD positions")
parser.add_argument("--bias", type=float, default=None, help="logit bias of a scripted token (default: 12 for tiny, "
                    "100 for a pretrained model, whose own logits are larger)")
parser.add_argument("--seed", type=int, default=0, help="model init seed")
parser.add_argument("--methods", default="ours,generate,original", help="comma-separated subset to run")
parser.add_argument("--no-timers", action="store_true", help="no forward/sample timers (on cuda they synchronise the "
                    "device around each call, which removes CPU/GPU overlap)")
args = parser.parse_args()
if args.bias is None:
    args.bias = 12.0 if args.model == "tiny" else 100.0
torch.set_num_threads(args.threads)

# -----------------------------------------------------------------------------
# Model, tokenizer, prompts, tool


def char_tokenizer_dir():
    """A character-level tokenizer (the tiny preset adds the tags as special tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = list(string.printable[:95]) + ["\n"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<pad>", "<eos>", "<unk>"] + chars)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    out = tempfile.mkdtemp(prefix="bench-tok-")
    tok.save_pretrained(out)
    return out


if args.model == "tiny":
    lm, tok = M.load("tiny", tokenizer=char_tokenizer_dir(), seed=args.seed, device=args.device)
else:
    lm, tok = M.load(args.model, add_action_tokens=True, device=args.device)
    if tok.pad_token_id == tok.eos_token_id:  # the baselines find padding by id: keep it apart from eos
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
lm.eval()
print(f"model {args.model}: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M params, vocab {len(tok)}, "
      f"device {args.device}")
questions = [f"Question {i}: what is {i} times {i + 3}, and where is {'Paris' * (i % 3 + 1)}?"
             for i in range(args.batch)]
prompts = [tok.encode(f"{q}\n{THINK_OPEN}", add_special_tokens=False) for q in questions]
tools = ToolRegistry({"search": lambda qs: [f"result 1: \"{q}\"\nsome text about {q}" for q in qs],
                      "calculator": calculator}, cache_size=0)
close_ids = {tok.convert_tokens_to_ids(action_close(n)): n for n in TOOL_NAMES}
V = lm.get_output_embeddings().weight.shape[0]

# The script: token id to force at (next position % period)
script = {}
for offset, text in [(0, "<begin_calculator> 7*6 </end_calculator>"),
                     (args.period // 2, "<begin_search> paris </end_search>")]:
    for j, t in enumerate(tok.encode(text, add_special_tokens=False)):
        script[offset + j] = t
EOS_AT = max(len(p) for p in prompts) + 2 * args.max_new_tokens  # late: most rows stop at the token budget


def script_bias(next_pos):
    """next_pos (B,) -> additive logits (B, V): the same function of position for every method. eos is suppressed
    except at EOS_AT (a pretrained model would end most rows before their second action)."""
    bias = torch.zeros(len(next_pos), V, device=next_pos.device)
    bias[:, tok.eos_token_id] = -args.bias
    for b, p in enumerate(next_pos.tolist()):
        t = tok.eos_token_id if p == EOS_AT else script.get(p % args.period)
        if t is not None:
            bias[b, t] = args.bias
    return bias


# Timers: wall and CPU seconds inside the LM's forward, the script's bias and our sampler (wrapped in place; everything
# calls them). CPU seconds (process time) keep the split honest on a machine shared with other jobs.
timers = {name: [0.0, 0.0] for name in ("forward", "script", "sample")}


def timed(name, fn):
    if args.no_timers:
        return fn
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def wrapper(*a, **kw):
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        out = fn(*a, **kw)
        sync()
        timers[name][0] += time.perf_counter() - t
        timers[name][1] += time.process_time() - cpu
        return out
    return wrapper


lm.forward = timed("forward", lm.forward)  # nn.Module.__call__ finds the instance attribute: generate uses it too
script_bias = timed("script", script_bias)
E._sample = timed("sample", E._sample)     # rollout() looks _sample up in engine.py at each step

forward_tokens = [0]
lm.model.embed_tokens.register_forward_hook(lambda mod, inp, out: forward_tokens.__setitem__(0, forward_tokens[0]
                                                                                              + inp[0].numel()))


class Scripted(torch.nn.Module):
    """Our engine's view of the model: the LM with the script's bias on the last logits (position from position_ids)."""

    def __init__(self):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, **kw):
        out = self.lm(input_ids=input_ids, position_ids=position_ids, **kw)
        out.logits[:, -1] += script_bias(position_ids[:, -1] + 1)
        return out


class ScriptProcessor(LogitsProcessor):
    """The baselines' view: same bias; next position = real (non-pad) tokens in the context."""

    def __call__(self, input_ids, scores):
        return scores + script_bias((input_ids != tok.pad_token_id).sum(-1))


class StopAtClose(StoppingCriteria):
    def __call__(self, input_ids, scores, **kw):
        return torch.isin(input_ids[:, -1], torch.tensor(list(close_ids), device=input_ids.device))


# -----------------------------------------------------------------------------
# The baselines: one generate call per turn, the whole context re-encoded each time


def generate_loop(stop_at_action):
    """-> (responses as id lists, sampled tokens kept, tokens generated past an action or the budget). Same budget rule
    as ours: max_new_tokens sampled tokens per row; the row stops at eos or the budget."""
    contexts = [list(p) for p in prompts]
    responses = [[] for _ in prompts]
    sampled = [0] * len(prompts)
    active = list(range(len(prompts)))
    wasted = 0
    while active:
        width = max(len(contexts[i]) for i in active)
        ids = torch.full((len(active), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(active):
            ids[r, width - len(contexts[i]):] = torch.tensor(contexts[i])
            mask[r, width - len(contexts[i]):] = 1
        budget = max(args.max_new_tokens - sampled[i] for i in active)
        with torch.no_grad():
            out = lm.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), do_sample=False,
                              max_new_tokens=budget, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              logits_processor=LogitsProcessorList([ScriptProcessor()]),
                              stopping_criteria=StoppingCriteriaList([StopAtClose()] if stop_at_action else []))
        new = out[:, width:].tolist()
        calls, next_active = [], []
        for r, i in enumerate(active):
            gen = [t for t in new[r] if t != tok.pad_token_id]
            cut = next((j + 1 for j, t in enumerate(gen) if t in close_ids), None)  # through the first action
            room = args.max_new_tokens - sampled[i]
            keep = gen[:min(cut or len(gen), room)]
            wasted += len(gen) - len(keep)
            responses[i] += keep
            contexts[i] += keep
            sampled[i] += len(keep)
            if cut is not None and cut <= room:  # an action on the last budget token is answered too (as ours)
                text = tok.decode(responses[i], skip_special_tokens=False)
                name = close_ids[keep[-1]]
                calls.append((i, name, _action_argument(text, name)))
        observations = tools([(n, a) for _, n, a in calls]) if calls else []
        for (i, name, _), obs in zip(calls, observations):
            obs_ids = M.encode_observation(tok, format_observation(name, obs))  # as the engine does
            responses[i] += obs_ids
            contexts[i] += obs_ids
            if sampled[i] < args.max_new_tokens:
                next_active.append(i)
        active = next_active
    return responses, sum(sampled), wasted


# -----------------------------------------------------------------------------
# Run and report

results = {}
for method in args.methods.split(","):
    forward_tokens[0] = 0
    for t in timers.values():
        t[:] = [0.0, 0.0]
    tools.reset_counts()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if method == "ours":
        # answer_tokens=0: the baselines have no forced answer, so every row samples max_new_tokens while thinking;
        # the forced "</think>\n" the engine then appends (the only injection outside an observation) is cut below
        outs = E.rollout(Scripted(), tok, prompts, tools, "real", max_new_tokens=args.max_new_tokens,
                         max_context=4096, answer_tokens=0, greedy=True)
        generated = sum(sum(r.loss_mask) for r in outs)
        forced = [next((j for j, (lm_, o) in enumerate(zip(r.loss_mask, r.obs_mask)) if not lm_ and not o),
                       len(r.response_ids)) for r in outs]
        responses = [r.response_ids[:f] for r, f in zip(outs, forced)]
        # tokens past an action, measured: while the row may act (before the forced "</think>"), a close tag is the
        # last token or is followed by an observation
        wasted = sum(1 for r, f in zip(outs, forced) for j, t in enumerate(r.response_ids[:f - 1])
                     if t in close_ids and not r.obs_mask[j + 1])
    else:
        responses, generated, wasted = generate_loop(stop_at_action=method == "generate")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    actions = [sum(t in close_ids for t in r) for r in responses]
    results[method] = dict(seconds=seconds, cpu=cpu, generated=generated, wasted=wasted, forward=forward_tokens[0],
                           calls=tools.real_calls, responses=responses)
    print(f"{method:9s} | {generated / seconds:8.1f} generated tok/s | {seconds:6.2f} s | {cpu:6.2f} CPU s | "
          f"{generated} tokens kept | "
          f"{wasted} generated past an action | {forward_tokens[0]} forward tokens | {tools.real_calls} tool calls | "
          f"actions/trajectory min {min(actions)} mean {sum(actions) / len(actions):.1f}")
    if not args.no_timers:
        for unit, i, total in (("s", 0, seconds), ("CPU s", 1, cpu)):
            rest = total - sum(t[i] for t in timers.values())
            forward = timers["forward"][i]
            print(f"{'':9s} | {unit:5s}: forward {forward:7.2f} ({100 * forward / total:.0f}%) | "
                  f"script bias {timers['script'][i]:.2f} | sampling {timers['sample'][i]:.2f} | host rest {rest:.2f} "
                  f"({100 * rest / total:.0f}%) | {forward_tokens[0] / forward:.0f} forward tok/s")

if "ours" in results:
    ours = results["ours"]
    for method, r in results.items():
        if method != "ours":
            same = sum(a == b for a, b in zip(ours["responses"], r["responses"]))
            print(f"ours vs {method}: {(ours['generated'] / ours['seconds']) / (r['generated'] / r['seconds']):.2f}x "
                  f"tokens/s ({r['cpu'] / ours['cpu']:.2f}x per CPU second), "
                  f"{r['forward'] / ours['forward']:.2f}x fewer forward tokens, "
                  f"{same}/{len(prompts)} identical trajectories")
