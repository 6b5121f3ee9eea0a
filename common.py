"""
What every training stage shares, in one place: the device and distributed set-up, padding, next-token log-probs (the
ONE place the targets are shifted), the learning-rate schedule and epoch order, the JSONL step log, and checkpoints
that survive a kill at any point. train_sft.py, train_rl.py and world_model.py import this, model.py, tools.py and
evaluate.py's metrics; no stage script imports another.

One checkpoint format for every stage:
    OUT/                 the final checkpoint: a save_pretrained dir (+ run_args.json), loadable by plain transformers
    OUT/metrics.jsonl    one row per step ("step" field), appended as the run goes
    OUT/resume/          weights (model.save) + trainer_state.pt (step, optimizer, RNG, whatever the stage adds),
                         written with save_resume every --save-every steps and once at the end
A kill at any point loses nothing: resume/ is swapped in as a whole (find_resume also finds it half-way through the
swap), the final checkpoint is moved INTO OUT file by file (the logs and resume/ never move), and since resume/
already holds the last step when the final save starts, a rerun with --resume only redoes that save. On --resume the
step log drops the rows of steps after the resume point, so every step's row is there exactly once.

Also here: the separate world model as a tool (world_model.py trains it; train_rl.py --world-model uses it).

No command of its own.
"""
import gc
import json
import math
import os
import shutil
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import encode_segments, load, save
from tools import ToolRegistry, action_close, action_open, calculator, result_close, result_open

# -----------------------------------------------------------------------------
# Device and ranks


def default_device():
    """The one default device rule of every script: cuda when there is one, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_distributed(device):
    """-> (rank, world_size, device, ddp). Under torchrun (RANK set): one process per GPU (nccl) or per CPU process
    (gloo), device becomes cuda:LOCAL_RANK. Otherwise one process on `device`."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device, False
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, True


def teardown_distributed():
    """Callers drop their DDP/FSDP modules first: a wrapper or DTensor freed after destroy_process_group still holds
    the gloo group, whose destructor then aborted ("terminate called without an active exception") or hung."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # reference cycles among the dropped modules
        dist.barrier()
        dist.destroy_process_group()


def all_sum(x):
    """Sum a tensor over ranks (a no-op in one process). NCCL reduces GPU tensors only: CPU ones go through one."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    y = x.cuda() if dist.get_backend() == "nccl" else x
    dist.all_reduce(y)
    return y.to(x.device)


def all_sum_dict(d):
    """{name: number} summed over ranks, same names (named metrics instead of slots in a tensor)."""
    keys = list(d)
    values = all_sum(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64)).tolist()
    return dict(zip(keys, values))


# -----------------------------------------------------------------------------
# Batches and the one next-token shift


def collate(rows, pad_id, device):
    """rows of (ids, mask, ...) lists -> right-padded (R, T) tensors: ids, attention mask, then each mask (padded 0)."""
    T = max(len(r[0]) for r in rows)

    def pad(seqs, value):
        return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    masks = [pad([r[k] for r in rows], 0) for k in range(1, len(rows[0]))]
    return (pad([r[0] for r in rows], pad_id), pad([[1] * len(r[0]) for r in rows], 0), *masks)


def token_logprobs(logits, ids):
    """log pi(x_t | x_<t) for every next token: the ONE place targets are shifted. Position t of the result scores
    ids[:, t + 1] from the logits at t, so a (R, T) mask over ids lines up with it as mask[:, 1:].
    logits (R, T, V), ids (R, T) -> (R, T-1), float32."""
    R, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="none")
    return -nll.view(R, T - 1)


def epoch_batches(lengths, batch_size, bucket_batches, seed, epoch):
    """Global batches (lists of example indices) for one epoch, identical on every rank: shuffle, fill the last batch
    with the epoch's first examples, sort by length within buffers of bucket_batches batches, shuffle the batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(lengths)
    order = torch.randperm(n, generator=g).tolist()
    order = [order[i % n] for i in range(math.ceil(n / batch_size) * batch_size)]
    batches, buffer = [], batch_size * bucket_batches
    for start in range(0, len(order), buffer):
        chunk = sorted(order[start:start + buffer], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def lr_factor(step, total_steps, warmup_steps, schedule, min_ratio):
    """Linear warmup, then constant or cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# The step log and checkpoints


