"""The SignCert-PO core (`grpo_signcert.signcert_advantages`) checked against the paper's theorems,
numerically, on random and adversarial inputs. Every expected value is computed independently of the
function under test: by brute force over head perturbations, by the optimality (KKT) conditions and feasible points
of the adversary's problem, or by the definition."""

import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_signcert import signcert_advantages  # noqa: E402


def linear_rm_batch(seed, B=3, K=6, d=5, scale=1.0):
    """A batch whose rewards come from a linear head, r = w^T h + b, as the theorems assume."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, K, d, generator=g, dtype=torch.float64) * scale
    w = torch.randn(d, generator=g, dtype=torch.float64)
    b = torch.randn((), generator=g, dtype=torch.float64)
    return h, w, b


def group_adv(h, w, b):
    """Dr.GRPO advantage of every completion under head (w, b), computed from the definition."""
    r = h @ w + b
    return r - r.mean(dim=1, keepdim=True)


seeds = st.integers(min_value=0, max_value=2**31 - 1)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, B=st.integers(1, 4), K=st.integers(2, 9), d=st.integers(1, 8))
def test_radius_is_smallest_sign_flipping_perturbation(seed, B, K, d):
    """Thm 3.1 / eq. (8): a perturbation of norm Delta_j (just over) along the flipping direction flips
    sign A_j; no perturbation of smaller norm does (random directions, and the worst direction scaled down)."""
    h, w, b = linear_rm_batch(seed, B, K, d)
    A = group_adv(h, w, b)
    _, radius, _ = signcert_advantages(h @ w + b, h, quantile=0.0)
    radius = radius.double()  # float64 inputs are computed in float64
    hbar = h.mean(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(B):
        for j in range(K):
            dev = h[i, j] - hbar[i, 0]
            if A[i, j].abs() < 1e-9 or dev.norm() < 1e-9:
                continue
            direction = -torch.sign(A[i, j]) * dev / dev.norm()
            # |A| / ||dev|| recomputed here in float64 (the function returns float32)
            assert radius[i, j] == pytest.approx((A[i, j].abs() / dev.norm()).item(), rel=1e-5)
            flip = group_adv(h, w + direction * radius[i, j] * (1 + 1e-4), b)[i, j]
            assert torch.sign(flip) == -torch.sign(A[i, j])
            almost = group_adv(h, w + direction * radius[i, j] * (1 - 1e-4), b)[i, j]
            assert torch.sign(almost) == torch.sign(A[i, j])
            deltas = torch.randn(200, d, generator=g, dtype=torch.float64)
            norms = torch.rand(200, 1, generator=g, dtype=torch.float64) * radius[i, j] * 0.999
            deltas = deltas / deltas.norm(dim=1, keepdim=True) * norms
            perturbed = torch.stack([group_adv(h, w + dl, b)[i, j] for dl in deltas])
            assert (torch.sign(perturbed) == torch.sign(A[i, j])).all()


@pytest.mark.parametrize("seed", range(10))
def test_radius_is_the_head_norm_times_the_cosine_of_the_deviation(seed):
    """With a linear head, A_j = w^T (h_j - hbar), so Delta_j = ||w|| |cos(w, h_j - hbar)|: the radius sees the
    DIRECTION of a completion's deviation from its group, not its distance (docs/METHOD.md section 2). A completion
    far from its group along the head (what the proxy rewards most) has nearly the largest radius, ||w||; one as far
    but across the head has nearly none."""
    h, w, b = linear_rm_batch(seed, B=3, K=6, d=5)
    _, radius, _ = signcert_advantages(h @ w + b, h, quantile=0.0)
    dev = h - h.mean(dim=1, keepdim=True)
    cos = (dev @ w).abs() / (dev.norm(dim=-1) * w.norm())  # computed here, from the definition of the cosine
    assert torch.allclose(radius.double(), w.norm() * cos, rtol=1e-5, atol=1e-12)
    assert (radius.double() <= w.norm() * (1 + 1e-9)).all()
    u = torch.randn(5, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    u = u - (u @ w) / (w @ w) * w  # across the head: w^T u = 0
    for push, expect_large in ((w / w.norm(), True), (u / u.norm(), False)):
        far = h.clone()
        far[0, 0] += 100.0 * push  # completion (0, 0) moved 100 feature units away from its group
        _, r, _ = signcert_advantages(far @ w + b, far, quantile=0.0)
        if expect_large:
            assert r[0, 0] > 0.99 * w.norm()
        else:
            assert r[0, 0] < 0.05 * w.norm()


@pytest.mark.parametrize("seed", range(20))
def test_reweighted_advantage_is_worst_case_in_eps_ball(seed):
    """Thm 3.2 / eq. (9)-(10): sign(A_j) Atilde_j = min over ||delta|| <= eps of sign(A_j) A_j(w + delta). The
    minimum is attained at a point of the ball that meets the KKT conditions there (for a convex problem with an
    interior they are sufficient: a global minimum), with the gradient taken by autograd from the definition; and no
    feasible point does better: 500 random directions, and scipy's SLSQP from several starts (used only as feasible
    points, so the test does not hinge on a line search converging on one CPU)."""
    h, w, b = linear_rm_batch(seed, B=2, K=5, d=4)
    A = group_adv(h, w, b)
    Atilde, _, eps = signcert_advantages(h @ w + b, h, quantile=0.3)
    eps = eps.item()
    assert eps > 0
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(500, 4))
    dirs = torch.from_numpy(dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * eps)
    ball = {"type": "ineq", "fun": lambda delta: eps**2 - delta @ delta}
    for i in range(2):
        for j in range(5):
            s = torch.sign(A[i, j]).item()
            # what the adversary minimises: the signed advantage under the perturbed head
            objective = lambda delta, i=i, j=j, s=s: s * group_adv(h, w + delta, b)[i, j]
            delta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
            (grad0,) = torch.autograd.grad(objective(delta), delta)
            star = -eps * grad0 / grad0.norm()  # a point on the sphere where the gradient points inwards ...
            delta = star.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(delta), delta)
            mu = -(grad @ star) / (2 * star @ star)  # ... KKT: grad = -mu grad ||delta||^2 with mu >= 0, active
            assert mu > 0 and star.norm().item() == pytest.approx(eps, rel=1e-12)
            torch.testing.assert_close(grad, -2 * mu * star, rtol=0, atol=1e-10 * grad.norm().item())
            value = objective(star).item()
            assert s * Atilde[i, j].item() == pytest.approx(value, rel=1e-5, abs=1e-6)  # float32 output
            # no feasible point does better than the closed form
            r = h @ (w + dirs).T + b  # (B, K, 500): the rewards under each perturbed head
            assert (s * (r - r.mean(dim=1, keepdim=True))[i, j]).min().item() >= value - 1e-9
            for _ in range(2):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a solver that stops early still returns a point
                    x = minimize(
                        lambda d: objective(torch.from_numpy(d)).item(),
                        rng.normal(size=4) * eps / 4,
                        constraints=[ball],
                        method="SLSQP",
                    ).x
                x = x * min(1.0, eps / np.linalg.norm(x))  # pulled back inside if it ended outside
                assert objective(torch.from_numpy(x)).item() >= value - 1e-9


@settings(max_examples=50, deadline=None)
@given(seed=seeds, K=st.integers(2, 9), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_quantile_zero_is_exactly_dr_grpo(seed, K, scale):
    h, w, b = linear_rm_batch(seed, B=4, K=K, scale=scale)
    r = (h @ w + b).float()
    adv, _, eps = signcert_advantages(r, h.float(), quantile=0.0)
    assert eps.item() == 0.0
    assert torch.equal(adv, r - r.mean(dim=1, keepdim=True))  # bitwise: eq. (4)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, K=st.integers(2, 9))
def test_zero_sum_obstruction_and_what_the_per_completion_adversary_adds(seed, K):
    """Appendix D: for every head w' the group advantages (eq. 4, through the function under test) sum to 0, so
    an adversary on the summed advantage has nothing to move; the per-completion worst case does move it: its
    group sum is -eps * sum_j sign(A_j) ||h_j - hbar||, recomputed here from the definition."""
    h, w, b = linear_rm_batch(seed, B=3, K=K)
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        w2, b2 = w + torch.randn(w.shape, generator=g, dtype=torch.float64), torch.randn((), generator=g).double()
        adv, _, _ = signcert_advantages(h @ w2 + b2, h, quantile=0.0)
        assert adv.sum(dim=1).abs().max() < 1e-9 * (1 + (h @ w2).abs().max())
    robust, _, eps = signcert_advantages(h @ w + b, h, quantile=0.4)
    A = group_adv(h, w, b)
    expected = -eps * (torch.sign(A) * (h - h.mean(dim=1, keepdim=True)).norm(dim=-1)).sum(dim=1)
    torch.testing.assert_close(robust.sum(dim=1), expected, rtol=1e-9, atol=1e-9)


def penalised_batch(seed, B, K, d, offset):
    """Rewards of a linear RM, except a few completions whose reward is a fixed penalty (no EOS), and LM-like
    features that share a large common offset (the situation that once rewarded not ending)."""
    h, w, b = linear_rm_batch(seed, B, K, d)
    g = torch.Generator().manual_seed(seed + 7)
    h = h + offset * torch.randn(d, generator=g, dtype=torch.float64)  # the same offset for every completion
    certified = torch.rand(B, K, generator=g) > 0.3
    certified[:, 0] = True
    r = torch.where(certified, h @ w + b, torch.tensor(-1.0, dtype=torch.float64))
    return h, w, b, r, certified


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    K=st.integers(2, 8),
    offset=st.sampled_from([0.0, 2.0, 5.0, 10.0, 100.0]),
    q=st.sampled_from([0.1, 0.3, 0.5, 0.9]),
)
def test_fixed_penalty_completions_keep_their_dr_grpo_advantage_whatever_the_offset(seed, K, offset, q):
    """A reward the RM did not give is not the RM's to certify: whatever the features' common offset, a penalised
    completion's re-weighted advantage equals its Dr.GRPO advantage (so it is never above it, and never positive
    where that is negative), its radius is infinite and it is not in the eps pool."""
    h, w, b, r, certified = penalised_batch(seed, 4, K, 5, offset)
    adv, radius, eps = signcert_advantages(r, h, q, certified=certified)
    A = r - r.mean(dim=1, keepdim=True)
    assert torch.equal(adv[~certified], A[~certified])
    assert (adv[~certified] <= A[~certified]).all() and not ((A[~certified] < 0) & (adv[~certified] > 0)).any()
    assert torch.isinf(radius[~certified]).all()
    finite = radius[certified & torch.isfinite(radius) & (radius > 0)]
    if q > 0 and finite.numel():
        assert eps == torch.quantile(finite, q)  # the pool is the certified completions alone


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_certified_radii_stay_exact_beside_fixed_penalties(seed, offset):
    """With some rewards fixed (they do not move with the head), the radius and worst case of every certified
    completion are still exact: recomputed here from the definition A_j(w + delta), with the penalised rewards
    held fixed, by autograd (the direction) and by flipping the sign just past the radius."""
    h, w, b, r, certified = penalised_batch(seed, 3, 6, 4, offset)
    adv, radius, eps = signcert_advantages(r, h, 0.3, certified=certified)

    def advantages_under(head):
        rr = torch.where(certified, h @ head + b, r)
        return rr - rr.mean(dim=1, keepdim=True)

    A = advantages_under(w)
    for i, j in certified.nonzero().tolist():
        head = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(advantages_under(head)[i, j], head)  # A_j(w + delta) = A_j + delta^T grad
        if A[i, j].abs() < 1e-9 or grad.norm() < 1e-9:
            continue
        assert radius[i, j].item() == pytest.approx((A[i, j].abs() / grad.norm()).item(), rel=1e-9)
        direction = -torch.sign(A[i, j]) * grad / grad.norm()
        assert torch.sign(advantages_under(w + direction * radius[i, j] * (1 + 1e-6))[i, j]) == -torch.sign(A[i, j])
        assert torch.sign(advantages_under(w + direction * radius[i, j] * (1 - 1e-6))[i, j]) == torch.sign(A[i, j])
        worst = advantages_under(w + direction * eps)[i, j]  # the minimiser over ||delta|| <= eps
        assert adv[i, j].item() == pytest.approx(worst.item(), rel=1e-9, abs=1e-12)


def test_inv_delta_leaves_groups_with_identical_features_out_of_the_pool():
    """A group whose features are all equal has Delta = inf; 1/inf = 0 must not enter the inv_delta pool."""
    h, w, b = linear_rm_batch(3, B=4, K=5)
    r = h @ w + b
    _, _, eps = signcert_advantages(r, h, 0.3, eps_mode="inv_delta")
    h2, r2 = torch.cat([h, h[:1, :1].expand(1, 5, -1)]), torch.cat([r, torch.arange(5.0).double()[None]])
    _, radius2, eps2 = signcert_advantages(r2, h2, 0.3, eps_mode="inv_delta")
    assert torch.isinf(radius2[-1]).all()
    assert eps2 == eps


@settings(max_examples=30, deadline=None)
@given(seed=seeds, q=st.sampled_from([0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.9]))
def test_fraction_with_nonpositive_rho_is_about_q(seed, q):
    h, w, b = linear_rm_batch(seed, B=16, K=8)
    adv, radius, eps = signcert_advantages(h @ w + b, h, quantile=q)
    rho = 1 - eps / radius  # eq. (11)
    n = radius.numel()
    assert abs((rho <= 0).float().mean().item() - q) <= 1.0 / n + 1e-6
    # and the re-weighting is rho * A (eq. 11) wherever the radius is finite
    A = (h @ w + b) - (h @ w + b).mean(dim=1, keepdim=True)
    assert torch.allclose(adv.double(), rho.double() * A, atol=1e-5, rtol=1e-4)


def test_eps_is_the_quantile_of_the_radii_by_sorting():
    h, w, b = linear_rm_batch(7, B=5, K=4)  # 20 radii: the 0.25-quantile interpolates sorted[4.75]
    _, radius, eps = signcert_advantages(h @ w + b, h, quantile=0.25)
    s = radius.flatten().sort().values
    assert eps.item() == pytest.approx((s[4] + 0.75 * (s[5] - s[4])).item(), rel=1e-6)
    _, radius, eps_inv = signcert_advantages(h @ w + b, h, quantile=0.25, eps_mode="inv_delta")
    s = (1 / radius).flatten().sort().values
    assert eps_inv.item() == pytest.approx((s[4] + 0.75 * (s[5] - s[4])).item(), rel=1e-6)


def test_clip_sets_flipped_completions_to_zero_and_keeps_the_rest():
    h, w, b = linear_rm_batch(3, B=8, K=8)
    unclipped, radius, eps = signcert_advantages(h @ w + b, h, quantile=0.4)
    clipped, _, eps_c = signcert_advantages(h @ w + b, h, quantile=0.4, clip=True)
    assert eps == eps_c
    flipped = radius < eps
    assert flipped.any() and (~flipped).any()
    A = group_adv(h, w, b)
    assert (torch.sign(unclipped[flipped]) == -torch.sign(A[flipped])).all()  # unclipped: opposite sign
    assert (clipped[flipped] == 0).all()
    assert torch.equal(clipped[~flipped], unclipped[~flipped])


def test_edge_cases_zero_advantage_and_identical_features():
    # group 0: all rewards equal (A = 0); group 1: identical features (||h - hbar|| = 0, Delta = inf)
    h = torch.randn(2, 4, 3)
    h[1] = h[1, 0]
    r = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    adv, radius, eps = signcert_advantages(r, h, quantile=0.5)
    assert (adv[0] == 0).all()
    assert torch.isinf(radius[1]).all()
    assert torch.equal(adv[1], r[1] - r[1].mean())  # rho = 1
    assert torch.isfinite(eps) and eps == 0.0  # the finite radii of group 0 are all 0
    # every feature identical everywhere: no finite radius at all, eps = 0
    adv, radius, eps = signcert_advantages(r, torch.ones(2, 4, 3), quantile=0.5)
    assert eps == 0 and torch.equal(adv, r - r.mean(dim=1, keepdim=True))


def test_gather_makes_eps_global():
    """The trainer passes accelerator.gather: each shard then uses the eps of the whole batch."""
    h, w, b = linear_rm_batch(11, B=6, K=4)
    r = h @ w + b
    full_adv, _, full_eps = signcert_advantages(r, h, quantile=0.3)
    _, all_radius, _ = signcert_advantages(r, h, quantile=0.0)
    for shard in (slice(0, 2), slice(2, 6)):
        adv, _, eps = signcert_advantages(r[shard], h[shard], 0.3, gather=lambda t: all_radius)
        assert eps == full_eps
        assert torch.equal(adv, full_adv[shard])
    _, _, local_eps = signcert_advantages(r[:2], h[:2], 0.3)
    assert local_eps != full_eps


def test_no_gradient_flows_and_dtypes():
    h = torch.randn(2, 4, 3, requires_grad=True)
    r = torch.randn(2, 4, requires_grad=True)
    adv, radius, eps = signcert_advantages(r.bfloat16(), h.bfloat16(), quantile=0.3)
    assert not adv.requires_grad and not radius.requires_grad and not eps.requires_grad
    assert adv.dtype == radius.dtype == torch.float32


@pytest.mark.parametrize(
    "rewards, features, quantile, kwargs, message",
    [
        (torch.zeros(2, 4), torch.zeros(2, 3, 5), 0.3, {}, r"features \(B, K, d\), got \[2, 4\], \[2, 3, 5\]"),
        (torch.zeros(8), torch.zeros(8, 5), 0.3, {}, r"need rewards \(B, K >= 2\)"),
        (torch.zeros(2, 1), torch.zeros(2, 1, 5), 0.3, {}, "K >= 2"),
        (torch.zeros(2, 4), torch.zeros(2, 4, 5), 1.5, {}, "need 0 <= quantile <= 1"),
        (torch.zeros(2, 4), torch.zeros(2, 4, 5), -0.1, {}, "need 0 <= quantile <= 1"),
        (torch.tensor([[0.0, math.nan]]), torch.zeros(1, 2, 5), 0.3, {}, "NaN"),
        (torch.zeros(1, 2), torch.full((1, 2, 5), math.inf), 0.3, {}, "NaN or inf"),
        (torch.zeros(2, 4), torch.zeros(2, 4, 5), 0.3, {"eps_mode": "delta_inv"}, "eps_mode"),
    ],
)
def test_bad_input_raises_clear_error(rewards, features, quantile, kwargs, message):
    with pytest.raises(ValueError, match=message):
        signcert_advantages(rewards, features, quantile, **kwargs)
