"""Benchmark: the time of one SignCert-PO training step relative to one Dr.GRPO step, side by side in
one run, on the same data, and the share of each phase (generation, scoring, advantages, update).

    python benchmarks/step_time.py                     # the tiny world (after `python pipeline.py`)
    python benchmarks/step_time.py --device cuda --bf16 --policy-path <sft> --reward-model-path <rm> \
        --num-prompts 32 --max-new-tokens 53           # a GPU, the paper's batch

Each repetition samples one batch of rollouts, then runs the two methods' steps on it in alternating
order, each from the same policy weights (restored between them, outside the timed region), so the
only difference between the two is the advantage computation. Generation and scoring are timed once
per repetition and counted in both: Dr.GRPO needs the same RM forward, and the features come out of
it for free. Reports medians over the repetitions, and the median of the per-repetition ratios.
"""

import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_signcert import (  # noqa: E402
    build_prompts,
    dr_grpo_loss,
    in_chunks,
    load_reward_model,
    load_split,
    response_logprobs,
    reward_and_features,
    sample,
    signcert_advantages,
    truncate_after_eos,
)


@dataclass
class Args:
    policy_path: str = "runs/tiny_world/sft"
    """the policy (and KL reference)"""
    reward_model_path: str = "runs/tiny_world/rm"
    """the proxy reward model"""
    dataset: str = "runs/tiny_world/data"
    """prompts (TL;DR or AlpacaFarm columns)"""
    num_prompts: int = 16
    """prompts per step"""
    num_generations: int = 8
    """K"""
    max_new_tokens: int = 24
    """completion length"""
    micro_batch_size: int = 32
    """completions per forward/backward"""
    quantile: float = 0.3
    """SignCert-PO's quantile (Dr.GRPO is quantile 0)"""
    repetitions: int = 7
    """timed repetitions (the median is reported); one warm-up before them"""
    device: str = "cpu"
    """cpu or cuda"""
    bf16: bool = False
    """autocast the policy in bf16 and hold the reference/RM in bf16 (GPU)"""
    seed: int = 1
    """seed"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def update(policy, optimizer, batch, args, device):
    """One Dr.GRPO optimiser step (ratio = 1) on the batch, micro-batched: the trainer's update without accelerate."""
    n = batch["response"].shape[0]
    for s in range(0, n, args.micro_batch_size):
        mb = {k: v[s : s + args.micro_batch_size] for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            lp = response_logprobs(policy, mb["query"], mb["query_mask"], mb["response"], mb["response_mask"], 1.0)
        loss, _ = dr_grpo_loss(
            lp,
            lp.detach(),
            mb["ref_logprobs"],
            mb["advantages"],
            mb["response_mask"],
            0.2,
            0.01,
            n * args.max_new_tokens,
        )
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(args.policy_path).to(device)
    ref = AutoModelForCausalLM.from_pretrained(args.policy_path, dtype=dtype).to(device).eval()
    rm = load_reward_model(args.reward_model_path, False, dtype, "--reward-model-path").to(device)
    rows, where = load_split(args.dataset, "train")
    prompts = build_prompts(rows, tokenizer, 512, where)
    start = copy.deepcopy(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    opt_start = copy.deepcopy(optimizer.state_dict())
    gen_args = SimpleNamespace(temperature=1.0, max_new_tokens=args.max_new_tokens)
    K, times = args.num_generations, {"Dr.GRPO": [], "SignCert-PO": []}
    phases = {
        k: []
        for k in (
            "generation",
            "scoring",
            "advantages Dr.GRPO",
            "advantages SignCert-PO",
            "update Dr.GRPO",
            "update SignCert-PO",
        )
    }
    print(
        f"{args.num_prompts} prompts x {K} completions, {args.max_new_tokens} new tokens, on {device}"
        f"{' (bf16)' if args.bf16 else ''}; {args.repetitions} repetitions after 1 warm-up"
    )
    for rep in range(args.repetitions + 1):
        chosen = prompts[rep * args.num_prompts : (rep + 1) * args.num_prompts]
        enc = tokenizer(chosen, return_tensors="pt", padding=True).to(device)
        query, qmask = enc.input_ids.repeat_interleave(K, 0), enc.attention_mask.repeat_interleave(K, 0)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            gen = in_chunks(lambda q, m: sample(policy, q, m, gen_args, tokenizer.pad_token_id), 256, query, qmask)
        response, rmask, _ = truncate_after_eos(gen, tokenizer.eos_token_id, tokenizer.pad_token_id)
        sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            ref_lp = in_chunks(
                lambda *t: response_logprobs(ref, *t, 1.0), args.micro_batch_size, query, qmask, response, rmask
            )
            reward, feats = in_chunks(
                lambda q, qm, r, rmk: reward_and_features(rm, torch.cat([q, r], 1), torch.cat([qm, rmk], 1)),
                args.micro_batch_size,
                query,
                qmask,
                response,
                rmask,
            )
        sync(device)
        t2 = time.perf_counter()
        order = ["Dr.GRPO", "SignCert-PO"] if rep % 2 == 0 else ["SignCert-PO", "Dr.GRPO"]
        for method in order:
            policy.load_state_dict(start)
            optimizer.load_state_dict(opt_start)
            sync(device)
            a0 = time.perf_counter()
            q = 0.0 if method == "Dr.GRPO" else args.quantile
            adv, _, _ = signcert_advantages(reward.view(-1, K), feats.view(-1, K, feats.shape[-1]), q)
            sync(device)
            a1 = time.perf_counter()
            batch = dict(
                query=query,
                query_mask=qmask,
                response=response,
                response_mask=rmask,
                ref_logprobs=ref_lp,
                advantages=adv.flatten(),
            )
            update(policy, optimizer, batch, args, device)
            sync(device)
            a2 = time.perf_counter()
            if rep > 0:
                times[method].append((t1 - t0) + (t2 - t1) + (a2 - a0))
                phases[f"advantages {method}"].append(a1 - a0)
                phases[f"update {method}"].append(a2 - a1)
        if rep > 0:
            phases["generation"].append(t1 - t0)
            phases["scoring"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in phases.items()}
    step = {k: statistics.median(v) for k, v in times.items()}
    print("\nmedian seconds per phase:")
    for k, v in med.items():
        print(f"  {k:26s} {v:10.5f}")
    for method in times:
        parts = [med["generation"], med["scoring"], med[f"advantages {method}"], med[f"update {method}"]]
        share = ", ".join(
            f"{n} {100 * p / sum(parts):.1f}%" for n, p in zip(("generation", "scoring", "advantages", "update"), parts)
        )
        print(f"{method:12s} step {step[method]:.4f} s  ({share})")
    ratios = [s / d for s, d in zip(times["SignCert-PO"], times["Dr.GRPO"])]  # paired: same rollouts, same repetition
    print(
        f"\nSignCert-PO / Dr.GRPO step time: median of {len(ratios)} paired ratios {statistics.median(ratios):.4f} "
        f"(min {min(ratios):.4f}, max {max(ratios):.4f})  "
        f"(advantage computation: +{1e3 * (med['advantages SignCert-PO'] - med['advantages Dr.GRPO']):.3f} ms)"
    )
