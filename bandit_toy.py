"""The conceptual bandit experiment of SignCert-PO (paper appendix F.1, Figure 1).

An 8-armed stateless bandit whose arms have fixed features h_m in R^6 (stand-ins for the reward model's
last-layer hidden states). A proxy head w = (1, 1, 1, 0.4, 0.4, 0.4) and a true head
w* = (1, 1, 1, 0.1, 0.1, 0.1) score them linearly. Arms 1-3 (reliable positive) and 4-6 (reliable
negative) live in the shared dims 0-2; arms 7-8 (hacking) live in the divergent dims 3-5, where the proxy
over-rates them. A softmax policy, theta = 0 at the start, is trained by plain gradient ascent with the
EXACT expected policy gradient (no sampling), for three methods:

- Dr.GRPO: advantages against the policy-weighted mean reward (eq. 4 in expectation);
- global robust (section 3.3, eq. 12-13): J - eps * ||E_pi[h]||, eps swept over 20 log-spaced values in
  [0.01, 10] and the one with the best final TRUE reward kept (an oracle choice that favours this baseline);
- SignCert-PO (eq. 8, eq. 10-11): every advantage replaced by its worst case in the ball ||delta|| <= eps.

Choices the paper leaves open (all printed at run time and stored in results.json):
- the feature vectors below (see `make_features`): reliable arms point along (1, 1, 1) so their advantage
  signs are hard to flip; the hacking arms are far from the feature mean along single divergent dims,
  so they have the largest proxy advantage, a negative true advantage and the smallest radii;
- learning rate 1.0 and 500 steps: long enough for Dr.GRPO to converge onto the hacking arms;
- hbar = sum_k pi_k h_k, the expected-value analogue of the group mean;
- eps = the PLAIN q-quantile (numpy's linear interpolation) of the 8 radii, not a policy-weighted one:
  in this exact-gradient toy the "group" is the set of all 8 arms, each listed once, as in Fig. 1(c)
  where eps is one line across the 8 radii. `--policy-weighted-quantile` gives the other choice (the
  many-samples limit of a quantile over sampled completions); it needs q >= 0.3 here: at q = 0.25 its
  inverted CDF lands exactly on the radius of hacking arm 7 (rho_7 = 0) and the policy still hacks;
- q = 0.25: a value of the paper's sweep {0.1, ..., 0.5}; it says "one completion in four has a fragile
  sign", which is the fraction of hacking arms here (2 of 8), so eps falls between the hacking and the
  reliable radii (Fig. 1c). q = 0.1 fails (eps between the two hacking radii); results.json holds a sweep;
- rho = 1 - eps / Delta unclipped (as every formula of the paper); `--clip` clips it at 0.
"""

import json
import os
import time
from dataclasses import asdict, dataclass
from functools import partial

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "signcert-po"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    # no seed / torch_deterministic: the exact expected gradient in float64 numpy has no randomness

    # Algorithm specific arguments
    num_steps: int = 500
    """number of gradient-ascent steps on theta"""
    learning_rate: float = 1.0
    """step size of plain gradient ascent on the softmax logits"""
    quantile: float = 0.25
    """SignCert-PO: eps is this quantile of the per-arm radii Delta_k"""
    policy_weighted_quantile: bool = False
    """SignCert-PO: take the quantile under the policy's weights pi_k instead of over the 8 arms"""
    clip: bool = False
    """SignCert-PO: clip rho_k = 1 - eps/Delta_k at 0 (the paper's formulas are unclipped)"""
    global_eps_min: float = 0.01
    """global robust: smallest eps of the log-spaced sweep"""
    global_eps_max: float = 10.0
    """global robust: largest eps of the log-spaced sweep"""
    global_eps_num: int = 20
    """global robust: number of eps values in the sweep"""
    output_dir: str = "runs/bandit_toy"
    """where the PNGs and results.json are written"""


W_PROXY = np.array([1.0, 1.0, 1.0, 0.4, 0.4, 0.4])
W_TRUE = np.array([1.0, 1.0, 1.0, 0.1, 0.1, 0.1])
HACKING = np.array([6, 7])  # arms 7-8 (0-based 6, 7)


