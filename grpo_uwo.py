# --- method: docstring ---
"""UWO: uncertainty-weighted optimisation with a reward-model ensemble (Coste et al. 2024, eq. 5), the
SignCert-PO paper's ensemble baseline, as Dr.GRPO with a conservative reward. A copy of grpo_signcert.py
in which only the reward/advantage section differs (`diff grpo_signcert.py grpo_uwo.py` shows the method).

    accelerate launch grpo_uwo.py --uwo-lambda 0.1        # the tiny world: 3 members rm, rm_2, rm_3
    accelerate launch --config_file configs/ddp_8gpu.yaml grpo_uwo.py --preset paper \
        --policy-path <sft> --reward-model-paths <rm1> <rm2> <rm3>   # Pythia-1B policy, 3 Pythia-410M RMs

For the k members r_1..r_k of the ensemble (k >= 2; the paper: 3, trained with different seeds) and the
K completions of one prompt:

    r_uwo_j = mean_i r_i(x, y_j) - lambda * Var_i r_i(x, y_j)   Coste et al. eq. (5), population variance
    A_j     = r_uwo_j - mean_k r_uwo_k                          eq. (4)   Dr.GRPO advantage

One training step: 1. rollouts, 2. scoring by the FIRST member (the proxy whose reward is logged as
`reward/proxy`, as in every trainer), 3. scoring by the other members, the UWO reward and Dr.GRPO
advantages, 4. the Dr.GRPO update, all as in grpo_signcert.py.

Choices (ours, where the papers are silent; docs/METHOD.md): the penalty is Coste's population variance
(`--uwo-penalty var`); the SignCert paper's appendix says "standard deviation", which is
`--uwo-penalty std`. lambda = 0.1 is Coste's value for PPO. A completion without EOS gets the fixed
reward `--missing-eos-penalty` from every member, hence no penalty. Members must read the policy's
tokens: each must have the policy tokenizer's vocabulary (train them with `train_rm.py --seed s
--output-dir runs/tiny_world/rm_s` from the same SFT; the default members are `runs/tiny_world/rm`,
`rm_2` and `rm_3`, which `pipeline.py` does not build: train rm_2 and rm_3 with the command above).
Logged: `uwo/reward` (mean UWO reward), `uwo/penalty` (mean of lambda * Var or lambda * std),
`uwo/spread` (mean over completions of the members' standard deviation).
"""
# --- end method ---

import argparse
import contextlib
import fcntl
import inspect
import json
import math
import os
import random
import shutil
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (the same for initialisation on every process; sampling uses seed + rank)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "signcert-po"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    preset: Literal["tiny", "paper"] = "tiny"
    """the defaults to start from: `tiny` (the offline tiny world, minutes on a CPU) or `paper`
    (Pythia-1B on TL;DR, the paper's Table 6); explicit flags override either"""

    # Algorithm specific arguments
    # -- models and data
    policy_path: str = "runs/tiny_world/sft"
    """the SFT policy to optimise (a causal LM folder); it is also the frozen reference policy of the KL"""
    # --- method: reward models ---
    reward_model_paths: tuple[str, ...] = ("runs/tiny_world/rm", "runs/tiny_world/rm_2", "runs/tiny_world/rm_3")
    """the k >= 2 ensemble members (paper: 3), each a *ForSequenceClassification with a linear `score` head,
    one output, trained from the policy's SFT (same tokenizer) by train_rm.py with its own seed; the first is
    the proxy whose reward is logged as reward/proxy"""
    # --- end method ---
    dataset: str = "runs/tiny_world/data"
    """prompts: a hub id or a local folder/file (jsonl, parquet, save_to_disk); TL;DR or AlpacaFarm columns"""
    dataset_config: Optional[str] = None
    """the hub dataset's config name (AlpacaFarm: `alpaca_instructions`)"""
    dataset_split: str = "train"
    """the split whose prompts are trained on"""
    max_prompt_length: int = 128
    """prompts longer than this are cut in the POST/input (paper: 512)"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (off: only transformers' own architectures)"""

    # --- method: args ---
    # -- UWO (Coste et al. 2024, eq. 5)
    uwo_lambda: float = 0.1
    """lambda >= 0, the weight of the ensemble's disagreement (Coste et al. 2024 for PPO: 0.1; 0 is the mean)"""
    uwo_penalty: Literal["var", "std"] = "var"
    """`var`: lambda * Var_i r_i (Coste's eq. 5, population variance); `std`: lambda * std (the SignCert paper's
    wording)"""
    # --- end method ---

    # -- the Dr.GRPO loss and the optimiser
    kl_coef: float = 0.01
    """beta, the weight of the k3 KL to the reference policy in the loss (paper: 0.01)"""
    clip_range: float = 0.2
    """the PPO clip range of the ratio (paper: 0.2)"""
    num_ppo_epochs: int = 1
    """optimiser steps on each batch of rollouts (1: the ratio is 1 and the PPO clip is inert, as in the paper)"""
    learning_rate: float = 2e-4
    """the learning rate, constant (paper: 1e-6)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    # -- rollouts
    num_generations: int = 8
    """K, completions per prompt (paper: 8)"""
    temperature: float = 1.0
    """sampling temperature of the rollouts; the log-probs of the loss use the same (paper: 1.0)"""
    max_new_tokens: int = 24
    """the maximum completion length, also the constant of the Dr.GRPO normaliser (paper: 53)"""
    missing_eos_penalty: Optional[float] = -1.0
    """the reward of a completion with no EOS, given instead of the RM's (None: score it as is); what the method
    does with a reward the RM did not give: the module's docstring"""
    generation_batch_size: int = 128
    """completions generated (and scored) at once on one device"""
    generation_backend: Literal["hf", "static", "compiled", "vllm"] = "hf"
    """`hf`: transformers' `generate` (the default, and the CPU path); `static`: our sampling loop over a static KV
    cache (`sample_static`, the same distribution); `compiled`: that loop with the decoding step compiled with CUDA
    graphs (`torch.compile(mode="reduce-overhead")`, for GPUs); `vllm`: a vLLM engine in this process, the policy's
    weights pushed into it before each step's sampling (`sample_vllm`; GPU or CPU, in vLLM's own environment:
    `bash tools/install_vllm.sh VENV`, then VENV/bin/python). The held-out evaluation samples with `generate` under
    `hf` and `vllm` alike"""
    vllm_gpu_memory_utilization: float = 0.3
    """`vllm`: the share of the GPU its engine may take beside the training (on a CPU, of the RAM for its KV cache;
    VLLM_CPU_KVCACHE_SPACE=N, in GiB, sets the size instead)"""

    # -- batch sizes and steps
    total_steps: int = 300
    """the number of optimiser steps (paper: 2000)"""
    num_prompts_per_step: int = 16
    """prompts per optimiser step, over all processes (paper: 32)"""
    micro_batch_size: int = 32
    """completions per forward/backward on one device; 0: auto, the largest divisor of the per-process batch
    whose update fits the GPU (measured at startup, printed; on a CPU at most 32). The numbers do not depend on
    it (the constant normaliser), only speed and memory do (the paper: 2 per GPU on 8 GPUs)"""
    bf16: bool = False
    """bf16 mixed precision (GPU); the reference and reward models are then held in bf16, the reward head
    is applied in float32"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy's backward"""

    # -- monitoring by the gold reward model (never in the update)
    gold_rm_path: Optional[str] = "runs/tiny_world/gold_rm"
    """the gold reward model (paper: Skywork-Reward-Llama-3.1-8B-v0.2); None to skip"""
    gold_every: int = 1
    """score the rollouts with the gold RM at step 1, every this many steps after it, and at the last step:
    `reward/gold` and `rm/proxy_accuracy` (the paper's Figure 2a, every 50 steps)"""
    gold_batch_size: int = 64
    """sequences per gold forward on one device"""
    gold_max_length: int = 256
    """gold input tokens (longer inputs lose their beginning), as in gen_prefs.py and eval_gold.py"""
    eval_every: int = 10
    """held-out gold evaluation of the current policy (`eval/{split}/...`, as eval_gold.py scores it) at step 0
    (the initial policy), every this many steps and at the last step; 0: off. Needs --gold-rm-path (paper: 100)"""
    eval_splits: tuple[str, ...] = ("validation", "test")
    """the dataset splits evaluated (validation: pick the early-stopping step; test: report it)"""
    eval_num_prompts: int = 128
    """the FIRST this many prompts of each split, the same at every evaluation (paper: 256)"""
    eval_temperature: float = 0.01
    """sampling temperature of the evaluation, one completion per prompt (eval_gold.py's 0.01: near-greedy)"""

    # -- outputs, checkpoints, resume
    output_dir: Optional[str] = None
    """where everything goes (default: runs/{run_name}); a folder that holds a run is refused unless
    `--resume` or `--overwrite`"""
    log_samples_every: int = 25
    """write every completion of the step (text, rewards, advantage, the method's own per-completion values) to
    samples.jsonl every this many steps"""
    save_every: int = 50
    """write a checkpoint every this many steps (atomically; `--resume` continues from the last one)"""
    resume: bool = False
    """continue the run in `--output-dir` from its last checkpoint (policy, optimiser, RNG, step); the
    arguments that shape the run must match its args.json"""
    overwrite: bool = False
    """delete what `--output-dir` holds and start afresh"""

    # to be filled in runtime
    run_name: Annotated[str, tyro.conf.Suppress] = ""
    """{exp_name}__{seed}__{time}, the same on every process; kept on resume (the wandb run id)"""
    num_processes: Annotated[int, tyro.conf.Suppress] = 0
    """the number of processes (GPUs)"""
    local_num_prompts: Annotated[int, tyro.conf.Suppress] = 0
    """prompts per step on one process"""
    local_batch_size: Annotated[int, tyro.conf.Suppress] = 0
    """completions per step on one process"""
    batch_size: Annotated[int, tyro.conf.Suppress] = 0
    """completions per step over all processes"""
    gradient_accumulation_steps: Annotated[int, tyro.conf.Suppress] = 0
    """micro-batches per optimiser step on one process"""


