"""Benchmark: the training step of our trainer (grpo_signcert.py) against TRL's GRPOTrainer with the SignCert
subclass (grpo_signcert_trl.py), on the same CPU, in one run: Dr.GRPO and SignCert-PO, the tiny world's shapes
(16 prompts x 8 completions, 24 new tokens, micro-batch 32), the same chain's SFT policy and proxy.

    python pipeline.py --no-rl                      # the chain, if not built yet
    python benchmarks/trl_step_time.py              # 4 runs of 30 steps, one after the other, one thread each

    # the SmolLM2 chain's (pipeline.py --policy smollm2) RL settings, its chain seed 2 on both cores:
    python benchmarks/trl_step_time.py --root $CHAIN --chain $CHAIN/seed2 --steps 12 --warmup-steps 3 --threads 2 \
      --extra-args="--num-prompts-per-step 4 --num-generations 4 --micro-batch-size 16 --learning-rate 3e-6" \
      --output $CHAIN/trl_step_time.json

Each run is the script's own command line (no held-out evaluation, no gold monitor, no checkpoint inside the timed
steps) and logs its phases per step in metrics.jsonl under the same names: `time/generation` (sampling),
`time/scoring` (the proxy's forward that gives reward and features, the reference's log-probs), `time/update`
(advantages, the forward/backward of every micro-batch, the optimiser step) and `time/step`, their sum. Reported:
the median of each over the steps after `--warmup-steps` (the last step, which ours monitors with the gold, left
out), and ours / TRL's per method. The runs alternate (ours, TRL, ours, TRL), so a drift of the machine's speed
falls on both.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List

import tyro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("generation", "scoring", "update", "step")


@dataclass
class Args:
    root: str = "runs/tiny_world"
    """the pipeline's root: its world (data, gold_rm) and, unless --chain, its chain seed 1 (sft, rm)"""
    chain: str = ""
    """the chain whose SFT policy (sft/) and proxy (rm/) both trainers start from; empty: --root"""
    extra_args: str = ""
    """flags given to both trainers' commands alike (the shapes and learning rate of another chain)"""
    steps: int = 30
    """optimiser steps per run"""
    warmup_steps: int = 5
    """steps left out of the medians at the start"""
    quantiles: List[float] = field(default_factory=lambda: [0.0, 0.5])
    """the methods: q = 0 is Dr.GRPO"""
    threads: int = 1
    """OMP_NUM_THREADS of every run"""
    output: str = "runs/tiny_world/trl_step_time.json"


def command(script, q, out, args):
    r, c = args.root, args.chain or args.root
    cmd = [sys.executable, os.path.join(HERE, script), "--quantile", str(q), "--total-steps", str(args.steps)]
    cmd += ["--policy-path", f"{c}/sft", "--reward-model-path", f"{c}/rm", "--dataset", f"{r}/data"]
    cmd += ["--gold-rm-path", f"{r}/gold_rm", "--eval-every", "0", "--save-every", str(10 * args.steps)]
    cmd += ["--output-dir", out]
    if script == "grpo_signcert.py":
        cmd += ["--gold-every", str(10 * args.steps)]  # the gold monitor: step 1 and the last only
    return cmd + shlex.split(args.extra_args)


def medians(path, args):
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if "time/step" in r and args.warmup_steps < r["step"] < args.steps]
    return {p: statistics.median(r[f"time/{p}"] for r in rows) for p in PHASES}, len(rows)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.steps - 1 - args.warmup_steps < 3:
        raise SystemExit("--steps must leave at least 3 timed steps after --warmup-steps (and the last)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    tmp = tempfile.mkdtemp(prefix="trl_step_time_")
    result = {"args": vars(args), "runs": {}}
    for q in args.quantiles:
        for impl, script in (("ours", "grpo_signcert.py"), ("TRL", "grpo_signcert_trl.py")):
            out = os.path.join(tmp, f"{impl}_q{q:g}")
            cmd = command(script, q, out, args)
            print(f"[trl_step_time] $ OMP_NUM_THREADS={args.threads} {' '.join(cmd)}", flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, env=env, cwd=HERE, stdout=subprocess.DEVNULL)
            med, n = medians(os.path.join(out, "metrics.jsonl"), args)
            result["runs"][f"{impl} q={q:g}"] = dict(median=med, timed_steps=n, wall=time.time() - t0)
            print(f"  {impl} q={q:g}: " + " ".join(f"{p} {med[p]:.3f}s" for p in PHASES) + f" ({n} steps)")
    print(f"\nmedian seconds per step over steps {args.warmup_steps + 1}-{args.steps - 1}, {args.threads} thread(s)")
    print("| method | implementation | " + " | ".join(PHASES) + " |\n|---|---|" + "---|" * len(PHASES))
    for q in args.quantiles:
        name = "Dr.GRPO" if q == 0 else f"SignCert-PO q={q:g}"
        for impl in ("ours", "TRL"):
            med = result["runs"][f"{impl} q={q:g}"]["median"]
            print(f"| {name} | {impl} | " + " | ".join(f"{med[p]:.3f}" for p in PHASES) + " |")
        ours, trl = result["runs"][f"ours q={q:g}"]["median"], result["runs"][f"TRL q={q:g}"]["median"]
        ratio = {p: ours[p] / trl[p] for p in PHASES}
        result[f"ours_over_trl q={q:g}"] = ratio
        print(f"| {name} | ours / TRL | " + " | ".join(f"{ratio[p]:.2f}" for p in PHASES) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.output}")
