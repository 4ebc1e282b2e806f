"""Benchmark (the paper's Table 2 in kind): the time of one training step of each of the five methods,
Dr.GRPO, SignCert-PO, UWO, AdvPO and BSPO, side by side in one run, on the same data, relative to
Dr.GRPO's, and the share of each phase (generation, scoring, advantages, update).

    python benchmarks/step_time.py                     # the tiny world (after `python pipeline.py`)
    python benchmarks/step_time.py --device cuda --bf16 --policy-path <sft> --reward-model-path <rm> \
        --uwo-member-paths <rm> <rm_2> <rm_3> --behavior-lm-path <rm_bspo>/behavior_lm \
        --num-prompts 32 --max-new-tokens 53           # a GPU, the paper's batch

Each repetition samples one batch of rollouts, then runs every method's step on it in a rotating
order, each from the same policy weights (restored between them, outside the timed region), so the
only difference between them is the method's own work. Generation and scoring (the proxy's forward,
which gives the features for free) are timed once per repetition and counted in every method. The
method's own work, timed with its advantages: SignCert-PO the re-weighting; UWO the forwards of the
other ensemble members and the UWO reward; AdvPO the pessimistic reward (M^-1 g by a Cholesky solve;
M itself is built once before training, so it is not in the step: here it comes from the warm-up
batch's features, which costs the same per step as the preference data's); BSPO the behaviour LM's
forward over the completions and the support mask. Reports medians over the repetitions, and for each
method the median of its per-repetition ratios to Dr.GRPO.
"""

import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_advpo import advpo_cholesky, advpo_rewards  # noqa: E402
from grpo_bspo import bspo_rewards  # noqa: E402
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
from grpo_uwo import dr_grpo_advantages, uwo_rewards  # noqa: E402

METHODS = ("Dr.GRPO", "SignCert-PO", "UWO", "AdvPO", "BSPO")


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
    uwo_member_paths: tuple[str, ...] = ("runs/tiny_world/rm", "runs/tiny_world/rm", "runs/tiny_world/rm")
    """UWO's ensemble: the first is scored with the proxy's forward, the others cost one forward each
    (the paper: 3 members smaller than the proxy; by default 3 copies of the proxy, the same compute as 3 seeds)"""
    uwo_lambda: float = 0.1
    """UWO's lambda"""
    budget: float = 5.0
    """AdvPO's B"""
    behavior_lm_path: Optional[str] = None
    """BSPO's behaviour LM (default: {reward_model_path}/behavior_lm if it exists, else the policy: the same size)"""
    support_threshold: float = 1e-4
    """BSPO's eps_beta"""
    repetitions: int = 7
    """timed repetitions (the median is reported); one warm-up before them (2 for a smoke run)"""
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
    if len(args.uwo_member_paths) < 2:
        raise ValueError(f"--uwo-member-paths: UWO needs at least 2 members, got {args.uwo_member_paths}")
    members = [load_reward_model(p, False, dtype, "--uwo-member-paths").to(device) for p in args.uwo_member_paths[1:]]
    default_behavior = os.path.join(args.reward_model_path, "behavior_lm")
    behavior_path = args.behavior_lm_path or (default_behavior if os.path.isdir(default_behavior) else args.policy_path)
    behavior = AutoModelForCausalLM.from_pretrained(behavior_path, dtype=dtype).to(device).eval()
    rows, where = load_split(args.dataset, "train")
    prompts = build_prompts(rows, tokenizer, 512, where)
    start = copy.deepcopy(policy.state_dict())
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    opt_start = copy.deepcopy(optimizer.state_dict())
    gen_args = SimpleNamespace(temperature=1.0, max_new_tokens=args.max_new_tokens)
    K, times = args.num_generations, {m: [] for m in METHODS}
    phases = {"generation": [], "scoring": [], **{f"{p} {m}": [] for p in ("advantages", "update") for m in METHODS}}
    print(
        f"{args.num_prompts} prompts x {K} completions, {args.max_new_tokens} new tokens, on {device}"
        f"{' (bf16)' if args.bf16 else ''}; {args.repetitions} repetitions after 1 warm-up; UWO: "
        f"{len(args.uwo_member_paths)} members; BSPO's behaviour LM: {behavior_path}"
    )
    chol, ref_mean = None, None
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
        tensors = (query, qmask, response, rmask)
        with torch.no_grad():
            ref_lp = in_chunks(lambda *t: response_logprobs(ref, *t, 1.0), args.micro_batch_size, *tensors)
            reward, feats = in_chunks(
                lambda q, qm, r, rmk: reward_and_features(rm, torch.cat([q, r], 1), torch.cat([qm, rmk], 1)),
                args.micro_batch_size,
                *tensors,
            )
        sync(device)
        t2 = time.perf_counter()
        if chol is None:  # AdvPO's M, built once before training (not part of a step): from the warm-up batch
            e = feats.double()
            chol = advpo_cholesky(e.T @ e + torch.eye(e.shape[1], dtype=torch.float64, device=device))
            ref_mean = e.mean(0)

        @torch.no_grad()
        def advantages(method):
            if method in ("Dr.GRPO", "SignCert-PO"):
                q = 0.0 if method == "Dr.GRPO" else args.quantile
                return signcert_advantages(reward.view(-1, K), feats.view(-1, K, feats.shape[-1]), q)[0]
            if method == "UWO":
                score = lambda m: in_chunks(
                    lambda q, qm, r, rmk: reward_and_features(m, torch.cat([q, r], 1), torch.cat([qm, rmk], 1))[0],
                    args.micro_batch_size,
                    *tensors,
                )
                member_rewards = torch.stack([reward] + [score(m) for m in members], dim=1)
                return dr_grpo_advantages(uwo_rewards(member_rewards, args.uwo_lambda)[0].view(-1, K))
            if method == "AdvPO":
                return dr_grpo_advantages(advpo_rewards(reward, feats, chol, ref_mean, args.budget)[0].view(-1, K))
            behavior_lp = in_chunks(lambda *t: response_logprobs(behavior, *t, 1.0), args.micro_batch_size, *tensors)
            bspo = bspo_rewards(reward, behavior_lp, rmask, args.support_threshold)[0]
            return dr_grpo_advantages(bspo.view(-1, K))

        order = METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]  # rotate: no method always first
        for method in order:
            policy.load_state_dict(start)
            optimizer.load_state_dict(opt_start)
            sync(device)
            a0 = time.perf_counter()
            adv = advantages(method)
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
    print(f"\n{'method':12s} {'step (s)':>9s} {'/ Dr.GRPO':>10s} {'(min - max)':>16s}  phase shares")
    for method in METHODS:
        parts = [med["generation"], med["scoring"], med[f"advantages {method}"], med[f"update {method}"]]
        share = ", ".join(
            f"{n} {100 * p / sum(parts):.1f}%" for n, p in zip(("generation", "scoring", "advantages", "update"), parts)
        )
        ratios = [s / d for s, d in zip(times[method], times["Dr.GRPO"])]  # paired: same rollouts, same repetition
        print(
            f"{method:12s} {step[method]:9.4f} {statistics.median(ratios):10.4f} "
            f"({min(ratios):.4f} - {max(ratios):.4f})  {share}"
        )
    print("(the paper, Pythia-1B on 8 H100: UWO 0.99, BSPO 1.32, AdvPO 1.45, SignCert-PO 0.99)")
