"""
GPU check (not run in CI; no GPU in the session that wrote it): the bf16 path on one CUDA device, end to end, for the
tiny preset and SmolLM2-135M (if its optional packages are installed, see model.py):
  1. an SFT step (train_sft.py stage 2) and an RL step (train_rl.py, GRPO, one real step) with --bf16, plain, then
     the same under torchrun --nproc_per_node=1 --fsdp (FSDP2 mixed precision: bf16 compute, fp32 reduce/master);
  2. rollout speed at batch 64 in bf16: our engine (engine.rollout) vs HF model.generate, and vLLM when installed,
     as generated tokens/s (the same prompts and token budget; the engine stops at actions, generate at eos or the
     budget, so the rows are a speed check, not the like-for-like comparison bench/rollout.py makes).
Exits with a message when CUDA is not available (--device cpu runs it anyway, slowly: for checking the script).

    python bench/gpu_check.py                    # both models, ~minutes on one GPU
    python bench/gpu_check.py --models tiny --batch 64 --max-new-tokens 256
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
from model import build_prompt, encode_segments, load  # noqa: E402
from tools import make_tools  # noqa: E402


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], help="tiny and/or smollm2")
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
    if not os.path.exists(os.path.join(data, "train.jsonl")):
        subprocess.run([sys.executable, "data.py", "--out", data], cwd=ROOT, check=True, capture_output=True)
    for name in args.models:
        print(f"{name}:", flush=True)
        if name == "smollm2":
            try:
                load("smollm2")
            except ImportError as e:
                print(f"  skipped: {str(e).splitlines()[0]}")
                continue
        init = ["--init", "tiny"] if name == "tiny" else ["--init", "smollm2", "--add-action-tokens"]
        sft = os.path.join(work, name, "sft")
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
    print("gpu check passed")


if __name__ == "__main__":
    main()
