"""
RL for agent models (AutoCoA paper 3.3, SPEC 5): GRPO (the paper's) or PPO (ppo.py) over multi-turn rollouts in which
the policy acts inside its chain of thought. RL-stage 1 runs in a simulated environment (the policy writes its own
observations, SFT stage 3's internal world model; --world-model CKPT: world_model.py's separate model, counted as
simulated), RL-stage 2 against the real tool. A step, one function per box: collect (engine.rollout, rewards) -> score
(old and reference log-probs) -> ADVANTAGES[--algo] -> update (--ppo-epochs x --minibatches clipped updates).

Departures from the paper / the authors' verl code, and why:
  - EVERY loss term (surrogate, k3 KL, entropy, value) is masked by loss_mask and divided by the masked-in tokens of
    the minibatch over all ranks and micro-batches (the original zeroed only the advantages: KL, entropy and the
    denominator counted observation tokens the policy did not write).
  - Several updates per batch (--ppo-epochs, --minibatches), so the ratio leaves 1 and clipping acts (the original made
    one: ratio == 1, the clip never fired). Dropout is off, so the first update has ratio exactly 1.
  - Reward = EM (or F1) when the response keeps the format, else --format-penalty, checked on the policy's OWN tokens
    (the original checked prompt+response, so it could never fail): a passage holding "</think>" or "\\boxed{X}" does
    not change the score; a result block the policy wrote itself breaks the format.
  - GRPO divides by the group std (--grpo-std-norm, as verl/DeepSeekMath; the paper's formula only mean-centers).
  - Tokens are scored under the distribution that sampled them, logits / --temperature (as verl): scoring at T=1 while
    sampling at 0.6 updates a policy that did not act (a path to entropy collapse). Top-p is not in the scored policy
    (verl neither). `logp_gap` = mean |engine - trainer| log-prob of the sampled tokens (< 1e-4 on CPU fp32, tested);
    --tis-cap C weights each token's surrogate by min(pi_old / pi_engine, C) where they differ (top-p, bf16 kernels).
  - --sim-context call (run.sh's tiny preset; the paper's is "trajectory"): the policy writes each simulated observation
    from the call alone (greedy), as stage 3 learnt the teacher's calls (in its trajectory it loses the fact hop by hop,
    RUNS.md); the calculator is real there. --real-questions: the real steps' prompts (run.sh: known ones).
  - --oversample N (run.sh's tiny preset: 3; paper: 1): DAPO's dynamic sampling. Each step rolls out N x the prompts,
    trains on --prompts-per-step groups, those whose rewards differ first (`signal_groups`; equal rewards: no GRPO
    advantage). The tiny policy samples nearly the same trajectory K times, so this is what lets its RL gain (RUNS.md).
  - real_calls: searches that reached the real tool (the paper's cost), not cache hits, calculator, errors or dev evals.
  - Minibatches are whole prompt groups in a fixed order; trajectory k of prompt j samples from its own generator
    seeded by (seed, step, j, k): N processes == 1 process (tested), each rank one batched engine call.

Usage (DIR from `python data.py --out out/world`, out/sft123 from train_sft.py stages base -> 1 -> 2 -> 3):
  python train_rl.py --init out/sft123 --data out/world --out out/rl --algo grpo --sim-steps 80 --real-steps 16
  python train_rl.py --init out/sft123 --data out/world --out out/rl_ppo --algo ppo --sim-steps 0 --real-steps 96
  python train_rl.py --init out/sft123 --data out/world --out out/rl_wm --world-model out/wm --sim-steps 80
  python train_rl.py --init out/sft123 --data out/world --out out/rl_call --sim-context call --sim-steps 80
  torchrun --standalone --nproc_per_node=8 train_rl.py --init out/sft123 --data out/world --out out/rl \\
      --device cuda --bf16 --prompts-per-step 48 --group-size 5 --lr 7e-7    # + --fsdp for a 7B (fsdp.shard)
Defaults are the paper's (80 sim + 16 real steps, 48 prompts x 5 samples, lr 7e-7, T 0.6, KL 1e-3, entropy 1e-3); the
tiny CPU model needs a larger --lr, fewer, shorter rollouts and T 1.0 (run.sh). After a kill: the same plus --resume.
Outputs: common.py's checkpoint format, OUT/real_calls.jsonl (every real call, world_model.py collect --rollout-logs;
rank r > 0: real_calls.rank{r}.jsonl), OUT/sim_end/ (the model at the sim -> real switch: Table 1's RL-stage-1 row).
"""
import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist

