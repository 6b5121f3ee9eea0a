"""
What train_sft.py, train_rl.py and world_model.py share (README's table); sharding (--fsdp) is fsdp.py's.

One checkpoint format for every stage (README "Checkpoints, resume"): OUT/ the final checkpoint, a save_pretrained dir
(+ run_args.json); OUT/metrics.jsonl a row per step ("step" field); OUT/resume/ weights (model.save) + trainer_state.pt
(step, optimizer, RNG, what the stage adds), written by save_resume every --save-every steps and once at the end.
A kill at any point loses nothing: resume/ is built beside itself and swapped in whole, trainer_state.pt last
(resume_point also finds it half-way through the swap); the final checkpoint is moved INTO OUT file by file (the
logs and resume/ never move); since resume/ holds the last step when the final save starts, a rerun with --resume
only redoes that save. On --resume the step log drops the rows after the resume point: every row exactly once.
"""
import gc
import json
import math
import os
import shutil

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import rollout
from model import build_prompt, encode_segments, load, save
from tools import ToolRegistry, action_close, action_open, calculator, read_jsonl, result_close, result_open

# -----------------------------------------------------------------------------
# Device and ranks


def default_device():  # the one default device rule of every script
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_distributed(device):
    """-> (rank, world_size, device, ddp); under torchrun (RANK set) a process per GPU (nccl) or CPU process (gloo)."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, device, False
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, True


def teardown_distributed():
    """Call it after train() returns: a DDP wrapper or DTensor freed after destroy_process_group holds the gloo
    group, whose destructor then hung or aborted."""
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
    """{name: number} summed over ranks."""
    return dict(zip(d, all_sum(torch.tensor([float(v) for v in d.values()], dtype=torch.float64)).tolist()))


# -----------------------------------------------------------------------------
# Batches and the one next-token shift


def collate(rows, pad_id, device):
    """rows of (ids, mask, ...) lists -> right-padded (R, T) tensors: ids, attention, each further column 0-padded."""
    T = max(len(r[0]) for r in rows)

    def pad(seqs, value):
        return torch.tensor([s + [value] * (T - len(s)) for s in seqs], device=device)
    masks = [pad([r[k] for r in rows], 0) for k in range(1, len(rows[0]))]
    return (pad([r[0] for r in rows], pad_id), pad([[1] * len(r[0]) for r in rows], 0), *masks)


def token_logprobs(logits, ids):
    """log pi(x_t | x_<t) of every next token, the ONE place targets are shifted: logits (R, T, V), ids (R, T) ->
    (R, T-1) float32, whose position t scores ids[:, t + 1], so a (R, T) mask over ids lines up as mask[:, 1:]."""
    R, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1), reduction="none")
    return -nll.view(R, T - 1)


def policy_forward(model, value_head, ids, attention, temperature=1.0, need_entropy=True):
    """RL's forward under softmax(logits / temperature), as the engine samples -> logp, entropy, values (B, T-1)."""
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=value_head is not None)
    scaled = out.logits.float() / temperature                            # (B, T, V)
    logp = token_logprobs(scaled, ids)
    z = scaled[:, :-1]
    entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1) if need_entropy else None
    values = value_head(out.hidden_states[-1][:, :-1]).float() if value_head is not None else None
    return logp, entropy, values


def epoch_batches(lengths, batch_size, bucket_batches, seed, epoch):
    """One epoch's batches of example indices, the same on every rank: the last filled with the first examples."""
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
# Input files: typed JSONL rows, errors that name file:line


# The type of every field a reader may require: a wrong type fails at the line that has it, not later ("args": null
# became the query "None", an int observation crashed split_results, a list as tool name a set insert).
CALL_FIELDS = ("tool", "args", "observation")
SEGMENT_FIELDS = ("segments", "prefix", "chosen", "rejected")  # SFT records: lists of {"kind", "text"} segments
FIELD_TYPES = {**dict.fromkeys(CALL_FIELDS + ("split", "entity", "question", "text"), (str, "a string")),
               "entity_seen": (bool, "true or false"), **dict.fromkeys(SEGMENT_FIELDS, (list, "a list of segments"))}


