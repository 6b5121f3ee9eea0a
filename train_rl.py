"""
RL for agent models (AutoCoA paper 3.3, SPEC 5): GRPO (the paper's algorithm) or PPO over multi-turn rollouts in which
the policy acts inside its chain of thought. RL-stage 1 runs in a simulated environment (the policy writes its own
observations: the internal world model learned in SFT stage 3), RL-stage 2 against the real tool. The paper's best
schedule is one flag pair: `--sim-steps 80 --real-steps 16` (5/6 simulated, 1/6 real).

One step: P prompts x G samples -> rollouts (model.rollout: token ids in, token ids out, loss_mask from the engine)
-> reward per trajectory -> advantages (GRPO: within each group; PPO: GAE on a value head) -> old and reference
log-probs by a no-grad forward -> --ppo-epochs x --minibatches clipped updates. Real tool calls are counted per step and
in total: spending few of them is the point of the simulated stage.

Departures from the paper / the authors' verl code, and why:
  - EVERY loss term (surrogate, k3 KL, entropy, value) is masked by loss_mask and divided by the number of masked-in
    tokens of the minibatch, counted over all ranks and micro-batches. The original zeroed only the advantages, so KL,
    entropy and the denominator still counted observation tokens, which the policy did not write.
  - --ppo-epochs / --minibatches: several updates per batch, so the ratio leaves 1 and clipping acts (the original made
    one update per batch: ratio == 1, the clip never fired).
  - Reward = EM (or --reward f1) of the answer when the response keeps the format, else --format-penalty (default
    -0.5): a broken trajectory always ranks below a well-formed wrong one. The format is checked on the RESPONSE only
    (the original checked prompt+response, so the check could never fail).
  - GRPO's division by the group std is a flag (--grpo-std-norm, on by default as in verl/DeepSeekMath; the paper's
    formula only mean-centers: --no-grpo-std-norm). A group whose rewards are all equal gets advantage exactly 0.
  - PPO (not in the paper) is offered for comparison: value head from model.py, GAE with gamma = lambda = 1 and the
    reward on the last policy token; observation tokens are skipped by GAE (they are the environment's transition, not
    actions), advantages whitened over masked-in tokens of the whole batch.
  - Tokens are scored under the distribution that sampled them: old, new and reference log-probs, KL and entropy all
    come from logits / --temperature (as verl does), so the ratio starts at 1 against the policy that acted. (Scoring
    at temperature 1 while sampling at 0.6 updates a policy that did not produce the samples: a non-zero update on
    logits that do not affect reward, a path to entropy collapse.) Top-p is NOT part of the scored policy (the
    truncated distribution has no gradient for the dropped tokens; verl does the same); the engine reports each token's
    log-prob under the distribution it was really drawn from, the step log's `logp_gap` is the mean |engine - trainer|
    over sampled tokens (< 1e-4 on CPU fp32 at top_p 1, tested), and --tis-cap C multiplies each token's surrogate by
    min(pi_old / pi_engine, C), truncated importance sampling, for where they differ (top-p, bf16 kernels).
  - real_calls = calls that reached the real search tool (the paper's cost); cache hits, calculator calls and error
    observations (malformed actions, unknown tools) are counted apart. The in-loop dev evaluation uses its own tool
    registry: its calls are never logged or counted as rollout calls.
  - Updates run with dropout off (model.eval()), so the first minibatch of the first epoch has ratio exactly 1.
  - --world-model CKPT: the simulated steps use the separate world model of world_model.py as the search tool
    (env "world-model") instead of the policy's own simulation; its calls are counted as simulated, not real.
  - Minibatches are whole prompt groups in a fixed order, and every trajectory samples from its own generator seeded
    by (seed, step, prompt index, sample index) (model.rollout's per-row seeds): neither the samples nor the
    minibatches depend on the number of ranks or on which rows share an engine call, so N processes == 1 process
    (tested) while each rank still generates all of its prompts in one batched engine call.

Usage (DIR from `python data.py --out out/world`, out/sft123 from train_sft.py stages base -> 1 -> 2 -> 3):
  python train_rl.py --init out/sft123 --data out/world --out out/rl --algo grpo --sim-steps 80 --real-steps 16
  python train_rl.py --init out/sft123 --data out/world --out out/rl_real --sim-steps 0 --real-steps 96  # all real
  python train_rl.py --init out/sft123 --data out/world --out out/rl_ppo --algo ppo --sim-steps 0 --real-steps 96
  python train_rl.py --init out/sft123 --data out/world --out out/rl_wm --world-model out/wm --sim-steps 80 \\
      --real-steps 16
  torchrun --standalone --nproc_per_node=8 train_rl.py --init out/sft123 --data out/world --out out/rl \\
      --device cuda --bf16 --prompts-per-step 48 --group-size 5 --lr 7e-7
The defaults are the paper's (48 prompts x 5 samples, lr 7e-7, temperature 0.6, KL 1e-3, entropy 1e-3); the tiny CPU
model needs a larger --lr and fewer, shorter rollouts (--prompts-per-step 8 --group-size 4 --max-new-tokens 256).
After a crash: the same command plus --resume (weights, optimizer, step, RNG and tool-call totals from OUT/resume).
Outputs: OUT/ final checkpoint (model.save), OUT/metrics.jsonl (one row per step), OUT/real_calls.jsonl (every real
tool call: step, tool, args, observation; `world_model.py collect --rollout-logs` reads it; rank r > 0 writes
real_calls.rank{r}.jsonl), OUT/resume/ (every --save-every),
OUT/sim_end/ (the model at the sim -> real switch, when both stages run: the RL-stage-1 row of Table 1).
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
from torch.nn.parallel import DistributedDataParallel as DDP

from evaluate import exact_match, extract_answer, f1, format_ok, load_questions
from model import build_prompt, checkpoint_template, encode_segments, load, rollout, save
from tools import make_tools
import train_sft as SFT  # the same padding and next-token log-probs as SFT

# -----------------------------------------------------------------------------
# Reward, advantages and losses: the math of the method, each a plain function (tests/test_rl.py checks them by hand)


def reward(response_text, golden_answers, kind="em", format_penalty=-0.5):
    """Scalar reward of one trajectory (SPEC 5): EM (or token F1) of the extracted answer when the RESPONSE keeps the
    format (</think>, no action after it, a \\boxed{} after it), else format_penalty. Swap this function to change the
    reward."""
    if not format_ok(response_text)[0]:
        return format_penalty
    score = {"em": exact_match, "f1": f1}[kind]
    return score(extract_answer(response_text), golden_answers)


def group_advantages(rewards, std_norm=True):
    """GRPO (paper 3.3.2): A = r - mean(r) over the K samples of one prompt, divided by std(r) + 1e-6 if std_norm."""
    # rewards: (P, K) one row per prompt group
    A = rewards - rewards.mean(dim=1, keepdim=True)                      # (P, K)
    if std_norm:
        A = A / (rewards.std(dim=1, keepdim=True) + 1e-6)
    # all-equal groups carry no signal; the mean of K equal floats can be 1 ulp off, which std division would blow up
    same = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)          # (P, 1)
    return A.masked_fill(same, 0.0)


def gae_advantages(token_rewards, values, mask, gamma=1.0, lam=1.0):
    """GAE over the masked-in (policy) tokens of each row; masked-out tokens (prompt, observations) are skipped, so the
    next value of a policy token is the value of the next policy token. -> (advantages, returns), 0 where masked."""
    # token_rewards, values, mask: (B, T)
    m = mask.bool()
    advantages = torch.zeros_like(values)
    last_gae = torch.zeros_like(values[:, 0])                            # (B,)
    next_value = torch.zeros_like(values[:, 0])                          # (B,) V after the last token = 0 (terminal)
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        gae_t = delta + gamma * lam * last_gae
        advantages[:, t] = torch.where(m[:, t], gae_t, 0.0)
        last_gae = torch.where(m[:, t], gae_t, last_gae)
        next_value = torch.where(m[:, t], values[:, t], next_value)
    returns = (advantages + values).masked_fill(~m, 0.0)
    return advantages, returns


def policy_loss(logp, old_logp, ref_logp, advantages, entropy, mask, num_tokens, clip=0.2, kl_coef=1e-3,
                entropy_coef=0.0, tis_weight=None):
    """Clipped surrogate + k3 KL to the reference + entropy bonus, ALL masked by loss_mask and divided by num_tokens
    (masked-in tokens of the whole minibatch over ranks and micro-batches). tis_weight: per-token truncated importance
    weight min(pi_old / pi_engine, C) on the surrogate, or None. Returns (loss, stats); each stat is a masked sum /
    num_tokens, so summing it over micro-batches and ranks gives the minibatch mean."""
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


def value_loss(values, old_values, returns, mask, num_tokens, clip=0.2):
    """PPO clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), masked, / num_tokens."""
    # values, old_values, returns, mask: (B, T)
    m = mask.bool()
    V, V_old, R = (x.masked_fill(~m, 0.0) for x in (values, old_values, returns))
    V_clipped = V_old + (V - V_old).clamp(-clip, clip)
    loss = 0.5 * torch.max((V - R) ** 2, (V_clipped - R) ** 2)           # (B, T)
    return loss.masked_fill(~m, 0.0).sum() / num_tokens


# -----------------------------------------------------------------------------
# Plumbing shared by the steps


def all_sum(x):
    """Sum a tensor over ranks (a no-op in one process). NCCL reduces GPU tensors only: CPU ones go through one."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    y = x.cuda() if dist.get_backend() == "nccl" else x
    dist.all_reduce(y)
    return y.to(x.device)


