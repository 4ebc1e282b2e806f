"""Every test runs offline (no hub look-ups, no wandb login); subprocesses inherit this environment. Also the
helpers several test files share: a multi-process launch command, the CI tiny world, jsonl logs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def free_port():
    """A port nobody listens on, for `accelerate launch --main_process_port`: concurrent runs (another
    suite, a user's job) would otherwise collide on the default 29500 and abort."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


# several CPU processes: `--multi_gpu` makes accelerate start them with torchrun, and the scripts, seeing no GPU,
# run them on the CPU with gloo (`--cpu --num_processes 2` starts ONE process in accelerate 1.x)
def accelerate_cmd(procs):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        free_port(),
        "--num_processes",
        str(procs),
    ]


def short_run_cmd(script, world, out, *extra, procs=None):
    """A short run of one of the four trainers on the CI world (4 prompts x 4 completions of 8 tokens), on `procs`
    processes (None: plain python), with the held-out evaluation off unless `extra` turns it on. `extra` comes
    last, so it can override any flag here (the last occurrence wins); the reward model(s) go in `extra`."""
    head = accelerate_cmd(procs) if procs else [sys.executable]
    return head + [
        script,
        "--policy-path",
        str(world / "policy"),
        "--gold-rm-path",
        str(world / "gold_rm"),
        "--dataset",
        str(world / "data"),
        "--num-prompts-per-step",
        "4",
        "--num-generations",
        "4",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--output-dir",
        str(out),
        "--eval-every",
        "0",
        *extra,
    ]


def ci_world_with_eos_policy(root: Path) -> Path:
    """The CI tiny world in `root`, plus `root/policy`: a copy of its random-init base policy (which almost never
    ends) whose EOS logit is raised by 3.5 at every position, so that it emits EOS about 1 token in 11 and
    completions with and without EOS (the missing-EOS penalty) both occur in a few steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "tiny_world.py", "--preset", "ci", "--output-dir", str(root)]
    subprocess.run(cmd, check=True, cwd=repo, capture_output=True, timeout=600)
    policy = AutoModelForCausalLM.from_pretrained(root / "base_policy")
    with torch.no_grad():
        policy.gpt_neox.final_layer_norm.bias[0] = 5.0
        policy.get_output_embeddings().weight[policy.config.eos_token_id, 0] = 0.7
    policy.save_pretrained(root / "policy")
    AutoTokenizer.from_pretrained(root / "base_policy").save_pretrained(root / "policy")
    return root


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")
