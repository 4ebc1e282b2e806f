"""BSPO: behaviour-supported policy optimisation (Dai et al. 2025) in the critic-free adaptation the
SignCert-PO paper compares against, as Dr.GRPO with out-of-support completions sent to the minimum
return. A copy of grpo_signcert.py in which only the reward/advantage section differs
(`diff grpo_signcert.py grpo_bspo.py` shows the method).

    python train_rm.py --lm-coef 1.0 --output-dir runs/tiny_world/rm_bspo   # the ScoreLM: RM + behaviour LM
    accelerate launch grpo_bspo.py --support-threshold 1e-4                   # the tiny world
    accelerate launch --config_file configs/ddp_8gpu.yaml grpo_bspo.py --preset paper \
        --policy-path <sft> --reward-model-path <rm trained with --lm-coef>  # Pythia-1B on TL;DR, 8 GPUs

The proxy RM is trained as a ScoreLM: the Bradley-Terry loss plus alpha times the next-token loss of an
LM head on the same backbone, on the RM's training responses (`train_rm.py --lm-coef alpha`), so the LM
head estimates the behaviour distribution beta of the responses the RM was trained on; it is saved as
the causal LM `behavior_lm/` inside the RM folder. For each completion y of prompt x:

    out_j  = any t: beta(y_t | x, y_<t) < eps_beta      (response tokens, EOS included; temperature 1)
    r~_j   = r_min if out_j else r_j                     r_min = the smallest proxy reward of the GLOBAL batch
    A_j    = r~_j - mean_k r~_k                          eq. (4), Dr.GRPO advantage

One training step: 1. rollouts, 2. scoring (the proxy reward), 3. the behaviour LM's token
probabilities, the support mask and Dr.GRPO advantages, 4. the Dr.GRPO update, all as in grpo_signcert.py.

Choices (ours; BSPO is PPO with a critic in Dai et al., whose value of an out-of-support action is the
minimum value; docs/METHOD.md): the minimum return is the smallest proxy reward of the global batch
(after the missing-EOS penalty): it lives on the RM's scale with no constant to tune, is never above an
in-support completion's reward, so an out-of-support completion never gets a positive advantage unless
its group is all out of support (then all its advantages are 0). eps_beta defaults to 1e-4. The
behaviour LM must read the policy's tokens (same vocabulary). Logged: `bspo/out_of_support_rate`,
`bspo/reward` (mean reward after the substitution), `bspo/min_return`.
"""

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

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
    policy_path: str = "runs/tiny_world/sft"
    """the SFT policy to optimise (a causal LM); it is also the frozen reference policy of the KL"""
    reward_model_path: str = "runs/tiny_world/rm_bspo"
    """the proxy RM trained as a ScoreLM (`train_rm.py --lm-coef alpha`): a *ForSequenceClassification with a
    linear `score` head, one output, and the behaviour LM in its subfolder behavior_lm/"""
    gold_rm_path: Optional[str] = "runs/tiny_world/gold_rm"
    """the gold reward model, for monitoring only (never in the update); None to skip"""
    dataset: str = "runs/tiny_world/data"
    """prompts: a hub id or a local folder/file (jsonl, parquet, save_to_disk); TL;DR or AlpacaFarm columns"""
    dataset_config: Optional[str] = None
    """the hub dataset's config name (AlpacaFarm: `alpaca_instructions`)"""
    dataset_split: str = "train"
    """the split whose prompts are trained on"""
    support_threshold: float = 1e-4
    """eps_beta in (0, 1): a completion with a response token of behaviour probability below it is out of support (our choice: 1e-4)"""
    kl_coef: float = 0.01
    """beta, the weight of the k3 KL to the reference policy in the loss"""
    learning_rate: float = 2e-4
    """the learning rate (constant; paper: 1e-6)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    total_steps: int = 300
    """the number of optimiser steps (paper: 2000)"""
    num_prompts_per_step: int = 16
    """prompts per optimiser step, over all processes (paper: 32)"""
    num_generations: int = 8
    """K, completions per prompt (paper: 8)"""
    micro_batch_size: int = 32
    """completions per forward/backward on one device (paper: 2)"""
    num_ppo_epochs: int = 1
    """optimiser steps on each batch of rollouts (1: the ratio is 1 and the PPO clip is inert, as in the paper)"""
    clip_range: float = 0.2
    """the PPO clip range of the ratio"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    max_new_tokens: int = 24
    """the maximum completion length, also the constant of the Dr.GRPO normaliser (paper: 53)"""
    max_prompt_length: int = 128
    """prompts longer than this are truncated in the POST, at a word boundary (paper: 512)"""
    missing_eos_penalty: Optional[float] = -1.0
    """the proxy reward of a completion with no EOS (None: score it as is)"""
    generation_batch_size: int = 128
    """completions generated at once on one device"""
    bf16: bool = False
    """bf16 mixed precision (GPU); the reference and reward models are then held in bf16"""
    gradient_checkpointing: bool = False
    """trade compute for memory in the policy's backward"""
    log_samples_every: int = 25
    """write a table of sample completions every this many steps"""
    save_every: int = 50
    """write a checkpoint every this many steps (atomically; `--resume` continues from the last one)"""
    resume: bool = False
    """continue the run in `--output-dir` from its last checkpoint (policy, optimiser, RNG, step)"""
    output_dir: Optional[str] = None
    """where everything goes (default: runs/{run_name})"""
    trust_remote_code: bool = False
    """allow models whose code lives on the hub (off: only transformers' own architectures)"""

    # to be filled in runtime
    num_processes: int = 0
    """the number of processes (GPUs)"""
    local_num_prompts: int = 0
    """prompts per step on one process"""
    local_batch_size: int = 0
    """completions per step on one process"""
    batch_size: int = 0
    """completions per step over all processes"""
    gradient_accumulation_steps: int = 0
    """micro-batches per optimiser step on one process"""


PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        policy_path="runs/paper/sft",
        reward_model_path="runs/paper/rm_bspo",
        gold_rm_path=None,
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        learning_rate=1e-6,
        total_steps=2000,
        num_prompts_per_step=32,
        micro_batch_size=2,
        max_new_tokens=53,
        max_prompt_length=512,
        generation_batch_size=64,
        bf16=True,
        gradient_checkpointing=True,
        log_samples_every=50,
        save_every=100,
    ),
}


def exact_div(a, b, what):
    if a % b != 0:
        valid = [d for d in range(1, a + 1) if a % d == 0]
        raise ValueError(f"{what}: {a} is not divisible by {b}; valid divisors of {a}: {valid}")
    return a // b


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
def bspo_rewards(rewards, behavior_logprobs, mask, threshold, gather=lambda t: t):
    """BSPO's critic-free reward: a completion with any response token whose behaviour probability is below
    `threshold` is out of support and gets the minimum return, the smallest reward of the global batch.

    rewards: (N,) proxy rewards; behavior_logprobs: (N, T) log beta(y_t | x, y_<t) of every response token;
    mask: (N, T) 1 on the real response tokens; threshold: eps_beta in (0, 1).
    gather: maps this process's rewards to the global batch's (e.g. accelerator.gather); the identity on one.
    Returns (rewards (N,), out_of_support (N,) bool, the minimum return (0-d)), without gradient.
    """
    if rewards.ndim != 1 or behavior_logprobs.shape != mask.shape or mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"need rewards (N,), behavior_logprobs and mask (N, T), got {tuple(rewards.shape)}, "
            f"{tuple(behavior_logprobs.shape)} and {tuple(mask.shape)}"
        )
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"the support threshold eps_beta must lie in (0, 1), got {threshold}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite: found NaN or inf (check the reward model's outputs)")
    out = ((behavior_logprobs < math.log(threshold)) & mask.bool()).any(1)
    floor = gather(rewards).min()
    return torch.where(out, floor, rewards), out, floor


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
    if path.suffix in (".jsonl", ".json"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def load_split(dataset: str, split: str, config: Optional[str] = None) -> list[dict]:
    """Rows of one split from a hub id or a local path (folder of {split}.jsonl/.parquet, one file, or save_to_disk)."""
    path = Path(dataset)
    if path.is_file():
        return read_rows(path)
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.parquet", f"{split}.json"):
            if (path / name).is_file():
                return read_rows(path / name)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{dataset} has splits {list(data)}, not {split!r}: pass one of them")
                data = data[split]
            return data.to_list()
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{dataset} has no {split}.jsonl, {split}.parquet or save_to_disk data (found: {found})"
        )
    # a path-looking string that does not exist is a mistake, not a hub id
    if dataset.startswith((".", "/", "~")) or dataset.count("/") != 1 or path.suffix in (".jsonl", ".parquet", ".json"):
        raise FileNotFoundError(
            f"dataset {dataset!r} does not exist (run `python tiny_world.py` for the tiny world, or pass --dataset)"
        )
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split).to_list()
    except Exception as e:
        raise RuntimeError(f"could not load {dataset!r} (config {config}, split {split}) from the hub: {e}") from e