def masked_whiten(x, mask):
    """(x - mean) / std over the masked-in entries of all ranks; 0 where masked."""
    m = mask.bool()
    n, s, sq = all_sum(torch.stack([m.sum().double(), x[m].double().sum(), (x[m].double() ** 2).sum()]))
    mean = s / n
    var = (sq / n - mean ** 2).clamp(min=0)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).float().masked_fill(~m, 0.0)


def prompt_index(seed, step, j, num_prompts, num_questions):
    """Question index of the j-th prompt of a step: epochs over a seeded permutation (resume-safe, rank-independent)."""
    position = step * num_prompts + j
    epoch, offset = divmod(position, num_questions)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(num_questions, generator=generator)[offset])


def collate(seqs, pad_id, device):
    """Right-pad sequences -> ids, attention (B, T), the loss mask of the next-token targets (B, T-1) and the engine's
    log-prob of each target (B, T-1; 0 where the engine sampled nothing)."""
    ids, attention, mask = SFT.collate([(s["ids"], s["mask"]) for s in seqs], pad_id, device)
    T = ids.shape[1]
    engine_logp = torch.tensor([s["engine_logp"] + [0.0] * (T - len(s["engine_logp"])) for s in seqs], device=device)
    return ids, attention, mask[:, 1:], engine_logp[:, 1:]


