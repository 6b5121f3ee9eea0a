"""
Supervised fine-tuning of an agent model, AutoCoA paper section 3.2: one script, four stages.

  base  plain language modelling on DIR/base.jsonl ({"text"}), documents joined with eos and packed into --max-len
        blocks (--no-pack: one row each). Not in the paper (it starts from R1-Distill, a reasoning model): it makes
        the tiny preset a small "reasoning model" that knows the world's known facts (SmolLM2: README, smollm2).
  1     CoT+A (paper 3.2.2, *when* to act) on DIR/sft_pairs.jsonl ({"question","prefix","chosen","rejected"}):
        L = -log sigmoid(P(chosen|c) - P(rejected|c)) + alpha * (-P(chosen|c)), P as mean_logprob. No reference model.
  2     CoT+CoA with observation mask (paper 3.2.3, *how* to act) on DIR/sft_mix.jsonl ({"question","segments"}):
        cross-entropy on the tokens the policy writes; observation tokens masked. Rows: model.encode_segments (SPEC 3).
  3     CoT+CoA without observation mask (paper 3.2.4, internal world model): the same, observation tokens trained.
        --wm-calls adds the teacher's real calls as one-action trajectories (query -> observation): the policy learns
        what the tools return in its world (not in the paper, whose teacher is a 7B on real data; on the tiny preset
        the renamed copies teach copying, not the world: README).

How this departs from the paper / the original code (LLaMA-Factory), and why:
- A step's loss is sum(token losses) / (trained tokens in the whole GLOBAL batch), not a mean of per-device means:
  every trained token weighs the same whatever the padding, the micro-batch or the GPU count, so 1 process and N
  processes give the same loss curve. Stage 1 divides the per-pair losses by the pair count.
- Sequences longer than --max-len are dropped and counted, never cut (a cut could end a row mid-observation).
- Rows are sorted by length within shuffled buffers of --bucket-batches global batches (less padding). An epoch's
  last global batch is filled with its first examples: every rank runs as many backward passes (or DDP hangs).
- Defaults are sized for the tiny preset on CPU; the paper's (R1-Distill-Qwen-7B) are in --lr, --batch-size, --epochs.

Commands (DIR from `python data.py --out DIR`):
  python train_sft.py --stage base --init tiny --data DIR --out out/sft_base --max-len 256 --epochs 10 --batch-size 16
  python train_sft.py --stage 1 --init out/sft_base --data DIR --out out/sft1 --epochs 1 --batch-size 16
  python train_sft.py --stage 2 --init out/sft1 --data DIR --out out/sft12
  python train_sft.py --stage 3 --init out/sft12 --data DIR --out out/sft123 --epochs 1 \
      [--wm-calls out/wm_calls.jsonl --wm-calls-copies 50]   # from `python world_model.py collect --data DIR ...`
  torchrun --standalone --nproc_per_node=8 train_sft.py --stage 2 --init smollm2 --data DIR --out out/sft2 \
      --lr 5e-5 --batch-size 32 --micro-batch 4 --bf16 --grad-checkpointing
  torchrun --standalone --nproc_per_node=8 train_sft.py ... --init QWEN_7B_DIR --bf16 --fsdp --grad-checkpointing
Outputs: common.py's checkpoint format (OUT/, OUT/metrics.jsonl, OUT/resume/); after a kill, rerun with --resume.
"""
import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fsdp
from common import (CALL_FIELDS, collate, default_device, epoch_batches, load_resume_state, lr_factor,
                    open_step_log, read_rows, resume_point, save_final, save_resume, setup_distributed,
                    teardown_distributed, token_logprobs)
from model import build_prompt, checkpoint_template, encode_segments, load, prompt_format
from tools import action_close, action_open, format_observation

