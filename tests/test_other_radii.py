"""The paper's other uncertainty models (App. C.2: `--uncertainty feature|full`) and policy gradients (App. E:
`--advantage grpo|reinforce`) in grpo_signcert.py, each checked against an independent computation: autograd through
the advantage as a function of the perturbed quantity, brute-force sign flips of the exact models, finite
differences, and per-completion gradients taken another way (torch.func on the batched forward)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from grpo_signcert import (  # noqa: E402
    GRPO_STD_EPS,
    advantage_jacobian,
    other_advantages,
    reward_and_features,
    signcert_advantages,
    uncertainty_gram,
)


def batch(seed, B=3, K=6, d=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    w, b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn((), generator=g, dtype=torch.float64)
    return h, w, b


def grpo(r):
    """Vanilla GRPO's advantage from its definition (TRL: std over the group, unbiased, + 1e-4)."""
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + GRPO_STD_EPS)


def advantage_of(kind, r, baseline=0.0):
    return {"drgrpo": lambda: r - r.mean(-1, keepdim=True), "grpo": lambda: grpo(r), "reinforce": lambda: r - baseline}[
        kind
    ]()


@pytest.mark.parametrize("kind", ["drgrpo", "grpo", "reinforce"])
@pytest.mark.parametrize("seed", range(5))
def test_advantage_and_its_jacobian_against_autograd(kind, seed):
    """The advantage is its definition, and dA_j / dr_k is autograd's Jacobian of that definition."""
    r = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    adv, jac = advantage_jacobian(r, kind, baseline=0.7)
    torch.testing.assert_close(adv, advantage_of(kind, r, 0.7))
    for i in range(r.shape[0]):
        expected = torch.autograd.functional.jacobian(lambda x: advantage_of(kind, x, 0.7), r[i])
        torch.testing.assert_close(jac[i], expected)


def sensitivity_by_autograd(kind, uncertainty, h, w, b, baseline=0.0):
    """||dA_j / dtheta|| per completion by autograd through A as a function of theta: the head w, or the group's
    features H (all K of them, jointly), computed group by group."""
    out = torch.zeros(h.shape[:2], dtype=h.dtype)
    for i in range(h.shape[0]):
        if uncertainty == "head":
            jac = torch.autograd.functional.jacobian(lambda v: advantage_of(kind, h[i] @ v + b, baseline), w)
        else:
            jac = torch.autograd.functional.jacobian(lambda H: advantage_of(kind, H @ w + b, baseline), h[i])
        out[i] = jac.flatten(1).norm(dim=1)
    return out


@pytest.mark.parametrize("uncertainty", ["head", "feature"])
@pytest.mark.parametrize("kind", ["drgrpo", "grpo", "reinforce"])
@pytest.mark.parametrize("seed", range(4))
def test_sensitivity_is_the_norm_of_the_advantage_gradient(uncertainty, kind, seed):
    """s_j = sqrt((J G J^T)_jj) equals ||dA_j / dtheta|| by autograd, for the head and for the features."""
    h, w, b = batch(seed)
    rm = type("RM", (), {"score": torch.nn.Linear(5, 1, dtype=torch.float64)})()
    rm.score.weight.data = w[None].clone()
    gram = uncertainty_gram(uncertainty, rm, h)
    adv, sens = other_advantages(h @ w + b, gram, kind, baseline=0.3)
    torch.testing.assert_close(sens, sensitivity_by_autograd(kind, uncertainty, h, w, b, 0.3))
    torch.testing.assert_close(adv, advantage_of(kind, h @ w + b, 0.3))


@pytest.mark.parametrize("seed", range(5))
def test_head_drgrpo_through_the_general_path_is_the_paper_method(seed):
    """other=(A, s) with the head's Gram and Dr.GRPO's Jacobian gives the default path's advantages, radii and eps."""
    h, w, b = batch(seed, B=4, K=7)
    r = h @ w + b
    certified = torch.rand(4, 7, generator=torch.Generator().manual_seed(seed)) > 0.2
    default = signcert_advantages(r, h, 0.3, certified=certified)
    general = signcert_advantages(
        r, h, 0.3, certified=certified, other=other_advantages(r, h @ h.transpose(1, 2), "drgrpo", 0.0, certified)
    )
    for a, e in zip(general, default):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("seed", range(6))