def make_features():
    """8 x 6 feature matrix: rows 0-2 reliable positive, 3-5 reliable negative, 6-7 hacking."""
    return np.array(
        [
            [0.50, 0.50, 0.50, 0.0, 0.0, 0.0],  # reliable positive: along (1,1,1), the direction both heads agree on
            [0.50, 0.45, 0.45, 0.0, 0.0, 0.0],
            [0.45, 0.45, 0.40, 0.0, 0.0, 0.0],
            [-0.10, -0.05, -0.05, 0.0, 0.0, 0.0],  # reliable negative, small so the true mean beats the hacking arms
            [-0.05, -0.10, -0.05, 0.0, 0.0, 0.0],
            [-0.05, -0.05, -0.10, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 3.50, 0.50, 0.25],  # hacking: far out along single divergent dims
            [0.0, 0.0, 0.0, 0.25, 0.50, 3.25],
        ]
    )


def softmax(theta):
    z = np.exp(theta - theta.max())
    return z / z.sum()


def advantages(pi, r):
    """Dr.GRPO advantage against the policy-weighted mean reward (eq. 4, in expectation)."""
    return r - pi @ r


def policy_gradient(pi, adv):
    """Exact expected softmax policy gradient for per-arm advantages adv: g_i = pi_i (adv_i - E_pi adv)."""
    return pi * (adv - pi @ adv)


def radii(pi, h, adv):
    """Certified sign-preservation radius Delta_k = |A_k| / ||h_k - hbar|| (eq. 8); inf where h_k = hbar."""
    dist = np.linalg.norm(h - pi @ h, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dist > 0, np.abs(adv) / dist, np.inf), dist


def quantile(x, q, weights=None):
    """q-quantile of the finite x; plain (numpy linear) or under `weights` (inverted weighted CDF)."""
    finite = np.isfinite(x)
    if q == 0 or not finite.any():
        return 0.0  # q = 0 means no adversary (as in grpo_signcert.py): eps = 0 is exactly Dr.GRPO
    if weights is None:
        return float(np.quantile(x[finite], q))
    order = np.argsort(x[finite])
    cdf = np.cumsum(weights[finite][order])
    return float(x[finite][order][min(np.searchsorted(cdf / cdf[-1], q), len(cdf) - 1)])


def worst_case_advantages(adv, dist, eps, clip=False):
    """Worst-case advantage rho_k A_k = A_k - eps sign(A_k) ||h_k - hbar|| (eq. 10).

    The division-free form gives the edge cases for free: A_k = 0 -> 0, ||h_k - hbar|| = 0 -> rho = 1.
    With clip, rho is clipped at 0: the magnitude |A_k| - eps ||h_k - hbar|| is clipped at 0 instead."""
    shrunk = np.abs(adv) - eps * dist
    return np.sign(adv) * (np.maximum(shrunk, 0.0) if clip else shrunk)


def signcert_eps(pi, h, adv, q, policy_weighted=False):
    """eps = q-quantile of {Delta_k} (section 3.2). Plain by default: the exact-gradient "group" is the 8 arms,
    each listed once (Fig. 1c); a policy-weighted quantile is the many-samples limit of a sampled batch."""
    delta, dist = radii(pi, h, adv)
    return quantile(delta, q, pi if policy_weighted else None), dist


def grad_drgrpo(theta, h):
    pi = softmax(theta)
    return policy_gradient(pi, advantages(pi, h @ W_PROXY))


def grad_signcert(theta, h, q, clip=False, policy_weighted=False):
    """Dr.GRPO with A_k -> rho_k A_k, A, Delta and rho held fixed (stop-gradient) (eq. 11)."""
    pi = softmax(theta)
    adv = advantages(pi, h @ W_PROXY)
    eps, dist = signcert_eps(pi, h, adv, q, policy_weighted)
    return policy_gradient(pi, worst_case_advantages(adv, dist, eps, clip))


def grad_global(theta, h, eps):
    """Gradient of E_pi[r] - eps ||E_pi[h]|| (eq. 12-13): one penalty direction shared by every arm."""
    pi = softmax(theta)
    mean_h = pi @ h
    penalty = pi * ((h - mean_h) @ mean_h) / np.linalg.norm(mean_h)
    return policy_gradient(pi, advantages(pi, h @ W_PROXY)) - eps * penalty