STAGE_FILES = {"base": "base.jsonl", "1": "sft_pairs.jsonl", "2": "sft_mix.jsonl", "3": "sft_mix.jsonl"}
STAGE_LR = {"base": 1e-3, "1": 1e-4, "2": 1e-3, "3": 1e-3}
# Arguments that fix the data order and the step count: --resume refuses a state saved with other values.
RESUME_KEYS = ("stage", "batch_size", "seed", "epochs", "max_steps", "train_file", "max_len", "bucket_batches",
               "pack", "train_copies", "wm_calls", "wm_calls_copies")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    p.add_argument("--stage", required=True, choices=["base", "1", "2", "3"], help="SFT stage (see the docstring)")
    p.add_argument("--init", default="tiny", help="tiny (random init; DIR/tokenizer), smollm2, a checkpoint or HF name")
    p.add_argument("--add-action-tokens", action="store_true", help="add think/action/result tags as special tokens")
    p.add_argument("--template", default=None, choices=["short", "autocoa"], help="prompt template (default: the one "
                   "--init was trained with, else 'short'; 'autocoa': the paper's long instruction)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=True, help="prompts through the "
                   "tokenizer's chat template if any; --no-chat-template: plain text (saved, so later stages agree)")
    # Data
    p.add_argument("--data", default="out/world", help="data dir written by data.py (its default example: out/world)")
    p.add_argument("--train-file", default=None, help="the stage's file (default DIR/{base,sft_pairs,sft_mix}.jsonl)")
    p.add_argument("--train-copies", type=int, default=1, help="copies of the train file's rows (vs --wm-calls-copies)")
    p.add_argument("--wm-calls", default=None, help="stage 3: add world_model.py collect's train calls as trajectories")
    p.add_argument("--wm-calls-copies", type=int, default=1, help="copies of the --wm-calls rows")
    p.add_argument("--max-len", type=int, default=1024, help="longer rows are dropped and counted; base-stage block size")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True, help="base: pack into --max-len rows")
    p.add_argument("--bucket-batches", type=int, default=16, help="sort by length in shuffled sets of N global batches")
    # Optimization
    p.add_argument("--epochs", type=float, default=2, help="passes over the data (paper: 2)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps in total (0: epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch: sequences (stage 1: pairs) per optimizer "
                   "step over all ranks (paper: 16 for stage 1, 32 for stages 2/3)")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences (pairs) per forward on one rank (accumulated)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per stage: " + str(STAGE_LR) +
                   "; paper: 5e-6 stage 1, 5e-5 stages 2/3)")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="after warmup")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup over this share of the steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--alpha", type=float, default=0.2, help="stage 1: weight of the auxiliary loss -P(chosen|c)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU, or AVX512-BF16/AMX CPU); fp32 weights")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (GPU memory)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (torchrun): shard weights, gradients, AdamW over ranks")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init and the data order")
    p.add_argument("--device", default=default_device(), help="cpu or cuda (torchrun: one GPU per rank)")
    # Checkpointing
    p.add_argument("--out", required=True, help="output dir: save_pretrained checkpoint + run_args.json + metrics.jsonl")
    p.add_argument("--save-every", type=int, default=0, help="write OUT/resume/ every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/resume/ if it exists (else start over)")
    p.add_argument("--max-steps-this-run", type=int, default=0, help="save OUT/resume/, stop after N steps (a kill)")
    args = p.parse_args(argv)
    args.lr = STAGE_LR[args.stage] if args.lr is None else args.lr
    args.template = checkpoint_template(args.init, args.template)  # the prompts the --init checkpoint was trained on
    return args


# -----------------------------------------------------------------------------
# data: JSONL records -> rows of (ids, loss_mask, obs_mask), token ids in, token ids out

def call_trajectories(path):
    """world_model.py collect's "train" rows as stage-3 records: query as question, one action, its real observation."""
    rows = [r for r in read_rows(path, CALL_FIELDS + ("split",)) if r["split"] == "train"]
    return [{"question": r["args"], "segments": [
        {"kind": "policy", "text": f" {action_open(r['tool'])} {r['args']} {action_close(r['tool'])}"},
        {"kind": "obs", "text": format_observation(r["tool"], r["observation"])}]} for r in rows]


def drop_long(examples, max_len):
    """-> (the examples whose rows all fit in max_len tokens, how many did not)"""
    kept = [ex for ex in examples if max(len(row[0]) for row in ex) <= max_len]
    return kept, len(examples) - len(kept)


