"""The README's main command, `python pipeline.py`, end to end at very small settings: a `ci` world,
every stage, Dr.GRPO and SignCert-PO for 2 steps, the table, the summary and Figure 2."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pipeline_runs_every_stage_and_writes_the_table(tmp_path):
    root = tmp_path / "tw"
    cmd = [
        sys.executable,
        "pipeline.py",
        "--root",
        str(root),
        "--world-preset",
        "ci",
        "--rl-steps",
        "2",
        "--extra-world-args=--gold-steps 3",
        "--extra-rl-args=--num-prompts-per-step 4 --num-generations 4 --micro-batch-size 16 --max-new-tokens 8",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| method | seed | gold win rate vs reference |" in res.stdout
    summary = json.load(open(root / "pipeline_summary_test.json"))
    assert [r["method"] for r in summary["rows"]] == ["SFT", "Dr.GRPO", "SignCert-PO"]
    for r in summary["rows"]:
        assert 0.0 <= r["eval/win_rate"] <= 1.0
    assert (root / "figure2.png").stat().st_size > 10_000
    signcert = [json.loads(line) for line in open(root / "rl" / "signcert_q0.3_kl0.01_s1" / "metrics.jsonl")]
    drgrpo = [json.loads(line) for line in open(root / "rl" / "drgrpo_kl0.01_s1" / "metrics.jsonl")]
    assert [r["step"] for r in signcert] == [0, 1, 2] == [r["step"] for r in drgrpo]  # 0: the held-out eval only
    assert "eval/validation/win_rate" in signcert[0] and "eval/test/gold_reward" in signcert[-1]
    # the pipeline launched each method with its own quantile (Dr.GRPO is SignCert-PO with q = 0)
    quantiles = [
        json.load(open(root / "rl" / run / "args.json"))["quantile"]
        for run in ("drgrpo_kl0.01_s1", "signcert_q0.3_kl0.01_s1")
    ]
    assert quantiles == [0.0, 0.3] and any(r["signcert/eps"] > 0 for r in signcert)
    # a second run skips every stage whose output exists
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("[pipeline] skip") == 9
