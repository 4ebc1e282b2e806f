"""benchmarks/gpu_step.py at the tiny shape on a CPU (ours only, 2 steps): it runs, documents itself, and its JSON
is consistent: each method's reported phases add up to its step time, and the SignCert-PO / Dr.GRPO ratio is the
ratio of those step times."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_step.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import run_checks_in_process  # noqa: E402


def test_help_documents_every_field():
    res = run_checks_in_process([sys.executable, os.path.join("benchmarks", "gpu_step.py"), "--help"], ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for flag in (
        "--shape",
        "--steps",
        "--warmup-steps",
        "--generation-backend",
        "--checks",
        "--output",
        "--no-trl",
        "--profile",
    ):
        assert flag in out


@pytest.mark.parametrize("backend", ["hf", "static"])
def test_tiny_run_writes_consistent_json(tmp_path, backend):
    out = tmp_path / "gpu_step.json"
    cmd = [sys.executable, SCRIPT, "--shape", "tiny", "--steps", "2", "--warmup-steps", "0", "--no-trl"]
    cmd += ["--prompt-length", "30", "--num-prompts", "2", "--num-generations", "4", "--max-new-tokens", "8"]
    cmd += ["--no-bf16", "--no-gradient-checkpointing", "--device", "cpu", "--generation-backend", backend]
    cmd += ["--profile", "2"] if backend == "static" else []
    log = subprocess.run(
        cmd + ["--output", str(out)], check=True, cwd=ROOT, timeout=600, capture_output=True, text=True
    )
    result = json.loads(out.read_text())
    if backend == "static":  # the profiled update: 2 micro-batches, its wall time printed and in the JSON
        prof = result["ours"]["Dr.GRPO"]["profile"]
        assert prof["micro_batches"] == 2 and prof["wall_seconds"] > 0 and prof["gpu_busy_seconds"] == 0  # a CPU
        assert f"profile: 2 micro-batches in {prof['wall_seconds']:.3f}s" in log.stdout
        assert "aten::" in log.stdout  # the operator table
    else:
        assert "profile" not in result["ours"]["Dr.GRPO"]
    for method in ("Dr.GRPO", "SignCert-PO"):
        r = result["ours"][method]
        assert len(r["steps"]) == 2
        med = r["median"]
        assert med["generation"] + med["scoring"] + med["update"] == pytest.approx(med["step"], rel=1e-9)
        assert med["step"] in [s["step"] for s in r["steps"]]  # a real step, not a mix of several
        assert all(s["generation"] > 0 and s["update"] > 0 for s in r["steps"])
    ratio = result["ours"]["SignCert-PO"]["median"]["step"] / result["ours"]["Dr.GRPO"]["median"]["step"]
    assert result["signcert_over_drgrpo"] == pytest.approx(ratio, rel=1e-12)
    assert result["loss_and_kl_finite"] is True
    assert "trl" not in result