import common
import fsdp
import ppo
from common import (all_sum, all_sum_dict, default_device, load_resume_state, lr_factor, open_step_log,
                    policy_forward, resume_point, save_final, save_resume, setup_distributed, teardown_distributed)
from evaluate import evaluate, exact_match, extract_answer, f1, format_ok, load_questions
from engine import rollout
from model import build_prompt, checkpoint_template, encode_segments, load, prompt_format, save
from tools import make_tools

# -----------------------------------------------------------------------------
# The math of the method, each a plain function (tests/test_rl.py checks them by hand)


def reward(response_text, golden_answers, kind="em", format_penalty=-0.5):
    """SPEC 5: EM (or token F1) of the answer if the response keeps the format (format_ok), else format_penalty."""
    if not format_ok(response_text)[0]:
        return format_penalty
    return {"em": exact_match, "f1": f1}[kind](extract_answer(response_text), golden_answers)


def flat_groups(rewards):
    """(P, K) rewards -> (P,) True where all K are equal: no signal (equality: their mean can be 1 ulp off the std's)"""
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards, std_norm=True):
    """GRPO (paper 3.3.2): A = r - mean(r) over the K samples of one prompt, divided by std(r) + 1e-6 if std_norm."""
    # rewards: (P, K) one row per prompt group
    A = rewards - rewards.mean(dim=1, keepdim=True)                      # (P, K)
    if std_norm:
        A = A / (rewards.std(dim=1, keepdim=True) + 1e-6)
    return A.masked_fill(flat_groups(rewards)[:, None], 0.0)


def policy_loss(logp, old_logp, ref_logp, advantages, entropy, mask, num_tokens, clip=0.2, kl_coef=1e-3,
                entropy_coef=0.0, tis_weight=None):
    """Clipped surrogate (x tis_weight unless None) + k3 KL to the reference + entropy bonus, ALL masked, / num_tokens
    -> (loss, stats): each stat a masked sum / num_tokens, so its sum over micro-batches and ranks is the mean."""
    # logp, old_logp, ref_logp, advantages, entropy, mask, tis_weight: (B, T); masked positions may hold anything
    m = mask.bool()
    log_ratio = (logp - old_logp).masked_fill(~m, 0.0)                   # masked before exp: no inf, no NaN gradient
    ratio = torch.exp(log_ratio)                                         # pi_theta / pi_old
    A = advantages.masked_fill(~m, 0.0)
    surrogate = torch.min(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    if tis_weight is not None:                                           # samples came from pi_engine, not pi_old
        surrogate = surrogate * tis_weight.masked_fill(~m, 0.0)
    ref_diff = (ref_logp - logp).masked_fill(~m, 0.0)
    kl = torch.exp(ref_diff) - ref_diff - 1                              # k3 estimator of KL(pi_theta || pi_ref)
    H = entropy.masked_fill(~m, 0.0)
    loss = (-surrogate + kl_coef * kl - entropy_coef * H).masked_fill(~m, 0.0).sum() / num_tokens
    with torch.no_grad():
        stats = {"kl": kl.sum(), "entropy": H.sum(), "clipfrac": ((ratio - 1).abs() > clip)[m].sum(),
                 "approx_kl": ((ratio - 1) - log_ratio).sum()}           # k3 of KL(pi_old || pi_theta)
        stats = {k: float(v) / num_tokens for k, v in stats.items()}
    return loss, stats


def prompt_index(seed, step, j, num_prompts, num_questions):
    """Question index of the j-th prompt of a step: epochs over a seeded permutation (resume-safe, rank-independent)."""
    epoch, offset = divmod(step * num_prompts + j, num_questions)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(num_questions, generator=generator)[offset])

# -----------------------------------------------------------------------------
# Advantages per algorithm: (score()'s micro-batches, args) -> extra metrics, setting b["advantages"] (B, T-1) on each


