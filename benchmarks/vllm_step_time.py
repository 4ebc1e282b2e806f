"""Benchmark: the whole RL step of grpo_signcert.py with its rollouts from Hugging Face's `generate` against a colocated
vLLM engine (`--generation-backend vllm`), side by side in one run (docs/TRAINER.md, "The trainers' rollouts through
vLLM").

    python tools/real_model.py                                   # -> runs/smollm2/{policy,rm} (main environment)
    bash tools/install_vllm.sh ~/vllm-venv                      # vLLM's own environment (requirements-vllm.txt)
    ~/vllm-venv/bin/python benchmarks/vllm_step_time.py --policy-path runs/smollm2/policy --reward-model-path \
        runs/smollm2/rm --dataset runs/tiny_world/data --gold-rm-path runs/tiny_world/gold_rm

Every variant is the same training run (this interpreter, so the same torch and transformers; --steps steps of
--prompts x --generations completions of up to --max-new-tokens, q = 0.3, no held-out evaluation, the gold on every
step), run in its own process, the variants in turn for --rounds rounds so that a change in the machine's load falls
on all of them: `hf` (generate), `vllm` (the engine with vLLM's CPU defaults, VLLM_CPU_OMP_THREADS_BIND=auto: on a
2-core machine it computes on one core and reserves the other for its scheduler, which in the training's process
runs in the same thread) and `vllm_all_cores` (VLLM_CPU_OMP_THREADS_BIND=0-(n-1), VLLM_CPU_NUM_OF_RESERVED_CPU=0). Each run's
metrics.jsonl gives its times per step (time/generation, /scoring, /update, /step); reported: the median over steps
2 and later of every run of a variant, and step 1's generation apart (it holds the engine's start under vllm).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import tyro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    policy_path: str = "runs/smollm2/policy"
    reward_model_path: str = "runs/smollm2/rm"
    dataset: str = "runs/tiny_world/data"
    gold_rm_path: str = "runs/tiny_world/gold_rm"
    steps: int = 4
    prompts: int = 4
    generations: int = 4
    max_new_tokens: int = 24
    rounds: int = 1
    variants: tuple[str, ...] = ("hf", "vllm", "vllm_all_cores")
    output: str = "runs/bench/vllm_step_time.json"


def one_run(args, variant, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if variant == "vllm_all_cores":
        env |= {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    cmd = [sys.executable, os.path.join(HERE, "grpo_signcert.py"), "--policy-path", args.policy_path,
           "--reward-model-path", args.reward_model_path, "--dataset", args.dataset, "--gold-rm-path",
           args.gold_rm_path, "--total-steps", str(args.steps), "--num-prompts-per-step", str(args.prompts),
           "--num-generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
           "--micro-batch-size", str(args.prompts * args.generations), "--eval-every", "0", "--quantile", "0.3",
           "--learning-rate", "1e-6", "--generation-backend", "hf" if variant == "hf" else "vllm",
           "--output-dir", out]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def main():
    args = tyro.cli(Args)
    keys = ("time/generation", "time/scoring", "time/update", "time/step", "completion/length")
    rows = {v: [] for v in args.variants}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in args.variants:
                t = time.perf_counter()
                rows[v].append(one_run(args, v, os.path.join(tmp, f"{v}_{r}")))
                print(f"round {r + 1} {v}: {time.perf_counter() - t:.0f} s", flush=True)
    load.append(os.getloadavg()[0])
    result = {"args": vars(args), "cpus": os.cpu_count(), "load_average_start_end": load, "variants": {}}
    for v, runs in rows.items():
        later = [m for run in runs for m in run if m["step"] >= 2]
        result["variants"][v] = {k: statistics.median(m[k] for m in later) for k in keys}
        result["variants"][v]["step1_generation"] = statistics.median(run[0]["time/generation"] for run in runs)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'variant':16} " + " ".join(f"{k.split('/')[-1]:>11}" for k in keys) + "  step1 gen")
    for v, t in result["variants"].items():
        print(f"{v:16} " + " ".join(f"{t[k]:11.2f}" for k in keys) + f"  {t['step1_generation']:9.1f}")
    print(f"load average {load[0]:.1f} -> {load[1]:.1f}; written {args.output}")


if __name__ == "__main__":
    main()