# fields that may differ when a run is resumed: they change what is logged or how fast, not the run
RESUME_MAY_CHANGE = {
    "preset",
    "resume",
    "overwrite",
    "output_dir",
    "run_name",
    "total_steps",
    "save_every",
    "log_samples_every",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "generation_batch_size",
    "gold_batch_size",
    "eval_every",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "vllm_gpu_memory_utilization",
}

PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        policy_path="runs/paper/sft",
        # --- method: paper preset ---
        reward_model_paths=("runs/paper/rm_410m_1", "runs/paper/rm_410m_2", "runs/paper/rm_410m_3"),
        # --- end method ---
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        max_prompt_length=512,
        learning_rate=1e-6,
        max_new_tokens=53,
        generation_batch_size=64,
        total_steps=2000,
        num_prompts_per_step=32,
        micro_batch_size=0,  # auto: the paper's 2 x 16 accumulation is for 8 GPUs; on one, 128 of 2 launch-bind it
        bf16=True,
        gradient_checkpointing=True,
        gold_rm_path="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
        gold_every=50,
        gold_batch_size=16,
        gold_max_length=1024,
        eval_every=100,
        eval_num_prompts=256,
        log_samples_every=50,
        save_every=100,
    ),
}


# ------------------------------------------------------------------------- the method
# --- method: method ---
def dr_grpo_advantages(rewards):
    """Dr.GRPO's group advantage (eq. 4): A_j = r_j - mean_k r_k over the K completions of each prompt
    (no division by the std). rewards: (B, K). Returns (B, K), without gradient."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must have shape (B, K) with K >= 2 completions per prompt, got {tuple(rewards.shape)}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite: found NaN or inf (check the reward model's outputs)")
    rewards = rewards.detach()
    return rewards - rewards.mean(dim=1, keepdim=True)


@torch.no_grad()
def uwo_rewards(member_rewards, lam, penalty="var"):
    """The uncertainty-weighted reward of Coste et al. 2024, eq. (5).

    member_rewards: (N, k) the reward of each of N completions under each of the k >= 2 members.
    lam: lambda >= 0. penalty: "var" (population variance, Coste) or "std" (its square root).
    Returns (reward (N,), penalty term lambda * Var or lambda * std (N,), spread = std over members (N,)),
    float32 (float64 for float64 inputs), without gradient.
    """
    if member_rewards.ndim != 2 or member_rewards.shape[1] < 2:
        raise ValueError(
            f"member_rewards must have shape (N, k) with k >= 2 ensemble members, got {tuple(member_rewards.shape)}"
        )
    if lam < 0 or penalty not in ("var", "std"):
        raise ValueError(f"need lambda >= 0 and penalty 'var' or 'std', got {lam} and {penalty!r}")
    if not torch.isfinite(member_rewards).all():
        raise ValueError("member rewards must be finite: found NaN or inf (check the reward models' outputs)")
    r = member_rewards.to(torch.promote_types(member_rewards.dtype, torch.float32))
    var = r.var(dim=1, correction=0)  # population variance over the members
    spread = var.sqrt()
    term = lam * (var if penalty == "var" else spread)
    return r.mean(dim=1) - term, term, spread


# --- end method ---


# ------------------------------------------------------------------------- the loss
def dr_grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_range, kl_coef, normalizer):
    """The Dr.GRPO loss (Liu et al. 2025; TRL `loss_type="dr_grpo"`) of a batch of completions.

    logprobs, old_logprobs, ref_logprobs, mask: (N, T) per response token; advantages: (N,).
    The token losses are SUMMED and divided by a constant `normalizer` (completions x max_new_tokens),
    never by a sequence's own length: the loss does not depend on how a batch is split.
    Returns (loss, kl) with kl the mean k3 estimate per real token (for logging).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)  # PPO clip
    log_r = ref_logprobs - logprobs
    kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(pi || pi_ref), >= 0
    loss = ((pg + kl_coef * kl) * mask).sum() / normalizer
    return loss, (kl * mask).sum() / mask.sum().clamp(min=1)