def open_step_log(path, resume, start_step):
    """A JSONL log with a "step" field per row, opened for appending. On resume, rows of steps after the resume point
    are dropped first (they are redone), and so is a last line cut short by a kill; without it the log starts empty."""
    kept = []
    if resume and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def replace_dir(src, dst):
    """Rename src over dst (rename cannot replace a non-empty dir: move the old one aside first, then delete it)."""
    old = dst.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def save_resume(model, tokenizer, out, args, state, state_dict=None):
    """OUT/resume = weights (model.save) + trainer state, swapped in as a whole: never a half-written resume dir. The
    state is written last, so a dir holding trainer_state.pt is complete (find_resume relies on it). state_dict: the
    gathered weights under FSDP (full_state_dict), else None."""
    tmp = os.path.join(out, ".resume.tmp")
    save(model, tokenizer, tmp, args, state_dict)
    torch.save(state, os.path.join(tmp, "trainer_state.pt.part"))
    os.replace(os.path.join(tmp, "trainer_state.pt.part"), os.path.join(tmp, "trainer_state.pt"))
    replace_dir(tmp, os.path.join(out, "resume"))


RESUME_DIRS = ("resume", ".resume.tmp", "resume.old")  # the state, its next version being built, the one moved aside


def find_resume(out):
    """Finish a swap of OUT/resume a kill interrupted (resume moved aside to resume.old, the new one still at
    .resume.tmp: the newest complete one becomes OUT/resume) and drop the leftovers."""
    resume = os.path.join(out, "resume")
    for name in RESUME_DIRS:  # newest first
        path = os.path.join(out, name)
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            if path != resume:
                replace_dir(path, resume)
            break
    for name in RESUME_DIRS:  # what an interrupted save left behind
        drop_leftovers(os.path.join(out, name), keep=name == "resume")


def drop_leftovers(path, keep=False):
    """Delete path (unless keep) and the build/old dirs model.save makes beside it (path.tmp-*, path.old-*)."""
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    parent, name = os.path.split(path.rstrip("/"))
    for other in os.listdir(parent) if os.path.isdir(parent) else []:
        if other.startswith((name + ".tmp-", name + ".old-")):
            shutil.rmtree(os.path.join(parent, other), ignore_errors=True)


def resume_point(out, resume, master, ddp):
    """-> OUT/resume to continue from, or None to start from scratch. With --resume: finish a swap a kill interrupted;
    nothing complete saved yet starts from scratch (said). Without: drop an earlier run's state, so a later --resume
    never mixes two runs. Every rank calls it."""
    if master:
        os.makedirs(out, exist_ok=True)
        if resume:
            find_resume(out)
        else:
            clear_resume(out)
    if ddp:
        dist.barrier()
    resume_dir = os.path.join(out, "resume")
    if resume and not os.path.exists(os.path.join(resume_dir, "trainer_state.pt")):
        if master:
            print(f"--resume: nothing saved in {resume_dir} yet, starting from scratch", flush=True)
        return None
    return resume_dir if resume else None


def clear_resume(out):
    """A run that starts over (no --resume) drops an earlier run's state, so a later --resume never mixes the two."""
    for name in RESUME_DIRS:
        drop_leftovers(os.path.join(out, name))


def load_resume_state(resume_dir):
    return torch.load(os.path.join(resume_dir, "trainer_state.pt"), map_location="cpu", weights_only=False)