def grpo_advantages(micro, args):
    """group_advantages of the step's rewards; every token of trajectory i gets A_i."""
    rewards = torch.tensor([s["reward"] for b in micro for s in b["seqs"]]).view(-1, args.group_size)  # (P, K)
    A = group_advantages(rewards, args.grpo_std_norm).flatten().split([len(b["seqs"]) for b in micro])
    for b, a in zip(micro, A):
        b["advantages"] = a.to(b["mask"].device)[:, None].expand_as(b["mask"])
    signal, groups = all_sum(torch.tensor([float((~flat_groups(rewards)).sum()), len(rewards)])).tolist()
    return {"signal_groups": signal / groups}  # groups whose rewards differ: all the surrogate learns from


ADVANTAGES = {"grpo": grpo_advantages, "ppo": ppo.advantages}

# -----------------------------------------------------------------------------
# The boxes of one step (the top of this file)


def collate(seqs, pad_id, device):
    """Right-pad -> ids, attention (B, T), the targets' loss mask and engine log-probs (B, T-1, as token_logprobs)."""
    columns = [(s["ids"], s["mask"], s["engine_logp"]) for s in seqs]
    ids, attention, mask, engine_logp = common.collate(columns, pad_id, device)
    return ids, attention, mask[:, 1:], engine_logp[:, 1:]


def tool_usage(registry):
    return {"real_calls": registry.paid_calls, "calculator_calls": registry.real_counts.get("calculator", 0),
            "cache_hits": registry.cache_hits, "tool_errors": registry.errors}


COUNTED = ("real_calls", "sim_obs", "cache_hits", "calculator_calls", "tool_errors")  # per step, and *_total