# --- method: variants ---
def check_member_vocabulary(path, tokenizer, trust_remote_code):
    """An ensemble member must read the policy's token ids: the same vocabulary as the policy's tokenizer and
    an embedding that covers it. From the config and tokenizer files, before any weights (check_same_tokenizer
    compares the ids of a probe text; this also catches a token one side has and the other lacks)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the UWO member {path} has a vocabulary of {config.vocab_size}, smaller than the policy tokenizer's "
            f"({len(tokenizer)}): every member must share the policy's tokenizer (train it with train_rm.py from "
            "the SFT)"
        )
    own = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if own.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the UWO member {path} has a tokenizer whose vocabulary differs from the policy's: every member "
            "must share the policy's tokenizer (train it with train_rm.py from the same SFT)"
        )


# --- end method ---


# ========================================================================= the training loop
def main():
    """Check every input (before any model loads), set up, then train: steps 1-4 of every optimiser step, the
    logging, a checkpoint every --save-every steps, and the final policy."""
    with input_errors_said_once():  # a bad input: its message, once, not a traceback per process
        args, on_cpu = read_args()  # the preset, the checks that need no file, the batch arithmetic
        # --- method: checks ---
        if len(args.reward_model_paths) < 2:
            raise ValueError(
                f"UWO needs an ensemble of at least 2 reward models (the paper: 3), got --reward-model-paths "
                f"{args.reward_model_paths}: train more with `train_rm.py --seed s --output-dir runs/tiny_world/rm_s`"
            )
        if args.uwo_lambda < 0:
            raise ValueError(
                f"--uwo-lambda must be >= 0 (Coste et al.: 0.1; 0 is the ensemble mean), got {args.uwo_lambda}"
            )
        for path in args.reward_model_paths:
            require_path(path, "--reward-model-paths")
        # --- end method ---
        require_path(args.gold_rm_path, "--gold-rm-path")
        # inputs, checked before any model is loaded and before the run folder exists
        rows, where = load_split(args.dataset, args.dataset_split, args.dataset_config)
        if args.gold_rm_path:
            check_reward_config(args.gold_rm_path, args.trust_remote_code, "--gold-rm-path")
        trust = dict(trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(args.policy_path, padding_side="left", **trust)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # only if it has none (pad is masked anyway)
        prompts = build_prompts(rows, tokenizer, args.max_prompt_length, where)
        # --- method: inputs ---
        for path in args.reward_model_paths:  # every member reads the policy's token ids, as the proxy does
            check_reward_config(path, args.trust_remote_code, "--reward-model-paths")
            check_same_tokenizer(tokenizer, path, args.trust_remote_code)
            check_member_vocabulary(path, tokenizer, args.trust_remote_code)
        # --- end method ---
        heldout = load_heldout(args, tokenizer)  # {split: (prompts, references)}: the first --eval-num-prompts
        accelerator = Accelerator(
            cpu=on_cpu,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision="bf16" if args.bf16 else "no",
        )
        device, rank = accelerator.device, accelerator.process_index
        args.run_name = broadcast_object_list([f"{args.exp_name}__{args.seed}__{int(time.time())}"])[0]
        args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
        run_lock = open_run_dir(args, accelerator)  # refuses a used folder, checks a resume, keeps the run's name
        announce_run(args, heldout, accelerator)  # the batch, the evaluation and args.json
        seed_everything(args, device)

        # models: the policy (trained), its frozen copy (KL reference), the proxy RM and, to monitor, the gold RM
        ckpt = latest_checkpoint(args.output_dir) if args.resume else None
        start_step = checkpoint_step(ckpt)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        policy, ref_policy = load_policies(args, ckpt, tokenizer, dtype)
        ends = end_ids(policy)  # a completion ends at any of these ids (`completion_end_ids`)
        warning = learning_rate_warning(policy, args.learning_rate, PRESETS["tiny"].learning_rate)
        if warning and accelerator.is_main_process:
            print(warning)
        # --- method: models ---
        members = [
            load_reward_model(path, args.trust_remote_code, dtype, "--reward-model-paths")
            for path in args.reward_model_paths
        ]
        rm = members[0]  # the proxy: step 2 scores with it, as in every trainer
        check_vocabulary(rm, "the proxy RM", tokenizer)
        for m in members[1:]:  # the proxy, members[0], moves with the other models below
            m.to(accelerator.device)
        # --- end method ---
        gold, gold_tok = load_gold(args, dtype)
        if args.micro_batch_size == 0:  # auto on a GPU: measure one update's memory at the longest sequence, then fit
            auto_micro_batch(args, policy, accelerator)
        # fused AdamW (one kernel for all parameters) on a GPU; the same update, up to float rounding
        optimizer = torch.optim.AdamW(
            policy.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=device.type == "cuda"
        )
        policy, optimizer = accelerator.prepare(policy, optimizer)
        policy.eval()  # generation mode; policy_update switches to train mode and back
        for m in (ref_policy, rm, gold):
            if m is not None:
                m.to(device)
        torch.manual_seed(args.seed + rank)  # each process samples different completions
        if ckpt:
            restore_checkpoint(accelerator, optimizer, ckpt)
    start_logs(args, accelerator, len(prompts), start_step, ckpt)  # the resumed logs cut at the checkpoint; wandb

    reference_gold, last_eval = {}, {}  # {split: this process's references' gold}, heldout_eval's cache
    if heldout and start_step == 0:  # the initial policy: the row of step 0
        t4 = time.perf_counter()
        last_eval = heldout_eval(policy, tokenizer, rm, gold, gold_tok, heldout, reference_gold, args, accelerator)
        write_logs(args, accelerator, {"step": 0, **last_eval, "time/eval": time.perf_counter() - t4})

    K = args.num_generations
    bar = tqdm(range(start_step + 1, args.total_steps + 1), disable=not accelerator.is_main_process, desc="steps")
    for step in bar:
        t0 = time.perf_counter()
        # 1. rollouts: K completions of each of this process's prompts
        mine = prompt_indices(step, len(prompts), args.num_prompts_per_step, args.seed)[
            rank * args.local_num_prompts : (rank + 1) * args.local_num_prompts
        ]
        step_prompts = [prompts[i] for i in mine]
        enc = tokenizer(
            [as_query(tokenizer, p) for p in step_prompts], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        query, query_mask = enc.input_ids.repeat_interleave(K, 0), enc.attention_mask.repeat_interleave(K, 0)
        generated = rollouts(accelerator.unwrap_model(policy), query, query_mask, args, tokenizer.pad_token_id)
        response, response_mask, has_eos = truncate_after_eos(generated, ends, tokenizer.pad_token_id)
        t1 = time.perf_counter()

        # 2. scoring: reward AND features from one proxy-RM forward; reference log-probs for the KL
        with torch.no_grad():
            ref_logprobs = in_chunks(
                lambda *t: response_logprobs(ref_policy, *t, args.temperature),
                args.generation_batch_size,
                query,
                query_mask,
                response,
                response_mask,
            )
            reward, features = in_chunks(
                lambda q, qm, r, rmk: reward_and_features(rm, torch.cat([q, r], 1), torch.cat([qm, rmk], 1)),
                args.generation_batch_size,
                query,
                query_mask,
                response,
                response_mask,
            )
        if args.missing_eos_penalty is not None:  # a fixed reward instead of the RM's
            reward = torch.where(has_eos, reward, args.missing_eos_penalty)
        monitor = gold is not None and ((step - 1) % args.gold_every == 0 or step == args.total_steps)
        log_samples = step % args.log_samples_every == 0 or step == args.total_steps
        if monitor or log_samples:
            texts = tokenizer.batch_decode(
                [r[: int(m.sum()) - int(e)] for r, m, e in zip(response, response_mask, has_eos)]
            )
        if monitor:
            gold_reward = gold_rewards(gold, gold_tok, [p for p in step_prompts for _ in range(K)], texts, args, device)
            if args.missing_eos_penalty is not None:  # as eval_gold.py scores it
                gold_reward = torch.where(has_eos, gold_reward, args.missing_eos_penalty)
        t2 = time.perf_counter()

        # --- method: advantages ---
        # 3. advantages: the other members' rewards, the UWO reward (Coste et al. eq. 5), then Dr.GRPO (eq. 4)
        with torch.no_grad():
            member_rewards = torch.stack(
                [reward]
                + [
                    in_chunks(
                        lambda q, qm, r, rmk, m=m: reward_and_features(
                            m, torch.cat([q, r], 1), torch.cat([qm, rmk], 1)
                        )[0],
                        args.generation_batch_size,
                        query,
                        query_mask,
                        response,
                        response_mask,
                    )
                    for m in members[1:]
                ],
                dim=1,
            )
        if args.missing_eos_penalty is not None:  # the same fixed reward from every member: no disagreement
            member_rewards = torch.where(has_eos.unsqueeze(1), member_rewards, args.missing_eos_penalty)
        uwo_reward, uwo_term, spread = uwo_rewards(member_rewards, args.uwo_lambda, args.uwo_penalty)
        advantages = dr_grpo_advantages(uwo_reward.view(-1, K))
        start = dr_grpo_advantages((uwo_reward + uwo_term).view(-1, K))  # the ensemble mean's Dr.GRPO advantage
        # --- end method ---

        # 4. update: the Dr.GRPO loss with the method's advantages
        batch = dict(
            query=query,
            query_mask=query_mask,
            response=response,
            response_mask=response_mask,
            ref_logprobs=ref_logprobs,
            advantages=advantages.flatten(),
        )
        if args.num_ppo_epochs > 1:  # several steps on one batch: the ratio is against the sampling policy
            with torch.no_grad():
                batch["old_logprobs"] = in_chunks(
                    lambda *t: response_logprobs(policy, *t, args.temperature),
                    args.generation_batch_size,
                    query,
                    query_mask,
                    response,
                    response_mask,
                )
        stats = policy_update(accelerator, policy, optimizer, batch, args)

        # logging, every metric over the global batch (docs/TRAINER.md defines each): what is logged, in this list
        g = accelerator.gather
        all_reward, all_adv, all_start = g(reward.view(-1, K)), g(advantages), g(start)
        loss_kl = g(torch.stack([stats["loss"], stats["k3_sum"], stats["tokens"]]).unsqueeze(0))
        # --- method: logging ---
        method_metrics = {
            "uwo/reward": g(uwo_reward).mean(),
            "uwo/penalty": g(uwo_term).mean(),
            "uwo/spread": g(spread).mean(),
        }
        per_completion = {
            "uwo_reward": uwo_reward,
            "penalty": uwo_term,
            "spread": spread,
        }  # samples.jsonl's own columns
        shown = {"spread": "uwo/spread"}  # in the progress bar
        # --- end method ---
        metrics = {
            "step": step,
            "reward/proxy": all_reward.mean(),
            "policy/kl": g(stats["seq_kl"]).mean(),
            "policy/kl_k3_per_token": (loss_kl[:, 1].sum() / loss_kl[:, 2].sum().clamp(min=1)),
            "policy/grad_norm": stats["grad_norm"],
            "losses/loss": loss_kl[:, 0].mean(),
            **method_metrics,
            "completion/length": g(response_mask.sum(1).float()).mean(),
            "completion/no_eos_rate": 1 - g(has_eos.float()).mean(),
            **advantage_activity(all_adv, all_start),  # adv/std, adv/relative_change
        }
        if monitor:
            all_gold = g(gold_reward.view(-1, K))
            metrics["reward/gold"] = all_gold.mean()
            metrics["rm/proxy_accuracy"] = pairwise_agreement(all_reward, all_gold)
        metrics = on_host(metrics)  # the step's one host sync; it returns when the update has finished
        t3 = time.perf_counter()
        metrics |= {"time/step": t3 - t0, "time/generation": t1 - t0, "time/scoring": t2 - t1, "time/update": t3 - t2}
        if heldout and (step % args.eval_every == 0 or step == args.total_steps):  # the policy after this update
            t4 = time.perf_counter()
            last_eval = heldout_eval(policy, tokenizer, rm, gold, gold_tok, heldout, reference_gold, args, accelerator)
            metrics |= last_eval | {"time/eval": time.perf_counter() - t4}
        samples = None
        if log_samples:  # every completion of the step
            local = [
                dict(
                    step=step,
                    group=rank * args.local_num_prompts + i // K,
                    prompt=step_prompts[i // K],
                    response=texts[i],
                    has_eos=bool(has_eos[i]),
                    length=int(response_mask[i].sum()),
                    proxy=reward[i].item(),
                    gold=gold_reward[i].item() if monitor else None,
                    advantage=advantages.flatten()[i].item(),
                    **{name: values[i].item() for name, values in per_completion.items()},
                )
                for i in range(len(texts))
            ]
            samples = gather_object(local)
        write_logs(args, accelerator, metrics, samples)  # metrics.jsonl, samples.jsonl, wandb
        if accelerator.is_main_process:
            bar.set_postfix(
                proxy=f"{metrics['reward/proxy']:.2f}",
                gold=f"{metrics.get('reward/gold', math.nan):.2f}",
                kl=f"{metrics['policy/kl']:.1f}",
                **{name: f"{metrics[key]:.3g}" for name, key in shown.items()},
                val_gold=f"{last_eval.get('eval/validation/gold_reward', math.nan):.2f}",  # the last held-out eval
            )
        if step % args.save_every == 0 and step < args.total_steps:
            save_checkpoint(accelerator, policy, optimizer, step, args.output_dir)

    save_final(args, accelerator, policy, tokenizer)  # the final policy, for eval_gold.py (atomic)
    finish(accelerator, run_lock)


# ------------------------------------------------------------------------- arguments and batch sizes
def read_args():
    """(args, on_cpu): the command line over its preset, every check that needs no file (the method's own come after,
    in `main`), and the batch arithmetic; errors say what to do."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=PRESETS)
    args = tyro.cli(Args, default=PRESETS[pre.parse_known_args()[0].preset])
    if args.num_generations < 2:
        raise ValueError(
            f"--num-generations must be >= 2: the group baseline needs at least two completions per prompt (paper: 8), "
            f"got {args.num_generations}"
        )
    if args.resume and not args.output_dir:
        raise ValueError(
            f"--resume needs --output-dir: the folder of the run to continue (e.g. runs/{args.exp_name}__1__1764180000)"
        )
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite deletes it: pass one of them")
    if min(args.gold_every, args.save_every, args.log_samples_every) < 1:
        raise ValueError("--gold-every, --save-every and --log-samples-every must be >= 1")
    if args.eval_every < 0 or args.eval_num_prompts < 1 or not args.eval_temperature > 0 or not args.eval_splits:
        raise ValueError(
            f"the held-out evaluation needs --eval-every >= 0 (0: off), --eval-num-prompts >= 1, --eval-temperature "
            f"> 0 and at least one --eval-splits; got {args.eval_every}, {args.eval_num_prompts}, "
            f"{args.eval_temperature}, {args.eval_splits}"
        )
    require_path(args.policy_path, "--policy-path")  # the reward models' in `main` (the method's), then the gold's

    # batch arithmetic, checked before anything heavy is loaded
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()  # then `accelerate launch --multi_gpu` runs CPU processes (gloo)
    args.num_processes = PartialState(cpu=on_cpu).num_processes
    args.local_num_prompts = exact_div(
        args.num_prompts_per_step, args.num_processes, "--num-prompts-per-step over the processes"
    )
    args.local_batch_size = args.local_num_prompts * args.num_generations
    args.batch_size = args.num_prompts_per_step * args.num_generations
    if args.micro_batch_size == 0 and on_cpu:  # auto on a CPU: no memory to fit, the cap keeps each matmul cache-sized
        args.micro_batch_size = fit_micro_batch(args.local_batch_size, 0, 1, CPU_MICRO_BATCH)
    args.gradient_accumulation_steps = exact_div(  # auto on a GPU: 1 until the models are loaded and measured
        args.local_batch_size,
        args.micro_batch_size or args.local_batch_size,
        "completions per process (--num-prompts-per-step x --num-generations / processes) over --micro-batch-size",
    )
    return args, on_cpu