def save_final(model, tokenizer, out, args, state_dict=None):
    """The final checkpoint INTO OUT, file by file (model.save builds it beside OUT first), so OUT's logs and resume/
    never move: a kill at any point leaves them in place, and a rerun with --resume only redoes this save.
    state_dict: the gathered weights under FSDP (full_state_dict), else None."""
    tmp = out.rstrip("/") + ".final.tmp"
    drop_leftovers(tmp)  # of a save a kill interrupted
    save(model, tokenizer, tmp, args, state_dict)
    for name in os.listdir(out):  # weights of an older checkpoint that this one does not have (e.g. value_head.pt)
        weights = name == "value_head.pt" or name.endswith((".safetensors", ".bin", ".safetensors.index.json"))
        if weights and not os.path.exists(os.path.join(tmp, name)):
            os.remove(os.path.join(out, name))
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    shutil.rmtree(tmp)


# -----------------------------------------------------------------------------
# The separate world model (world_model.py) as a tool: its prompt, its generation, its registry


def wm_prompt(tool, args):
    """The world model's WHOLE input: the call as it appears in a trajectory, then the opened result tag. It takes only
    (tool, args), so no question, gold answer or trajectory can reach the world model."""
    return f"{action_open(tool)} {args.strip()} {action_close(tool)}\n{result_open(tool)}\n"


def simulate(model, tokenizer, prompts, tool, max_obs_tokens=192, batch_size=16, greedy=True, temperature=1.0):
    """prompts: token id lists that end inside an opened result tag -> the observation text each row writes, up to
    result_close(tool) or eos. HF generate with left padding (one prefill per batch, then the KV cache) and the close
    tag as an extra stop token: engine.rollout stops only at actions and eos, so it does not fit here."""
    stop = tokenizer.convert_tokens_to_ids(result_close(tool))
    if stop is None or stop == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no token for {result_close(tool)!r}: load with add_action_tokens=True")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    model.eval()
    out = []
    for b in range(0, len(prompts), batch_size):
        rows = prompts[b:b + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": 1.0}
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_obs_tokens,
                                   eos_token_id=[stop, tokenizer.eos_token_id], pad_token_id=pad, **sampling)
        for new in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(new) if t in (stop, tokenizer.eos_token_id)), len(new))
            out.append(tokenizer.decode(new[:cut], skip_special_tokens=True).strip())
    return out


def load_world_model_tools(ckpt, max_obs_tokens=192, device="cpu", batch_size=16, greedy=True, temperature=1.0,
                           max_query_chars=300, cache_size=4096, timeout_s=3600):
    """A ToolRegistry whose "search" is the world model at ckpt and whose "calculator" is the real calculator
    (computation is cheap and exact: simulating it would only add errors). registry.real_calls then counts world-model
    generations, not real retrievals. Queries longer than max_query_chars are cut so prompt + observation fit.
    timeout_s is only a backstop (generation is local and bounded by max_obs_tokens): the registry's 30 s default
    would turn a long CPU batch into timeout errors."""
    model, tokenizer = load(ckpt, device=device, add_action_tokens=True)

    def search(queries):
        prompts = [encode_segments(tokenizer, [{"kind": "prompt", "text": wm_prompt("search", q[:max_query_chars])}])
                   [0] for q in queries]
        return simulate(model, tokenizer, prompts, "search", max_obs_tokens, batch_size, greedy, temperature)

    return ToolRegistry({"search": search, "calculator": calculator}, cache_size=cache_size, timeout_s=timeout_s)


# -----------------------------------------------------------------------------
# FSDP (--fsdp): the paper's 7B trained on one 8-GPU node. DDP keeps a whole copy of the fp32 weights, gradients and
# AdamW moments on every GPU (16 bytes a parameter: 122 GB for 7.6B, more than an 80 GB GPU); FSDP2 keeps 1/world of
# each and gathers one decoder layer at a time. `python common.py plan` prints the memory plan (memory_plan below).


