"""SignCert-PO: Dr.GRPO with every advantage replaced by its worst case under a perturbation of the
reward model's linear head (arXiv 2604.02986, "Mitigating Reward Hacking in RLHF via Advantage Sign
Robustness"; formulas restored in METHOD.md).

The reward model is `r(x, y) = w^T h(x, y) + b`, with `h` the last-layer hidden state that feeds its
linear `score` head. For the K completions of one prompt:

    A_j      = r_j - mean_k r_k                         eq. (4)   Dr.GRPO advantage
    Delta_j  = |A_j| / ||h_j - hbar||                   eq. (8)   certified sign-preservation radius:
                                                                  the smallest ||delta|| with
                                                                  sign A_j(w + delta) != sign A_j(w)
    Atilde_j = A_j - eps * sign(A_j) * ||h_j - hbar||   eq. (10)  worst case over ||delta|| <= eps
             = (1 - eps / Delta_j) * A_j                eq. (11)  i.e. A_j re-weighted by rho_j
    eps      = q-quantile of {Delta_j} over the batch             so a fraction q gets rho_j <= 0

`quantile = 0` gives eps = 0, which is exactly Dr.GRPO.

This file holds the SignCert-PO core, `signcert_advantages`: pure tensors in and out, no framework
objects, meant to be copied into any GRPO-style trainer. The full trainer (rollouts, scoring with
the proxy RM, the Dr.GRPO loss, logging, checkpoints) is added to this same file by a later issue.
"""

import math

import torch


@torch.no_grad()  # eq. (11): A, Delta and rho are constants of the policy update (stop-gradient)
def signcert_advantages(rewards, features, quantile, eps_mode="delta", clip=False, gather=lambda t: t):
    """SignCert-PO advantages for a batch of B prompts with K completions each.

    rewards:  (B, K) proxy rewards r_j = w^T h_j + b.
    features: (B, K, d) the RM's last-layer features h_j, the input of its linear head.
    quantile: q in [0, 1]; eps is the q-quantile of the radii (q = 0: eps = 0, plain Dr.GRPO).
    eps_mode: "delta" (default): quantile of {Delta_j}; "inv_delta": quantile of {1 / Delta_j},
              the literal Algorithm 1 of the paper (METHOD.md section 2 discusses the contradiction).
    clip:     clip rho_j at 0 (ablation); the paper's formulas are unclipped, so that a completion
              with Delta_j < eps gets the opposite sign.
    gather:   maps this process's radii to the radii of the global batch (e.g. accelerator.gather),
              so that every process uses the same eps; the identity on one process.
    Returns (advantages (B, K), radius (B, K), eps (0-d tensor)), float32 (float64 for float64
    inputs), without gradient.
    """
    _check_inputs(rewards, features, quantile, eps_mode)
    dtype = torch.promote_types(rewards.dtype, torch.float32)  # bf16 RM outputs: compute in float32
    rewards, features = rewards.to(dtype), features.to(dtype)
    adv = rewards - rewards.mean(dim=1, keepdim=True)                                 # eq. (4)
    dev = (features - features.mean(dim=1, keepdim=True)).norm(dim=-1)               # ||h_j - hbar||
    radius = torch.where(dev > 0, adv.abs() / dev, torch.full_like(adv, math.inf))   # eq. (8)
    # eps from the global batch; non-finite values (dev = 0, or A = 0 in "inv_delta") are left out.
    pool = gather(radius if eps_mode == "delta" else 1.0 / radius).flatten()
    pool = pool[torch.isfinite(pool)]
    eps = torch.quantile(pool, quantile) if quantile > 0 and pool.numel() > 0 else adv.new_zeros(())
    shrunk = adv.abs() - eps * dev                                                   # |A_j| rho_j
    if clip:
        shrunk = shrunk.clamp(min=0.0)
    return adv.sign() * shrunk, radius, eps                                          # eq. (10)-(11)


def _check_inputs(rewards, features, quantile, eps_mode):
    """Clear, early errors for the mistakes a caller can make (checked on every call: it is cheap)."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must have shape (B, K) with K >= 2 completions per prompt, got {tuple(rewards.shape)}")
    if features.ndim != 3 or features.shape[:2] != rewards.shape:
        raise ValueError(
            f"features must have shape (B, K, d) = {tuple(rewards.shape)} + (d,) to match rewards, got {tuple(features.shape)}"
        )
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1] (the paper sweeps 0.1 to 0.5), got {quantile}")
    if eps_mode not in ("delta", "inv_delta"):
        raise ValueError(f"eps_mode must be 'delta' or 'inv_delta', got {eps_mode!r}")
    if not (torch.isfinite(rewards).all() and torch.isfinite(features).all()):
        raise ValueError("rewards and features must be finite: found NaN or inf (check the reward model's outputs)")