@contextlib.contextmanager
def input_errors_said_once():
    """Around the setup: a ValueError or FileNotFoundError (the input checks' errors, which say what to do) ends
    the run with its message alone, printed by the main process only; under `accelerate launch` every process
    would otherwise print the same traceback (the launcher still adds its own). Errors after the setup keep
    their traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            raise SystemExit(f"error: {e}") from None
        raise SystemExit(1) from None


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, or an error that names both ways out: a multiple of b for the first, a divisor of a for the second."""
    if b < 1 or a % b != 0:
        multiples = sorted({m for m in (b * (a // b), b * (a // b + 1)) if m > 0}) if b >= 1 else []
        divisors = [d for d in range(1, a + 1) if a % d == 0]
        raise ValueError(
            f"{what}: {a} is not a multiple of {b}; make the first a multiple of {b} (e.g. {multiples}) "
            f"or the second a divisor of {a} ({divisors})"
        )
    return a // b


def require_path(path: Optional[str], flag: str) -> None:
    """Fail now, naming the flag and saying what to do, on a path that cannot be what was meant: a local folder
    that does not exist, a run folder instead of its model, or a hub id that cannot be had (the hub offline or
    unreachable, and no cached copy), instead of a hub lookup that fails later under a long traceback."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        raise FileNotFoundError(f"{flag} {path} is a run folder, not a model: pass its model, {p / 'model'}")
    if p.exists():
        return
    missing = f"{flag} {path}: no such local folder"
    todo = "run the stage that writes it, `python pipeline.py` for the tiny world, or give an existing folder"
    first = p.parts[0] if p.parts else ""
    # a hub id is `name` or `owner/name`; anything else, or an `owner` that is a local folder, is a local path
    if path.startswith((".", "/", "~", "runs/")) or path.count("/") > 1 or Path(first).is_dir():
        raise FileNotFoundError(f"{missing} ({todo})")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(path, "config.json"), str):
        return  # the hub's local cache has it: it loads offline too
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{missing}, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy of {path!r} ({todo}; "
            "for a hub model, unset HF_HUB_OFFLINE where the hub can be reached)"
        )
    try:
        huggingface_hub.model_info(path, timeout=10)
    except GatedRepoError:
        return  # it exists; loading it says what access it needs
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{missing}, nor a hub model you can read ({todo})") from None
    except HfHubHTTPError:
        return  # the hub answered: loading it reports the rest
    except Exception as e:  # no answer: no network, a proxy, a wrong HF_ENDPOINT
        raise FileNotFoundError(
            f"{missing}, and the hub is unreachable ({type(e).__name__}: {e}) ({todo}; for a hub model, "
            "check the network or HF_ENDPOINT)"
        ) from None


# ------------------------------------------------------------------------- data (as in the stage scripts)
TLDR_COLUMNS = ("subreddit", "title", "post", "summary")
ALPACA_COLUMNS = ("instruction", "input", "output")
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl (.json: one object per line) or .parquet file; errors name the file and 1-based line."""
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); every line must be "
                        "one JSON object: fix or delete that line"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}, line {number}: a {type(row).__name__}, not a JSON object; every line must be "
                        "one object with the dataset's columns"
                    )
                rows.append(row)
        return rows
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def load_split(dataset: str, split: str, config: Optional[str] = None) -> tuple[list[dict], str]:
    """(rows, where) of one split from a hub id or a local path (a folder of {split}.jsonl/.parquet, one
    file, or save_to_disk); `where` names the file the rows came from, for error messages."""
    path = Path(dataset)
    if path.is_file():  # one file is every split: said, so that an evaluation on the training rows is never silent
        print(f"[data] {path} is one file: the {split!r} split reads all of its rows, as every other split does (for a "
              f"held-out split, pass a folder with one file per split: train.jsonl, validation.jsonl, test.jsonl)")  # fmt: skip
        return read_rows(path), str(path)
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.parquet", f"{split}.json"):
            if (path / name).is_file():
                return read_rows(path / name), str(path / name)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{dataset} has splits {list(data)}, not {split!r}: pass one of them")
                data = data[split]
            return data.to_list(), f"{dataset} [{split}]"
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{dataset} has no {split}.jsonl, {split}.parquet or save_to_disk data (found: {found})"
        )
    # a path-looking string that does not exist is a mistake, not a hub id
    first = path.parts[0] if path.parts else ""
    if (
        dataset.startswith((".", "/", "~", "runs/"))
        or dataset.count("/") != 1
        or path.suffix in (".jsonl", ".parquet", ".json")
        or Path(first).is_dir()
    ):
        raise FileNotFoundError(
            f"dataset {dataset!r} does not exist: no such file or folder (run `python tiny_world.py` for the "
            "tiny world, or pass --dataset)"
        )
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split).to_list(), f"{dataset} [{split}]"
    except Exception as e:
        raise RuntimeError(f"could not load {dataset!r} (config {config}, split {split}) from the hub: {e}") from e


def check_columns(rows: list[dict], columns: tuple, where: str) -> None:
    """Every row has every column, as a string: a missing or null field is an error that names the row."""
    if not rows:
        raise ValueError(f"{where} is empty (no rows): point --dataset at a file or folder with data")
    for number, row in enumerate(rows, 1):
        for column in columns:
            if column not in row:
                raise ValueError(
                    f"{where}, row {number}: no column {column!r} (every row needs {list(columns)}): "
                    "add it or delete that row"
                )
            if not isinstance(row[column], str):
                value = "null" if row[column] is None else f"a {type(row[column]).__name__}"
                raise ValueError(
                    f"{where}, row {number}: column {column!r} is {value}, not a string: give it a string "
                    '("" for an empty Alpaca input) or delete that row'
                )


def detect_format(rows: list[dict], where: str) -> str:
    """'tldr' or 'alpaca' from the columns of the first row; then every row must have them (check_columns)."""
    if not rows:
        raise ValueError(f"{where} is empty (no rows): point --dataset at a file or folder with data")
    columns = set(rows[0])
    for fmt, need in (("tldr", TLDR_COLUMNS), ("alpaca", ALPACA_COLUMNS)):
        if set(need) <= columns:
            check_columns(rows, need, where)
            return fmt
    raise ValueError(
        f"{where} has columns {sorted(columns)}; need the TL;DR columns {list(TLDR_COLUMNS)} "
        f"or the AlpacaFarm columns {list(ALPACA_COLUMNS)}"
    )


CHAT_EOS_CHECKED = set()  # (chat template, EOS) pairs seen to end a turn with that EOS


def as_query(tokenizer, prompt: str) -> str:
    """The text the policy reads for `prompt` (and the proxy RM, which reads the policy's tokens): where the tokenizer
    has a chat template (an instruct model, e.g. SmolLM2-135M-Instruct), the prompt as the user's turn with the
    assistant's turn opened; else the prompt as it is (Pythia, the tiny world). The gold always reads the prompt
    itself. A chat model must end its turn with the tokenizer's EOS, where completions are cut and rewards read."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    key = (tokenizer.chat_template, tokenizer.eos_token)
    if key not in CHAT_EOS_CHECKED:
        turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        if tokenizer.eos_token is None or "y" + tokenizer.eos_token not in tokenizer.apply_chat_template(
            turn, tokenize=False
        ):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path} does not end an assistant turn with the tokenizer's "
                f"EOS {tokenizer.eos_token!r}: set the tokenizer's eos_token to the token that ends a turn "
                "(tokenizer.eos_token = ...; save_pretrained), or remove the chat template to train on plain prompts"
            )
        CHAT_EOS_CHECKED.add(key)
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def fit_prompt(build, text: str, tokenizer, max_len: int) -> str:
    """build(text) -> prompt; shorten `text` until the prompt has <= max_len tokens. The cut is at a token
    boundary about on budget, moved back to the last whitespace when there is one in the kept part's second
    half: words stay whole, and text without whitespace (Japanese, a long URL) is cut, not dropped whole."""
    while True:
        prompt = build(text)
        n = len(tokenizer(as_query(tokenizer, prompt), add_special_tokens=False).input_ids)  # as the policy reads it
        if n <= max_len:
            return prompt
        if not text:
            raise ValueError(
                f"prompt is {n} tokens even with an empty post/input/instruction; raise --max-prompt-length "
                f"(now {max_len})"
            )
        keep = len(tokenizer(text, add_special_tokens=False).input_ids) - (n - max_len)
        if keep <= 0:
            cut = ""
        elif getattr(tokenizer, "is_fast", False):  # the exact prefix of `text` that its first `keep` tokens cover
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
            cut = text[: offsets[keep - 1][1]]
        else:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            cut = tokenizer.decode(ids[:keep]).rstrip("\ufffd")  # no half character at the end
        space = max(cut.rfind(" "), cut.rfind("\n"))
        at_word_end = text.startswith(cut) and text[len(cut) : len(cut) + 1].isspace()
        if not at_word_end and space > len(cut) // 2:
            cut = cut[:space]
        cut = cut.rstrip()
        text = cut if len(cut) < len(text) else text[:-1]  # always progress


def to_prompt_response(row: dict, fmt: str, tokenizer, max_prompt_length: int) -> tuple[str, str]:
    """The prompt (fitted to max_prompt_length: the TL;DR post, the Alpaca input, or else the Alpaca
    instruction is cut) and the reference response of one row; every script builds its prompts here."""
    if fmt == "tldr":
        build = lambda post: f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: {post}\n\nTL;DR:"
        return fit_prompt(build, row["post"].strip(), tokenizer, max_prompt_length), " " + row["summary"].strip()
    if row["input"]:
        build = lambda inp: ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=inp)
        return fit_prompt(build, row["input"], tokenizer, max_prompt_length), row["output"]
    build = lambda ins: ALPACA_PROMPT_NO_INPUT.format(instruction=ins)
    return fit_prompt(build, row["instruction"], tokenizer, max_prompt_length), row["output"]


def build_prompts(rows, tokenizer, max_prompt_length, where):
    """Prompt strings, exactly as the stage scripts build them (to_prompt_response: the post, the input or
    the instruction is cut to fit --max-prompt-length)."""
    fmt = detect_format(rows, where)
    return [to_prompt_response(r, fmt, tokenizer, max_prompt_length)[0] for r in rows]


def load_heldout(args, tokenizer):
    """{split: (prompts, references)} of the held-out evaluation: the first --eval-num-prompts rows of each of
    --eval-splits (empty when the evaluation is off), built as the training prompts are."""
    heldout = {}
    if args.eval_every > 0 and args.gold_rm_path:
        for split in dict.fromkeys(args.eval_splits):
            try:
                split_rows, split_where = load_split(args.dataset, split, args.dataset_config)
            except (FileNotFoundError, ValueError, RuntimeError) as e:
                raise ValueError(
                    f"--eval-splits {split}: {e}; pass the held-out splits that {args.dataset} has, or --eval-every 0"
                ) from None
            if len(split_rows) < args.eval_num_prompts:
                raise ValueError(
                    f"--eval-num-prompts {args.eval_num_prompts} is more than the {len(split_rows)} rows of "
                    f"{split_where}: pass --eval-num-prompts {len(split_rows)} or fewer"
                )
            split_rows = split_rows[: args.eval_num_prompts]
            fmt = detect_format(split_rows, split_where)
            heldout[split] = (
                build_prompts(split_rows, tokenizer, args.max_prompt_length, split_where),
                [to_prompt_response(r, fmt, tokenizer, args.max_prompt_length)[1] for r in split_rows],
            )
    return heldout


# ------------------------------------------------------------------------- models and scoring
def check_reward_config(path: str, trust_remote_code: bool, flag: str) -> None:
    """Refuse a checkpoint that is not a one-output sequence classifier BEFORE loading its weights:
    transformers would silently put a random `score` head on a causal LM."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise ValueError(
            f"{flag} {path} is not a reward model: its architectures are {archs} with num_labels={config.num_labels}; "
            "a reward model is a *ForSequenceClassification checkpoint with num_labels=1, a linear head `score` "
            "with one output (e.g. the output of train_rm.py or runs/tiny_world/gold_rm)"
        )