def json_type(value):
    """The JSON name of a parsed value's type, for error messages."""
    return {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_fields(row, fields, where, what="field"):
    """-> row if every field is there with its FIELD_TYPES type, else ValueError naming where and the field."""
    for field in fields:
        if field not in row:
            raise ValueError(f"{where}: missing {what} '{field}'")
        kind, name = FIELD_TYPES.get(field, (object, ""))
        if not isinstance(row[field], kind):
            raise ValueError(f"{where}: {what} '{field}' must be {name}, got {json_type(row[field])}")
        for i, seg in enumerate(row[field] if field in SEGMENT_FIELDS else ()):
            if not (isinstance(seg, dict) and seg.get("kind") in ("policy", "obs")
                    and isinstance(seg.get("text"), str)):
                raise ValueError(f"{where}: {what} '{field}[{i}]' must be " '{"kind": "policy"|"obs", "text": str}')
    return row


def read_rows(path, fields=()):
    """Rows of a JSONL file, each with "_where" (file:line) added and its fields checked (check_fields)."""
    return [{**check_fields(row, fields, where), "_where": where} for where, row in read_jsonl(path)]


# -----------------------------------------------------------------------------
# The step log and checkpoints


def open_step_log(path, resume, start_step):
    """The step log, opened to append: on resume without rows after start_step or cut short by a kill; else empty."""
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
    """OUT/resume (the top of this file). state_dict: FSDP's gathered weights or None."""
    tmp = os.path.join(out, ".resume.tmp")
    save(model, tokenizer, tmp, args, state_dict)
    torch.save(state, os.path.join(tmp, "trainer_state.pt.part"))
    os.replace(os.path.join(tmp, "trainer_state.pt.part"), os.path.join(tmp, "trainer_state.pt"))
    replace_dir(tmp, os.path.join(out, "resume"))


RESUME_DIRS = (".resume.tmp", "resume", "resume.old")  # newest first; with trainer_state.pt (written last): complete


def drop_leftovers(path, keep=False):
    """Delete path (unless keep) and the build/old dirs model.save makes beside it (path.tmp-*, path.old-*)."""
    if not keep:
        shutil.rmtree(path, ignore_errors=True)
    parent, name = os.path.split(path.rstrip("/"))
    for other in os.listdir(parent) if os.path.isdir(parent) else []:
        if other.startswith((name + ".tmp-", name + ".old-")):
            shutil.rmtree(os.path.join(parent, other), ignore_errors=True)


def resume_point(out, resume, master, ddp):
    """-> OUT/resume to continue from, or None to start from scratch (every rank calls it). --resume first finishes a
    swap a kill interrupted; without it an earlier run's state is dropped, so a later --resume never mixes two runs."""
    resume_dir = os.path.join(out, "resume")
    if master:
        os.makedirs(out, exist_ok=True)
        newest = next((n for n in RESUME_DIRS if os.path.exists(os.path.join(out, n, "trainer_state.pt"))), "resume")
        if resume and newest != "resume":
            replace_dir(os.path.join(out, newest), resume_dir)
        for name in RESUME_DIRS:  # what an interrupted save left behind (starting over: everything)
            drop_leftovers(os.path.join(out, name), keep=resume and name == "resume")
    if ddp:
        dist.barrier()
    found = resume and os.path.exists(os.path.join(resume_dir, "trainer_state.pt"))
    if resume and not found and master:
        print(f"--resume: nothing saved in {resume_dir} yet, starting from scratch", flush=True)
    return resume_dir if found else None


def load_resume_state(resume_dir):
    return torch.load(os.path.join(resume_dir, "trainer_state.pt"), map_location="cpu", weights_only=False)


def save_final(model, tokenizer, out, args, state_dict=None):
    """The final checkpoint, INTO OUT (the top of this file). state_dict: FSDP's gathered weights or None."""
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
# World models as tools: the separate one (world_model.py), and the policy from the call alone (train_rl.py)


def wm_prompt(tool, args):
    """The world model's WHOLE input: the call as it appears in a trajectory, then the opened result tag. It takes only
    (tool, args), so no question, gold answer or trajectory can reach the world model."""
    return f"{action_open(tool)} {args.strip()} {action_close(tool)}\n{result_open(tool)}\n"


def simulate(model, tokenizer, prompts, tool, max_obs_tokens=192, batch_size=64):
    """prompts: token id lists that end inside an opened result tag -> each row's observation, greedy, up to
    result_close(tool) or eos: the engine's own KV-cache loop (rollout's observe mode), as every rollout."""
    out = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        rollouts = rollout(model, tokenizer, chunk, None, env="sim", observe=tool, greedy=True,
                           sim_obs_tokens=max_obs_tokens, max_new_tokens=max_obs_tokens + 1, answer_tokens=1,
                           max_context=max(map(len, chunk)) + max_obs_tokens + 64)
        out += [r.text.split(result_close(tool))[0].strip() for r in rollouts]
    return out


def policy_sim_segments(tokenizer, tool, args, template="short"):
    """The minimal context in which a POLICY plays its own world model, from the call alone (no gold answer either):
    its usual prompt with the query as the question, then the call and the opened result tag, as env="sim" leaves it."""
    return [{"kind": "prompt", "text": build_prompt(tokenizer, args.strip(), template)},
            {"kind": "prompt", "text": f" {wm_prompt(tool, args)}"}]


def simulator_tools(model, tokenizer, segments, max_obs_tokens=192, batch_size=16, max_query_chars=300,
                    cache_size=4096, timeout_s=3600):
    """A ToolRegistry whose "search" is `model` writing the observation greedily from segments(query) alone, the
    calculator the real one (cheap and exact: simulating it would only add errors). Queries are cut to max_query_chars
    so prompt + observation fit; timeout_s is a backstop: the registry's 30 s default would fail long CPU batches."""
    def search(queries):
        prompts = [encode_segments(tokenizer, segments(q[:max_query_chars]))[0] for q in queries]
        return simulate(model, tokenizer, prompts, "search", max_obs_tokens, batch_size)

    return ToolRegistry({"search": search, "calculator": calculator}, cache_size=cache_size, timeout_s=timeout_s)


def load_world_model_tools(ckpt, max_obs_tokens=192, device="cpu", batch_size=16, **registry):
    """simulator_tools of the separate world model at ckpt (real_calls count its generations): its input is the call."""
    model, tokenizer = load(ckpt, device=device, add_action_tokens=True)
    return simulator_tools(model, tokenizer, lambda q: [{"kind": "prompt", "text": wm_prompt("search", q)}],
                           max_obs_tokens, batch_size, **registry)


def policy_world_model_tools(policy, tokenizer, template, max_obs_tokens=192, batch_size=64):
    """simulator_tools of the POLICY as its own world model from the call alone (train_rl --sim-context call): the
    context in which stage 3 learnt the teacher's calls and world_model.py eval measures its recall."""
    return simulator_tools(policy, tokenizer, lambda q: policy_sim_segments(tokenizer, "search", q, template),
                           max_obs_tokens, batch_size)