def load_examples(tok, stage, path, max_len, template="short", pack=True):
    """Examples for a stage: each a list of rows (ids, loss_mask, obs_mask); stage 1 has two rows (chosen, rejected)
    whose loss_mask covers only the continuation. Returns (examples, number dropped for being over max_len)."""
    if stage == "base":
        docs = [tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for r in read_rows(path, ("text",))]
        if pack:  # documents attend across their eos boundaries, as in GPT pretraining: no padding, no waste
            stream = [i for d in docs for i in d]
            docs = [stream[i:i + max_len] for i in range(0, len(stream), max_len)]
        return drop_long([[(d, [1] * len(d), [0] * len(d))] for d in docs], max_len)
    if stage != "1":
        return encode_trajectories(tok, read_rows(path, ("question", "segments")), stage, max_len, template)
    examples = []
    for r in read_rows(path, ("question", "prefix", "chosen", "rejected")):
        prompt = {"kind": "prompt", "text": build_prompt(tok, r["question"], template)}
        context, _, context_obs = encode_segments(tok, [prompt] + r["prefix"])
        # no eos after a continuation cut short ("cut", teacher.decision_pairs); the shared context c gets mask 0
        rows = [encode_segments(tok, c, add_eos=not r.get("cut", False)) for c in (r["chosen"], r["rejected"])]
        examples.append([(context + ids, [0] * len(context) + loss, context_obs + obs) for ids, loss, obs in rows])
    return drop_long(examples, max_len)


def encode_trajectories(tok, records, stage, max_len, template="short"):
    """Stage 2/3 examples of {"question", "segments"} records (stage 3 trains observations) -> as load_examples."""
    examples = []
    for r in records:
        prompt = {"kind": "prompt", "text": build_prompt(tok, r["question"], template)}
        examples.append([encode_segments(tok, [prompt] + r["segments"], train_obs=(stage == "3"), add_eos=True)])
    return drop_long(examples, max_len)


# -----------------------------------------------------------------------------
# losses (the next-token log-probs come from common.token_logprobs: the one shift)

def mean_logprob(logp, mask):
    """P(x|c) = 1/|x| sum_i log pi(x_i | c, x_<i) over the continuation x (mask: its trained tokens). (R,T-1) -> (R,)"""
    return (logp * mask).sum(1) / mask.sum(1)


def contrastive_loss(P_chosen, P_rejected, alpha):
    """SFT stage 1 (paper 3.2.2), per pair: L = L_contra + alpha * L_aux. P_chosen, P_rejected: (P,) -> (P,)"""
    L_contra = -F.logsigmoid(P_chosen - P_rejected)  # (P,)  -log sigma(P(chosen|c) - P(rejected|c))
    L_aux = -P_chosen                                # (P,)  stops P(chosen|c) falling together with P(rejected|c)
    return L_contra + alpha * L_aux


def main(args):
    """Under python or torchrun. The ranks are torn down after train() returns, its DDP/FSDP modules gone: one freed
    after destroy_process_group still holds the gloo group, whose destructor then hung or aborted."""
    rank, world_size, device, ddp = setup_distributed(args.device)
    train(args, rank, world_size, device, ddp)
    teardown_distributed()