def load_reward_model(path: str, trust_remote_code: bool, dtype, flag: str):
    """A reward model whose last layer is a linear `score` head with one output, in eval mode and frozen."""
    check_reward_config(path, trust_remote_code, flag)
    rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    head = getattr(rm, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(
            f"{flag} {path}: a reward model here needs its last layer to be a linear head `score` with one "
            f"output (a *ForSequenceClassification with num_labels=1), got {head!r}"
        )
    return rm.eval().requires_grad_(False)


def check_same_tokenizer(policy_tok, rm_path, trust_remote_code):
    """Refuse a proxy RM whose tokenizer is not the policy's: the RM is fed the policy's token ids as they
    are, so another tokenizer (other ids for the same text, another EOS) would score meaningless inputs.
    Compares the ids of a probe text (unicode, digits, the EOS) and the EOS id; cheap, before any model loads."""
    fix = (
        "train the proxy RM from the policy's SFT with train_rm.py (--policy-path <the SFT folder the policy starts "
        "from>), which saves the SFT tokenizer with it"
    )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(rm_path) and not any(os.path.exists(os.path.join(rm_path, f)) for f in tokenizer_files):
        raise ValueError(
            f"--reward-model-path {rm_path} has no tokenizer, so nothing shows that it reads the policy's token "
            f"ids (the trainer feeds it the policy's ids): {fix}; or, if it was trained on exactly the tokenizer "
            f"of {policy_tok.name_or_path}, save that tokenizer into {rm_path} (tokenizer.save_pretrained)"
        )
    rm_tok = AutoTokenizer.from_pretrained(rm_path, trust_remote_code=trust_remote_code)
    probe = (
        "SUBREDDIT: r/relationships\n\nTITLE: Café bill: 3 crêpes for €12.50?\n\nPOST: On 2024-03-07 we paid "
        "1,234 ¥ in 東京, naïve me 🙂. Don't ask!\n\nTL;DR: we overpaid" + (policy_tok.eos_token or "")
    )
    mine = policy_tok(probe, add_special_tokens=False).input_ids
    theirs = rm_tok(probe, add_special_tokens=False).input_ids
    if mine != theirs or policy_tok.eos_token_id != rm_tok.eos_token_id:
        at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise ValueError(
            f"the proxy RM {rm_path} has another tokenizer than the policy {policy_tok.name_or_path}: a probe "
            f"text gives ids {mine[at : at + 5]} (policy) vs {theirs[at : at + 5]} (RM) from token {at} on, EOS id "
            f"{policy_tok.eos_token_id} vs {rm_tok.eos_token_id}; the RM would score token ids it does not read "
            f"as the policy meant them: {fix}"
        )


def position_ids_of(mask):
    """Positions that skip the left padding, so a padded prompt is seen exactly as an unpadded one."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def response_logprobs(model, query, query_mask, response, response_mask, temperature):
    """log pi(y_t | x, y_<t) of every response token: (N, T). The LM head runs only on the T positions that
    predict them (`logits_to_keep`: the last T + 1, less the last), not on the prompt's (most of the sequence)."""
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    T = response.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_of(mask), logits_to_keep=T + 1).logits
    logits = logits[:, :-1].float() / temperature
    return logits.gather(-1, response.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def reward_and_features(rm, ids, mask):
    """ONE forward of a reward model: (reward (N,), features h (N, d)), both float32, read at the last real
    token of every row (the EOS when there is one; any padding, left or right). h is the input of the linear
    `score` head and reward = w^T h + b - reward_offset (the constant that centres the references, in the
    RM's config). The index comes from the mask, never from searching for pad ids; the head is applied in
    float32, so a bf16 backbone does not quantise the reward. No `no_grad` here: train_rm.py trains through it."""
    hidden = getattr(rm, rm.base_model_prefix)(input_ids=ids, attention_mask=mask, position_ids=position_ids_of(mask))
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    h = hidden.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last].float()
    bias = None if rm.score.bias is None else rm.score.bias.float()
    with torch.autocast(h.device.type, enabled=False):  # float32 even inside an autocast region (bf16 training)
        reward = F.linear(h, rm.score.weight.float(), bias).squeeze(-1)
    return reward - getattr(rm.config, "reward_offset", 0.0), h


def truncate_after_eos(response, eos_ids, pad_id):
    """Keep each completion up to and including its first EOS, any id of `eos_ids` (one id or a list: see
    `completion_end_ids`); the tokens after it become `pad_id`. Returns (response, mask (1 on the kept tokens),
    has_eos (N,) bool)."""
    is_eos = torch.isin(response, torch.as_tensor(eos_ids, dtype=response.dtype, device=response.device))
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), response.shape[1])
    mask = torch.arange(response.shape[1], device=response.device).unsqueeze(0) <= first.unsqueeze(1)
    return response.masked_fill(~mask, pad_id), mask.long(), has_eos


def completion_end_ids(tokenizer, generation_config) -> list:
    """The ids a completion ends at, in every stage (as TRL's GRPOTrainer and vLLM end it): the tokenizer's EOS and
    every EOS id of the model's generation config, where a chat model lists its end-of-turn token (Qwen2.5-Instruct:
    <|im_end|> and <|endoftext|>). Sampling stops at any of them and `truncate_after_eos` cuts at the first."""
    eos = generation_config.eos_token_id
    return sorted({tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])} - {None})


def rm_input_ids(tokenizer, prompt: str, response: str, max_length: int, chat: bool) -> list[int]:
    """What a reward model reads. chat: the tokenizer's chat template (user = prompt, assistant =
    response), for a gold like Skywork; else prompt ids + response ids + EOS (the tiny-world gold, and
    the proxy RM, whose RL stage concatenates policy tokens the same way)."""
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    else:
        ids = (
            tokenizer(prompt, add_special_tokens=False).input_ids
            + tokenizer(response, add_special_tokens=False).input_ids
        )
        ids = ids + [tokenizer.eos_token_id]
    return ids[-max_length:]  # keep the end: that is where the reward is read


@torch.no_grad()
def gold_rewards(gold, gold_tok, prompts, responses, args, device):
    """The gold RM's score of each (prompt, response text), built exactly as gen_prefs.py and eval_gold.py
    build it (`rm_input_ids`: the chat format if the gold's tokenizer has a chat template), right-padded."""
    out = []
    for i in range(0, len(prompts), args.gold_batch_size):
        seqs = [
            rm_input_ids(gold_tok, p, r, args.gold_max_length, bool(gold_tok.chat_template))
            for p, r in zip(prompts[i : i + args.gold_batch_size], responses[i : i + args.gold_batch_size])
        ]
        width = max(map(len, seqs))
        ids = torch.tensor([x + [gold_tok.pad_token_id] * (width - len(x)) for x in seqs], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=device)
        out.append(reward_and_features(gold, ids, mask)[0])
    return torch.cat(out)


def on_host(metrics: dict) -> dict:
    """The step's metrics with every tensor among them (0-d, on the device) made a float by ONE device-to-host
    copy for all of them: the step's single host sync for its logged statistics."""
    keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist() if keys else []
    return metrics | dict(zip(keys, values))


def pairwise_agreement(proxy, gold):
    """Proxy RM accuracy vs gold on on-policy pairs: over all pairs within a group whose gold scores
    differ, the fraction where the proxy orders them as the gold does. proxy, gold: (B, K)."""
    dp, dg = proxy.unsqueeze(2) - proxy.unsqueeze(1), gold.unsqueeze(2) - gold.unsqueeze(1)
    upper = torch.triu(torch.ones_like(dg, dtype=torch.bool), diagonal=1) & (dg != 0)
    return ((dp * dg > 0) & upper).sum() / upper.sum().clamp(min=1)  # a 0-d tensor (on_host syncs it)


def load_policies(args, ckpt, tokenizer, dtype):
    """(policy, reference): the policy to train (from the checkpoint on --resume), and the frozen SFT policy that
    the KL is taken to, in `dtype` (bf16 with --bf16)."""
    trust = dict(trust_remote_code=args.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "model") if ckpt else args.policy_path, **trust)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    # the end ids every sampler stops at (`generate` reads them here, `end_ids` too), and the rollouts are cut at
    policy.generation_config.eos_token_id = completion_end_ids(tokenizer, policy.generation_config)
    if args.gradient_checkpointing:  # acts in train mode, which policy_update sets
        policy.gradient_checkpointing_enable()
        policy.disable_input_require_grads()  # a hook for frozen (PEFT) embeddings; torch.compile rejects it
    ref_policy = (
        AutoModelForCausalLM.from_pretrained(args.policy_path, dtype=dtype, **trust).eval().requires_grad_(False)
    )
    return policy, ref_policy