def detect_format(rows: list[dict], where: str) -> str:
    columns = set(rows[0]) if rows else set()
    if set(TLDR_COLUMNS) <= columns:
        return "tldr"
    if set(ALPACA_COLUMNS) <= columns:
        return "alpaca"
    raise ValueError(
        f"{where} has columns {sorted(columns)}; need the TL;DR columns {list(TLDR_COLUMNS)} or the AlpacaFarm columns {list(ALPACA_COLUMNS)}"
    )


def fit_prompt(build, text: str, tokenizer, max_len: int) -> str:
    """build(text) -> prompt; cut `text` at a whitespace boundary until the prompt has <= max_len tokens."""
    while True:
        prompt = build(text)
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        if n <= max_len:
            return prompt
        if not text:
            raise ValueError(
                f"prompt is {n} tokens even with an empty post/input; raise --max-prompt-length (now {max_len})"
            )
        # jump close to the budget in one step, then back off to the previous whitespace
        cut = min(len(text) - 1, int(len(text) * max_len / n))
        space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
        text = text[: max(space, 0)].rstrip()


def build_prompts(rows, tokenizer, max_prompt_length, where):
    """Prompt strings: the OpenAI TL;DR format (POST cut at a word to fit) or the Alpaca format."""
    fmt = detect_format(rows, where)
    if fmt == "tldr":
        return [
            fit_prompt(
                lambda post, r=r: f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {post}\n\nTL;DR:",
                r["post"].strip(),
                tokenizer,
                max_prompt_length,
            )
            for r in rows
        ]
    return [
        fit_prompt(
            lambda inp, r=r: ALPACA_PROMPT_INPUT.format(instruction=r["instruction"], input=inp),
            r["input"],
            tokenizer,
            max_prompt_length,
        )
        if r["input"]
        else ALPACA_PROMPT_NO_INPUT.format(instruction=r["instruction"])
        for r in rows
    ]


# ------------------------------------------------------------------------- models
def load_reward_model(path, dtype, trust_remote_code):
    """A reward model for SignCert-PO: it must end in a linear `score` head with one output."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise ValueError(
            f"{path} is not a reward model (its config says architectures={config.architectures}); "
            "SignCert-PO needs a *ForSequenceClassification with a linear `score` head: train one with train_rm.py"
        )
    rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    head = getattr(rm, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(
            f"{path}: SignCert-PO needs a reward model whose last layer is a linear head `score` with "
            f"one output (a *ForSequenceClassification with num_labels=1), got {head!r}"
        )
    return rm.eval().requires_grad_(False)


def position_ids_of(mask):
    """Positions that skip the left padding, so a padded prompt is seen exactly as an unpadded one."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def response_logprobs(model, query, query_mask, response, response_mask, temperature):
    """log pi(y_t | x, y_<t) of every response token: (N, T)."""
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_of(mask)).logits
    logits = logits[:, query.shape[1] - 1 : -1].float() / temperature
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
    reward = F.linear(h, rm.score.weight.float(), bias).squeeze(-1)
    return reward - getattr(rm.config, "reward_offset", 0.0), h


