"""tools/isa_probe.py: the same step on this CPU's torch kernels and on kernels capped at AVX2, compared. On a CPU
whose kernels are AVX-512 the softmax rounds differently under the cap (what makes a chain another draw on a CPU
without AVX-512: docs/TINY_WORLD.md); on an AVX2 CPU the two runs are the same to the bit."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_isa_probe_finds_the_ops_that_round_differently_under_avx2(ci_world_3_gold_steps):
    policy = str(ci_world_3_gold_steps / "base_policy")
    cmd = [sys.executable, "tools/isa_probe.py", "--policy-path", policy, "--batch-size", "8", "--seq-len", "16"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    gradient_lines = [line for line in out.splitlines() if line.startswith("gradients that differ:")]
    assert len(gradient_lines) == 1 and "matmul (GEMM): identical" in out and "exp: identical" in out
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert "softmax: differs" in out and "log_softmax: differs" in out
        assert "gradients that differ: 0 of" not in out
    else:  # the cap changes nothing
        assert "differs" not in out and "gradients that differ: 0 of" in out