TINY_MODEL_PARAMETERS = 10**7  # the tiny world's models have under a million parameters; a pretrained LM, 100M and more


def learning_rate_warning(model, learning_rate: float, tiny_default: float) -> Optional[str]:
    """A warning for a pretrained model trained at the tiny world's default learning rate, or None. That default is set
    for the world's 2-layer models and moves a real LM far in a few steps (the SmolLM2-135M SFT policy at the RL
    trainer's 2e-4: policy/kl 9.2 after 2 steps, every evaluation completion one token long)."""
    n = sum(p.numel() for p in model.parameters())
    if learning_rate != tiny_default or n < TINY_MODEL_PARAMETERS:
        return None
    return (
        f"warning: --learning-rate {learning_rate:g} is the tiny world's default, set for its models of under "
        f"{TINY_MODEL_PARAMETERS // 10**6}M parameters; this model has {n / 1e6:.0f}M, which that rate moves far in a "
        "few steps. Pass --learning-rate for this model (SmolLM2-135M: 3e-5 for SFT, 1e-6 for RL; Pythia-1B: --preset "
        "paper)"
    )


def check_vocabulary(model, what, tokenizer):
    """Refuse a model that reads the policy's token ids with a smaller vocabulary than the policy tokenizer's."""
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"{what}'s vocabulary ({model.config.vocab_size}) is smaller than the policy tokenizer's "
            f"({len(tokenizer)}): the proxy must share the policy's tokenizer (train it with train_rm.py)"
        )


def load_gold(args, dtype):
    """(gold RM, its tokenizer, right-padded), or (None, None) without --gold-rm-path: it only monitors."""
    if not args.gold_rm_path:
        return None, None
    gold = load_reward_model(args.gold_rm_path, args.trust_remote_code, dtype, "--gold-rm-path")
    gold_tok = AutoTokenizer.from_pretrained(
        args.gold_rm_path, padding_side="right", trust_remote_code=args.trust_remote_code
    )
    gold_tok.pad_token = gold_tok.pad_token or gold_tok.eos_token
    return gold, gold_tok


# ------------------------------------------------------------------------- held-out evaluation
@torch.no_grad()
def heldout_eval(policy, tokenizer, rm, gold, gold_tok, heldout, reference_gold, args, accelerator):
    """The gold reward of the CURRENT policy on fixed held-out prompts, scored as eval_gold.py scores it.

    heldout: {split: (prompts, references)}, the prompts built by `build_prompts`, the same at every call.
    For each split the prompts are split over the processes; each gets ONE completion sampled at
    `args.eval_temperature` by the rollouts' sampler (`sample` or `sample_static`; `sample` under vllm, in chunks of
    `generation_batch_size`), cut after its first EOS and decoded as eval_gold.py decodes it; the gold RM scores
    it (`gold_rewards`) and the proxy `rm` too (`reward_and_features` on the policy's token ids, as the rollouts);
    a completion without EOS gets `args.missing_eos_penalty` for both. A win is gold(policy) > gold(reference),
    strictly. reference_gold caches {split: this process's references' gold scores}: computed at the first call.
    The sampling draws from the generator seeded with seed + rank, afresh for each split (as eval_gold.py seeds
    it), inside `fork_rng`: the training RNG stream is left as it was, so the evaluation does not change the run.
    Returns {"eval/{split}/gold_reward", "eval/{split}/win_rate", "eval/{split}/proxy_reward",
    "eval/{split}/length", "eval/{split}/no_eos_rate"}, over all the split's prompts, on every process."""
    device = accelerator.device
    model, pad_id = accelerator.unwrap_model(policy), tokenizer.pad_token_id
    sampler = sample if args.generation_backend in ("hf", "vllm") else sample_static
    at_eval = replace(args, temperature=args.eval_temperature)
    metrics = {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        for split, (prompts, references) in heldout.items():
            torch.manual_seed(args.seed + accelerator.process_index)
            with accelerator.split_between_processes(list(range(len(prompts)))) as mine:
                mine = list(mine)
            if split not in reference_gold:  # the references do not change: score them once
                refs = [references[i] for i in mine]
                local_prompts = [prompts[i] for i in mine]
                reference_gold[split] = (
                    gold_rewards(gold, gold_tok, local_prompts, refs, args, device).cpu() if mine else torch.zeros(0)
                )
            records = []
            for start in range(0, len(mine), args.generation_batch_size):
                chunk = [prompts[i] for i in mine[start : start + args.generation_batch_size]]
                enc = tokenizer(
                    [as_query(tokenizer, p) for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                generated = sampler(model, enc.input_ids, enc.attention_mask, at_eval, pad_id)
                response, response_mask, has_eos = truncate_after_eos(generated, end_ids(model), pad_id)
                texts = tokenizer.batch_decode(  # as eval_gold.py: the tokens up to the EOS, special ones dropped
                    [r[: int(m.sum())] for r, m in zip(response, response_mask)], skip_special_tokens=True
                )
                gold_score = gold_rewards(gold, gold_tok, chunk, texts, args, device)
                proxy = reward_and_features(
                    rm,
                    torch.cat([enc.input_ids, response], 1),
                    torch.cat([enc.attention_mask, response_mask], 1),
                )[0]
                if args.missing_eos_penalty is not None:  # as eval_gold.py: gold and proxy alike
                    gold_score = torch.where(has_eos, gold_score, args.missing_eos_penalty)
                    proxy = torch.where(has_eos, proxy, args.missing_eos_penalty)
                records += zip(
                    gold_score.tolist(),
                    reference_gold[split][start : start + len(chunk)].tolist(),
                    proxy.tolist(),
                    response_mask.sum(1).tolist(),
                    has_eos.tolist(),
                )
            records = gather_object(records)  # every prompt of the split, from every process
            g, ref, proxy, length, ended = (np.array(column, dtype=np.float64) for column in zip(*records))
            metrics |= {
                f"eval/{split}/gold_reward": float(g.mean()),
                f"eval/{split}/win_rate": float((g > ref).mean()),  # strict, as eval_gold.py
                f"eval/{split}/proxy_reward": float(proxy.mean()),
                f"eval/{split}/length": float(length.mean()),
                f"eval/{split}/no_eos_rate": float(1 - ended.mean()),
            }
    return metrics


# ------------------------------------------------------------------------- run folder and checkpoints
def open_run_dir(args, accelerator):
    """Make `args.output_dir` this run's, on the main process, before anything heavy: refuse a folder that
    holds a run unless --resume or --overwrite; on --resume, refuse arguments that would change the run
    (against its args.json) and keep its run_name; take a lock that this process holds until it exits, so
    a second run (e.g. a resume while orphaned workers of a killed launcher still write) is refused. A folder that
    holds no run (`holds_a_run`: what a start that failed before its first step left) is emptied and reused, said.
    Errors are raised on every process. Returns the lock's open file (keep it referenced)."""
    error, lock, out = None, None, args.output_dir
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            error = f"{out} is in use by a live run (pid {lock.read().strip() or '?'}): stop it first, or pick another --output-dir"
        used = [name for name in os.listdir(out) if name != ".lock"]
        saved = os.path.join(out, "args.json")
        stale = error is None and used and not args.resume and not args.overwrite and not holds_a_run(out)
        if stale:  # emptied below, as --overwrite empties a folder
            print(
                f"[run] {out} holds no run, only what a start that failed before its first step left "
                f"({', '.join(sorted(used))}): starting afresh in it"
            )
        if error is None and used and (args.overwrite or stale):
            for name in used:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        elif error is None and used and not args.resume:
            error = (
                f"{out} already holds a run ({', '.join(sorted(used)[:4])}): pass --resume to continue it, "
                "--overwrite to replace it, or another --output-dir"
            )
        elif error is None and args.resume and os.path.exists(saved):
            with open(saved) as f:
                before = json.load(f)
            now = json.loads(json.dumps(asdict(args) | {"num_processes": args.num_processes}))  # tuples as lists
            changed = {
                k: (before.get(k), v) for k, v in now.items() if k not in RESUME_MAY_CHANGE and before.get(k) != v
            }
            if changed:
                error = f"--resume of {out} with arguments that change the run (was, now): {changed}; resume with the run's own arguments"
            args.run_name = before.get("run_name") or args.run_name
        if error is None:
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
    error, args.run_name = broadcast_object_list([error, args.run_name])
    if error:
        raise ValueError(error)  # said once, by the main process (`input_errors_said_once`)
    return lock


def holds_a_run(out):
    """Whether folder `out` holds a run that a new one must not silently replace: a checkpoint (`latest`,
    checkpoint-*), a final `model`, or a metrics.jsonl row past step 0 (an unreadable row counts as one). Anything
    else (args.json, the step-0 evaluation's row, a wandb folder) is what a start that failed before its first step
    leaves: such a folder holds no run, and the next run into it reuses it."""
    if any(name in ("latest", "model") or name.startswith("checkpoint-") for name in os.listdir(out)):
        return True
    metrics = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(metrics):
        return False
    with open(metrics) as f:
        for line in f:
            try:
                if json.loads(line)["step"] > 0:
                    return True
            except (ValueError, KeyError, TypeError):
                return True
    return False


def save_checkpoint(accelerator, policy, optimizer, step, output_dir):
    """Write checkpoint-{step}.tmp, rename it to checkpoint-{step}, then point `latest` at it (atomic
    rename); older checkpoints are deleted only after that. So at every moment `latest` names a complete
    checkpoint. A leftover checkpoint-{step} of a run killed before it updated `latest` is replaced."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(
        {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        os.path.join(tmp, f"rng_{accelerator.process_index}.pt"),
    )
    optim_state = optimizer.state_dict()  # a collective under some distributed back-ends: every rank calls it
    if accelerator.is_main_process:
        accelerator.unwrap_model(policy).save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
        torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step}, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # not `latest`'s: a leftover of a killed run
        os.replace(tmp, final)
        with open(os.path.join(output_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(output_dir, "latest.tmp"), os.path.join(output_dir, "latest"))
        for name in os.listdir(output_dir):  # keep only the newest checkpoint
            if name.startswith("checkpoint-") and name != os.path.basename(final):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_checkpoint(output_dir):
    """The folder `latest` names, or None when the run was killed before its first checkpoint."""
    latest = os.path.join(output_dir, "latest")
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        return os.path.join(output_dir, f.read().strip())


def restore_checkpoint(accelerator, optimizer, ckpt):
    """Restore the optimiser and this rank's RNG from a checkpoint (the policy was loaded from it)."""
    optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True))
    rng = torch.load(os.path.join(ckpt, f"rng_{accelerator.process_index}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def keep_steps_upto(path, step):
    """Drop the rows of a jsonl log written after `step` (a resumed run writes them again)."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def announce_run(args, heldout, accelerator):
    """The main process prints the batch, the held-out evaluation and the arguments, and writes args.json."""
    if not accelerator.is_main_process:
        return
    print(
        f"[{args.exp_name}] {args.num_processes} process(es) x {args.local_num_prompts} prompts x "
        f"{args.num_generations} completions = {args.batch_size} completions per step, in "
        f"{args.gradient_accumulation_steps} micro-batches of {args.micro_batch_size or 'auto (measured below)'} "
        "per process; "
        f"Dr.GRPO normaliser = {args.batch_size} x {args.max_new_tokens} tokens"
    )
    print(
        f"held-out gold evaluation: the first {args.eval_num_prompts} prompts of {list(heldout)} at temperature "
        f"{args.eval_temperature}, at step 0, every {args.eval_every} steps and at the last"
        if heldout
        else f"held-out gold evaluation: off ({'--eval-every 0' if args.gold_rm_path else 'no --gold-rm-path'})"
    )
    print(json.dumps(asdict(args), indent=1))
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=1)


def seed_everything(args, device):
    """The same seed on every process for the initialisation (sampling reseeds with seed + rank); on a CPU the
    cores shared between the processes (OMP_NUM_THREADS, if set, decides)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cpu":
        torch.set_num_threads(
            int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // args.num_processes)
        )


def checkpoint_step(ckpt):
    """The step a checkpoint was written after (0: no checkpoint, a fresh start)."""
    if not ckpt:
        return 0
    with open(os.path.join(ckpt, "state.json")) as f:
        return json.load(f)["step"]


def start_logs(args, accelerator, num_prompts, start_step, ckpt):
    """On the main process: say where the run starts; cut metrics.jsonl and samples.jsonl at the checkpoint (a
    resumed run writes the steps after it again; without one, all); start wandb with --track."""
    if not accelerator.is_main_process:
        return
    print(
        f"{num_prompts} prompts from {args.dataset}[{args.dataset_split}]; starting at step {start_step + 1} "
        f"of {args.total_steps}{' (resumed from ' + ckpt + ')' if ckpt else ''}; writing to {args.output_dir}"
    )
    for name in ("metrics.jsonl", "samples.jsonl"):
        keep_steps_upto(os.path.join(args.output_dir, name), start_step if ckpt else -1)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            config=asdict(args),
            name=args.run_name,
            id=args.run_name,  # a resumed run keeps its name, so it continues the same wandb run
            resume="allow",
            dir=args.output_dir,
            save_code=True,
        )


def write_logs(args, accelerator, metrics, samples=None):
    """On the main process: a step's metrics to metrics.jsonl, its completions (if logged) to samples.jsonl, both
    to wandb with --track."""
    if not accelerator.is_main_process:
        return
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if samples:
        with open(os.path.join(args.output_dir, "samples.jsonl"), "a") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    if args.track:
        import wandb

        wandb.log(metrics, step=metrics["step"])
        if samples:
            table = wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])
            wandb.log({"samples": table}, step=metrics["step"])