def test_reinforce_radius_is_exact_by_brute_force(seed):
    """App. E.1, eq. (19): Delta_j = |r_j - V| / ||h_j||. A head perturbation just over Delta_j along the worst
    direction flips sign(r_j - V); 2000 random ones of norm just under it never do."""
    h, w, b = batch(seed)
    V = 0.4
    r = h @ w + b
    rm = type("RM", (), {"score": None})()
    adv, radius, _ = signcert_advantages(r, h, 0.0, other=other_advantages(r, uncertainty_gram("head", rm, h),
                                                                             "reinforce", V))  # fmt: skip
    torch.testing.assert_close(radius, (r - V).abs() / h.norm(dim=-1))
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(h.shape[0]):
        for j in range(h.shape[1]):
            worst = -torch.sign(adv[i, j]) * h[i, j] / h[i, j].norm()
            assert torch.sign(h[i, j] @ (w + worst * radius[i, j] * (1 + 1e-6)) + b - V) == -torch.sign(adv[i, j])
            d = torch.randn(2000, 5, generator=g, dtype=torch.float64)
            d = d / d.norm(dim=1, keepdim=True) * radius[i, j] * (1 - 1e-6)
            assert (torch.sign((w + d) @ h[i, j] + b - V) == torch.sign(adv[i, j])).all()


@pytest.mark.parametrize("seed", range(6))
def test_grpo_first_order_radius_and_where_the_sign_really_flips(seed):
    """App. E.2.2: the GRPO radius is first order, |A_j| / ||dA_j / dw|| (dA/dw by autograd elsewhere). Dividing by
    the group's std (> 0) never changes a sign, so the EXACT flip is Dr.GRPO's radius: found here by bisection along
    the Dr.GRPO worst direction, and never reached by 500 random directions of a smaller norm. The first-order
    radius is another number (docs/METHOD.md): it is checked to differ on some completion."""
    h, w, b = batch(seed, B=2, K=5)
    rm = type("RM", (), {"score": None})()
    r = h @ w + b
    adv, sens = other_advantages(r, uncertainty_gram("head", rm, h), "grpo")
    _, drgrpo_radius, _ = signcert_advantages(r, h, 0.0)
    g = torch.Generator().manual_seed(seed)
    differs = False
    for i in range(2):
        dev = h[i] - h[i].mean(0)
        for j in range(5):
            sign = adv[i, j].sign().item()
            direction = -sign * dev[j] / dev[j].norm()
            along = lambda t: grpo(h[i] @ (w + t * direction) + b)[j].item() * sign  # noqa: E731
            lo, hi = 0.0, 2 * drgrpo_radius[i, j].item()
            assert along(hi) < 0 < along(lo)
            for _ in range(100):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if along(mid) > 0 else (lo, mid)
            assert lo == pytest.approx(drgrpo_radius[i, j].item(), rel=1e-9)
            d = torch.randn(500, 5, generator=g, dtype=torch.float64)
            d = d / d.norm(dim=1, keepdim=True) * lo * (1 - 1e-6)
            assert (torch.sign(grpo((h[i] @ (w + d).T).T + b)[:, j]) == sign).all()
            differs |= abs(adv[i, j].abs() / sens[i, j] - lo).item() > 1e-3 * lo
    assert differs


def test_feature_radius_is_a_function_of_the_advantage_alone():
    """App. C.2, eq. (16): under feature noise the Dr.GRPO radius is |A_j| / (||w|| sqrt(1 - 1/K)), and the worst
    case is A_j - sign(A_j) * (the q-quantile of |A|) whatever the constant (the quantile absorbs it): what the
    paper's |A_j| / ||w|| gives too."""
    h, w, b = batch(3, B=5, K=8)
    r = h @ w + b
    rm = type("RM", (), {"score": torch.nn.Linear(5, 1, dtype=torch.float64)})()
    rm.score.weight.data = w[None].clone()
    adv, radius, eps = signcert_advantages(r, h, 0.3, other=other_advantages(r, uncertainty_gram("feature", rm, h),
                                                                              "drgrpo"))  # fmt: skip
    A = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(radius, A.abs() / (w.norm() * math.sqrt(1 - 1 / 8)))
    paper = torch.quantile((A.abs() / w.norm()).flatten(), 0.3) * w.norm()  # eps x ||w|| with the paper's radius
    torch.testing.assert_close(adv, A - A.sign() * paper)