def collect(policy, tokenizer, questions, step, env_name, step_tools, real_tools, template, amp, args, rank, world):
    """This rank's rollouts (prompt j -> rank j % world) and rewards -> (seqs, metrics, response tokens of all ranks)"""
    n_prompts = args.prompts_per_step * args.oversample
    js = list(range(rank, n_prompts, world))
    qs = [questions[prompt_index(args.seed, step, j, n_prompts, len(questions))] for j in js]
    ids = [encode_segments(tokenizer, [{"kind": "prompt", "text": build_prompt(tokenizer, q["question"], template)}])[0]
           for q in qs]  # each prompt built and tokenised once
    prompts = [list(p) for p in ids for _ in range(args.group_size)]  # group-contiguous: K copies of each prompt
    seeds = [((args.seed * 1_000_003 + step) * 1_000_003 + j) * 1_000 + k for j in js for k in range(args.group_size)]
    before = tool_usage(real_tools)
    simulator = env_name in ("world-model", "sim-call")  # a model called like a tool: what it answers is simulated
    with torch.no_grad(), amp(), fsdp.whole_model(policy):  # FSDP: the whole policy gathered (all ranks)
        rolls = rollout(policy, tokenizer, prompts, step_tools, env="sim" if env_name == "sim" else "real",
                        max_new_tokens=args.max_new_tokens, max_actions=args.max_actions, max_context=args.max_context,
                        temperature=args.temperature, top_p=args.top_p, seed=seeds, train_sim_obs=args.train_sim_obs,
                        sim_greedy=args.sim_greedy and not args.train_sim_obs, sim_real_tools=args.sim_real_tools,
                        tool_batch=args.sim_tool_batch if simulator else 1)
    seqs, sums = [], {}
    for i, r in enumerate(rolls):
        golds = qs[i // args.group_size]["golden_answers"]
        R = reward(r.policy_text, golds, args.reward, args.format_penalty)  # the policy's own text, no passage
        seqs.append({"ids": list(r.prompt_ids) + list(r.response_ids), "reward": R,
                     "mask": [0] * len(r.prompt_ids) + list(r.loss_mask),
                     "engine_logp": [0.0] * len(r.prompt_ids) + list(r.logprobs)})
        row = {"n": 1, "reward": R, "em": exact_match(extract_answer(r.policy_text), golds),
               "format_violation": 1 - format_ok(r.policy_text)[0], "actions": sum(r.num_actions.values()),
               "sim_obs": r.sim_obs + (r.real_calls if simulator else 0),  # counted as simulated, never hidden
               "tokens": len(r.response_ids), "tool_requests": r.real_calls}
        sums = {k: sums.get(k, 0.) + v for k, v in row.items()}
    if args.oversample > 1:  # dynamic sampling (DAPO): keep 1/oversample of the groups, differing rewards first
        groups = [seqs[g:g + args.group_size] for g in range(0, len(seqs), args.group_size)]
        flat = flat_groups(torch.tensor([[s["reward"] for s in group] for group in groups])).tolist()
        keep = sorted(sorted(range(len(groups)), key=lambda g: flat[g])[:len(groups) // args.oversample])
        seqs = [s for g in keep for s in groups[g]]  # the step's metrics stay those of every rollout
    sums = all_sum_dict({**sums, **{k: v - before[k] for k, v in tool_usage(real_tools).items()}})
    means = {k: sums[k] / sums["n"] for k in ("reward", "em", "format_violation", "actions")}
    log = {"step": step + 1, "env": env_name, **means, **{k: int(sums[k]) for k in ("tool_requests",) + COUNTED}}
    return seqs, log, sums["tokens"]


def score(policy, reference, value_head, seqs, pad_id, device, amp, args):
    """Old and reference log-probs (old values) at logits / T in minibatches of whole groups -> (batches, logp_gap)"""
    per_minibatch = len(seqs) // args.minibatches
    batches, gap = [], torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), amp():
        for start in range(0, len(seqs), per_minibatch):
            batches.append([])
            for i in range(start, start + per_minibatch, args.micro_batch):
                mb = seqs[i:min(i + args.micro_batch, start + per_minibatch)]
                ids, attention, mask, engine_logp = collate(mb, pad_id, device)
                old_logp, _, old_values = policy_forward(policy, value_head, ids, attention, args.temperature, False)
                ref_logp = old_logp if reference is None else \
                    policy_forward(reference, None, ids, attention, args.temperature, False)[0]
                b = {"seqs": mb, "ids": ids, "attention": attention, "mask": mask, "old_logp": old_logp,
                     "ref_logp": ref_logp, "old_values": old_values}
                m = mask.bool()
                gap += torch.stack([(engine_logp - old_logp)[m].abs().sum().double(), m.sum().double()]).cpu()
                if args.tis_cap > 0:  # pi_old / pi_engine, truncated: the samples came from the engine
                    b["tis_weight"] = torch.exp((old_logp - engine_logp).masked_fill(~m, 0.0)).clamp(max=args.tis_cap)
                batches[-1].append(b)
    gap = all_sum(gap)
    return batches, (gap[0] / gap[1].clamp(min=1)).item()


def update(model, value_head, optimizer, batches, amp, args, wrapped, world):
    """--ppo-epochs x --minibatches optimizer steps (wrapped: model is DDP's) -> (mean stats, a stop reason or None)"""
    names = ["loss", "kl", "entropy", "clipfrac", "approx_kl"] + ["value_loss"] * (value_head is not None)
    stats = dict.fromkeys(names, 0.0)
    for epoch in range(args.ppo_epochs):
        for minibatch in batches:
            num_tokens = max(all_sum(torch.tensor(float(sum(b["mask"].sum() for b in minibatch)))).item(), 1.0)
            for i, b in enumerate(minibatch):
                sync = not wrapped or i == len(minibatch) - 1  # DDP all-reduces gradients on the last micro-batch only
                with nullcontext() if sync else model.no_sync():
                    with amp():
                        logp, entropy, values = policy_forward(model, value_head, b["ids"], b["attention"],
                                                               args.temperature)
                    loss, micro = policy_loss(logp, b["old_logp"], b["ref_logp"], b["advantages"], entropy, b["mask"],
                                              num_tokens, args.clip, args.kl_coef, args.entropy_coef,
                                              b.get("tis_weight"))
                    if value_head is not None:  # PPO's critic (GRPO has none)
                        v_loss = ppo.value_loss(values, b["old_values"], b["returns"], b["mask"], num_tokens, args.clip)
                        loss = loss + ppo.VF_COEF * v_loss
                        micro["value_loss"] = v_loss.item()
                    (loss * world).backward()  # DDP averages over ranks; the loss is already a global mean
                micro["loss"] = loss.item()
                for k, v in micro.items():
                    stats[k] += v / (args.ppo_epochs * args.minibatches)
            grad_norm = fsdp.clip_grad_norm(optimizer.param_groups[0]["params"], args.grad_clip)
            if not torch.isfinite(grad_norm):  # the global norm (of FSDP shards too): the same on every rank
                return all_sum_dict(stats), f"gradient is not finite (grad norm {grad_norm.item()})"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return all_sum_dict(stats), None


def step_line(log, total_steps):
    return (f"step {log['step']}/{total_steps} {log['env']} | reward {log['reward']:.3f} | em {log['em']:.3f} | "
            f"fmt_bad {log['format_violation']:.2f} | act {log['actions']:.2f} | real {log['real_calls']}/"
            f"{log['real_calls_total']} | sim_obs {log['sim_obs']} | logp_gap {log['logp_gap']:.1e} | "
            f"kl {log['kl']:.4f} | ent {log['entropy']:.3f} | clip {log['clipfrac']:.3f} | akl {log['approx_kl']:.4f}"
            + (f" | vloss {log['value_loss']:.4f} | ev {log['explained_variance']:.3f}" if "value_loss" in log else "")
            + (f" | signal {log['signal_groups']:.2f}" if "signal_groups" in log else "")
            + f" | roll {log['rollout_s']:.1f}s upd {log['update_s']:.1f}s | {log['tokens_per_s']:.0f} tok/s"
            + (f" | dev_em {log['dev_em']:.3f}" if "dev_em" in log else ""))

# -----------------------------------------------------------------------------
# Arguments and the loop


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init", required=True, help="policy start checkpoint (paper: SFT-1&2&3), also the KL reference")
    g.add_argument("--device", default=default_device(), help="cpu or cuda (torchrun: one GPU per rank)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast; weights and optimizer stay float32")
    g.add_argument("--fsdp", action="store_true", help="shard policy and reference over the ranks (FSDP2, torchrun)")
    g = p.add_argument_group("data and environment")
    g.add_argument("--data", required=True, help="dir with train.jsonl (+ dev.jsonl, corpus.jsonl), shared format")
    g.add_argument("--questions", default="train.jsonl", help="prompts in --data (data.py --rl: rl.jsonl, new to SFT)")
    g.add_argument("--real-questions", default=None, help="the real steps' prompts in --data (default: --questions)")
    g.add_argument("--template", default=None, choices=["short", "autocoa"],
                   help="prompt template (default: --init's, its run_args.json); chat template: --init's tokenizer's")
    g.add_argument("--corpus", default=None, help="search corpus JSONL for the real tool (default: DATA/corpus.jsonl)")
    g.add_argument("--url", default=None, help="retrieval server URL for the real tool instead of --corpus")
    g.add_argument("--api", default="flashrag", choices=["flashrag", "searchr1"], help="retrieval server API shape")
    g.add_argument("--max-obs-chars", type=int, default=4000, help="longer tool output is cut, '... [truncated]'")
    g.add_argument("--world-model", default=None, help="world_model.py checkpoint: the sim steps' search tool")
    g.add_argument("--sim-context", default="trajectory", choices=["trajectory", "call"],
                   help="the policy writes a simulated observation inside its trajectory (paper), or from the call "
                        "alone, as stage 3 learnt the teacher's calls (greedy; the calculator real)")
    g.add_argument("--sim-steps", type=int, default=80, help="steps [0, sim) in the simulated environment (RL stage 1)")
    g.add_argument("--real-steps", type=int, default=16, help="then this many steps against the real tool (stage 2)")
    g = p.add_argument_group("rollout")
    g.add_argument("--prompts-per-step", type=int, default=48, help="prompts per step over all ranks (paper: 48)")
    g.add_argument("--group-size", type=int, default=5, help="samples per prompt, K (paper: 5)")
    g.add_argument("--oversample", type=int, default=1, help="roll out N x the prompts, train on --prompts-per-step "
                   "groups, those whose rewards differ first (DAPO's dynamic sampling; GRPO; 1: off, the paper's)")
    g.add_argument("--temperature", type=float, default=0.6, help="sampling T (paper: 0.6); scored under logits / T")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (not in the scored policy: --tis-cap)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="budget of generated tokens per trajectory")
    g.add_argument("--max-actions", type=int, default=10, help="actions per trajectory (SPEC 2: 10)")
    g.add_argument("--max-context", type=int, default=2048, help="prompt + response tokens at most")
    g.add_argument("--sim-tool-batch", type=int, default=32, help="sim steps with a generating simulator (--sim-"
                   "context call, --world-model): a row paused at an action waits until N have or no other row runs, "
                   "one generation answers them: the same trajectories, faster (1: at once, as real steps always are)")
    g.add_argument("--train-sim-obs", action="store_true", help="train on simulated observations (AutoCoA: masked)")
    g.add_argument("--sim-greedy", action="store_true", help="greedy sim observations (not with --train-sim-obs)")
    g.add_argument("--sim-real-tools", nargs="*", default=[], help="tools still called for real in sim steps")
    g = p.add_argument_group("reward")
    g.add_argument("--reward", default="em", choices=["em", "f1"], help="answer score (paper: EM)")
    g.add_argument("--format-penalty", type=float, default=-0.5, help="reward of a response that breaks the format")
    g = p.add_argument_group("optimization")
    g.add_argument("--algo", default="grpo", choices=list(ADVANTAGES), help="GRPO (paper) or PPO (ppo.py)")
    g.add_argument("--lr", type=float, default=7e-7, help="AdamW learning rate, constant after warmup (paper: 7e-7)")
    g.add_argument("--warmup-steps", type=int, default=0, help="the lr rises linearly over N steps (0: off, paper)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each batch")
    g.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass (whole prompt groups each)")
    g.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (gradient accumulation)")
    g.add_argument("--clip", type=float, default=0.2, help="ratio clip epsilon (PPO: the value clip too)")
    g.add_argument("--tis-cap", type=float, default=0.0, help="surrogate x min(pi_old / pi_engine, C) (0: off)")
    g.add_argument("--kl-coef", type=float, default=1e-3, help="k3 KL-to-reference coefficient (0: no reference model)")
    g.add_argument("--entropy-coef", type=float, default=1e-3, help="entropy bonus coefficient")
    g.add_argument("--grpo-std-norm", action=argparse.BooleanOptionalAction, default=True, help="A /= std(r) too")
    g.add_argument("--seed", type=int, default=0, help="seed of prompt order and rollouts")
    g = p.add_argument_group("stopping")
    g.add_argument("--collapse-entropy", type=float, default=0.02, help="collapse: mean token entropy below this ...")
    g.add_argument("--collapse-format", type=float, default=0.5, help="... and the format-ok rate below this ...")
    g.add_argument("--collapse-patience", type=int, default=5, help="... for this many steps in a row (0: never stop)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", required=True, help="output dir: final checkpoint, metrics.jsonl, resume/")
    g.add_argument("--save-every", type=int, default=0, help="write OUT/resume every N steps (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/resume (after a kill at any point)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate on DATA/dev.jsonl every N steps (0: off)")
    g.add_argument("--eval-limit", type=int, default=100, help="dev questions per evaluation")
    return p.parse_args(argv)


def build_models(args, start, device, ddp):
    """-> policy (float32 master weights: lr 7e-7 updates are below bfloat16's resolution), frozen reference (--init's,
    also on --resume; None when --kl-coef 0), the training module (DDP-wrapped policy under torchrun), tokenizer."""
    torch.manual_seed(args.seed)  # a fresh value head is initialised from the global RNG: same seed, same head
    policy, tokenizer = load(start, device=device, value_head=args.algo == "ppo", seed=args.seed)
    if args.algo != "ppo":  # an init with value_head.pt would attach a head GRPO never uses (DDP: unused parameters)
        policy.value_head = None
    policy.eval()  # dropout off for rollouts AND updates (see docstring)
    reference = (load(args.init, device=device, seed=args.seed)[0].eval().requires_grad_(False)
                 if args.kl_coef > 0 else None)
    policy, model = fsdp.parallelize(policy, device, ddp, args.fsdp, args.bf16)  # model: the training forward's
    if args.fsdp and reference is not None:
        reference = fsdp.shard(reference, device, args.bf16)
    return policy, reference, model, tokenizer


def main(argv=None):
    args = parse_args(argv)
    stop = train(args, *setup_distributed(args.device))  # -> rank, world, device, ddp
    teardown_distributed()
    if stop:
        raise SystemExit(1)


def train(args, rank, world, device, ddp):
    """Steps (args.sim_steps simulated, then args.real_steps real) -> a stop reason, or None when every step ran."""
    master, total_steps = rank == 0, args.sim_steps + args.real_steps
    assert args.prompts_per_step % world == 0, f"--prompts-per-step {args.prompts_per_step} must divide by {world}"
    prompts_per_rank = args.prompts_per_step // world
    assert prompts_per_rank >= args.minibatches > 0 and prompts_per_rank % args.minibatches == 0, \
        f"{prompts_per_rank} prompts per rank must divide into --minibatches {args.minibatches} (whole groups)"
    assert args.algo == "ppo" or args.group_size >= 2, "GRPO needs --group-size >= 2 (a group of one has no baseline)"
    assert args.oversample >= 1 and (args.algo == "grpo" or args.oversample == 1), "--oversample N >= 1, GRPO only"
    assert total_steps > 0 and args.temperature > 0, "needs --sim-steps + --real-steps > 0 and --temperature > 0"
    simulators = bool(args.world_model) + (args.sim_context == "call")  # models called as the search tool
    assert simulators == 0 or simulators == 1 and not (args.train_sim_obs or args.sim_greedy or args.sim_real_tools), \
        "--world-model or --sim-context call (not both): not with --train-sim-obs, --sim-greedy or --sim-real-tools"
    if master:
        print(f"{world} rank(s) x {prompts_per_rank} prompts x {args.group_size} samples; {args.ppo_epochs} epochs x "
              f"{args.minibatches} minibatches; {args.sim_steps} sim + {args.real_steps} real steps")
    resume_dir = resume_point(args.out, args.resume, master, ddp)

    # --- models, tools, data
    amp = partial(torch.autocast, device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
    policy, reference, model, tokenizer = build_models(args, resume_dir or args.init, device, ddp)
    fsdp.check_memory(policy.config, device, master, world, args.micro_batch, args.max_context, args.fsdp,
                      None, bf16=args.bf16, reference=reference is not None,  # None: no --grad-checkpointing here
                      rollout_batch=prompts_per_rank * args.group_size * args.oversample)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # prompts must look like the ones SFT trained on; saved in run_args.json, so RL from this run's checkpoint agrees
    template = args.template = checkpoint_template(args.init, args.template)
    if master:
        print(prompt_format(tokenizer, template))
    sim_prompts = load_questions(os.path.join(args.data, args.questions))  # RL-stage 1's, and stage 2's by default
    real_prompts = load_questions(os.path.join(args.data, args.real_questions)) if args.real_questions else sim_prompts
    tool_source = dict(url=args.url, api=args.api) if args.url else \
        dict(corpus=args.corpus or os.path.join(args.data, "corpus.jsonl"))
    real_tools = make_tools(**tool_source, max_obs_chars=args.max_obs_chars)
    dev_tools = make_tools(**tool_source, max_obs_chars=args.max_obs_chars) if args.eval_every and master else None
    world_model_tools = common.load_world_model_tools(args.world_model, device=device) if args.world_model else None
    own_call_tools = (common.policy_world_model_tools(policy, tokenizer, template) if args.sim_context == "call"
                      else None)

    start_step, totals, collapse_streak = 0, dict.fromkeys(COUNTED, 0), 0
    if resume_dir:
        state = load_resume_state(resume_dir)
        fsdp.load_optimizer_state(policy, optimizer, state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_step, totals, collapse_streak = state["step"], state["totals"], state["collapse_streak"]
        # the tool cache decides which calls reach the tool: without it a resumed run's counts and call log differ
        real_tools.cache.update(((t, a), o) for t, a, o in state["tool_cache"][rank])
        if master:
            print(f"resumed from {resume_dir} at step {start_step} ({totals['real_calls']} real tool calls so far)")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics_file = open_step_log(metrics_path, resume_dir is not None, start_step) if master else None
    calls_file = open_step_log(os.path.join(args.out, "real_calls.jsonl" if rank == 0 else
                                            f"real_calls.rank{rank}.jsonl"), resume_dir is not None, start_step)
    real_tools.log = []

    def save_state(done_steps):
        """OUT/resume: weights, optimizer, RNG, totals and every rank's tool cache (collective: all ranks call it)."""
        caches = [[[t, a, o] for (t, a), o in real_tools.cache.items()]] * world  # every rank's, for rank 0
        if ddp:
            dist.all_gather_object(caches, caches[rank])
        weights, optimizer_state = fsdp.full_state_dict(policy), fsdp.optimizer_state(policy, optimizer)
        if master:
            save_resume(policy, tokenizer, args.out, vars(args), {
                "step": done_steps, "optimizer": optimizer_state, "torch_rng": torch.get_rng_state(),
                "totals": totals, "collapse_streak": collapse_streak, "tool_cache": caches}, weights)

    stop = None
    sim_env = (("world-model", world_model_tools) if world_model_tools else  # RL-stage 1's environment
               ("sim-call", own_call_tools) if own_call_tools else ("sim", real_tools))
    for step in range(start_step, total_steps):
        env_name, step_tools = ("real", real_tools) if step >= args.sim_steps else sim_env
        if env_name == "sim-call":
            own_call_tools.cache.clear()  # the policy moved: last step's simulated observations are not its own now
        optimizer.param_groups[0]["lr"] = args.lr * lr_factor(step, total_steps, args.warmup_steps, "constant", 1.0)
        t0 = time.time()
        seqs, log, tokens = collect(policy, tokenizer, real_prompts if env_name == "real" else sim_prompts,
                                    step, env_name, step_tools, real_tools, template, amp, args, rank, world)
        calls_file.writelines(json.dumps({"step": step + 1, **c}) + "\n" for c in real_tools.log)
        calls_file.flush()
        real_tools.log.clear()
        totals = {k: totals[k] + log[k] for k in COUNTED}
        rollout_s = time.time() - t0
        log.update({f"{k}_total": v for k, v in totals.items()}, tokens_per_s=tokens / rollout_s)

        t0 = time.time()
        batches, log["logp_gap"] = score(policy, reference, policy.value_head, seqs, pad_id, device, amp, args)
        log.update(ADVANTAGES[args.algo]([b for minibatch in batches for b in minibatch], args))
        stats, stop = update(model, policy.value_head, optimizer, batches, amp, args, model is not policy, world)
        log.update(stats, lr=optimizer.param_groups[0]["lr"], rollout_s=rollout_s, update_s=time.time() - t0)

        # --- stopping rules, evaluation, logging, checkpoints
        stop = stop or (None if math.isfinite(log["loss"]) else "loss is not finite")
        stop = stop and f"{stop} at step {step + 1}"
        collapsed = log["entropy"] < args.collapse_entropy and 1 - log["format_violation"] < args.collapse_format
        collapse_streak = collapse_streak + 1 if collapsed else 0
        if not stop and args.collapse_patience and collapse_streak >= args.collapse_patience:
            stop = (f"collapse: entropy {log['entropy']:.4f} < {args.collapse_entropy} and format-ok rate "
                    f"{1 - log['format_violation']:.2f} < {args.collapse_format} for {collapse_streak} steps "
                    f"(lower --lr, raise --entropy-coef or --kl-coef; --collapse-patience 0 disables this stop)")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            with fsdp.whole_model(policy):  # FSDP: every rank gathers the policy, rank 0 evaluates (greedy, real)
                if master:
                    dev = load_questions(os.path.join(args.data, "dev.jsonl"))[:args.eval_limit]
                    overall = evaluate(policy, tokenizer, dev, dev_tools, "agent", template=template,
                                       progress=False, max_new_tokens=args.max_new_tokens,
                                       max_actions=args.max_actions, max_context=args.max_context)[0]["overall"]
                    log.update(dev_em=overall["em"], dev_f1=overall["f1"], dev_actions=overall.get("num_actions"))
            if ddp:
                dist.barrier()
        if master:
            print(step_line(log, total_steps), flush=True)
            metrics_file.write(json.dumps(log) + "\n")
            metrics_file.flush()
        if stop:
            if master:
                saved = os.path.join(args.out, "resume")
                last = f"the last good checkpoint is {saved}" if os.path.exists(saved) else "nothing saved"
                print(f"stopping: {stop}; {last}", flush=True)
            break
        if step + 1 == args.sim_steps and args.real_steps > 0:
            weights = fsdp.full_state_dict(policy)
            if master:
                save(policy, tokenizer, os.path.join(args.out, "sim_end"), vars(args), weights)
                shutil.copy(metrics_path, os.path.join(args.out, "sim_end", "metrics.jsonl"))  # its real-call count
        if args.save_every and (step + 1) % args.save_every == 0:
            save_state(step + 1)

    # --- final checkpoint (not after a stop: the last good one is OUT/resume)
    calls_file.close()
    if not stop:
        if start_step < total_steps:  # else: a rerun after a kill during the final save; OUT/resume is final already
            save_state(total_steps)
        weights = fsdp.full_state_dict(policy)  # every rank (FSDP: a collective), rank 0 writes
        if master:
            metrics_file.close()
            save_final(policy, tokenizer, args.out, vars(args), weights)
            print(f"saved {args.out} ({totals['real_calls']} real tool calls in total)")
    return stop


if __name__ == "__main__":
    main()
