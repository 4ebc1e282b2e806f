"""The whole gold-model pipeline on the offline tiny world, one command, stage by stage:

    world -> SFT -> preference pairs (gold labels) -> proxy RM -> gold evaluation of the SFT policy
          -> Dr.GRPO and SignCert-PO against the proxy, per seed -> gold evaluation of each -> one table + plots

    python pipeline.py                                   # everything, 1 seed
    python pipeline.py --seeds 1 2 3                     # the README's multi-seed result
    python pipeline.py --no-rl                           # stop after the SFT policy's evaluation
    python pipeline.py --num-processes 2                 # every stage under `accelerate launch` (CPU or GPU)

Each stage is a separate script run in a subprocess: they share nothing but files on disk, and this
driver only passes paths. A stage whose output already exists is skipped (`--force` redoes it), so a
killed pipeline continues where it stopped. Every artefact goes under `--root`.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

import tyro


@dataclass
class Args:
    root: str = "runs/tiny_world"
    """where the world and every stage's output go"""
    seeds: List[int] = field(default_factory=lambda: [1])
    """RL seeds: each runs Dr.GRPO and SignCert-PO against the same proxy RM"""
    quantile: float = 0.3
    """SignCert-PO's quantile q (Dr.GRPO is q = 0)"""
    rl_steps: int = 300
    """optimiser steps of each RL run"""
    kl_coef: float = 0.01
    """beta of both RL methods"""
    eval_split: str = "test"
    """the split the RL policies are evaluated on (`validation` to choose the quantile without the test set)"""
    rl: bool = True
    """run the RL stage (`--no-rl`: stop after the SFT policy's gold evaluation)"""
    num_processes: int = 1
    """processes per stage; above 1 every stage runs under `accelerate launch --multi_gpu` (CPU processes
    when there is no GPU)"""
    world_preset: str = "full"
    """tiny_world.py's preset (`ci`: a very small world, for tests)"""
    extra_world_args: str = ""
    """extra arguments of tiny_world.py, one string (write `--extra-world-args="--gold-steps 900"`)"""
    extra_rl_args: str = ""
    """extra arguments of grpo_signcert.py, one string (e.g. `--extra-rl-args="--learning-rate 1e-4"`)"""
    force: bool = False
    """redo stages whose outputs exist"""


