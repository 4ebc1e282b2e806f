"""A proxy reward model on a FROZEN backbone: a linear head fitted by Bradley-Terry on the backbone's features.

What it is for: the paper's premise (its App. C.1: hacking outputs lie in sharp, high-norm feature directions) is
a claim about a pretrained LM's feature space, and on a 2-core CPU the one way to put a 135M-parameter pretrained
backbone under a proxy is to keep it frozen and fit only the `score` head (the quantity SignCert-PO perturbs):

    python tools/frozen_rm.py --backbone runs/smollm2/rm --output-dir runs/smollm2/proxy      # SmolLM2 (tools/real_model.py)
    python tools/frozen_rm.py --backbone runs/tiny_world/sft --output-dir runs/tiny_world/proxy_frozen   # the control

For each preference pair of `--prefs-path` (gen_prefs.py's output: the gold's choice between two samples of the
SFT policy) it reads the features `h` of chosen and rejected as every script reads a reward model
(`grpo_signcert.reward_and_features`: the input of `score` at the last real token; the input is the prompt
as the policy reads it, in the backbone's chat template where its tokenizer has one (`as_query`), then the response
and the EOS (`rm_input_ids`): what train_rm.py trains on and RL feeds the proxy), then fits `w` by L2-regularised logistic
regression on `h_chosen - h_rejected` (the Bradley-Terry likelihood; no bias: it cancels), float64 L-BFGS, the L2
weight chosen from a grid by the log-loss on the last tenth of the training pairs, then refitted on all of them. The
head is written into the backbone's `*ForSequenceClassification` (a causal LM gets one) with `reward_offset` = the
mean of `w^T h` over reference summaries (`--norm-split`), as train_rm.py centres its proxies. Output: a reward
model folder every script loads, with `metrics.json` (accuracy on the held-out pairs, the chosen L2, sizes, times),
written next to the target and renamed into place.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one level up

import torch
import tyro
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import grpo_signcert as gs
import train_rm


@dataclass
class Args:
    backbone: str = "runs/smollm2/rm"
    """a *ForSequenceClassification or causal LM folder with its tokenizer (tools/real_model.py's rm/, an SFT)"""
    prefs_path: str = "runs/tiny_world/prefs"
    """gen_prefs.py's output folder: train.jsonl and test.jsonl of prompt / chosen / rejected"""
    dataset: str = "runs/tiny_world/data"
    """the dataset whose reference summaries set the reward offset"""
    output_dir: str = "runs/smollm2/proxy"
    num_train_pairs: int = 2000
    """the first N training pairs (features cost one backbone forward per response)"""
    norm_split: str = "validation"
    num_norm_samples: int = 256
    l2_grid: List[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    """L2 weights tried (on the mean log-loss); the best by held-out tenth is refitted on all pairs"""
    max_length: int = 256
    max_prompt_length: int = 128
    batch_size: int = 16
    threads: int = 2


@torch.inference_mode()
def features(rm, seqs: list[list[int]], pad_id: int, batch_size: int, what: str) -> torch.Tensor:
    """h of every token sequence (float32, (N, d)), batched by length (less padding), back in input order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), rm.config.hidden_size)
    for i in tqdm(range(0, len(seqs), batch_size), desc=f"features of {what}", mininterval=5):
        idx = order[i : i + batch_size]
        width = max(len(seqs[j]) for j in idx)
        ids = torch.tensor([seqs[j] + [pad_id] * (width - len(seqs[j])) for j in idx])
        mask = torch.tensor([[1] * len(seqs[j]) + [0] * (width - len(seqs[j])) for j in idx])
        out[idx] = gs.reward_and_features(rm, ids, mask)[1]
    return out


def fit_head(diff: torch.Tensor, l2: float) -> torch.Tensor:
    """argmin_w mean softplus(-diff @ w) + l2/2 ||w||^2 (strictly convex: L-BFGS to its unique minimum)."""
    diff = diff.double()
    w = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-diff @ w).mean() + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    for path, what in ((args.backbone, "--backbone"), (args.prefs_path, "--prefs-path"), (args.dataset, "--dataset")):
        gs.require_path(path, what)
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--backbone {args.backbone}: its tokenizer has no EOS, where every reward is read")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rm = AutoModelForSequenceClassification.from_pretrained(args.backbone, num_labels=1, dtype=torch.float32)
    if not isinstance(getattr(rm, "score", None), torch.nn.Linear) or rm.score.out_features != 1:
        raise ValueError(f"--backbone {args.backbone}: {type(rm).__name__} has no one-output linear `score` head")
    rm.eval().requires_grad_(False)
    rm.config.reward_offset = 0.0  # reward_and_features subtracts it; features do not depend on it

    pairs = {s: gs.read_rows(Path(args.prefs_path) / f"{s}.jsonl") for s in ("train", "test")}
    for split, rows in pairs.items():
        gs.check_columns(rows, ("prompt", "chosen", "rejected"), f"{args.prefs_path}/{split}.jsonl")
    pairs["train"] = pairs["train"][: args.num_train_pairs]
    norm_rows, norm_where = gs.load_split(args.dataset, args.norm_split)
    norm_rows = norm_rows[: args.num_norm_samples]
    fmt = gs.detect_format(norm_rows, norm_where)
    references = [gs.to_prompt_response(r, fmt, tokenizer, args.max_prompt_length) for r in norm_rows]
    encode = lambda p, r: gs.rm_input_ids(tokenizer, gs.as_query(tokenizer, p), r, args.max_length, False)
    n_train, n_test = len(pairs["train"]), len(pairs["test"])
    print(f"{args.backbone}: {type(rm).__name__}, hidden {rm.config.hidden_size}, "
          f"{sum(p.numel() for p in rm.parameters()):,} parameters (frozen); {n_train} train / {n_test} test pairs, "
          f"{len(references)} references ({norm_where}); L2 grid {args.l2_grid}")  # fmt: skip
    start = time.time()
    seqs = [
        encode(r["prompt"], r[side]) for s in ("train", "test") for r in pairs[s] for side in ("chosen", "rejected")
    ]
    h = features(rm, seqs + [encode(p, r) for p, r in references], pad, args.batch_size, "pairs and references")
    feature_seconds = time.time() - start
    pair_h = h[: 2 * (n_train + n_test)].view(-1, 2, h.shape[1])
    diff = (pair_h[:, 0] - pair_h[:, 1]).double()
    train, test = diff[:n_train], diff[n_train:]

    cut = n_train - n_train // 10
    held = {
        l2: torch.nn.functional.softplus(-train[cut:] @ fit_head(train[:cut], l2)).mean().item() for l2 in args.l2_grid
    }
    l2 = min(held, key=held.get)
    w = fit_head(train, l2)
    offset = (h[2 * (n_train + n_test) :].double() @ w).mean().item()
    metrics = {
        "train/accuracy": (train @ w > 0).double().mean().item(),
        "eval/accuracy": (test @ w > 0).double().mean().item(),
        "eval/reward_margin": (test @ w).mean().item(),
        "l2": l2,
        "held_out_logloss_by_l2": held,
        "head_norm": w.norm().item(),
        "reward_offset": offset,
        "num_train_pairs": n_train,
        "num_test_pairs": n_test,
        "hidden_size": rm.config.hidden_size,
        "feature_seconds": feature_seconds,
        "args": asdict(args),
    }
    print(json.dumps({k: v for k, v in metrics.items() if k != "args"}, indent=1))

    rm.score.weight.copy_(w.float().unsqueeze(0))
    rm.config.reward_offset = offset
    rm.config.pad_token_id = pad
    out = train_rm.staging_dir(args.output_dir, "frozen_rm")  # written next to the target, then moved in at once
    rm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1)
    train_rm.commit_dir(out, args.output_dir)
    print(f"saved {args.output_dir}")
    return metrics


if __name__ == "__main__":
    main(tyro.cli(Args))