def train(grad_fn, h, num_steps, learning_rate):
    """Plain gradient ascent from the uniform policy; returns per-step proxy/true reward and hacking mass."""
    theta = np.zeros(len(h))
    curve = np.zeros((num_steps + 1, 3))
    for step in range(num_steps + 1):
        pi = softmax(theta)
        curve[step] = pi @ h @ W_PROXY, pi @ h @ W_TRUE, pi[HACKING].sum()
        if step < num_steps:
            theta = theta + learning_rate * grad_fn(theta, h)
    return curve, softmax(theta)


def bar_plot(path, values, colors, ylabel, title, hline=None):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(1, len(values) + 1), values, color=colors)
    ax.axhline(0.0, color="black", lw=0.8)
    if hline is not None:
        ax.axhline(hline[0], color="black", ls="--", lw=1.2, label=hline[1])
        ax.set_ylim(top=1.35 * max(values.max(), hline[0]))  # head-room so the legend covers no bar
        ax.legend(loc="upper right")
    ax.set_xticks(np.arange(1, len(values) + 1))
    ax.set_xlabel("arm")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_args(args: Args) -> None:
    """Bad flags fail here, naming the flag, before anything runs or is written."""
    if not 0.0 <= args.quantile <= 1.0:
        raise ValueError(f"--quantile must lie in [0, 1] (the paper sweeps 0.1 to 0.5), got {args.quantile}")
    if args.global_eps_num < 1:
        raise ValueError(
            f"--global-eps-num must be >= 1 (eps values in the global-robust sweep), got {args.global_eps_num}"
        )
    if not 0.0 < args.global_eps_min <= args.global_eps_max:
        raise ValueError(
            f"--global-eps-min and --global-eps-max must satisfy 0 < min <= max (a log-spaced sweep), got "
            f"{args.global_eps_min} and {args.global_eps_max}"
        )
    if args.num_steps < 0:
        raise ValueError(f"--num-steps must be >= 0, got {args.num_steps}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    run_name = f"{args.exp_name}__{int(time.time())}"
    os.makedirs(args.output_dir, exist_ok=True)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), name=run_name)

    # the construction, scored at the uniform start policy
    h = make_features()
    r, r_true = h @ W_PROXY, h @ W_TRUE
    pi0 = np.full(len(h), 1.0 / len(h))
    adv0, adv0_true = advantages(pi0, r), advantages(pi0, r_true)
    delta0, _ = radii(pi0, h, adv0)
    eps0, _ = signcert_eps(pi0, h, adv0, args.quantile, args.policy_weighted_quantile)
    np.set_printoptions(precision=3, suppress=True)
    print(f"proxy head w  = {W_PROXY}\ntrue  head w* = {W_TRUE}\nlr = {args.learning_rate}, steps = {args.num_steps}")
    print(f"{'arm':>3} {'kind':<9} {'features h':<36} {'r':>6} {'r*':>6} {'A':>6} {'A*':>6} {'Delta':>6}")
    kinds = ["positive"] * 3 + ["negative"] * 3 + ["hacking"] * 2
    for m in range(len(h)):
        print(
            f"{m + 1:>3} {kinds[m]:<9} {' '.join(f'{x:5.2f}' for x in h[m]):<36} {r[m]:6.3f} {r_true[m]:6.3f} "
            f"{adv0[m]:6.3f} {adv0_true[m]:6.3f} {delta0[m]:6.3f}"
        )
    print(f"SignCert-PO eps at the start = {eps0:.3f} (q = {args.quantile})")

    # the three methods
    def run(grad_fn, **kwargs):
        return train(partial(grad_fn, **kwargs), h, args.num_steps, args.learning_rate)

    curves, finals = {}, {}
    curves["Dr.GRPO"], finals["Dr.GRPO"] = run(grad_drgrpo)
    eps_grid = np.logspace(np.log10(args.global_eps_min), np.log10(args.global_eps_max), args.global_eps_num)
    sweep = {float(eps): run(grad_global, eps=eps) for eps in eps_grid}
    best_eps = max(sweep, key=lambda e: sweep[e][0][-1, 1])  # oracle pick: best final TRUE reward
    global_name = f"Global robust (best eps={best_eps:.3g})"
    curves[global_name], finals[global_name] = sweep[best_eps]
    signcert = partial(grad_signcert, clip=args.clip, policy_weighted=args.policy_weighted_quantile)
    curves["SignCert-PO"], finals["SignCert-PO"] = run(signcert, q=args.quantile)
    q_sweep = {q: run(signcert, q=q)[0][-1] for q in (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)}

    table = {
        name: {
            "proxy_reward": c[-1, 0],
            "true_reward": c[-1, 1],
            "hacking_mass": c[-1, 2],
            "final_policy": finals[name].tolist(),
        }
        for name, c in curves.items()
    }
    start = curves["Dr.GRPO"][0]
    print(f"\nafter {args.num_steps} steps (uniform start: proxy {start[0]:.3f}, true {start[1]:.3f})")
    print(f"| {'method':<32} | proxy reward | true reward | mass on arms 7-8 |")
    print(f"|{'-' * 34}|--------------|-------------|------------------|")
    for name, row in table.items():
        print(
            f"| {name:<32} | {row['proxy_reward']:12.3f} | {row['true_reward']:11.3f} | {row['hacking_mass']:16.3f} |"
        )
    print("\nSignCert-PO final true reward per q: " + ", ".join(f"q={q}: {v[1]:.3f}" for q, v in q_sweep.items()))

    # figures 1(a), 1(c), 1(d)
    bar_plot(
        os.path.join(args.output_dir, "fig1a_advantages.png"),
        adv0,
        ["tab:red" if s else "tab:blue" for s in np.sign(adv0) != np.sign(adv0_true)],
        "proxy advantage A",
        "(a) proxy advantage at the uniform policy\n(red: its sign disagrees with the true advantage)",
    )
    bar_plot(
        os.path.join(args.output_dir, "fig1c_radius.png"),
        delta0,
        ["tab:red" if m in HACKING else "tab:blue" for m in range(len(h))],
        "radius Delta (eq. 8)",
        "(c) certified sign-preservation radius at the uniform policy\n(red: hacking arms)",
        hline=(eps0, f"eps = {args.quantile}-quantile = {eps0:.3f}"),
    )
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (name, c), color in zip(curves.items(), ["tab:red", "tab:orange", "tab:green"]):
        ax.plot(c[:, 1], color=color, ls="-", label=f"{name} (true)")
        ax.plot(c[:, 0], color=color, ls="--", label=f"{name} (proxy)")
    ax.set_xlabel("gradient step")
    ax.set_ylabel("expected reward")
    ax.set_title("(d) true (solid) and proxy (dashed) expected reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "fig1d_rewards.png"), dpi=120)
    plt.close(fig)

    results = {
        "settings": asdict(args),
        "construction": {
            "features": h.tolist(),
            "w_proxy": W_PROXY.tolist(),
            "w_true": W_TRUE.tolist(),
            "proxy_reward": r.tolist(),
            "true_reward": r_true.tolist(),
            "proxy_advantage_uniform": adv0.tolist(),
            "true_advantage_uniform": adv0_true.tolist(),
            "radius_uniform": delta0.tolist(),
            "signcert_eps_uniform": eps0,
            "hacking_arms": (HACKING + 1).tolist(),
        },
        "final": table,
        "global_robust_best_eps": best_eps,
        "global_robust_sweep_true_reward": {f"{e:.4g}": v[0][-1, 1] for e, v in sweep.items()},
        "signcert_quantile_sweep_true_reward": {str(q): v[1] for q, v in q_sweep.items()},
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)

    if args.track:
        for step in range(args.num_steps + 1):
            metrics = {}
            for name, c in curves.items():
                for i, key in enumerate(["proxy_reward", "true_reward", "hacking_mass"]):
                    metrics[f"charts/{name}/{key}"] = c[step, i]
            wandb.log(metrics, step=step)
        wandb.finish()