def truncate_after_eos(response, eos_id, pad_id):
    """Keep each completion up to and including its first EOS; the tokens after it become `pad_id`.
    Returns (response, mask (1 on the kept tokens), has_eos (N,) bool)."""
    is_eos = response == eos_id
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), response.shape[1])
    mask = torch.arange(response.shape[1], device=response.device).unsqueeze(0) <= first.unsqueeze(1)
    return response.masked_fill(~mask, pad_id), mask.long(), has_eos


@torch.no_grad()
def gold_rewards(gold, gold_tok, prompts, responses, has_eos, device, batch_size=64):
    """The gold RM's score of each completion, through its own tokenizer: the chat format if it has a
    chat template (Skywork), else prompt ids + response ids + EOS (the convention of the stage scripts)."""
    seqs = []
    for p, r, e in zip(prompts, responses, has_eos):
        if gold_tok.chat_template:
            text = gold_tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            seqs.append(gold_tok(text, add_special_tokens=False).input_ids)
        else:
            ids = gold_tok(p, add_special_tokens=False).input_ids + gold_tok(r, add_special_tokens=False).input_ids
            seqs.append(ids + [gold_tok.eos_token_id] * int(e))
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([s + [gold_tok.pad_token_id] * (width - len(s)) for s in chunk], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
        out.append(reward_and_features(gold, ids, mask)[0])
    return torch.cat(out)


def pairwise_agreement(proxy, gold):
    """Proxy RM accuracy vs gold on on-policy pairs: over all pairs within a group whose gold scores
    differ, the fraction where the proxy orders them as the gold does. proxy, gold: (B, K)."""
    dp, dg = proxy.unsqueeze(2) - proxy.unsqueeze(1), gold.unsqueeze(2) - gold.unsqueeze(1)
    upper = torch.triu(torch.ones_like(dg, dtype=torch.bool), diagonal=1) & (dg != 0)
    return ((dp * dg > 0) & upper).sum().item() / max(upper.sum().item(), 1)


# ------------------------------------------------------------------------- checkpoints
def save_checkpoint(accelerator, policy, optimizer, step, output_dir):
    """Write checkpoint-{step} next to the old one, then point `latest` at it (atomic rename), so a
    run killed at any moment leaves a complete checkpoint behind."""
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
        os.replace(tmp, final)
        with open(os.path.join(output_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(output_dir, "latest.tmp"), os.path.join(output_dir, "latest"))
        for name in os.listdir(output_dir):  # keep only the newest checkpoint
            if name.startswith("checkpoint-") and name != os.path.basename(final):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    accelerator.wait_for_everyone()


def restore_checkpoint(accelerator, optimizer, ckpt):
    """Restore the optimiser and this rank's RNG from a checkpoint (the policy was loaded from it)."""
    optimizer.load_state_dict(torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True))
    rng = torch.load(os.path.join(ckpt, f"rng_{accelerator.process_index}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])


def prompt_indices(step, num_prompts, per_step, seed, _perms={}):
    """The dataset rows of a step: consecutive slices of a fresh permutation every epoch. A function of
    the step alone, so a resumed run sees exactly the prompts an uninterrupted one would have."""
    out = []
    for pos in range((step - 1) * per_step, step * per_step):
        epoch, k = divmod(pos, num_prompts)
        if epoch not in _perms:
            _perms[epoch] = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(_perms[epoch][k].item())
    return out


def in_chunks(fn, size, *tensors):
    """fn over slices of `size` rows, outputs concatenated (bounds the memory of no-grad forwards)."""
    outs = [fn(*(t[i : i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    return tuple(torch.cat(o) for o in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


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


def policy_update(accelerator, policy, optimizer, batch, args):
    """Step 4: `num_ppo_epochs` optimiser steps on this process's rollouts. Every micro-batch's loss is
    its token sum over (micro_batch_size x max_new_tokens); accelerate divides it by the accumulation
    steps and DDP averages over processes, so the step follows the gradient of
    sum over ALL tokens / (completions per step x max_new_tokens): the Dr.GRPO constant normaliser,
    the same however the batch is split over processes and micro-batches."""
    mbs, stats = args.micro_batch_size, {"loss": 0.0, "kl_k3": 0.0, "seq_kl": []}
    for epoch in range(args.num_ppo_epochs):
        for s in range(0, batch["response"].shape[0], mbs):
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
                    accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if epoch == 0:  # KL(pi || pi_ref) of the rollouts, per sequence (k1, summed over tokens)
                stats["seq_kl"].append(((lp.detach() - mb["ref_logprobs"]) * mb["response_mask"]).sum(1))
                stats["kl_k3"] += kl.item() * mbs / batch["response"].shape[0]
            stats["loss"] += loss.item() / args.num_ppo_epochs
    stats["seq_kl"] = torch.cat(stats["seq_kl"])
    return stats


if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=PRESETS)
    args = tyro.cli(Args, default=PRESETS[pre.parse_known_args()[0].preset])
    if not 0.0 < args.support_threshold < 1.0:
        raise ValueError(f"--support-threshold (eps_beta) must lie in (0, 1), got {args.support_threshold}")
    behavior_lm_path = os.path.join(args.reward_model_path, "behavior_lm")
    if os.path.isdir(args.reward_model_path) and not os.path.exists(os.path.join(behavior_lm_path, "config.json")):
        raise FileNotFoundError(
            f"{args.reward_model_path} has no behaviour LM ({behavior_lm_path}): BSPO needs the RM trained as a "
            "ScoreLM: train it with `train_rm.py --lm-coef 1.0 --output-dir <rm>`"
        )
    for name in ("policy_path", "reward_model_path", "gold_rm_path"):
        path = getattr(args, name)
        if path and path.startswith(("runs/", ".", "/")) and not os.path.exists(path):
            raise FileNotFoundError(
                f"--{name.replace('_', '-')} {path} does not exist: build the tiny world and its "
                "stages first (python pipeline.py), or give the path of your own model"
            )

    # batch arithmetic, checked before anything heavy is loaded
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()  # then `accelerate launch --multi_gpu` runs CPU processes (gloo)
    args.num_processes = PartialState(cpu=on_cpu).num_processes
    args.local_num_prompts = exact_div(
        args.num_prompts_per_step, args.num_processes, "--num-prompts-per-step over the processes"
    )
    args.local_batch_size = args.local_num_prompts * args.num_generations
    args.batch_size = args.num_prompts_per_step * args.num_generations
    args.gradient_accumulation_steps = exact_div(
        args.local_batch_size,
        args.micro_batch_size,
        "completions per process (--num-prompts-per-step x --num-generations / processes) over --micro-batch-size",
    )
    rows = load_split(args.dataset, args.dataset_split, args.dataset_config)  # fails early on a wrong path
    accelerator = Accelerator(
        cpu=on_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "no",
    )
    device, rank = accelerator.device, accelerator.process_index
    run_name = broadcast_object_list([f"{args.exp_name}__{args.seed}__{int(time.time())}"])[0]
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        print(
            f"[{args.exp_name}] {args.num_processes} process(es) x {args.local_num_prompts} prompts x "
            f"{args.num_generations} completions = {args.batch_size} completions per step, in "
            f"{args.gradient_accumulation_steps} micro-batches of {args.micro_batch_size} per process; "
            f"Dr.GRPO normaliser = {args.batch_size} x {args.max_new_tokens} tokens"
        )
        print(json.dumps(asdict(args), indent=1))
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cpu":  # share the cores between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.num_processes))

    # models: the policy (trained), its frozen copy (KL reference), the proxy RM and, to monitor, the gold RM
    start_step, ckpt = 0, None
    if args.resume:
        latest = os.path.join(args.output_dir, "latest")
        if not os.path.exists(latest):
            raise FileNotFoundError(f"--resume: no checkpoint in {args.output_dir} (it has no `latest` file)")
        with open(latest) as f:
            ckpt = os.path.join(args.output_dir, f.read().strip())
        with open(os.path.join(ckpt, "state.json")) as f:
            start_step = json.load(f)["step"]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    trust = dict(trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path, padding_side="left", **trust)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    eos_id = tokenizer.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "model") if ckpt else args.policy_path, **trust)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    ref_policy = (
        AutoModelForCausalLM.from_pretrained(args.policy_path, dtype=dtype, **trust).eval().requires_grad_(False)
    )
    rm = load_reward_model(args.reward_model_path, dtype, args.trust_remote_code)
    if rm.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the proxy RM's vocabulary ({rm.config.vocab_size}) is smaller than the policy tokenizer's "
            f"({len(tokenizer)}): the proxy must share the policy's tokenizer (train it with train_rm.py)"
        )
    behavior_lm = AutoModelForCausalLM.from_pretrained(behavior_lm_path, dtype=dtype, **trust)
    behavior_lm = behavior_lm.eval().requires_grad_(False).to(device)
    if behavior_lm.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the behaviour LM's vocabulary ({behavior_lm.config.vocab_size}) is smaller than the policy "
            f"tokenizer's ({len(tokenizer)}): train the RM with `train_rm.py --lm-coef` from the policy's SFT"
        )
    gold, gold_tok = None, None
    if args.gold_rm_path:
        gold = load_reward_model(args.gold_rm_path, dtype, args.trust_remote_code)
        gold_tok = AutoTokenizer.from_pretrained(args.gold_rm_path, padding_side="right", **trust)
        gold_tok.pad_token = gold_tok.pad_token or gold_tok.eos_token
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=0.0)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    for m in (ref_policy, rm, gold):
        if m is not None:
            m.to(device)
    torch.manual_seed(args.seed + rank)  # each process samples different completions
    if ckpt:
        restore_checkpoint(accelerator, optimizer, ckpt)

    prompts = build_prompts(rows, tokenizer, args.max_prompt_length, f"{args.dataset}[{args.dataset_split}]")
    if accelerator.is_main_process:
        print(
            f"{len(prompts)} prompts from {args.dataset}[{args.dataset_split}]; starting at step {start_step + 1} "
            f"of {args.total_steps}; writing to {args.output_dir}"
        )
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if args.resume and os.path.exists(metrics_path):  # drop the steps after the checkpoint: no step twice
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        if args.track:
            import wandb

            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                config=asdict(args),
                name=run_name,
                id=run_name,
                resume="allow",
                save_code=True,
            )

    K = args.num_generations
    bar = tqdm(range(start_step + 1, args.total_steps + 1), disable=not accelerator.is_main_process, desc="steps")
    for step in bar:
        t0 = time.perf_counter()
        # 1. rollouts: K completions of each of this process's prompts
        mine = prompt_indices(step, len(prompts), args.num_prompts_per_step, args.seed)[
            rank * args.local_num_prompts : (rank + 1) * args.local_num_prompts
        ]
        step_prompts = [prompts[i] for i in mine]
        enc = tokenizer(step_prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        query, query_mask = enc.input_ids.repeat_interleave(K, 0), enc.attention_mask.repeat_interleave(K, 0)
        generated = in_chunks(
            lambda q, m: sample(accelerator.unwrap_model(policy), q, m, args, tokenizer.pad_token_id),
            args.generation_batch_size,
            query,
            query_mask,
        )
        response, response_mask, has_eos = truncate_after_eos(generated, eos_id, tokenizer.pad_token_id)
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
        if args.missing_eos_penalty is not None:  # a fixed reward, independent of the head: its feature is 0
            reward = torch.where(has_eos, reward, args.missing_eos_penalty)
            features = features * has_eos.unsqueeze(1)
        texts = tokenizer.batch_decode(
            [r[: int(m.sum()) - int(e)] for r, m, e in zip(response, response_mask, has_eos)]
        )
        if gold is not None:
            gold_reward = gold_rewards(
                gold, gold_tok, [p for p in step_prompts for _ in range(K)], texts, has_eos.tolist(), device
            )
            if args.missing_eos_penalty is not None:  # as eval_gold.py scores it
                gold_reward = torch.where(has_eos, gold_reward, args.missing_eos_penalty)
        t2 = time.perf_counter()

        # 3. advantages: behaviour probabilities of every response token, the support mask, then Dr.GRPO (eq. 4)
        with torch.no_grad():
            behavior_logprobs = in_chunks(
                lambda *t: response_logprobs(behavior_lm, *t, 1.0),
                args.generation_batch_size,
                query,
                query_mask,
                response,
                response_mask,
            )
        bspo_reward, out_of_support, min_return = bspo_rewards(
            reward, behavior_logprobs, response_mask, args.support_threshold, gather=accelerator.gather
        )
        advantages = dr_grpo_advantages(bspo_reward.view(-1, K))

        # 4. update: the Dr.GRPO loss with the re-weighted advantages
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
        t3 = time.perf_counter()

        # logging: every metric over the global batch
        g = accelerator.gather
        all_reward = g(reward.view(-1, K))
        metrics = {
            "step": step,
            "reward/proxy": all_reward.mean().item(),
            "policy/kl": g(stats["seq_kl"]).mean().item(),
            "policy/kl_k3_per_token": g(torch.tensor([stats["kl_k3"]], device=device)).mean().item(),
            "losses/loss": g(torch.tensor([stats["loss"]], device=device)).mean().item(),
            "bspo/out_of_support_rate": g(out_of_support.float()).mean().item(),
            "bspo/reward": g(bspo_reward).mean().item(),
            "bspo/min_return": min_return.item(),
            "completion/length": g(response_mask.sum(1).float()).mean().item(),
            "completion/eos_rate": g(has_eos.float()).mean().item(),
            "time/step": t3 - t0,
            "time/generation": t1 - t0,
            "time/scoring": t2 - t1,
            "time/update": t3 - t2,
        }
        if gold is not None:
            all_gold = g(gold_reward.view(-1, K))
            metrics["reward/gold"] = all_gold.mean().item()
            metrics["rm/proxy_accuracy"] = pairwise_agreement(all_reward, all_gold)
        samples = None
        if step % args.log_samples_every == 0 or step == args.total_steps:
            local = [
                dict(
                    step=step,
                    prompt=step_prompts[i // K],
                    response=texts[i],
                    proxy=reward[i].item(),
                    gold=gold_reward[i].item() if gold is not None else None,
                    advantage=advantages.flatten()[i].item(),
                    out_of_support=bool(out_of_support[i]),
                )
                for i in range(min(2 * K, len(texts)))
            ]
            samples = gather_object(local)
        if accelerator.is_main_process:
            with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if samples:
                with open(os.path.join(args.output_dir, "samples.jsonl"), "a") as f:
                    f.writelines(json.dumps(s) + "\n" for s in samples)
            if args.track:
                wandb.log(metrics, step=step)
                if samples:
                    wandb.log(
                        {"samples": wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])},
                        step=step,
                    )
            bar.set_postfix(
                proxy=f"{metrics['reward/proxy']:.2f}",
                gold=f"{metrics.get('reward/gold', math.nan):.2f}",
                kl=f"{metrics['policy/kl']:.1f}",
                oos=f"{metrics['bspo/out_of_support_rate']:.2f}",
            )
        if step % args.save_every == 0 and step < args.total_steps:
            save_checkpoint(accelerator, policy, optimizer, step, args.output_dir)

    # the final policy, for eval_gold.py (atomic: written next to its place, then renamed)
    if accelerator.is_main_process:
        final, tmp = os.path.join(args.output_dir, "model"), os.path.join(args.output_dir, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(policy).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        print(f"saved the policy to {final}; metrics in {os.path.join(args.output_dir, 'metrics.jsonl')}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