def run(args, script, out_marker, *script_args, extra=(), launch=True):
    """Run one stage unless `out_marker` exists; print where its artefacts went."""
    name = os.path.basename(script)
    if os.path.exists(out_marker) and not args.force:
        print(f"[pipeline] skip {name}: {out_marker} exists")
        return
    head = [sys.executable]
    if launch and args.num_processes > 1:
        head += [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_processes",
            str(args.num_processes),
        ]
    cmd = head + [script, *script_args, *extra]
    print(f"[pipeline] $ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    print(f"[pipeline] {name} done in {time.time() - t0:.0f} s -> {out_marker}", flush=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def smooth(xs, window=10):
    """Trailing mean over `window` steps (per-step on-policy metrics are noisy)."""
    return [sum(xs[max(0, i - window + 1) : i + 1]) / len(xs[max(0, i - window + 1) : i + 1]) for i in range(len(xs))]


def plot_figure2(runs, path):
    """The paper's Figure 2 on the tiny world: proxy (dashed) and gold (solid) reward vs KL, and the proxy
    RM's accuracy on on-policy pairs vs KL, one line per RL run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rew) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"Dr.GRPO": "tab:red", "SignCert-PO": "tab:green"}
    for (method, seed), rows in runs.items():
        kl = [r["policy/kl"] for r in rows]
        label = f"{method} (seed {seed})"
        ax_acc.plot(
            smooth(kl), smooth([r["rm/proxy_accuracy"] for r in rows]), color=colors[method], alpha=0.8, label=label
        )
        ax_rew.plot(
            smooth(kl), smooth([r["reward/gold"] for r in rows]), color=colors[method], alpha=0.8, label=label + " gold"
        )
        ax_rew.plot(
            smooth(kl),
            smooth([r["reward/proxy"] for r in rows]),
            color=colors[method],
            alpha=0.8,
            ls="--",
            label=label + " proxy",
        )
    ax_acc.axhline(0.5, color="grey", lw=0.8)
    ax_acc.set(
        xlabel="KL(pi || pi_SFT) per completion",
        ylabel="proxy RM accuracy vs gold (on-policy pairs)",
        title="(a) KL - proxy RM accuracy",
    )
    ax_rew.set(
        xlabel="KL(pi || pi_SFT) per completion", ylabel="reward", title="(b) KL - reward: gold (solid), proxy (dashed)"
    )
    for ax in (ax_acc, ax_rew):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny world never needs the hub
    os.environ.setdefault("WANDB_MODE", "disabled")
    here = os.path.dirname(os.path.abspath(__file__))
    script = lambda name: os.path.join(here, name)
    R = args.root
    d = lambda *p: os.path.join(R, *p)
    t_start = time.time()

    run(
        args,
        script("tiny_world.py"),
        d("world.json"),
        "--output-dir",
        R,
        "--preset",
        args.world_preset,
        extra=shlex.split(args.extra_world_args),
        launch=False,
    )
    world = read_json(d("world.json"))
    run(
        args,
        script("sft.py"),
        d("sft", "config.json"),
        "--model-name-or-path",
        d("base_policy"),
        "--dataset",
        d("data"),
        "--output-dir",
        d("sft"),
    )
    run(
        args,
        script("gen_prefs.py"),
        d("prefs", "test.jsonl"),
        "--policy-path",
        d("sft"),
        "--gold-rm-path",
        d("gold_rm"),
        "--dataset",
        d("data"),
        "--output-dir",
        d("prefs"),
    )
    run(
        args,
        script("train_rm.py"),
        d("rm", "config.json"),
        "--policy-path",
        d("sft"),
        "--prefs-path",
        d("prefs"),
        "--dataset",
        d("data"),
        "--output-dir",
        d("rm"),
    )
    run(
        args,
        script("eval_gold.py"),
        d(f"eval_sft_{args.eval_split}", "eval.json"),
        "--policy-path",
        d("sft"),
        "--gold-rm-path",
        d("gold_rm"),
        "--reward-model-path",
        d("rm"),
        "--dataset",
        d("data"),
        "--split",
        args.eval_split,
        "--output-dir",
        d(f"eval_sft_{args.eval_split}"),
    )

    rm_metrics = read_json(d("rm", "eval.json"))
    table = [("SFT", "-", read_json(d(f"eval_sft_{args.eval_split}", "eval.json")), None)]
    runs = {}
    if args.rl:
        for seed in args.seeds:
            for method, q in (("Dr.GRPO", 0.0), ("SignCert-PO", args.quantile)):
                out = d("rl", f"{'drgrpo' if q == 0 else f'signcert_q{q}'}_kl{args.kl_coef}_s{seed}")
                run(
                    args,
                    script("grpo_signcert.py"),
                    os.path.join(out, "model", "config.json"),
                    "--seed",
                    str(seed),
                    "--quantile",
                    str(q),
                    "--kl-coef",
                    str(args.kl_coef),
                    "--total-steps",
                    str(args.rl_steps),
                    "--policy-path",
                    d("sft"),
                    "--reward-model-path",
                    d("rm"),
                    "--gold-rm-path",
                    d("gold_rm"),
                    "--dataset",
                    d("data"),
                    "--output-dir",
                    out,
                    *(["--eval-num-prompts", "16"] if args.world_preset == "ci" else []),  # ci: 50 held-out rows
                    extra=shlex.split(args.extra_rl_args),
                )
                ev_dir = os.path.join(out, f"eval_{args.eval_split}")
                run(
                    args,
                    script("eval_gold.py"),
                    os.path.join(ev_dir, "eval.json"),
                    "--policy-path",
                    os.path.join(out, "model"),
                    "--gold-rm-path",
                    d("gold_rm"),
                    "--reward-model-path",
                    d("rm"),
                    "--dataset",
                    d("data"),
                    "--split",
                    args.eval_split,
                    "--output-dir",
                    ev_dir,
                )
                rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["step"] > 0]  # 0: eval only
                runs[(method, seed)] = rows
                table.append((method, seed, read_json(os.path.join(ev_dir, "eval.json")), rows[-1]["policy/kl"]))

    # one table: the world's calibration, then each policy's gold evaluation
    print("\n" + "=" * 100)
    print(f"tiny world: {R}   (pipeline {time.time() - t_start:.0f} s)")
    for key, value in world.get("measured", {}).items():
        print(f"  world.{key}: {value}")
    for key, value in rm_metrics.items():
        print(f"  rm.{key}: {value}")
    print("\n| method | seed | gold win rate vs reference | mean gold reward | mean proxy reward | KL (last step) |")
    print("|---|---|---|---|---|---|")
    for method, seed, ev, kl in table:
        kl_s = "0" if kl is None else f"{kl:.2f}"
        print(
            f"| {method} | {seed} | {ev['eval/win_rate']:.3f} | {ev['eval/gold_reward_mean']:.3f} | "
            f"{ev.get('eval/proxy_reward_mean', math.nan):.3f} | {kl_s} |"
        )
    if len(args.seeds) > 1:  # mean and spread over the seeds
        print(f"\nover seeds {args.seeds}: mean (min - max)")
        print("| method | gold win rate vs reference | mean gold reward | mean proxy reward | KL (last step) |")
        print("|---|---|---|---|---|")
        for method in ("Dr.GRPO", "SignCert-PO"):
            rows = [(e, k) for m, _, e, k in table if m == method]
            cells = []
            for values in (
                [e["eval/win_rate"] for e, _ in rows],
                [e["eval/gold_reward_mean"] for e, _ in rows],
                [e["eval/proxy_reward_mean"] for e, _ in rows],
                [k for _, k in rows],
            ):
                cells.append(f"{sum(values) / len(values):.3f} ({min(values):.3f} - {max(values):.3f})")
            print(f"| {method} | " + " | ".join(cells) + " |")
    summary = {"root": R, "args": vars(args), "rows": [dict(method=m, seed=s, kl=k, **e) for m, s, e, k in table]}
    with open(d(f"pipeline_summary_{args.eval_split}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if runs:
        plot_figure2(runs, d("figure2.png"))
        print(f"\nplots: {d('figure2.png')}; table: {d(f'pipeline_summary_{args.eval_split}.json')}")