def shard(model, device, bf16=False):
    """FSDP2 (torch.distributed.fsdp.fully_shard), in place: each decoder layer (HF's _no_split_modules) is one unit,
    all-gathered just before its forward and again for its backward, and freed after; the PPO value head is one unit;
    the root holds the rest (embeddings, final norm, lm_head) and stays gathered from forward to backward (FSDP2's
    default for the root). The parameters become DTensor shards: build the optimizer AFTER this.
    bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), i.e. the gathered weights are cast to bfloat16
    for compute, gradients are reduced in float32, the sharded master weights and AdamW state stay float32.
    Gradients are reduce-scattered on every backward, micro-batches included (no no_sync: skipping the reduction would
    hold unsharded gradients, the memory FSDP saves), and averaged over ranks as DDP does. Needs torchrun (a process
    group); runs on CPU with gloo too (tests/test_fsdp.py)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    assert dist.is_initialized(), "--fsdp needs torchrun (torchrun --standalone --nproc_per_node=N ...)"
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    assert units, f"{type(model).__name__}: no decoder layers found (its _no_split_modules: {model._no_split_modules})"
    if getattr(model, "value_head", None) is not None:
        units.append(model.value_head)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=precision)
    fully_shard(model, mesh=mesh, mp_policy=precision)
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextmanager
def whole_model(model):
    """Rollouts (and evaluation) under FSDP: gather every unit once, run, then shard again. A decode loop calls the
    model once per token; sharded, each call would all-gather every layer (the whole model per token) and every rank
    would have to make exactly as many calls as the others, which ranks generating their own prompts to different
    lengths do not. Gathered, a forward makes no collective at all. Cost: the whole model in the compute dtype on
    every GPU for the rollout (bf16 7.6B: 15 GB) on top of its shards; gradients are freed by then (zero_grad), which
    is what makes room. Every rank must enter (the gather is a collective). A no-op without FSDP."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)  # forwards inside leave the units gathered
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)                 # the layers: free after forward (FSDP2's default) ...
        model.set_reshard_after_forward(False, recurse=False)  # ... the root: kept until backward (its default)


