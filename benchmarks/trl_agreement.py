"""Benchmark: do our trainer (grpo_signcert.py) and TRL's GRPOTrainer with the SignCert subclass
(grpo_signcert_trl.py) train the same thing? Dr.GRPO and SignCert-PO q = 0.5 in both, on one chain of the tiny world
(the same SFT policy, proxy and gold), the same batch shape, lr, beta and held-out evaluation, over several RL seeds;
one plot of held-out test gold against KL, and a table of each run's frontier numbers with the per-method spread.

    python pipeline.py --no-rl                      # the chain (chain seed 1), if not built yet
    python benchmarks/trl_agreement.py              # 4 methods x 3 RL seeds x 150 steps, 2 runs at a time

The runs are pipeline.py's own (`rl_run`: the same commands it runs for --methods drgrpo signcert drgrpo_trl
signcert_trl), with the RL seed varied on the one chain; a run whose final policy exists is skipped.
The two implementations agree on a number when the 95% Welch interval of TRL's mean minus ours over the RL seeds
holds 0 (printed as `agree`); the table gives the numbers to judge it.
"""

import json
import os
import statistics
import sys
from dataclasses import dataclass, field, replace
from typing import List

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402

PAIRS = (("drgrpo", "drgrpo_trl"), ("signcert", "signcert_trl"))  # (ours, TRL's) implementations of one method


@dataclass
class Args:
    root: str = "runs/tiny_world"
    """the pipeline's root (its chain seed 1 is trained on)"""
    rl_seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    """RL seeds of every method (the chain is fixed)"""
    quantile: float = 0.5
    """SignCert-PO's q in both implementations"""
    rl_steps: int = 150
    eval_every: int = 10
    eval_num_prompts: int = 128
    jobs: int = 2
    """runs at once (one thread each)"""
    extra_rl_args: str = ""
    """extra arguments of every run (the same for both implementations)"""
    plot: str = "runs/tiny_world/trl_agreement.png"
    """where the plot goes"""


def welch_interval(x, y, level=0.95):
    """mean(x) - mean(y) and its Welch t interval (unequal variances, Welch-Satterthwaite degrees of freedom)."""
    from scipy import stats

    mx, my, vx, vy = statistics.mean(x), statistics.mean(y), statistics.variance(x), statistics.variance(y)
    se2 = vx / len(x) + vy / len(y)
    if se2 == 0:
        return mx - my, mx - my, mx - my
    df = se2**2 / ((vx / len(x)) ** 2 / (len(x) - 1) + (vy / len(y)) ** 2 / (len(y) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * se2**0.5
    return mx - my, mx - my - half, mx - my + half


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    p = replace(
        tyro.cli(pipeline.Args, args=[]),
        root=args.root,
        quantile=args.quantile,
        rl_steps=args.rl_steps,
        eval_every=args.eval_every,
        eval_num_prompts=args.eval_num_prompts,
        jobs=args.jobs,
        extra_rl_args=args.extra_rl_args,
    )
    for need in ("sft", "rm", "gold_rm", "data"):
        if not os.path.exists(os.path.join(args.root, need)):
            raise SystemExit(f"{args.root}/{need} is missing: build the chain first (python pipeline.py --no-rl)")
    jobs, runs = [], []
    for seed in args.rl_seeds:
        for ours, theirs in PAIRS:
            for m in (ours, theirs):
                label, out, cmd = pipeline.rl_run(p, args.root, seed, m, args.quantile)
                # the run's own RL seed on chain seed 1: rl_run names the folder by it
                jobs.append((label, out, cmd))
                runs.append((label, seed, out))
    print(f"[trl_agreement] {len(jobs)} runs, {args.jobs} at a time: {json.dumps(vars(args))}", flush=True)
    pipeline.run_all(p, jobs)

    metrics = {(label, seed): pipeline.read_metrics(os.path.join(out, "metrics.jsonl")) for label, seed, out in runs}
    summary = {k: pipeline.frontier(rows, p.matched_kl) for k, rows in metrics.items()}
    keys = ["peak_gold", "peak_step", "peak_kl", "final_gold", "final_kl", "stopped_gold"]
    keys += [f"gold_at_kl{k:g}" for k in p.matched_kl]
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    print(f"\nheld-out TEST gold ({args.eval_num_prompts} prompts), {len(args.rl_seeds)} RL seeds, mean (min - max)")
    print("| run | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for lbl in labels:
        cells = [pipeline.spread([summary[lbl, s][k] for s in args.rl_seeds]) for k in keys]
        print(f"| {lbl} | " + " | ".join(cells) + " |")
    print("\nTRL - ours, mean difference with a 95% Welch t interval over the RL seeds (unpaired: the two draw")
    print("different samples from the same seed); `agree` when the interval holds 0:")
    verdict = {}
    for i in range(0, len(labels), 2):
        a, b = labels[i], labels[i + 1]
        for k in keys:
            va = [summary[a, s][k] for s in args.rl_seeds if summary[a, s][k] is not None]
            vb = [summary[b, s][k] for s in args.rl_seeds if summary[b, s][k] is not None]
            if len(va) < 2 or len(vb) < 2:
                continue
            diff, lo, hi = welch_interval(vb, va)
            verdict[f"{b} - {a}: {k}"] = dict(
                diff=float(diff), low=float(lo), high=float(hi), agree=bool(lo <= 0 <= hi)
            )
            print(f"  {b} - {a}: {k}: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] -> {'agree' if lo <= 0 <= hi else 'DIFFER'}")
    pipeline.plot_runs(metrics, args.plot)
    with open(os.path.splitext(args.plot)[0] + ".json", "w") as f:
        json.dump(
            {"args": vars(args), "runs": {f"{k[0]} s{k[1]}": v for k, v in summary.items()}, "agreement": verdict},
            f,
            indent=1,
        )
    print(f"\nplot: {args.plot}")
