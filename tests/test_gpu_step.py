"""benchmarks/gpu_step.py at the tiny shape on a CPU: each framework in its own process on the same saved weights
and prompts, every completion at the forced length on both sides, the first update on TRL's own batch equal to
TRL's, phases that add up, and `--profile` that leaves the training state as it was."""

import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_step.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from conftest import run_checks_in_process  # noqa: E402


def test_help_documents_every_field():
    res = run_checks_in_process([sys.executable, os.path.join("benchmarks", "gpu_step.py"), "--help"], ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    for flag in ("--shape", "--steps", "--warmup-steps", "--generation-backend", "--checks", "--output", "--no-trl",
                 "--profile", "--best", "--best-micro-batches", "--micro-batch-size"):  # fmt: skip
        assert flag in res.stdout


def test_tiny_run_ours_trl_ours_on_the_same_weights_and_batch(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "gpu_step.json"
    T = 8
    cmd = [sys.executable, SCRIPT, "--shape", "tiny", "--steps", "2", "--warmup-steps", "1", "--prompt-length", "30"]
    cmd += ["--num-prompts", "2", "--num-generations", "4", "--max-new-tokens", str(T), "--micro-batch-size", "4"]
    cmd += ["--no-bf16", "--no-gradient-checkpointing", "--device", "cpu", "--generation-backend", "static"]
    res = subprocess.run(cmd + ["--output", str(out)], cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())["matched"]
    assert len(r["ours"]) == 2 and r["trl"] is not None  # ours, TRL, ours again: three processes
    assert res.stdout.count("--- ours") == 2 and res.stdout.count("--- trl") == 1
    for run in r["ours"]:
        for m in ("Dr.GRPO", "SignCert-PO"):
            steps = run["methods"][m]["steps"]
            assert len(steps) == 3 and all(s["completion_tokens"] == T for s in steps)  # forced length
            for s in steps:
                assert s["generation"] + s["scoring"] + s["update"] == pytest.approx(s["step"], rel=1e-9)
            med = run["methods"][m]["summary"]["step"]
            assert med["min"] <= med["median"] <= med["max"]
    assert all(s["completion_tokens"] == T for s in r["trl"]["steps"])  # TRL: min_new_tokens
    assert all(s["update"] > 0 and s["generation"] > 0 for s in r["trl"]["steps"])
    # the same initial weights and the same rollouts: our first update on TRL's batch is TRL's first update
    same = r["first_update_on_the_same_batch"]
    assert same["relative_difference"]["grad_norm"] < 1e-4 and same["abs_difference"]["loss"] < 1e-6
    assert same["abs_difference"]["kl"] < 1e-7  # the policy is the reference at the first update, on both sides
    assert r["loss_and_kl_finite"] is True
    # two processes of ours on the same seed and weights draw the same rollouts: the same first losses
    a, b = (run["methods"]["SignCert-PO"]["steps"][0]["loss"] for run in r["ours"])
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    ours = statistics.median(s["step"] for run in r["ours"] for s in run["methods"]["Dr.GRPO"]["steps"][1:])
    assert r["ours_over_trl"]["step"] == pytest.approx(ours / r["trl"]["summary"]["step"]["median"], rel=1e-12)


def test_profile_leaves_the_training_state_as_it_was():
    """`--profile` runs micro-batches of the update on a copy: the policy's weights, its gradients (none) and the
    accelerator's accumulation counter are as before, and the next update is the one it would have been."""
    import gpu_step
    from accelerate import Accelerator
    from update_worker import model_and_batch

    import grpo_signcert as gs

    policy, batch = model_and_batch()
    targs = SimpleNamespace(micro_batch_size=4, num_ppo_epochs=1, temperature=1.0, clip_range=0.2, kl_coef=0.1,
                            max_new_tokens=6, max_grad_norm=1e9, profile=2)  # fmt: skip
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    reference = {k: v.clone() for k, v in policy.state_dict().items()}
    step_before = accelerator.step
    prof = gpu_step.profile_update(accelerator, policy, batch, targs, torch.device("cpu"))
    assert prof["micro_batches"] == 2 and prof["wall_seconds"] > 0 and prof["gpu_busy_seconds"] == 0
    assert all(torch.equal(v, reference[k]) for k, v in policy.state_dict().items())
    assert all(p.grad is None for p in policy.parameters()) and accelerator.step == step_before
    assert len(accelerator._optimizers) == 1  # the copy's optimiser is gone
    gs.policy_update(accelerator, policy, optimizer, batch, targs)  # the real update: 4 micro-batches, one step
    moved = max((v - reference[k]).abs().max().item() for k, v in policy.state_dict().items())
    assert moved > 0