def clip_grad_norm(params, max_norm):
    """torch's clip_grad_norm_ (max_norm <= 0: no clipping) -> the global norm as a plain tensor. Under FSDP2 the
    gradients are DTensor shards and torch reduces the norm over all ranks itself (tests/test_fsdp.py checks it against
    one process); the result is a replicated DTensor, made plain here."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model):
    """The whole model's weights for model.save: under FSDP gathered to rank 0's CPU (a collective: EVERY rank calls
    it; rank 0 gets the full dict, the others {}); None without FSDP (model.save then uses model.state_dict())."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer):
    """What trainer_state.pt stores of the optimizer: optimizer.state_dict(), or under FSDP the FULL AdamW state keyed
    by parameter name, gathered to rank 0's CPU (a collective: every rank calls it). One resume format whatever the
    world size: a run saved on 8 GPUs resumes on 4. Resume with the --fsdp setting the state was saved with."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state):
    """Inverse of optimizer_state: every rank passes the full state it read; under FSDP each keeps its own shard."""
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


# The paper's policy, Qwen2.5-7B (R1-Distill-Qwen-7B has the same shape): its config.json fields, so the plan needs no
# download. head_dim = 3584 / 28 = 128; Qwen2 has biases on q, k and v.
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
GB = 1e9


def count_parameters(config):
    """-> (parameters of one decoder layer, of the rest: embeddings, lm_head unless tied, final norm) of a
    Llama/Qwen-shaped config (a dict or an HF config)."""
    c = config if isinstance(config, dict) else config.to_dict()
    h, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    bias = c.get("attention_bias", c.get("model_type") == "qwen2")
    layer = h * q + 2 * h * kv + q * h + (q + 2 * kv) * bias + 3 * h * I + 2 * h  # attention, SwiGLU MLP, 2 norms
    rest = V * h * (1 if c.get("tie_word_embeddings") else 2) + h
    return layer, rest


def memory_plan(config, world_size, micro_batch, context, fsdp, grad_checkpointing=False, bf16=True, reference=False,
                rollout_batch=0, rows_per_item=1):
    """Bytes per GPU, as {item: bytes}, of a training run: estimates from the config alone (no weights), for plain
    DDP (fsdp=False: every GPU holds everything) or FSDP (1/world_size of the sharded items). The trainers keep
    float32 weights (bf16: bfloat16 compute), so per parameter: weights 4, gradients 4, AdamW 2 moments x 4 bytes.
      reference    the frozen KL reference of RL (float32 like the policy), sharded under FSDP
      gathered     FSDP's working set: the root (embeddings, lm_head) + 2 layers (one computing, one prefetched) in
                   the compute dtype, and their unreduced gradients
      activations  per decoder layer and token, e bytes per value (2 in bf16, else 4), with SDPA/flash attention
                   (no s x s scores): e * (8h + 2 kv_dim + 4I) = the norms' inputs and outputs and fp32 internals
                   (8h), q, k, v (h + 2 kv_dim), the attention output (h), gate, up, silu(gate) and their product (4I).
                   The same count as Korthikanti et al. 2022's 34 s b h for GPT (4h GELU MLP, dropout masks); Qwen's
                   SwiGLU MLP makes it ~59 s b h. x layers x tokens (micro_batch x rows_per_item x context).
                   --grad-checkpointing keeps only each layer's input (e h per token) + one layer recomputed.
      logits       tokens x vocab x (e + 3 x 4): the logits and 3 float32 copies (the float cast, log-softmax,
                   the entropy's softmax in RL)
      rollout      (RL, rollout_batch > 0) the KV cache, 2 x layers x kv_heads x head_dim x context x rollout_batch x e,
                   and under FSDP the whole model gathered in the compute dtype (common.whole_model)
    The peak is the larger of the training step (everything but the rollout) and the rollout (no gradients: freed).
    CUDA's own context and allocator fragmentation are not in it: check_memory keeps 10% for them."""
    c = config if isinstance(config, dict) else config.to_dict()
    h, L, I, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    kv_dim = c["num_key_value_heads"] * (c.get("head_dim") or h // c["num_attention_heads"])
    layer, rest = count_parameters(c)
    P, e, n = L * layer + rest, 2 if bf16 else 4, world_size if fsdp else 1
    tokens = micro_batch * rows_per_item * context
    per_layer = e * (8 * h + 2 * kv_dim + 4 * I) * tokens
    plan = {"parameters (count)": P, "weights (fp32)": 4 * P / n, "gradients (fp32)": 4 * P / n,
            "AdamW moments (2 x fp32)": 8 * P / n, "reference model (fp32)": 4 * P / n * reference,
            "gathered units (FSDP)": (rest + 2 * layer) * (e + 4) * fsdp,
            "activations": L * per_layer, "activations, --grad-checkpointing": L * e * h * tokens + per_layer,
            "logits": tokens * V * (e + 12),
            "rollout KV cache": 2 * L * kv_dim * context * rollout_batch * e,
            "rollout: whole model gathered (FSDP)": P * e * fsdp * (rollout_batch > 0)}
    kept = plan["weights (fp32)"] + plan["AdamW moments (2 x fp32)"] + plan["reference model (fp32)"]
    activations = plan["activations, --grad-checkpointing" if grad_checkpointing else "activations"]
    plan["peak: training step"] = kept + plan["gradients (fp32)"] + plan["gathered units (FSDP)"] + activations + \
        plan["logits"]
    plan["peak: rollout"] = (kept + plan["rollout KV cache"] + plan["rollout: whole model gathered (FSDP)"]) * \
        (rollout_batch > 0)
    plan["peak"] = max(plan["peak: training step"], plan["peak: rollout"])
    return plan


def format_plan(config, world_size, micro_batch, context, gpu_gb=None, **options):
    """memory_plan for DDP and FSDP side by side, in GB per GPU: a small table."""
    ddp, fsdp = (memory_plan(config, world_size, micro_batch, context, sharded, **options) for sharded in (False, True))
    c = config if isinstance(config, dict) else config.to_dict()
    lines = [f"memory plan per GPU: {c.get('model_type', '?')} {ddp['parameters (count)'] / 1e9:.2f}B parameters, "
             f"{world_size} GPU(s), micro-batch {micro_batch} x {context} tokens, rollout "
             f"{options.get('rollout_batch', 0)} sequences, {'bf16' if options.get('bf16', True) else 'fp32'}"
             f"{', --grad-checkpointing' if options.get('grad_checkpointing') else ''}",
             f"{'GB per GPU':<38} {'DDP':>8} {'FSDP':>8}"]
    for key in ddp:
        if key != "parameters (count)":
            lines.append(f"{key:<38} {ddp[key] / GB:>8.1f} {fsdp[key] / GB:>8.1f}")
    if gpu_gb:
        fits = lambda plan: "yes" if plan["peak"] <= 0.9 * gpu_gb * GB else "NO"  # noqa: E731
        lines.append(f"{f'fits in {gpu_gb:g} GB (90%)?':<38} {fits(ddp):>8} {fits(fsdp):>8}")
    return "\n".join(lines)


def check_memory(config, device, master, world_size, micro_batch, context, fsdp, grad_checkpointing=False, **options):
    """Rank 0 prints the memory plan; on CUDA every rank refuses to start when the plan's peak exceeds 90% of the
    GPU's memory, naming the first change that would fit: --fsdp, --grad-checkpointing, a smaller --micro-batch.
    grad_checkpointing=None: the script has no such flag (never suggested)."""
    if master:
        print(format_plan(config, world_size, micro_batch, context, grad_checkpointing=grad_checkpointing, **options),
              flush=True)
    if not device.startswith("cuda"):
        return
    budget = 0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory
    peak = lambda **change: memory_plan(**{**dict(config=config, world_size=world_size, micro_batch=micro_batch,  # noqa
                                        context=context, fsdp=fsdp, grad_checkpointing=grad_checkpointing, **options),
                                        **change})["peak"]
    if peak() <= budget:
        return
    can_checkpoint = grad_checkpointing is not None
    tries = [("--fsdp", dict(fsdp=True))]
    if can_checkpoint:
        tries += [("--grad-checkpointing", dict(grad_checkpointing=True)),
                  ("--fsdp --grad-checkpointing", dict(fsdp=True, grad_checkpointing=True))]
    tries += [(f"--fsdp{' --grad-checkpointing' * can_checkpoint} --micro-batch {m}",
               dict(micro_batch=m, fsdp=True, grad_checkpointing=can_checkpoint))
              for m in range(micro_batch - 1, 0, -1)]
    fix = next((flags for flags, change in tries if peak(**change) <= budget), None)
    raise SystemExit(f"memory plan: {peak() / GB:.1f} GB per GPU, more than 90% of this GPU's "
                     f"{budget / 0.9 / GB:.0f} GB. " + (f"It fits with {fix}." if fix else
                                                         "Nothing fits: more GPUs or a shorter context."))


if __name__ == "__main__":  # python common.py plan [--config config.json] --world-size 8 --gpu-gb 80 ...
    import argparse
    p = argparse.ArgumentParser(description="memory plan per GPU, DDP vs FSDP, from a model config alone")
    p.add_argument("command", choices=["plan"], help="the one command")
    p.add_argument("--config", default=None, help="an HF config.json (default: Qwen2.5-7B, embedded)")
    p.add_argument("--world-size", type=int, default=8, help="GPUs")
    p.add_argument("--gpu-gb", type=float, default=80, help="memory of one GPU")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per forward/backward on one GPU")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--rollout-batch", type=int, default=0, help="RL: trajectories one GPU generates at once (0: SFT)")
    p.add_argument("--reference", action="store_true", help="RL: a frozen reference model for the KL term")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--fp32", action="store_true", help="float32 compute instead of bf16")
    a = p.parse_args()
    print(format_plan(json.load(open(a.config)) if a.config else QWEN25_7B, a.world_size, a.micro_batch, a.context,
                      a.gpu_gb, grad_checkpointing=a.grad_checkpointing, bf16=not a.fp32, reference=a.reference,
                      rollout_batch=a.rollout_batch))
