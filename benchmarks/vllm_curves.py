"""Experiment (issue 45): does grpo_signcert.py train the same with its rollouts from the colocated vLLM engine
(`--generation-backend vllm`) as from Hugging Face's `generate`? The same run with the backend alone changed, over
--seeds RL seeds each. The two backends draw other random numbers, so a run of one is not the run of the other: the
question is whether their curves differ by more than the seeds' spread.

    bash tools/install_vllm.sh ~/vllm-venv                    # vLLM's environment (requirements-vllm.txt)
    python pipeline.py --policy smollm2 --root $CHAIN --base-model $CHAIN/smollm2 --no-rl    # the SmolLM2 chain
    ~/vllm-venv/bin/python benchmarks/vllm_curves.py --policy-path $CHAIN/sft --reward-model-path $CHAIN/rm \
      --dataset $CHAIN/data --gold-rm-path $CHAIN/gold_rm --steps 20 --window 10 --eval-every 10 \
      --extra-args="--learning-rate 3e-6 --num-prompts-per-step 4 --num-generations 4 --micro-batch-size 16"

The SmolLM2 chain, not the tiny world: vLLM 0.32's CPU attention refuses the tiny policy's head size of 16
("Unsupported CPU attention configuration: head_dim=16"); SmolLM2's 64 runs.

Each run is grpo_signcert.py's own command (q = --quantile, --steps steps, the rollouts' gold every step, the held-out
gold on --eval-num-prompts test prompts every --eval-every steps), the runs one after the other; a finished run of
the same command is not run again (the experiment resumes). Reported per window of --window steps and per
metric (the rollouts' proxy and gold reward, KL to the SFT policy, completion length, and the held-out test gold at
its evaluations): each backend's mean over its seeds (min - max), and whether each backend's mean lies within the
other's range of seeds ("within the spread"). Written: --output-dir/vllm_curves.json and vllm_curves.png. On a CPU
the engine's KV cache takes 1 GiB unless VLLM_CPU_KVCACHE_SPACE says otherwise.
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List

import tyro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("reward/proxy", "reward/gold", "policy/kl", "completion/length", "eval/test/gold_reward")


@dataclass
class Args:
    policy_path: str = "runs/smollm2_chain/sft"
    """the SFT policy every run starts from (pipeline.py --policy smollm2's chain seed 1 by default)"""
    reward_model_path: str = "runs/smollm2_chain/rm"
    dataset: str = "runs/smollm2_chain/data"
    gold_rm_path: str = "runs/smollm2_chain/gold_rm"
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    backends: List[str] = field(default_factory=lambda: ["hf", "vllm"])
    steps: int = 60
    window: int = 20
    """steps per window of the table (each window's value: a run's mean over its steps)"""
    quantile: float = 0.5
    eval_every: int = 20
    eval_num_prompts: int = 64
    extra_args: str = ""
    """more flags for every run alike (e.g. another chain's shapes)"""
    output_dir: str = "runs/bench/vllm_curves"


def run(args, backend, seed):
    """One training run; its metrics rows. Not run again when its folder holds a finished run of the same command
    (command.json, written at its end): the experiment resumes, and never reuses a run of other settings."""
    out = os.path.join(args.output_dir, f"{backend}_s{seed}")
    cmd = [sys.executable, os.path.join(HERE, "grpo_signcert.py"), "--seed", str(seed), "--quantile",
           str(args.quantile), "--policy-path", args.policy_path, "--reward-model-path", args.reward_model_path,
           "--dataset", args.dataset, "--gold-rm-path", args.gold_rm_path, "--total-steps", str(args.steps),
           "--gold-every", "1", "--eval-every", str(args.eval_every), "--eval-splits", "test",
           "--eval-num-prompts", str(args.eval_num_prompts), "--generation-backend", backend,
           "--output-dir", out, "--overwrite", *shlex.split(args.extra_args)]  # fmt: skip
    done = os.path.join(out, "command.json")
    if not (os.path.exists(done) and json.load(open(done)) == cmd[1:]):
        print(f"[vllm_curves] $ {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        subprocess.run(cmd, check=True, env=env, cwd=HERE, stdout=subprocess.DEVNULL)
        with open(done, "w") as f:
            json.dump(cmd[1:], f)  # the interpreter aside: the same run from another environment
        print(f"  {backend} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def window_means(rows, metric, window, steps):
    """[mean of `metric` over the run's steps in window i] for each window of `window` steps (None where not logged)."""
    out = []
    for lo in range(1, steps + 1, window):
        vs = [r[metric] for r in rows if metric in r and lo <= r["step"] < lo + window]
        out.append(sum(vs) / len(vs) if vs else None)
    return out


def compare(per_backend):
    """per_backend {backend: [a run's value per seed]}: each backend's mean, min, max, and whether every backend's
    mean lies within every other's range of seeds."""
    stats = {b: dict(mean=sum(v) / len(v), lo=min(v), hi=max(v), values=v) for b, v in per_backend.items()}
    within = all(s["lo"] <= stats[o]["mean"] <= s["hi"] for s in stats.values() for o in stats)
    return stats, within


def plot(result, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, metric in zip(axes, METRICS):
        for i, b in enumerate(args.backends):
            runs = result["curves"][b]
            steps = sorted({r["step"] for rows in runs for r in rows if metric in r})
            per_step = [[r[metric] for rows in runs for r in rows if r.get("step") == s and metric in r] for s in steps]
            mean = [sum(v) / len(v) for v in per_step]
            ax.plot(steps, mean, color=f"C{i}", label=b, marker="o" if metric.startswith("eval/") else None)
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=f"C{i}", alpha=0.2)
        ax.set(title=metric, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend(title=f"mean, min-max over {len(args.seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args):
    if args.steps % args.window:
        raise SystemExit(f"--steps {args.steps} must be a multiple of --window {args.window}")
    curves = {b: [run(args, b, s) for s in args.seeds] for b in args.backends}
    result = {"args": vars(args), "table": [], "curves": curves}
    print(f"\nmean over {len(args.seeds)} seeds (min - max), per window of {args.window} steps; q = {args.quantile:g}")
    print("| metric | steps | " + " | ".join(args.backends) + " | within the spread |")
    print("|---|---|" + "---|" * (len(args.backends) + 1))
    for metric in METRICS:
        per_run = {b: [window_means(rows, metric, args.window, args.steps) for rows in curves[b]] for b in curves}
        for i in range(args.steps // args.window):
            values = {b: [w[i] for w in per_run[b]] for b in per_run}
            if any(v is None for vs in values.values() for v in vs):
                continue
            stats, within = compare(values)
            steps = f"{i * args.window + 1}-{(i + 1) * args.window}"
            result["table"].append(dict(metric=metric, steps=steps, within=within, **stats))
            cells = [f"{s['mean']:.3f} ({s['lo']:.3f} - {s['hi']:.3f})" for s in stats.values()]
            print(f"| {metric} | {steps} | " + " | ".join(cells) + f" | {'yes' if within else 'NO'} |")
    with open(os.path.join(args.output_dir, "vllm_curves.json"), "w") as f:
        json.dump(result, f)
    plot(result, args, os.path.join(args.output_dir, "vllm_curves.png"))
    print(f"wrote {args.output_dir}/vllm_curves.json and vllm_curves.png")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
