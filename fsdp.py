"""
The paper's 7B on one 8-GPU node (--fsdp in train_sft.py, train_rl.py, world_model.py train): FSDP2 sharding, the
helpers the trainers call on every path (plain torch on an unsharded model, so the CPU path runs them too), and the
memory plan every trainer prints at start and checks on CUDA. Why: DDP keeps the fp32 weights, gradients and AdamW
moments on every GPU (16 bytes a parameter: 122 GB for 7.6B); FSDP2 keeps 1/world of each.

    python fsdp.py plan                                  # Qwen2.5-7B on 8 x 80 GB: DDP vs FSDP, GB per GPU
    python fsdp.py plan --config DIR/config.json --world-size 4 --gpu-gb 141 --rollout-batch 30 --reference
"""
import json
from contextlib import contextmanager

import torch
import torch.distributed as dist


def shard(model, device, bf16=False):
    """FSDP2 in place: each decoder layer (HF's _no_split_modules) and the PPO value head is a unit, gathered for its
    forward and again for its backward; the root (embeddings, norm, lm_head) stays gathered in between. Build the
    optimizer AFTER this (DTensor shards). bf16: bfloat16 compute, float32 gradient reduction, weights and AdamW state.
    Gradients are reduce-scattered on every backward, micro-batches included (no_sync would hold unsharded ones)."""
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


def parallelize(model, device, ddp, sharded, bf16=False):
    """-> (model, training module): --fsdp shards the model in place (the two are the same module); plain torchrun
    wraps it in DDP (rollouts, no-grad passes and saving use the model, the training forward the wrapper)."""
    if sharded:
        shard(model, device, bf16)
    elif ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return model, DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    return model, model


@contextmanager
def whole_model(model):
    """Rollouts (and evaluation) under FSDP: gather every unit once (every rank: a collective), run, shard again.
    Sharded, each decoded token would all-gather the whole model, and ranks decoding their own prompts to different
    lengths would make different numbers of collectives. Cost: the model in bf16 on every GPU (7.6B: 15 GB)."""
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
    """torch's clip_grad_norm_ (max_norm <= 0: no clipping) -> the global norm as a plain tensor (under FSDP2 torch
    reduces it over the ranks' DTensor shards itself and returns a replicated DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model):
    """model.save's weights: under FSDP gathered to rank 0's CPU (a collective: EVERY rank calls it; the others get
    {}); None without FSDP (model.save then uses model.state_dict())."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer):
    """optimizer.state_dict(), or under FSDP the FULL AdamW state keyed by parameter name, gathered to rank 0's CPU (a
    collective): a run saved on 8 GPUs resumes on 4. Resume with the --fsdp setting the state was saved with."""
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


# The paper's policy, Qwen2.5-7B (R1-Distill-Qwen-7B has its shape): its config.json, so the plan needs no download.
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
GB = 1e9


def count_parameters(config):
    """-> (parameters of one decoder layer, of the rest) of a Llama/Qwen-shaped config (a dict or an HF config)."""
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
    """Bytes per GPU, {item: bytes}, of a training run estimated from the config alone, for plain DDP (fsdp=False:
    every GPU holds everything) or FSDP (1/world_size of the sharded items). The trainers keep float32 weights (bf16:
    bfloat16 compute): per parameter, weights 4, gradients 4, AdamW's 2 moments 8 bytes.
      reference    RL's frozen KL reference (float32 like the policy), sharded under FSDP
      gathered     FSDP's working set: root + 2 layers (computing, prefetched), compute dtype + unreduced gradients
      activations  per layer and token, e bytes a value (2 in bf16, else 4), SDPA (no s x s scores): the norms' inputs,
                   outputs, fp32 internals (8h), q, k, v (h + 2 kv_dim), attention output (h), gate, up, silu(gate) and
                   their product (4I): Korthikanti et al. 2022's 34 s b h for GPT is ~59 s b h for Qwen's SwiGLU MLP.
                   --grad-checkpointing keeps each layer's input (e h per token) + one layer recomputed.
      logits       the logits and 3 float32 copies (float cast, log-softmax, RL's entropy)
      rollout      (RL) the KV cache, and under FSDP the whole model gathered (whole_model)
      AdamW step   torch's multi-tensor AdamW (CUDA's default) makes a float32 temporary of every parameter (README)
    The peak is the largest of the training step, the optimizer step and the rollout (gradients freed). CUDA's own
    context and fragmentation are not in it: check_memory keeps 10% for them."""
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
            "rollout: whole model gathered (FSDP)": P * e * fsdp * (rollout_batch > 0),
            "AdamW step temporaries": 4 * P / n}
    kept = plan["weights (fp32)"] + plan["AdamW moments (2 x fp32)"] + plan["reference model (fp32)"]
    activations = plan["activations, --grad-checkpointing" if grad_checkpointing else "activations"]
    plan["peak: training step"] = kept + plan["gradients (fp32)"] + plan["gathered units (FSDP)"] + activations + \
        plan["logits"]
    plan["peak: optimizer step"] = kept + plan["gradients (fp32)"] + plan["AdamW step temporaries"]
    plan["peak: rollout"] = (kept + plan["rollout KV cache"] + plan["rollout: whole model gathered (FSDP)"]) * \
        (rollout_batch > 0)
    plan["peak"] = max(plan["peak: training step"], plan["peak: optimizer step"], plan["peak: rollout"])
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
    """Rank 0 prints the plan; on CUDA every rank refuses to start when its peak exceeds 90% of the GPU, naming the
    first change that fits (--fsdp, --grad-checkpointing, a smaller --micro-batch; grad_checkpointing=None: no flag)."""
    if master:
        print(format_plan(config, world_size, micro_batch, context, grad_checkpointing=grad_checkpointing, **options),
              flush=True)
    if not device.startswith("cuda"):
        return
    budget = 0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory
    base = dict(config=config, world_size=world_size, micro_batch=micro_batch, context=context, fsdp=fsdp,
                grad_checkpointing=grad_checkpointing, **options)
    peak = lambda **change: memory_plan(**{**base, **change})["peak"]  # noqa: E731
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


if __name__ == "__main__":
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