def train(args, rank, world_size, device, ddp):
    # -------------------------------------------------------------------------
    # resume point, model
    cuda, master = device.startswith("cuda"), rank == 0
    log = print if master else (lambda *a, **k: None)
    resume_dir = resume_point(args.out, args.resume, master, ddp)

    torch.manual_seed(args.seed)
    if resume_dir:
        model, tok = load(resume_dir, device=device)
    elif args.init == "tiny":
        model, tok = load("tiny", tokenizer=os.path.join(args.data, "tokenizer"), device=device, seed=args.seed)
    else:
        model, tok = load(args.init, device=device, add_action_tokens=args.add_action_tokens,
                          chat_template=args.chat_template)
    assert tok.eos_token_id is not None, f"tokenizer of {args.init} has no eos token"
    log(prompt_format(tok, args.template))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    raw_model, model = fsdp.parallelize(model, device, ddp, args.fsdp, args.bf16)  # model: the training forward's
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext()

    # -------------------------------------------------------------------------
    # data and derived sizes
    path = args.train_file or os.path.join(args.data, STAGE_FILES[args.stage])
    examples, dropped = load_examples(tok, args.stage, path, args.max_len, args.template, args.pack)
    examples = examples * args.train_copies
    if args.wm_calls:  # after the train file's rows, as one file holding both would list them
        assert args.stage == "3", "--wm-calls is stage 3's (it trains observation tokens)"
        calls, calls_dropped = encode_trajectories(tok, call_trajectories(args.wm_calls), "3", args.max_len,
                                                   args.template)
        examples, dropped = examples + calls * args.wm_calls_copies, dropped + calls_dropped
        path = f"{path} x {args.train_copies} + {args.wm_calls} ({len(calls)} calls) x {args.wm_calls_copies}"
    assert examples, f"{path}: no usable examples ({dropped} dropped as longer than --max-len {args.max_len})"
    lengths = [tuple(len(row[0]) for row in ex) for ex in examples]  # stage 1 sorts by (chosen, rejected) length
    B, m = args.batch_size, args.micro_batch
    assert B > 0 and m > 0 and B % (m * world_size) == 0, \
        f"--batch-size {B} must be a multiple of --micro-batch {m} x world size {world_size}"
    accum_steps = B // (m * world_size)   # micro-steps per rank per optimizer step
    steps_per_epoch = math.ceil(len(examples) / B)
    total_steps = min(math.ceil(steps_per_epoch * args.epochs), args.max_steps or math.inf)
    warmup_steps = int(args.warmup_ratio * total_steps)
    log(f"stage {args.stage} | {path}: {len(examples)} {'pairs' if args.stage == '1' else 'sequences'}, {dropped} "
        f"dropped as longer than --max-len {args.max_len} | world {world_size} x micro {m} x accum {accum_steps} = "
        f"batch {B} | {steps_per_epoch} steps/epoch, {total_steps} steps, warmup {warmup_steps} | lr {args.lr:g}")
    fsdp.check_memory(raw_model.config, device, master, world_size, m, args.max_len, args.fsdp,
                      args.grad_checkpointing, bf16=args.bf16, rows_per_item=2 if args.stage == "1" else 1)

    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    # -------------------------------------------------------------------------
    # resume: optimizer, step and RNG (weights: loaded above); the data order is a function of (seed, epoch, step)
    step = 0
    if resume_dir:
        state = load_resume_state(resume_dir)
        for key in RESUME_KEYS:
            assert state["args"][key] == getattr(args, key), \
                f"--resume: {key} was {state['args'][key]!r} in {resume_dir}, now {getattr(args, key)!r}; the data " \
                "order would differ from the interrupted run's"
        fsdp.load_optimizer_state(raw_model, optimizer, state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if cuda and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu())
        log(f"resumed from {resume_dir} at step {step}")

    def save_state():
        # every rank calls it (FSDP: gathers are collectives); rank 0 writes its own RNG (ranks differ only by dropout)
        weights, optimizer_state = fsdp.full_state_dict(raw_model), fsdp.optimizer_state(raw_model, optimizer)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state() if cuda else None}
        if master:
            state = {"optimizer": optimizer_state, "step": step, "rng": rng, "args": vars(args)}
            save_resume(raw_model, tok, args.out, vars(args), state, weights)

    # -------------------------------------------------------------------------
    # training loop
    metrics_file = open_step_log(os.path.join(args.out, "metrics.jsonl"), step > 0, step) if master else None
    start_step = step
    batches = None
    steps_this_run, run_tokens, run_pad = 0, 0.0, 0.0
    while step < total_steps:
        t0 = time.time()
        if batches is None or step % steps_per_epoch == 0:  # a new epoch, or a resumed run's first step
            batches = epoch_batches(lengths, B, args.bucket_batches, args.seed, step // steps_per_epoch)
        batch = [examples[i] for i in batches[step % steps_per_epoch]]
        lr = args.lr * lr_factor(step, total_steps, warmup_steps, args.schedule, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Contiguous micro-batches of the length-sorted global batch, dealt round-robin to the ranks: 1 and N
        # processes see the same micro-batches. The normaliser counts the whole global batch (known to every rank).
        micro_batches = [batch[k * m:(k + 1) * m] for k in range(rank, B // m, world_size)]
        shift = slice(1, None)  # masks are per token; a token is predicted from the one before it
        normaliser = float(B) if args.stage == "1" else float(sum(sum(ex[0][1][shift]) for ex in batch))
        obs_count = float(sum(sum(row[2][shift]) for ex in batch for row in ex))
        sums = torch.zeros(7, device=device)  # loss, obs nll, P_chosen, P_rejected, correct, pad tokens, all tokens
        for k, examples_k in enumerate(micro_batches):
            # DDP (a wrapper): all-reduce the gradients on the last micro-batch only
            with nullcontext() if model is raw_model or k == len(micro_batches) - 1 else model.no_sync():
                # One padded tensor per row kind: stage 1 forwards its chosen rows, then its rejected rows (their
                # lengths differ a lot, one tensor for both would be a third padding); one backward for both.
                logps, masks = [], []
                for j in range(len(examples_k[0])):
                    ids, attention, loss_mask, obs_mask = collate([ex[j] for ex in examples_k], pad_id, device)
                    with autocast:
                        logits = model(input_ids=ids, attention_mask=attention).logits
                    logp = token_logprobs(logits, ids)                 # (R, T-1)
                    logps.append(logp)
                    masks.append(loss_mask[:, 1:].float())
                    sums[1] += -(logp.detach() * obs_mask[:, 1:]).sum()
                    sums[5] += (attention == 0).sum()
                    sums[6] += attention.numel()
                if args.stage == "1":
                    P_chosen, P_rejected = (mean_logprob(logp, mask) for logp, mask in zip(logps, masks))
                    loss = contrastive_loss(P_chosen, P_rejected, args.alpha).sum() / normaliser
                    sums[2:5] += torch.stack([P_chosen.sum(), P_rejected.sum(), (P_chosen > P_rejected).sum()]).detach()
                else:
                    loss = -(logps[0] * masks[0]).sum() / normaliser  # paper 3.2.3: mask = I[x_i != o] in stage 2
                # DDP averages gradients over ranks; our loss is already a share of the global sum, so undo the mean
                (loss * world_size).backward()
            sums[0] += loss.detach()
        grad_norm = fsdp.clip_grad_norm(raw_model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(sums)
        step += 1
        steps_this_run += 1

        # -------------------------------------------------------------------------
        # logging (rank 0), checkpoints
        dt = time.time() - t0
        s = sums.tolist()
        run_tokens, run_pad = run_tokens + s[6], run_pad + s[5]
        metrics = {"step": step, "loss": s[0], "lr": lr, "grad_norm": grad_norm.item(), "pad": s[5] / s[6],
                   "tok_per_s": (s[6] - s[5]) / dt}
        if args.stage in ("2", "3"):  # the observation loss (no gradient in stage 2); null if all pure CoT
            metrics["obs_loss"] = s[1] / obs_count if obs_count else None
        if args.stage == "1":
            metrics.update(P_chosen=s[2] / B, P_rejected=s[3] / B, margin=(s[2] - s[3]) / B, pair_acc=s[4] / B)
        if master:
            keys = [k for k in ("loss", "obs_loss", "P_chosen", "P_rejected", "margin", "pair_acc")
                    if metrics.get(k) is not None]
            shown = [f"step {step}/{total_steps}"] + [f"{k} {metrics[k]:.4f}" for k in keys]
            shown += [f"lr {lr:.2e}", f"pad {metrics['pad']:.0%}", f"{metrics['tok_per_s']:.0f} tok/s"]
            print(" | ".join(shown), flush=True)
            print(json.dumps(metrics), file=metrics_file, flush=True)
        stop_early = args.max_steps_this_run and steps_this_run >= args.max_steps_this_run and step < total_steps
        if (args.save_every and step % args.save_every == 0) or stop_early:
            save_state()
        if stop_early:
            log(f"stopping after {steps_this_run} steps this run (--max-steps-this-run); continue with --resume")
            break

    log(f"{steps_this_run} steps this run | pad {run_pad / max(run_tokens, 1):.1%} of {run_tokens:.0f} tokens")
    if master:
        metrics_file.close()
    if step >= total_steps:
        if start_step < total_steps:  # else: a rerun after a kill during the final save; OUT/resume is final already
            save_state()
        weights = fsdp.full_state_dict(raw_model)  # every rank (FSDP: a collective), rank 0 writes
        if master:
            save_final(raw_model, tok, args.out, vars(args), weights)
            log(f"saved {args.out}")


if __name__ == "__main__":
    main(parse_args())