def tool_usage(registry):
    """Cumulative counters of a ToolRegistry: real_calls = arguments that reached a real tool other than the (local,
    free) calculator, i.e. the paper's cost; cache hits, calculator calls and error observations apart."""
    reached = registry.real_counts
    return {"real_calls": sum(n for name, n in reached.items() if name != "calculator"),
            "calculator_calls": reached.get("calculator", 0), "cache_hits": registry.cache_hits,
            "tool_errors": registry.errors}


def forward(model, value_head, ids, attention, temperature=1.0, need_entropy=True):
    """Per-target log-prob, entropy and value of a padded batch under softmax(logits / temperature), the distribution
    the engine sampled from; values only when value_head is given."""
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=value_head is not None)
    scaled = out.logits.float() / temperature                            # (B, T, V)
    logp = SFT.token_logprobs(scaled, ids)                               # (B, T-1) log pi_T(ids[:, 1:])
    entropy = None
    if need_entropy:                                                     # H = logsumexp(z) - sum softmax(z) z
        logits = scaled[:, :-1]                                          # (B, T-1, V)
        entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, :-1]).float()      # (B, T-1) V(prefix up to t)
    return logp, entropy, values


def replace_dir(src, dst):
    """Rename src over dst (rename cannot replace a non-empty dir: move the old one aside first, then delete it)."""
    old = dst.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_resume(policy, tokenizer, out, args, state):
    """OUT/resume = weights (model.save) + trainer state, swapped in as a whole: never a half-written resume dir. The
    state is written last, so a dir holding trainer_state.pt is complete (find_resume relies on it)."""
    tmp = os.path.join(out, ".resume.tmp")
    save(policy, tokenizer, tmp, args)
    torch.save(state, os.path.join(tmp, "trainer_state.pt.part"))
    os.replace(os.path.join(tmp, "trainer_state.pt.part"), os.path.join(tmp, "trainer_state.pt"))
    replace_dir(tmp, os.path.join(out, "resume"))


def find_resume(out):
    """The complete resume dir under OUT, also after a kill inside replace_dir (resume moved aside to resume.old, the
    new one still at .resume.tmp): the newest complete one, else None."""
    for name in ("resume", ".resume.tmp", "resume.old"):  # newest first
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            return path
    return None


def save_final(policy, tokenizer, out, args):
    """The final checkpoint INTO OUT, file by file (model.save builds it beside OUT first), so OUT's logs, resume/ and
    sim_end/ are never moved: a kill at any point leaves them in place, and since OUT/resume already holds the final
    step, a rerun with --resume only redoes this save."""
    tmp = out.rstrip("/") + ".final.tmp"
    save(policy, tokenizer, tmp, args)
    for name in os.listdir(out):  # files of an older checkpoint that this one does not have (e.g. value_head.pt)
        weights = name == "value_head.pt" or name.endswith((".safetensors", ".bin", ".safetensors.index.json"))
        if weights and not os.path.exists(os.path.join(tmp, name)):
            os.remove(os.path.join(out, name))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    shutil.rmtree(tmp)