def advantage_activity(advantages, start):
    """How much a method changes the update's signal (logged so that a knob can be shown to act): the spread of its
    advantages (population std) and sum |A - A0| / sum |A0|, with A0 = `start`, the advantage the method starts from
    (Dr.GRPO's, eq. 4, or, under --advantage grpo|reinforce, that form's), so 0 where the method changes nothing.
    advantages, start: (B, K), the global batch."""
    change = (advantages - start).abs().sum() / start.abs().sum().clamp(min=torch.finfo(start.dtype).tiny)
    return {"adv/std": advantages.std(correction=0), "adv/relative_change": change}


def save_final(args, accelerator, policy, tokenizer):
    """The final policy and its tokenizer in {output_dir}/model, for eval_gold.py (atomic: written next to its
    place, then renamed)."""
    if accelerator.is_main_process:
        final, tmp = os.path.join(args.output_dir, "model"), os.path.join(args.output_dir, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(policy).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        print(f"saved the policy to {final}; metrics in {os.path.join(args.output_dir, 'metrics.jsonl')}")
    accelerator.wait_for_everyone()


def finish(accelerator, run_lock):
    """Stop the vLLM engine (if any), the trackers and the process group, then let the run folder go (its lock)."""
    if "llm" in VLLM_ENGINE:  # before the process group goes: the engine tears down its own groups
        VLLM_ENGINE.pop("llm").llm_engine.engine_core.shutdown()
    accelerator.end_training()  # stops the trackers, destroys the process group
    if run_lock is not None:  # None on the other processes
        run_lock.close()
    if accelerator.num_processes > 1 and not accelerator.is_main_process and accelerator.device.type == "cpu":
        # all is written; a gloo worker of torch 2.13 can still abort in its C++ teardown at interpreter exit
        # ("terminate called without an active exception", exit -6, seen twice in CI runs): leave without it
        print(end="", flush=True)
        os._exit(0)


# ------------------------------------------------------------------------- sampling
VLLM_ENGINE = {}  # --generation-backend vllm: this process's engine, made at the first rollouts (sample_vllm)


def prompt_indices(step, num_prompts, per_step, seed):
    """The dataset rows of a step: consecutive slices of a fresh permutation every epoch. A function of
    its arguments alone, so a resumed run sees exactly the prompts an uninterrupted one would have."""
    positions = range((step - 1) * per_step, step * per_step)
    perms = {
        epoch: torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for epoch in {pos // num_prompts for pos in positions}
    }
    return [perms[pos // num_prompts][pos % num_prompts].item() for pos in positions]


def in_chunks(fn, size, *tensors):
    """fn over slices of `size` rows, outputs concatenated (bounds the memory of no-grad forwards)."""
    outs = [fn(*(t[i : i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    return tuple(torch.cat(o) for o in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


def rollouts(policy, query, query_mask, args, pad_id):
    """Step 1's sampling: a completion of every row of `query`, by --generation-backend (`sample`, `sample_static` or
    `sample_vllm`: the same distribution), --generation-batch-size rows at a time (vLLM: all at once, it batches them
    itself); padded to max_new_tokens."""
    if args.generation_backend == "vllm":
        return sample_vllm(policy, query, query_mask, args, pad_id)
    sampler = sample if args.generation_backend == "hf" else sample_static
    return in_chunks(lambda q, m: sampler(policy, q, m, args, pad_id), args.generation_batch_size, query, query_mask)


@torch.no_grad()
def sample(policy, query, query_mask, args, pad_id):
    """K completions of temperature `args.temperature` (pure sampling: no top-k, no top-p), padded to
    `max_new_tokens` (generate stops early when every row has finished)."""
    out = policy.generate(
        input_ids=query,
        attention_mask=query_mask,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=pad_id,
    )
    return F.pad(out[:, query.shape[1] :], (0, args.max_new_tokens - (out.shape[1] - query.shape[1])), value=pad_id)


def end_ids(policy) -> list:
    """The ids `generate` stops at: the EOS of `policy.generation_config`, one id or a list of them (`load_policies`
    sets them to `completion_end_ids`)."""
    eos = policy.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def sample_static(policy, query, query_mask, args, pad_id, _compiled={}):
    """What `sample` returns, from a sampling loop of our own over the model's forward with a static KV cache:
    the logits of every step are softmax-sampled at `args.temperature` (no top-k, no top-p), a finished row
    gets `pad_id` after its EOS (the EOS of `policy.generation_config`, as `generate`), and the loop stops
    when every row has finished. The cache and the inputs of a decoding step keep one shape for the whole
    loop (the prompt is left-padded to a multiple of 64), so with `args.generation_backend == "compiled"` the
    step is replayed as a CUDA graph instead of launching hundreds of small kernels per token: the overhead
    that bounds `generate`."""
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    from transformers import StaticCache

    eos = torch.tensor(end_ids(policy), device=query.device)
    extra = -query.shape[1] % 64  # fixed shapes per 64-token bucket: few recompilations under `compiled`
    query, query_mask = F.pad(query, (extra, 0), value=pad_id), F.pad(query_mask, (extra, 0), value=0)
    (n, width), T = query.shape, args.max_new_tokens
    step, cache = policy.forward, None
    if args.generation_backend == "compiled":  # one compiled step and one cache per policy, reused: the graph reads
        # the cache and the weights (updated in place by the optimiser) at fixed addresses
        held = _compiled.setdefault(id(policy), {})
        if "step" not in held:
            held["step"] = torch.compile(policy.forward, mode="reduce-overhead", fullgraph=True)
        if held.get("shape") != (n, width + T):
            held["shape"], held["cache"] = (n, width + T), StaticCache(config=policy.config, max_cache_len=width + T)
        step, cache = held["step"], held["cache"]
        cache.reset()
    cache = cache or StaticCache(config=policy.config, max_cache_len=width + T)
    # transformers renamed `past_key_values` to `cache` in 5.x; pass the name this model's forward takes
    name = "cache" if "cache" in inspect.signature(type(policy).forward).parameters else "past_key_values"
    mask = torch.cat([query_mask, query_mask.new_ones(n, T)], 1)  # one shape; causality hides the future columns
    logits = policy(
        input_ids=query,
        attention_mask=mask[:, :width],
        position_ids=position_ids_of(query_mask),
        use_cache=True,
        logits_to_keep=1,
        **{name: cache},
    ).logits
    out = query.new_full((n, T), pad_id)
    unfinished = torch.ones(n, dtype=torch.bool, device=query.device)
    position = query_mask.sum(1, keepdim=True)  # the position of the first new token (left padding skipped)
    for t in range(T):
        probs = torch.softmax(logits[:, -1].to(torch.float32, copy=True) / args.temperature, -1)
        token = torch.multinomial(probs, 1).squeeze(1).masked_fill(~unfinished, pad_id)
        out[:, t] = token
        unfinished &= ~torch.isin(token, eos)
        if t == T - 1 or not unfinished.any():
            break
        logits = step(
            input_ids=token.unsqueeze(1),
            attention_mask=mask,
            position_ids=position + t,
            use_cache=True,
            **{name: cache},
        ).logits
    return out


@torch.no_grad()
def sample_vllm(policy, query, query_mask, args, pad_id):
    """What `sample` returns, from a vLLM engine that lives in this process beside the policy (colocated, as TRL's
    `vllm_mode="colocate"`): made at the first call from --policy-path, its seeding kept off the training's random
    stream; then, at every call, the policy's current weights are pushed into it (`push_weights`: so it samples from
    the policy after the last update, and from the checkpoint of a resumed run), and each row of `query` (its left
    padding dropped) gets one completion at `args.temperature` (no top-k, no top-p), stopped by the EOS ids of
    `policy.generation_config` as `generate` stops, padded with `pad_id`. The log-probs of the loss are still the
    policy's own (step 4). One engine per process (each takes its share of the prompts, as under `hf`)."""
    if "llm" not in VLLM_ENGINE:
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(
                "--generation-backend vllm needs vLLM, which is not installed here: it lives in a virtual environment "
                "of its own (`bash tools/install_vllm.sh VENV`, requirements-vllm.txt; CPU or GPU): run this script "
                "with VENV/bin/python, or use --generation-backend hf"
            ) from e
        if "MASTER_PORT" not in os.environ:  # a plain `python` run: vLLM forms a process group of its own, of one
            with contextlib.closing(socket.socket()) as s:  # on a free port (two runs side by side must not collide)
                s.bind(("127.0.0.1", 0))
                os.environ |= dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        for name in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(name, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        with torch.random.fork_rng(devices=[query.device] if query.device.type == "cuda" else []):
            VLLM_ENGINE["llm"] = LLM(
                model=args.policy_path,
                seed=args.seed + int(os.environ["RANK"]),
                dtype="bfloat16" if args.bf16 else "float32",
                max_model_len=args.max_prompt_length + args.max_new_tokens,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                distributed_executor_backend="external_launcher",  # the engine in this process, not a spawned one
                trust_remote_code=args.trust_remote_code,
            )
    from vllm import SamplingParams

    llm = VLLM_ENGINE["llm"]
    push_weights(llm, policy)
    params = SamplingParams(
        n=1,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_tokens=args.max_new_tokens,
        ignore_eos=True,  # vLLM's own EOS set (the tokenizer's and the generation config's) is replaced by ...
        stop_token_ids=end_ids(policy),  # ... the ones `generate` stops at
    )
    requests = [{"prompt_token_ids": q[m.bool()].tolist()} for q, m in zip(query, query_mask)]
    out = query.new_full((len(requests), args.max_new_tokens), pad_id)
    for i, request in enumerate(llm.generate(requests, params, use_tqdm=False)):
        tokens = list(request.outputs[0].token_ids)
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=out.dtype)
    return out


def push_weights(llm, policy):
    """Copy the policy's weights into the vLLM engine (in place, in its own layout), then drop its prefix cache,
    which holds keys and values of the old weights. vLLM 0.32 on a CPU packs the LM head for its GEMM when it loads
    the model and does not repack it when an embedding tied to it is reloaded: the head is repacked here."""
    worker = llm.llm_engine.model_executor.driver_worker.worker
    worker.reload_weights(weights_iterator=((n, p.detach()) for n, p in policy.named_parameters()))
    engine_model = worker.model_runner.get_model()
    head = getattr(engine_model, "lm_head", None)
    if policy.config.tie_word_embeddings and hasattr(
        getattr(head, "quant_method", None), "process_weights_after_loading"
    ):
        head.quant_method.process_weights_after_loading(head)
    llm.reset_prefix_cache()


# ------------------------------------------------------------------------- update
CPU_MICRO_BATCH = 32  # --micro-batch-size 0 on a CPU: the largest divisor of the per-process batch up to this


def fit_micro_batch(local_batch, fixed_bytes, per_completion_bytes, budget_bytes):
    """The largest divisor d of `local_batch` with fixed + d x per_completion <= budget (1 if none fits)."""
    fits = [d for d in range(1, local_batch + 1) if local_batch % d == 0]
    return max([d for d in fits if fixed_bytes + d * per_completion_bytes <= budget_bytes], default=1)


def probe_update_memory(policy, length, args, device):
    """(fixed, per-completion) bytes of the update's peak GPU memory: one forward/backward of `response_logprobs`
    at the longest sequence (`length` tokens, the last max_new_tokens the response) with 1 and with 2 completions,
    as the update runs it (train mode, bf16 autocast if --bf16, gradient checkpointing if on); the gradients it
    leaves are dropped."""
    peaks, T = [], args.max_new_tokens
    policy.train()
    for b in (1, 2):
        policy.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.ones(b, length, dtype=torch.long, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16):
            lp = response_logprobs(policy, ids[:, :-T], torch.ones_like(ids[:, :-T]), ids[:, -T:], ids[:, -T:], 1.0)
        lp.sum().backward()
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    policy.zero_grad(set_to_none=True)
    policy.eval()
    per = max(peaks[1] - peaks[0], 1)
    return peaks[0] - per, per


def measured_micro_batch(policy, local_batch, length, args, device):
    """--micro-batch-size 0 on a GPU: (the largest divisor of `local_batch` whose update fits, (fixed, per-completion,
    budget) bytes). The budget: 90% of the GPU less what is allocated and AdamW's two fp32 moments (not allocated yet)."""
    fixed, per = probe_update_memory(policy, length, args, device)
    budget = 0.9 * torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
    budget -= 8 * sum(p.numel() for p in policy.parameters())
    return fit_micro_batch(local_batch, fixed, per, budget), (fixed, per, budget)


def auto_micro_batch(args, policy, accelerator):
    """--micro-batch-size 0 on a GPU: the largest divisor of the per-process batch whose update fits (measured at
    the longest sequence), the smallest over the processes (DDP's steps must match); printed and saved in args.json."""
    device = accelerator.device
    policy.to(device)
    length = args.max_prompt_length + args.max_new_tokens
    fits, (fixed, per, budget) = measured_micro_batch(policy, args.local_batch_size, length, args, device)
    mine = torch.tensor([fits], device=device)
    args.micro_batch_size = int(accelerator.gather(mine).min())  # one split on every process (DDP's steps)
    args.gradient_accumulation_steps = args.local_batch_size // args.micro_batch_size
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
    if accelerator.is_main_process:
        print(
            f"--micro-batch-size 0 (auto): {args.micro_batch_size}, {args.gradient_accumulation_steps} micro-batches "
            f"per process (measured: {fixed / 2**30:.2f} GiB + {per / 2**30:.3f} GiB per completion of "
            f"{length} tokens; budget {budget / 2**30:.1f} GiB)"
        )
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)


def policy_update(accelerator, policy, optimizer, batch, args):
    """Step 4: `num_ppo_epochs` optimiser steps on this process's rollouts. Every micro-batch's loss is
    its token sum over (micro_batch_size x max_new_tokens); accelerate divides it by the accumulation
    steps and DDP averages over processes, so the step follows the gradient of
    sum over ALL tokens / (completions per step x max_new_tokens): the Dr.GRPO constant normaliser,
    the same however the batch is split over processes and micro-batches.
    The policy is in train mode here only (gradient checkpointing acts in train mode; generation wants
    eval mode and its KV cache). Nothing here waits for the device (no `.item()`: a GPU runs ahead of Python
    through all the micro-batches). Returns this process's stats, as tensors on the device: `loss` (the Dr.GRPO
    loss of its rollouts, averaged over epochs), `seq_kl` (N,) and the k3 sum and token count of the first
    epoch, `grad_norm` (before clipping, of the last optimiser step)."""
    mbs, n = args.micro_batch_size, batch["response"].shape[0]
    sums = torch.zeros(4, device=batch["response"].device)  # loss, k3 sum, tokens, grad norm
    seq_kl = []
    policy.train()
    for epoch in range(args.num_ppo_epochs):
        for s in range(0, n, mbs):
            mb = {k: v[s : s + mbs] for k, v in batch.items()}
            with accelerator.accumulate(policy):
                lp = response_logprobs(
                    policy, mb["query"], mb["query_mask"], mb["response"], mb["response_mask"], args.temperature
                )
                old_lp = mb["old_logprobs"] if args.num_ppo_epochs > 1 else lp.detach()  # 1 epoch: ratio = 1
                loss, kl = dr_grpo_loss(
                    lp,
                    old_lp,
                    mb["ref_logprobs"],
                    mb["advantages"],
                    mb["response_mask"],
                    args.clip_range,
                    args.kl_coef,
                    normalizer=mbs * args.max_new_tokens,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    sums[3] = math.nan if norm is None else norm  # None: DeepSpeed clips inside its step
                optimizer.step()
                optimizer.zero_grad()
            if epoch == 0:  # KL(pi || pi_ref) of the rollouts, per sequence (k1, summed over tokens)
                seq_kl.append(((lp.detach() - mb["ref_logprobs"]) * mb["response_mask"]).sum(1))
                tokens = mb["response_mask"].sum()
                sums[1:3] += torch.stack([kl.detach() * tokens, tokens])
            sums[0] += loss.detach() * (mbs / (n * args.num_ppo_epochs))  # the loss of the whole local batch
    policy.eval()
    loss, k3_sum, tokens, grad_norm = sums  # 0-d tensors: the caller syncs them once, with its other metrics
    return {"loss": loss, "seq_kl": torch.cat(seq_kl), "k3_sum": k3_sum, "tokens": tokens, "grad_norm": grad_norm}


if __name__ == "__main__":
    main()
