"""--fsdp (FSDP2, fsdp.shard) on CPU with gloo: 2 torchrun processes sharding the model give the same step as one
plain process (metrics, gradient norm, final weights), the sharded checkpoint is a plain save_pretrained dir, resume
under FSDP equals an uninterrupted run, and the memory plan's numbers for Qwen2.5-7B. The tiny models and data are
tests/test_sft.py's and tests/test_rl.py's fixtures (2 layers, width 64)."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import fsdp  # noqa: E402
import model as M  # noqa: E402
import test_rl  # noqa: E402
import test_sft  # noqa: E402
import train_rl  # noqa: E402
import train_sft  # noqa: E402

pytest.importorskip("torch.distributed.fsdp")


@pytest.fixture(scope="module")
def sft_world(tmp_path_factory):
    return test_sft.world.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def rl_world(tmp_path_factory):
    return test_rl.world.__wrapped__(tmp_path_factory)


def torchrun(script, args):
    """Run script under torchrun with 2 CPU ranks (gloo); fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script), *args]
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out; output:\n{(e.stdout or b'')[-3000:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def assert_same_weights(dir_a, dir_b, init=None):
    """Both dirs load with plain transformers and hold the same weights; with init, the weights moved from it."""
    a, b = (AutoModelForCausalLM.from_pretrained(d) for d in (dir_a, dir_b))
    moved = 0.0
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name
        if init is not None:
            moved = max(moved, (p - init[name]).abs().max().item())
    assert init is None or moved > 1e-4, "the steps did not change the weights: the comparison would be vacuous"


# -----------------------------------------------------------------------------
# SFT


@pytest.fixture(scope="module")
def sft_one_process(sft_world):
    """The reference: 3 steps of stage 2 in one plain process (batch 8 = 2 ranks x micro 2 x 2 accumulation steps)."""
    out = sft_world["root"] / "fsdp_one"
    train_sft.main(train_sft.parse_args(test_sft.run_args(sft_world, out, "--stage", "2", "--max-steps", "3",
                                                          "--batch-size", "8")))
    return out


def test_sft_fsdp_two_processes_equal_one_process(sft_world, sft_one_process):
    """Sharded, each rank holds half of every weight and gradient: the loss, the global gradient norm (clipped on
    DTensor shards) and the final weights must still be the one-process run's, and the checkpoint rank 0 writes from
    the gathered weights is a plain save_pretrained dir."""
    out = sft_world["root"] / "fsdp_two"
    torchrun("train_sft.py", test_sft.run_args(sft_world, out, "--stage", "2", "--max-steps", "3", "--batch-size", "8",
                                               "--fsdp"))
    one, two = test_sft.read_metrics(sft_one_process), test_sft.read_metrics(out)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "obs_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    init = AutoModelForCausalLM.from_pretrained(sft_world["init"]).state_dict()
    assert_same_weights(sft_one_process, out, init)
    assert not any(name.startswith(("model-", "pytorch_model")) and "shard" in name for name in os.listdir(out))


def test_sft_fsdp_resume_equals_uninterrupted(sft_world, sft_one_process):
    """Stopped after 2 of 3 steps (OUT/resume: gathered weights + the full AdamW state keyed by parameter name),
    then --resume: each rank loads its shard of the optimizer state, and the run ends where the uninterrupted one
    does (metrics of every step, weights)."""
    out = sft_world["root"] / "fsdp_resume"
    args = test_sft.run_args(sft_world, out, "--stage", "2", "--max-steps", "3", "--batch-size", "8", "--fsdp")
    torchrun("train_sft.py", args + ["--max-steps-this-run", "2"])
    state = common.load_resume_state(out / "resume")
    assert state["step"] == 2 and "model.layers.0.mlp.up_proj.weight" in state["optimizer"]["state"]
    torchrun("train_sft.py", args + ["--resume"])
    one, two = test_sft.read_metrics(sft_one_process), test_sft.read_metrics(out)
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    assert_same_weights(sft_one_process, out)


# -----------------------------------------------------------------------------
# RL


def test_rl_fsdp_two_processes_equal_one_process(rl_world, tmp_path):
    """PPO (value head: its own FSDP unit) with a KL reference (sharded too), one simulated then one real step, a dev
    evaluation: the rollouts run on the gathered policy (fsdp.whole_model), each rank its own prompts, so samples,
    rewards, losses and final weights equal one process's; sim_end/ and the final checkpoint are gathered saves."""
    extra = ("--algo", "ppo", "--sim-steps", "1", "--real-steps", "1", "--eval-every", "2", "--eval-limit", "2")
    torchrun("train_rl.py", test_rl.run_args(rl_world, tmp_path / "two", *extra, "--fsdp"))
    train_rl.main(test_rl.run_args(rl_world, tmp_path / "one", *extra))
    for one, two in zip(test_rl.read_metrics(tmp_path / "one"), test_rl.read_metrics(tmp_path / "two")):
        for k in ("reward", "em", "actions", "tool_requests", "format_violation"):
            assert one[k] == two[k], k                                    # identical samples
        for k in ("loss", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance"):
            if k == "explained_variance" and abs(one[k]) > 1e3:
                continue  # all returns equal (every reward -0.5): 1 - 0/0, rounding noise over rounding noise
            assert one[k] == pytest.approx(two[k], rel=1e-4, abs=1e-6), k
    assert one["dev_em"] == two["dev_em"]
    init = AutoModelForCausalLM.from_pretrained(rl_world / "init").state_dict()
    assert_same_weights(tmp_path / "one", tmp_path / "two", init)
    assert_same_weights(tmp_path / "one" / "sim_end", tmp_path / "two" / "sim_end")
    heads = [torch.load(tmp_path / d / "value_head.pt") for d in ("one", "two")]
    for name in heads[0]:
        assert torch.allclose(heads[0][name], heads[1][name], atol=1e-5), name


def test_rl_fsdp_resume_equals_uninterrupted(rl_world, tmp_path):
    """GRPO under FSDP: 2 steps in one run == 1 step, --resume, 1 more step (optimizer shards, RNG, tool caches)."""
    extra = ("--sim-steps", "0", "--save-every", "1", "--fsdp")
    torchrun("train_rl.py", test_rl.run_args(rl_world, tmp_path / "full", "--real-steps", "2", *extra))
    torchrun("train_rl.py", test_rl.run_args(rl_world, tmp_path / "cut", "--real-steps", "1", *extra))
    torchrun("train_rl.py", test_rl.run_args(rl_world, tmp_path / "cut", "--real-steps", "2", "--resume", *extra))
    full, cut = test_rl.read_metrics(tmp_path / "full"), test_rl.read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2]
    for a, b in zip(full, cut):
        for k in ("reward", "loss", "kl", "entropy", "real_calls_total"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert_same_weights(tmp_path / "full", tmp_path / "cut")


# -----------------------------------------------------------------------------
# The memory plan (no weights, no GPU)


def test_memory_plan_qwen25_7b_on_8_x_80gb():
    """Qwen2.5-7B has 7.62B parameters (its model card: 7.61B). Plain DDP holds 16 bytes a parameter on every GPU
    (122 GB): it does not fit 80 GB; FSDP over 8 GPUs divides weights, gradients, AdamW state and the reference by 8."""
    layer, rest = fsdp.count_parameters(fsdp.QWEN25_7B)
    assert 28 * layer + rest == pytest.approx(7.615e9, rel=1e-3)
    options = dict(world_size=8, micro_batch=1, context=4096, reference=True, rollout_batch=30)
    ddp = fsdp.memory_plan(fsdp.QWEN25_7B, fsdp=False, **options)
    sharded = fsdp.memory_plan(fsdp.QWEN25_7B, fsdp=True, **options)
    for key in ("weights (fp32)", "gradients (fp32)", "AdamW moments (2 x fp32)", "reference model (fp32)"):
        assert sharded[key] == pytest.approx(ddp[key] / 8)
    assert ddp["weights (fp32)"] + ddp["gradients (fp32)"] + ddp["AdamW moments (2 x fp32)"] == 16 * (28 * layer + rest)
    assert ddp["rollout KV cache"] == 2 * 28 * 4 * 128 * 4096 * 30 * 2 == sharded["rollout KV cache"]
    assert ddp["peak"] > 80e9 > sharded["peak"]
    # torch's multi-tensor AdamW: one float32 temporary per parameter on top of weights, gradients and moments, so
    # the 7B on one GPU needs 20 bytes a parameter at the optimizer step (152 GB; it ran out of memory on an H200)
    one = fsdp.memory_plan(fsdp.QWEN25_7B, world_size=1, micro_batch=1, context=2048, fsdp=False,
                           grad_checkpointing=True)
    assert one["peak: optimizer step"] == one["peak"] == 20 * (28 * layer + rest)
    assert sharded["AdamW step temporaries"] == pytest.approx(ddp["AdamW step temporaries"] / 8)
    checkpointed = fsdp.memory_plan(fsdp.QWEN25_7B, fsdp=True, grad_checkpointing=True, **options)
    assert checkpointed["peak"] < sharded["peak"]
    table = fsdp.format_plan(fsdp.QWEN25_7B, 8, 1, 4096, gpu_gb=80, reference=True, rollout_batch=30)
    assert "DDP" in table and "FSDP" in table and table.splitlines()[-1].split()[-2:] == ["NO", "yes"]


def test_memory_check_refuses_on_cuda_naming_the_flag(monkeypatch):
    """On a GPU whose memory the plan exceeds, the run stops before training and names the flag that fits."""
    class Props:
        total_memory = 80e9
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    with pytest.raises(SystemExit, match="--fsdp"):
        fsdp.check_memory(fsdp.QWEN25_7B, "cuda:0", False, 8, 1, 4096, fsdp=False, reference=True)
    fsdp.check_memory(fsdp.QWEN25_7B, "cuda:0", False, 8, 1, 4096, fsdp=True, reference=True)  # fits: no error
    fsdp.check_memory(fsdp.QWEN25_7B, "cpu", True, 8, 64, 4096, fsdp=False)  # CPU: printed, never refused


# -----------------------------------------------------------------------------
# world_model.py train


def test_world_model_fsdp_two_processes_equal_one_process(tmp_path_factory):
    """world_model.py train --fsdp shards for memory only (every rank trains on the same batches): the gathered
    checkpoint equals a plain one-process run's. At lr 1e-4, not the default 1e-3: AdamW's first step is nearly
    lr * sign(g), so a weight whose gradient is ~eps (1e-8) moves by a fraction of lr that the sharded reduction order
    decides (at 1e-3 one o_proj entry of 65,536 differed by 1.7e-5 on 2026-12-03's CPU); a real error (ranks on
    different batches, a lost gradient) still moves weights by ~lr = 10x the tolerance, and the check that they
    moved keeps the comparison from being vacuous."""
    import test_world_model
    import world_model
    world = test_world_model.world.__wrapped__(tmp_path_factory)
    args = ["train", "--calls", str(world / "calls.jsonl"), "--init", "tiny", "--tokenizer", str(world / "tokenizer"),
            "--epochs", "1", "--batch-size", "2", "--lr", "1e-4", "--device", "cpu"]
    world_model.main(world_model.parse_args(args + ["--out", str(world / "one")]))
    torchrun("world_model.py", args + ["--out", str(world / "two"), "--fsdp"])
    init = M.load("tiny", tokenizer=str(world / "tokenizer"), add_action_tokens=True, seed=0)[0].state_dict()
    assert_same_weights(world / "one", world / "two", init)  # world_model.py train's init, --seed 0