# ------------------------------------------------------------------ the full-parameter model on a real (tiny) RM
@pytest.fixture(scope="module")
def tiny_rm():
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=1, pad_token_id=0)  # fmt: skip
    rm = GPTNeoXForSequenceClassification(cfg).double().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (8, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as the trainer's prompts
    mask[5, -2:] = 0  # right padding, as a completion cut at its EOS
    return rm, ids, mask


def per_completion_gradients(rm, ids, mask, params):
    """The K gradients dr_k / dtheta another way: torch.func's Jacobian of the BATCHED forward (all rows at once)."""
    wrap = _Wrap(rm)
    base = dict(wrap.named_parameters())
    names = [n for n, p in base.items() if any(p is q for q in params)]

    def rewards(*values):
        return torch.func.functional_call(wrap, {**base, **dict(zip(names, values))}, (ids, mask))

    jac = torch.func.jacrev(rewards, argnums=tuple(range(len(names))))(*[base[n] for n in names])
    return torch.cat([j.flatten(1) for j in jac], 1)


class _Wrap(torch.nn.Module):
    """A module whose forward is the trainer's reward (reward_and_features), so torch.func can call it."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, mask):
        return reward_and_features(self.m, ids, mask)[0]


def test_full_gram_against_per_completion_gradients_taken_another_way_and_finite_differences(tiny_rm):
    """uncertainty_gram('full') (one backward per completion) equals the Gram of torch.func's Jacobian of the batched
    forward; and that Jacobian's directional derivative matches a central finite difference of the rewards."""
    rm, ids, mask = tiny_rm
    with torch.no_grad():
        _, h = reward_and_features(rm, ids, mask)
    gram = uncertainty_gram("full", rm, h.view(2, 4, -1), ids, mask)
    params = list(rm.parameters())
    grads = per_completion_gradients(rm, ids, mask, params)
    for i in range(2):
        g = grads[4 * i : 4 * i + 4]
        torch.testing.assert_close(gram[i], g @ g.T)
    v = torch.randn(grads.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = v / v.norm()
    t = 1e-3  # the reward is float32 (reward_and_features): a step that its rounding does not swamp
    with torch.no_grad():
        flat = torch.nn.utils.parameters_to_vector(params).clone()
        torch.nn.utils.vector_to_parameters(flat + t * v, params)
        up = reward_and_features(rm, ids, mask)[0]
        torch.nn.utils.vector_to_parameters(flat - t * v, params)
        down = reward_and_features(rm, ids, mask)[0]
        torch.nn.utils.vector_to_parameters(flat, params)
    torch.testing.assert_close(((up - down) / (2 * t)).double(), (grads @ v).float().double(), rtol=1e-3, atol=1e-4)
    assert not any(p.requires_grad for p in rm.parameters())  # the RM stays frozen


def test_full_restricted_to_the_head_is_the_head(tiny_rm):
    """The full-parameter model over the head's weight alone is the paper's head model: G = H H^T."""
    rm, ids, mask = tiny_rm
    with torch.no_grad():
        _, h = reward_and_features(rm, ids, mask)
    h = h.view(2, 4, -1)
    torch.testing.assert_close(
        uncertainty_gram("full", rm, h, ids, mask, params=[rm.score.weight]), uncertainty_gram("head", rm, h)
    )


def test_full_radius_is_where_the_sign_flips_to_first_order(tiny_rm):
    """Moving ALL the RM's parameters along -sign(A_j) dA_j/dtheta, the Dr.GRPO advantage's sign flips at
    t ~ Delta_j (first order: within 10% for the smallest radius of the batch)."""
    rm, ids, mask = tiny_rm
    with torch.no_grad():
        r, h = reward_and_features(rm, ids, mask)
    r = r.view(2, 4)
    gram = uncertainty_gram("full", rm, h.view(2, 4, -1), ids, mask)
    adv, sens = other_advantages(r, gram, "drgrpo")
    radius = adv.abs() / sens
    i, j = divmod(int(radius.argmin()), 4)
    grads = per_completion_gradients(rm, ids, mask, list(rm.parameters()))[4 * i : 4 * i + 4]
    direction = -adv[i, j].sign() * (grads[j] - grads.mean(0))
    direction = direction / direction.norm()
    params = list(rm.parameters())
    flat = torch.nn.utils.parameters_to_vector(params).clone()

    def along(t):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat + t * direction, params)
            rr = reward_and_features(rm, ids[4 * i : 4 * i + 4], mask[4 * i : 4 * i + 4])[0]
            torch.nn.utils.vector_to_parameters(flat, params)
        return (rr[j] - rr.mean()).item() * adv[i, j].sign().item()

    lo, hi = 0.0, 3 * radius[i, j].item()
    assert along(hi) < 0 < along(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if along(mid) > 0 else (lo, mid)
    assert lo / radius[i, j].item() == pytest.approx(1.0, abs=0.1)


def test_a_penalised_completion_keeps_its_advantage_and_moves_no_one():
    """certified False (the missing-EOS penalty): g = 0, so its advantage is kept and the others' sensitivities are
    those of a group where its reward is a constant (autograd with that reward held fixed)."""
    h, w, b = batch(7, B=1, K=5)
    r = h @ w + b
    certified = torch.tensor([[True, True, False, True, True]])
    r = torch.where(certified, r, -1.0)
    rm = type("RM", (), {"score": None})()
    adv, sens = other_advantages(r, uncertainty_gram("head", rm, h), "grpo", certified=certified)
    fixed = lambda v: grpo(torch.where(certified[0], h[0] @ v + b, -1.0))  # noqa: E731
    expected = torch.autograd.functional.jacobian(fixed, w).norm(dim=1)
    torch.testing.assert_close(sens[0], expected)
    out, radius, _ = signcert_advantages(r, h, 0.5, certified=certified, other=(adv, sens))
    assert out[0, 2] == adv[0, 2] and math.isinf(radius[0, 2])


# ------------------------------------------------------------------ the trainer with the flags
@pytest.mark.parametrize("advantage", ["grpo", "reinforce"])
def test_trainer_certifies_the_chosen_advantage_with_the_feature_radius(ci_world_with_rm, tmp_path, advantage):
    """Two steps of `--uncertainty feature --advantage grpo|reinforce`: every logged completion's radius is
    |A_j| / ||dA_j / dH|| recomputed from its proxy reward and the RM's head with numpy (feature noise needs no
    features), its advantage is the worst case A_j - eps sign(A_j) |A_j| / Delta_j with eps the q-quantile of the
    step's radii, and frac_reweighted counts against the method's own A (not Dr.GRPO's)."""
    from safetensors.numpy import load_file
    from test_trainer import read_metrics, read_samples, trainer_cmd

    world, out, K, q = ci_world_with_rm, tmp_path / "run", 4, 0.3
    cmd = trainer_cmd(world, out, "--total-steps", "2", "--quantile", str(q), "--log-samples-every", "1",
                      "--uncertainty", "feature", "--advantage", advantage, "--reinforce-baseline", "0.25")  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    w = load_file(str(world / "rm" / "model.safetensors"))["score.weight"].astype(np.float64).ravel()
    metrics, samples = read_metrics(out), read_samples(out)
    for m in metrics:
        rows = samples[m["step"]]
        r = np.array([s["proxy"] for s in rows]).reshape(-1, K)
        ok = np.array([s["has_eos"] for s in rows]).reshape(-1, K)
        if advantage == "grpo":
            A = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
            jac = np.stack([torch.autograd.functional.jacobian(grpo, torch.tensor(g)).numpy() for g in r])
        else:
            A, jac = r - 0.25, np.broadcast_to(np.eye(K), (len(r), K, K))
        sens = np.linalg.norm(w) * np.sqrt((jac**2 * ok[:, None, :]).sum(-1)) * ok  # g_k = w on certified k only
        with np.errstate(divide="ignore", invalid="ignore"):
            radius = np.where(sens > 0, np.abs(A) / sens, np.inf)
        np.testing.assert_allclose([s["radius"] for s in rows], radius.ravel(), rtol=1e-4)
        pool = radius[np.isfinite(radius) & (radius > 0)]
        eps = np.quantile(pool, q)
        assert m["signcert/eps"] == pytest.approx(eps, rel=1e-4)
        expected = A - eps * np.sign(A) * sens
        np.testing.assert_allclose([s["advantage"] for s in rows], expected.ravel(), rtol=1e-4, atol=1e-5)
        assert m["signcert/frac_reweighted"] == pytest.approx(np.mean(np.abs(expected - A) > 1e-6))
    assert json.load(open(out / "args.json"))["uncertainty"] == "feature"


# ------------------------------------------------------------------ issue 46 item 3: the fidelity slips, each fixed
@pytest.mark.parametrize("uncertainty", ["head", "feature", "full"])
@pytest.mark.parametrize("kind", ["drgrpo", "grpo", "reinforce"])
def test_quantile_0_gives_the_chosen_advantage_to_the_bit(uncertainty, kind):
    """`--quantile 0`: eps = 0 and every advantage is the chosen form's, bit for bit in float32 (Dr.GRPO's under
    drgrpo, whatever the uncertainty model: A is no longer computed in float64 and cast, one ulp off)."""
    g = torch.Generator().manual_seed(3)
    r, h = torch.randn(4, 6, generator=g), torch.randn(4, 6, 5, generator=g)
    gram = torch.rand(4, 6, 6, generator=g, dtype=torch.float64) + torch.eye(6, dtype=torch.float64)
    gram = gram @ gram.transpose(1, 2) if uncertainty == "full" else uncertainty_gram("head", None, h)
    other = None if (uncertainty, kind) == ("head", "drgrpo") else other_advantages(r, gram, kind, 0.3)
    adv, _, eps = signcert_advantages(r, h, 0.0, other=other)
    expected = {"drgrpo": r - r.mean(1, keepdim=True), "grpo": grpo(r), "reinforce": r - 0.3}[kind]
    assert eps == 0 and adv.dtype == torch.float32 and torch.equal(adv, expected)


def test_relative_change_is_measured_from_the_advantage_the_method_starts_from():
    """adv/relative_change is 0 at q = 0 under every --advantage (it was measured from Dr.GRPO's centred rewards, so
    grpo and reinforce showed a change where the method made none), and sum |A - A0| / sum |A0| otherwise."""
    import grpo_signcert as gs

    g = torch.Generator().manual_seed(4)
    r, h = torch.randn(4, 6, generator=g), torch.randn(4, 6, 5, generator=g)
    for kind in ("grpo", "reinforce"):
        other = other_advantages(r, uncertainty_gram("head", None, h), kind, 0.3)
        adv, _, _ = signcert_advantages(r, h, 0.0, other=other)
        assert gs.advantage_activity(adv, other[0])["adv/relative_change"] == 0
        adv, _, _ = signcert_advantages(r, h, 0.5, other=other)
        change = gs.advantage_activity(adv, other[0])["adv/relative_change"]
        torch.testing.assert_close(change, (adv - other[0]).abs().sum() / other[0].abs().sum())


def test_a_tied_group_in_float64_has_no_radius_and_leaves_eps_alone():
    """Equal rewards whose float64 mean is a ulp off (0.1 three times): A = 0 exactly, radius 0, out of the pool; eps
    is the one of the batch without that group (before: A = 1.4e-17, a radius of 1e-16 that dragged eps to it)."""
    g = torch.Generator().manual_seed(5)
    r, h = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    tied = torch.cat([r, torch.full((1, 3), 0.1, dtype=torch.float64)])
    assert (tied[-1] - tied[-1].mean()).abs().max() > 0  # the float64 mean is not exact here
    for kind in ("drgrpo", "grpo"):
        other = None if kind == "drgrpo" else other_advantages(tied, uncertainty_gram("head", None, h), kind)
        adv, radius, eps = signcert_advantages(tied, h, 0.2, other=other)
        alone = None if kind == "drgrpo" else other_advantages(r, uncertainty_gram("head", None, h[:3]), kind)
        assert (adv[-1] == 0).all() and (radius[-1] == 0).all()
        assert eps == signcert_advantages(r, h[:3], 0.2, other=alone)[2]


@pytest.mark.parametrize("kind", ["drgrpo", "grpo", "reinforce"])
def test_inv_delta_under_the_other_models_is_the_quantile_of_the_inverse_radii(kind):
    g = torch.Generator().manual_seed(6)
    r, h = torch.randn(4, 6, generator=g), torch.randn(4, 6, 5, generator=g)
    for uncertainty in ("feature", "head"):
        gram = uncertainty_gram("head", None, h) if uncertainty == "head" else torch.eye(6).expand(4, 6, 6) * 2.0
        other = other_advantages(r, gram, kind, 0.3)
        adv, radius, eps = signcert_advantages(r, h, 0.4, eps_mode="inv_delta", other=other)
        pool = radius[torch.isfinite(radius) & (radius > 0)]
        torch.testing.assert_close(eps, torch.quantile(1.0 / pool, 0.4))
        torch.testing.assert_close(adv, other[0] * (1 - eps / radius))


@pytest.mark.parametrize("kind", ["grpo", "reinforce"])
def test_full_with_grpo_and_reinforce_against_per_completion_gradients(tiny_rm, kind):
    """full x grpo|reinforce: s_j = ||sum_k dA_j/dr_k g_k|| with the gradients taken another way (torch.func)."""
    rm, ids, mask = tiny_rm
    with torch.no_grad():
        r, h = reward_and_features(rm, ids, mask)
    gram = uncertainty_gram("full", rm, h.view(2, 4, -1), ids, mask)
    adv, sens = other_advantages(r.view(2, 4), gram, kind, 0.2)
    grads = per_completion_gradients(rm, ids, mask, list(rm.parameters())).view(2, 4, -1)
    _, jac = advantage_jacobian(r.view(2, 4).double(), kind, 0.2)
    torch.testing.assert_close(sens.double(), (jac @ grads).norm(dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adv, advantage_of(kind, r.view(2, 4), 0.2))


def test_full_is_skipped_at_quantile_0(tiny_rm, monkeypatch):
    """The trainer's step 3 (`other_model`) takes no per-completion gradient at q = 0 (eps = 0: s is unused)."""
    import argparse

    import grpo_signcert as gs

    rm, ids, mask = tiny_rm
    with torch.no_grad():
        r, h = reward_and_features(rm, ids, mask)
    calls = []
    monkeypatch.setattr(gs, "reward_gradients", lambda *a, **k: calls.append(1) or torch.zeros(4, 3))
    ok = torch.ones(2, 4, dtype=torch.bool)
    for q, called in ((0.0, []), (0.3, [1, 1])):
        calls.clear()
        args = argparse.Namespace(uncertainty="full", advantage="drgrpo", quantile=q, reinforce_baseline=0.0)
        adv, sens = gs.other_model(args, rm, r.view(2, 4), h.view(2, 4, -1), ids, mask, ok)
        assert calls == called
    args.quantile = 0.0
    adv, radius, eps = signcert_advantages(r.view(2, 4), h.view(2, 4, -1), 0.0, other=gs.other_model(args, rm, r.view(2, 4), h.view(2, 4, -1), ids, mask, ok))  # fmt: skip
    assert torch.equal(adv, r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True)) and torch.isinf(radius).all()


def test_full_gradients_are_written_in_place_not_stacked_from_a_list():
    """reward_gradients' peak memory: the (N, P) float64 result once, not a list of N rows plus their stack (twice
    the result). Measured as the growth of the process's peak RSS in a fresh interpreter (P = 4M, N = 8: 256 MB)."""
    code = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
import grpo_signcert as gs
class RM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4_000_000) * 1e-3)
rm = RM().requires_grad_(False)
gs.reward_and_features = lambda m, ids, mask: ((m.w[: ids.shape[1]] * ids.float()).sum(-1, keepdim=True).sum(-1), None)
ids = torch.ones(8, 5)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = gs.reward_gradients(rm, ids, ids)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / out.numel() / 8)
"""
    res = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    growth = float(res.stdout.split()[-1])  # the peak's growth over the result's own size
    assert growth < 1.5, f"the peak grew by {growth:.2f} x the result: the gradients are held twice"