def open_step_log(path, resume, start_step):
    """A JSONL log with a "step" field per row, opened for appending. On --resume, rows of steps after the resume point
    are dropped first (they are redone), and so is a last line cut short by the crash."""
    if resume and os.path.exists(path):
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return open(path, "a" if resume else "w")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--init", required=True,
                        help="policy start checkpoint (paper: SFT stage 1&2&3); also the frozen KL reference")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir, needed when --init is 'tiny'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (torchrun: one GPU per rank)")
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast for rollouts and forwards; weights and optimizer stay float32")
    # Data and environment
    parser.add_argument("--data", required=True,
                        help="dir with train.jsonl (+ dev.jsonl, corpus.jsonl) in the shared format")
    parser.add_argument("--template", default=None, choices=["short", "autocoa"],
                        help="prompt template (default: the one --init was trained with, else 'short')")
    parser.add_argument("--corpus", default=None,
                        help="search corpus JSONL for the real tool (default: DATA/corpus.jsonl)")
    parser.add_argument("--url", default=None, help="retrieval server URL for the real tool instead of --corpus")
    parser.add_argument("--max-obs-chars", type=int, default=4000,
                        help="tool output longer than this is cut (visibly: '... [truncated]') before tokenising")
    parser.add_argument("--api", default="flashrag", choices=["flashrag", "searchr1"],
                        help="retrieval server API shape")
    parser.add_argument("--world-model", default=None,
                        help="world_model.py checkpoint: the simulated steps use it as the search tool")
    parser.add_argument("--sim-steps", type=int, default=80,
                        help="steps [0, sim) run in the simulated environment (RL stage 1)")
    parser.add_argument("--real-steps", type=int, default=16,
                        help="then this many steps against the real tool (RL stage 2)")
    # Rollout
    parser.add_argument("--prompts-per-step", type=int, default=48, help="prompts per step over all ranks (paper: 48)")
    parser.add_argument("--group-size", type=int, default=5, help="samples per prompt, K (paper: 5)")
    parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (paper: 0.6)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling (the trainer scores softmax(z/T) without it: see --tis-cap)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="budget of generated tokens per trajectory")
    parser.add_argument("--max-actions", type=int, default=10, help="actions per trajectory (SPEC 2: 10)")
    parser.add_argument("--max-context", type=int, default=2048, help="prompt + response tokens at most")
    parser.add_argument("--sim-obs-tokens", type=int, default=256,
                        help="sim env: most tokens of one observation the policy writes")
    parser.add_argument("--train-sim-obs", action="store_true",
                        help="also train on observations the policy simulated (default: masked, as AutoCoA)")
    # Reward
    parser.add_argument("--reward", default="em", choices=["em", "f1"], help="answer score (paper: EM)")
    parser.add_argument("--format-penalty", type=float, default=-0.5,
                        help="reward of a response that breaks the format")
    # Optimization
    parser.add_argument("--algo", default="grpo", choices=["grpo", "ppo"],
                        help="advantage estimator: group-relative (paper) or GAE on a value head")
    parser.add_argument("--lr", type=float, default=7e-7, help="AdamW learning rate, constant (paper: 7e-7)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    parser.add_argument("--ppo-epochs", type=int, default=2, help="passes over each batch")
    parser.add_argument("--minibatches", type=int, default=2,
                        help="optimizer steps per pass (whole prompt groups each)")
    parser.add_argument("--micro-batch-size", type=int, default=4,
                        help="sequences per forward/backward (gradient accumulation)")
    parser.add_argument("--clip", type=float, default=0.2, help="ratio clip epsilon")
    parser.add_argument("--tis-cap", type=float, default=0.0,
                        help="truncated importance sampling: weight each token's surrogate by min(pi_old/pi_engine, "
                             "C) against the engine's own log-probs (top-p, bf16 mismatch; 0: off)")
    parser.add_argument("--kl-coef", type=float, default=1e-3,
                        help="k3 KL-to-reference loss coefficient (0: no reference model)")
    parser.add_argument("--entropy-coef", type=float, default=1e-3, help="entropy bonus coefficient")
    parser.add_argument("--grpo-std-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="divide group advantages by std (paper text: only mean-centering)")
    parser.add_argument("--gamma", type=float, default=1.0, help="PPO discount")
    parser.add_argument("--lam", type=float, default=1.0, help="PPO GAE lambda")
    parser.add_argument("--value-clip", type=float, default=0.2, help="PPO value clip")
    parser.add_argument("--vf-coef", type=float, default=0.5, help="PPO value loss coefficient")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt order and rollouts")
    # Stopping
    parser.add_argument("--collapse-entropy", type=float, default=0.02,
                        help="collapse if mean token entropy falls below this ...")
    parser.add_argument("--collapse-format", type=float, default=0.5, help="... and the format-ok rate below this ...")
    parser.add_argument("--collapse-patience", type=int, default=5,
                        help="... for this many consecutive steps (0: never stop)")
    # Logging and checkpoints
    parser.add_argument("--out", required=True, help="output dir: final checkpoint, metrics.jsonl, resume/")
    parser.add_argument("--save-every", type=int, default=0, help="write OUT/resume every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/resume (after a kill at any point, also during the final save)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate on DATA/dev.jsonl every N steps (0: off)")
    parser.add_argument("--eval-limit", type=int, default=100, help="dev questions per evaluation")
    args = parser.parse_args(argv)

    # -----------------------------------------------------------------------------
    # Distributed setup and derived sizes

    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world, device = 0, 1, args.device
    if ddp:
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    master = rank == 0
    total_steps = args.sim_steps + args.real_steps
    assert args.prompts_per_step % world == 0, f"--prompts-per-step {args.prompts_per_step} must divide by {world}"
    prompts_per_rank = args.prompts_per_step // world
    assert prompts_per_rank >= args.minibatches > 0 and prompts_per_rank % args.minibatches == 0, \
        f"{prompts_per_rank} prompts per rank must divide into --minibatches {args.minibatches} (whole groups)"
    assert args.algo == "ppo" or args.group_size >= 2, "GRPO needs --group-size >= 2 (a group of one has no baseline)"
    assert total_steps > 0, "--sim-steps + --real-steps must be > 0"
    if master:
        print(f"{world} rank(s) x {prompts_per_rank} prompts x {args.group_size} samples = "
              f"{args.prompts_per_step * args.group_size} trajectories/step; {args.ppo_epochs} epochs x "
              f"{args.minibatches} minibatches; {args.sim_steps} sim + {args.real_steps} real steps")
    os.makedirs(args.out, exist_ok=True)
    resume_dir = os.path.join(args.out, "resume")
    if args.resume:
        found = find_resume(args.out)
        if found is None:
            raise SystemExit(f"--resume: no {resume_dir}/trainer_state.pt (nothing saved yet, or a different --out)")
        if master and found != resume_dir:  # a kill inside the swap: finish it
            replace_dir(found, resume_dir)
        if ddp:
            dist.barrier()

    # -----------------------------------------------------------------------------
    # Models, tools, data

    # float32 master weights: lr 7e-7 updates are below bfloat16's resolution, they would round to nothing
    amp = partial(torch.autocast, device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16)
    torch.manual_seed(args.seed)  # a fresh value head is initialised from the global RNG: same seed, same head
    policy, tokenizer = load(resume_dir if args.resume else args.init, tokenizer=args.tokenizer, device=device,
                             value_head=args.algo == "ppo", seed=args.seed)
    if args.algo != "ppo":  # an init with value_head.pt would attach a head GRPO never uses (DDP: unused parameters)
        policy.value_head = None
    policy.eval()  # dropout off for rollouts AND updates (see docstring)
    reference = None
    if args.kl_coef > 0:  # a "tiny" init is seeded: the reference gets the policy's starting weights
        reference = load(args.init, tokenizer=args.tokenizer, device=device, seed=args.seed)[0]
        reference.eval().requires_grad_(False)
    value_head = policy.value_head if args.algo == "ppo" else None
    model = policy  # rollouts and no-grad passes use the unwrapped policy; the training forward goes through DDP
    if ddp:
        model = DDP(policy, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # prompts must look like the ones SFT trained on; saved in run_args.json, so RL from this run's checkpoint agrees
    template = args.template = checkpoint_template(args.init, args.template)
    questions = load_questions(os.path.join(args.data, "train.jsonl"))
    tool_source = dict(url=args.url, api=args.api) if args.url else \
        dict(corpus=args.corpus or os.path.join(args.data, "corpus.jsonl"))
    real_tools = make_tools(**tool_source, max_obs_chars=args.max_obs_chars)
    eval_tools = None  # the dev evaluation's own registry (cache, counters): never mixed with the rollouts' calls
    world_model_tools = None
    if args.world_model:
        try:
            from world_model import load_world_model_tools  # lazy: only this environment needs it
        except ImportError as e:
            raise SystemExit(f"--world-model needs world_model.py next to train_rl.py ({e})")
        world_model_tools = load_world_model_tools(args.world_model, device=device)

    counted = ("real_calls", "sim_obs", "cache_hits", "calculator_calls", "tool_errors")
    start_step, totals, collapse_streak = 0, dict.fromkeys(counted, 0), 0
    if args.resume:
        state = torch.load(os.path.join(resume_dir, "trainer_state.pt"), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_step, totals, collapse_streak = state["step"], state["totals"], state["collapse_streak"]
        # the tool cache decides which calls reach the tool: without it a resumed run's counts and call log differ
        real_tools.cache.update(((t, a), o) for t, a, o in state["tool_cache"][rank])
        if master:
            print(f"resumed from {resume_dir} at step {start_step} ({totals['real_calls']} real tool calls so far)")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    metrics_file = open_step_log(metrics_path, args.resume, start_step) if master else None
    # every real call (tool, args, observation) of this rank's rollouts: world_model.py collect --rollout-logs reads it
    calls_path = os.path.join(args.out, "real_calls.jsonl" if rank == 0 else f"real_calls.rank{rank}.jsonl")
    calls_file = open_step_log(calls_path, args.resume, start_step)
    real_tools.log = []

    # -----------------------------------------------------------------------------
    # Training loop

    def save_state(done_steps):
        """OUT/resume: weights, optimizer, RNG, totals and every rank's tool cache (collective: all ranks call it)."""
        caches = [[[t, a, o] for (t, a), o in real_tools.cache.items()]]
        if ddp:
            caches = [None] * world
            dist.all_gather_object(caches, [[t, a, o] for (t, a), o in real_tools.cache.items()])
        if master:
            save_resume(policy, tokenizer, args.out, vars(args), {
                "step": done_steps, "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "totals": totals, "collapse_streak": collapse_streak, "tool_cache": caches})

    step, stop = start_step, None
    for step in range(start_step, total_steps):
        if step >= args.sim_steps:
            env_name, engine_env, step_tools = "real", "real", real_tools
        elif world_model_tools is not None:  # the world model answers like a tool; nothing real is called
            env_name, engine_env, step_tools = "world-model", "real", world_model_tools
        else:                                # the policy writes its own observations (internal world model)
            env_name, engine_env, step_tools = "sim", "sim", real_tools

        # --- rollouts: prompt j of the step goes to rank j % world; all of a rank's trajectories in one engine call,
        # trajectory k of prompt j seeded by (seed, step, j, k)
        t0 = time.time()
        policy.eval()
        seqs, sums = [], torch.zeros(8, dtype=torch.float64)
        usage_before = tool_usage(real_tools)
        js = list(range(rank, args.prompts_per_step, world))
        qs = [questions[prompt_index(args.seed, step, j, args.prompts_per_step, len(questions))] for j in js]
        texts = [build_prompt(tokenizer, q["question"], template) for q in qs]
        prompts = [encode_segments(tokenizer, [{"kind": "prompt", "text": t}])[0]
                   for t in texts for _ in range(args.group_size)]  # group-contiguous: K copies of each prompt
        seeds = [((args.seed * 1_000_003 + step) * 1_000_003 + j) * 1_000 + k
                 for j in js for k in range(args.group_size)]
        with torch.no_grad(), amp():
            rolls = rollout(policy, tokenizer, prompts, step_tools, env=engine_env,
                            max_new_tokens=args.max_new_tokens, max_actions=args.max_actions,
                            max_context=args.max_context, temperature=args.temperature, top_p=args.top_p,
                            seed=seeds, train_sim_obs=args.train_sim_obs, sim_obs_tokens=args.sim_obs_tokens)
        for i, r in enumerate(rolls):
            q = qs[i // args.group_size]
            # the policy's own text: what a passage says can neither be the answer nor break (or fake) the format
            R = reward(r.policy_text, q["golden_answers"], args.reward, args.format_penalty)
            # the world model is called like a tool, but what it answers is simulated (counted, never hidden)
            sim = r.sim_obs + (r.real_calls if env_name == "world-model" else 0)
            seqs.append({"ids": list(r.prompt_ids) + list(r.response_ids),
                         "mask": [0] * len(r.prompt_ids) + list(r.loss_mask),
                         "engine_logp": [0.0] * len(r.prompt_ids) + list(r.logprobs), "reward": R})
            sums += torch.tensor([1, R, exact_match(extract_answer(r.policy_text), q["golden_answers"]),
                                  1 - format_ok(r.policy_text)[0], sum(r.num_actions.values()), sim,
                                  len(r.response_ids), r.real_calls], dtype=torch.float64)
        usage = tool_usage(real_tools)
        usage = all_sum(torch.tensor([float(usage[k] - usage_before[k]) for k in counted if k != "sim_obs"]))
        calls_file.writelines(json.dumps({"step": step + 1, **c}) + "\n" for c in real_tools.log)
        calls_file.flush()
        real_tools.log.clear()
        sums = all_sum(sums)
        rollout_s = time.time() - t0
        n_traj = sums[0].item()
        log = {"step": step + 1, "env": env_name, "reward": sums[1].item() / n_traj, "em": sums[2].item() / n_traj,
               "format_violation": sums[3].item() / n_traj, "actions": sums[4].item() / n_traj,
               "sim_obs": int(sums[5]), "tool_requests": int(sums[7]), **{k: int(v) for k, v in zip([k for k in counted if k != "sim_obs"], usage)}}
        totals = {k: totals[k] + log[k] for k in counted}
        log.update({f"{k}_total": v for k, v in totals.items()}, tokens_per_s=sums[6].item() / rollout_s)

        # --- old log-probs, reference log-probs, values and advantages (no grad), per micro-batch
        t0 = time.time()
        per_minibatch = len(seqs) // args.minibatches  # whole prompt groups: same global minibatches for any world size
        minibatches = [[seqs[i:min(i + args.micro_batch_size, start + per_minibatch)]
                        for i in range(start, start + per_minibatch, args.micro_batch_size)]
                       for start in range(0, len(seqs), per_minibatch)]
        if args.algo == "grpo":
            rewards = torch.tensor([s["reward"] for s in seqs]).view(-1, args.group_size)   # (prompts, K)
            A = group_advantages(rewards, args.grpo_std_norm)
            for s, a in zip(seqs, A.flatten().tolist()):
                s["advantage"] = a
        ev_sums = torch.zeros(5, dtype=torch.float64)  # n, sum R, sum R^2, sum R-V, sum (R-V)^2: explained variance
        batches = [[] for _ in minibatches]  # tensors per micro-batch, grouped by minibatch
        gap = torch.zeros(2, dtype=torch.float64)  # sum |engine logp - old logp| over sampled tokens, their count
        T = args.temperature
        with torch.no_grad(), amp():
            for k, minibatch in enumerate(minibatches):
                for mb in minibatch:
                    ids, attention, mask, engine_logp = collate(mb, pad_id, device)
                    old_logp, _, old_values = forward(policy, value_head, ids, attention, T, need_entropy=False)
                    ref_logp = old_logp if reference is None else \
                        forward(reference, None, ids, attention, T, need_entropy=False)[0]
                    b = {"ids": ids, "attention": attention, "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp}
                    m = mask.bool()
                    gap += torch.stack([(engine_logp - old_logp)[m].abs().sum().double(), m.sum().double()]).cpu()
                    if args.tis_cap > 0:  # pi_old / pi_engine, truncated: the samples came from the engine
                        b["tis_weight"] = torch.exp((old_logp - engine_logp).masked_fill(~m, 0.0)).clamp(
                            max=args.tis_cap)
                    if args.algo == "grpo":
                        A = torch.tensor([s["advantage"] for s in mb], device=device)
                        b["advantages"] = A[:, None].expand_as(mask)               # one advantage for all tokens
                    else:  # the reward sits on the last policy-written token of each row
                        last = (mask * torch.arange(mask.shape[1], device=device)).argmax(dim=1)     # (B,)
                        token_rewards = torch.zeros_like(old_logp)
                        token_rewards[torch.arange(len(mb), device=device), last] = torch.tensor(
                            [s["reward"] for s in mb], device=device)
                        token_rewards *= mask  # a row without any policy token gets no reward
                        b["advantages"], b["returns"] = gae_advantages(token_rewards, old_values, mask, args.gamma,
                                                                       args.lam)
                        b["old_values"] = old_values
                        R, d = b["returns"][mask.bool()].double(), (b["returns"] - old_values)[mask.bool()].double()
                        ev_sums += torch.stack([mask.sum().double(), R.sum(), (R ** 2).sum(), d.sum(),
                                                (d ** 2).sum()]).cpu()
                    batches[k].append(b)
        gap = all_sum(gap)
        log["logp_gap"] = (gap[0] / gap[1].clamp(min=1)).item()
        if args.algo == "ppo":  # whitening over all masked-in tokens of the batch, all ranks
            flat = [b for minibatch in batches for b in minibatch]
            all_adv = torch.cat([b["advantages"].flatten() for b in flat])
            all_mask = torch.cat([b["mask"].flatten() for b in flat])
            whitened = masked_whiten(all_adv, all_mask).split([b["mask"].numel() for b in flat])
            for b, w in zip(flat, whitened):
                b["advantages"] = w.view_as(b["mask"])
            n, sR, sR2, sd, sd2 = all_sum(ev_sums).tolist()
            var_R, var_d = sR2 / n - (sR / n) ** 2, sd2 / n - (sd / n) ** 2
            log["explained_variance"] = 1 - var_d / var_R if var_R > 0 else float("nan")

        # --- updates: every rank makes the same number of backward passes (same prompts per rank, same split)
        stats = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "value_loss": 0.0}
        for epoch in range(args.ppo_epochs):
            for minibatch in batches:
                num_tokens = all_sum(torch.tensor(float(sum(b["mask"].sum() for b in minibatch)))).item()
                num_tokens = max(num_tokens, 1.0)
                for i, b in enumerate(minibatch):
                    sync = not ddp or i == len(minibatch) - 1  # DDP all-reduces gradients on the last micro-batch only
                    with nullcontext() if sync else model.no_sync():
                        with amp():
                            logp, entropy, values = forward(model, value_head, b["ids"], b["attention"], T)
                        loss, micro_stats = policy_loss(logp, b["old_logp"], b["ref_logp"], b["advantages"], entropy,
                                                        b["mask"], num_tokens, args.clip, args.kl_coef,
                                                        args.entropy_coef, b.get("tis_weight"))
                        if args.algo == "ppo":  # the one place where PPO's update differs from GRPO's
                            v_loss = value_loss(values, b["old_values"], b["returns"], b["mask"], num_tokens,
                                                args.value_clip)
                            loss = loss + args.vf_coef * v_loss
                            micro_stats["value_loss"] = v_loss.item()
                        (loss * world).backward()  # DDP averages over ranks; the loss is already a global mean
                    micro_stats["loss"] = loss.item()
                    for k, v in micro_stats.items():
                        stats[k] += v / (args.ppo_epochs * args.minibatches)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
                if not torch.isfinite(grad_norm):  # gradients are already synchronised: every rank sees the same norm
                    stop = f"loss or gradient is not finite at step {step + 1} (grad norm {grad_norm.item()})"
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if stop:
                break
        stat_keys = list(stats)
        reduced = all_sum(torch.tensor([stats[k] for k in stat_keys], dtype=torch.float64)).tolist()
        log.update(dict(zip(stat_keys, reduced)), rollout_s=rollout_s, update_s=time.time() - t0)
        if args.algo == "grpo":
            del log["value_loss"]

        # --- logging, stopping rules, evaluation, checkpoints
        if not stop and not math.isfinite(log["loss"]):
            stop = f"loss is not finite at step {step + 1}"
        collapsed = log["entropy"] < args.collapse_entropy and 1 - log["format_violation"] < args.collapse_format
        collapse_streak = collapse_streak + 1 if collapsed else 0
        if not stop and args.collapse_patience and collapse_streak >= args.collapse_patience:
            stop = (f"collapse: entropy {log['entropy']:.4f} < {args.collapse_entropy} and format-ok rate "
                    f"{1 - log['format_violation']:.2f} < {args.collapse_format} for {collapse_streak} steps "
                    f"(lower --lr, raise --entropy-coef or --kl-coef; --collapse-patience 0 disables this stop)")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            if master:
                from evaluate import evaluate  # lazy: evaluation is optional
                dev = load_questions(os.path.join(args.data, "dev.jsonl"))[:args.eval_limit]
                eval_tools = eval_tools or make_tools(**tool_source, max_obs_chars=args.max_obs_chars)
                summary = evaluate(policy, tokenizer, dev, eval_tools, "agent", template=template, progress=False,
                                   max_new_tokens=args.max_new_tokens, max_actions=args.max_actions,
                                   max_context=args.max_context)[0]  # greedy, real tools
                log.update(dev_em=summary["overall"]["em"], dev_f1=summary["overall"]["f1"],
                           dev_actions=summary["overall"].get("num_actions"))
            if ddp:
                dist.barrier()
        if master:
            print(f"step {step + 1}/{total_steps} {env_name} | reward {log['reward']:.3f} | em {log['em']:.3f} | "
                  f"fmt_bad {log['format_violation']:.2f} | act {log['actions']:.2f} | real {log['real_calls']}/"
                  f"{log['real_calls_total']} | sim_obs {log['sim_obs']} | logp_gap {log['logp_gap']:.1e} | "
                  f"kl {log['kl']:.4f} | "
                  f"ent {log['entropy']:.3f}"
                  f" | clip {log['clipfrac']:.3f} | akl {log['approx_kl']:.4f}"
                  + (f" | vloss {log['value_loss']:.4f} | ev {log['explained_variance']:.3f}"
                     if args.algo == "ppo" else "")
                  + f" | roll {rollout_s:.1f}s upd {log['update_s']:.1f}s | {log['tokens_per_s']:.0f} tok/s"
                  + (f" | dev_em {log['dev_em']:.3f}" if "dev_em" in log else ""), flush=True)
            metrics_file.write(json.dumps(log) + "\n")
            metrics_file.flush()
        if stop:
            if master:
                last = f"the last good checkpoint is {resume_dir}" if os.path.exists(resume_dir) else "nothing saved"
                print(f"stopping: {stop}; {last}", flush=True)
            break
        if master and step + 1 == args.sim_steps and args.real_steps > 0:
            # the model after the simulated stage alone: Table 1's "SFT-1&2&3 + RL-stage 1" row, from the same run
            save(policy, tokenizer, os.path.join(args.out, "sim_end"), vars(args))
            shutil.copy(metrics_path, os.path.join(args.out, "sim_end", "metrics.jsonl"))  # its real-call count
        if args.save_every and (step + 1) % args.save_every == 0:
            save_state(step + 1)

    # -----------------------------------------------------------------------------
    # Final checkpoint (not after a stop: the last good one is OUT/resume)

    calls_file.close()
    if not stop:
        if start_step < total_steps:  # else: a rerun after a kill during the final save; OUT/resume is final already
            save_state(total_steps)
        if master:
            metrics_file.close()
            save_final(policy, tokenizer, args.out, vars(args))
            print(f"saved {args.out} ({totals['real_calls']} real tool calls in total)")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if stop:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
