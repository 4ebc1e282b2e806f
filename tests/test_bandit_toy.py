"""Tests of bandit_toy.py: analytic gradients vs autograd / finite differences, the construction, one run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import bandit_toy as bt  # noqa: E402

H = bt.make_features()


def random_thetas(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [np.zeros(len(H))] + [rng.normal(scale=1.5, size=len(H)) for _ in range(n)]


def torch_objective(theta, eps):
    """E_pi[r] - eps ||E_pi[h]|| in torch float64 (eps = 0: the Dr.GRPO objective)."""
    pi = torch.softmax(theta, dim=0)
    h = torch.tensor(H, dtype=torch.float64)
    mean_h = pi @ h
    return mean_h @ torch.tensor(bt.W_PROXY, dtype=torch.float64) - eps * torch.linalg.vector_norm(mean_h)


def autograd(theta, eps):
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    torch_objective(t, eps).backward()
    return t.grad.numpy()


def finite_difference(theta, eps, step=1e-6):
    f = lambda th: torch_objective(torch.tensor(th, dtype=torch.float64), eps).item()  # noqa: E731
    return np.array([(f(theta + step * e) - f(theta - step * e)) / (2 * step) for e in np.eye(len(theta))])


@pytest.mark.parametrize("theta", random_thetas())
def test_drgrpo_gradient_is_gradient_of_expected_proxy_reward(theta):
    g = bt.grad_drgrpo(theta, H)
    np.testing.assert_allclose(g, autograd(theta, 0.0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g, finite_difference(theta, 0.0), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("eps", [0.01, 0.3, 1.13, 10.0])
@pytest.mark.parametrize("theta", random_thetas(3, seed=1))
def test_global_robust_gradient_is_gradient_of_eq12(theta, eps):
    g = bt.grad_global(theta, H, eps)
    np.testing.assert_allclose(g, autograd(theta, eps), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g, finite_difference(theta, eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("theta", random_thetas(3, seed=2))
def test_signcert_gradient_is_eq11_surrogate_with_stop_gradient(theta, clip):
    """eq. 11: the gradient of sum_k pi_k Atilde_k with Atilde held fixed."""
    pi = bt.softmax(theta)
    adv = bt.advantages(pi, H @ bt.W_PROXY)
    eps, dist = bt.signcert_eps(pi, H, adv, 0.25)
    atilde = torch.tensor(bt.worst_case_advantages(adv, dist, eps, clip))
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    (torch.softmax(t, dim=0) @ atilde).backward()
    np.testing.assert_allclose(bt.grad_signcert(theta, H, 0.25, clip), t.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("theta", random_thetas(3, seed=3))
def test_signcert_with_eps_zero_is_drgrpo_exactly(theta):
    pi = bt.softmax(theta)
    adv = bt.advantages(pi, H @ bt.W_PROXY)
    _, dist = bt.radii(pi, H, adv)
    assert np.array_equal(bt.policy_gradient(pi, bt.worst_case_advantages(adv, dist, 0.0)), bt.grad_drgrpo(theta, H))


def test_quantile_zero_is_dr_grpo_and_small_q_follows_the_radii():
    """q = 0 means eps = 0 (the project-wide convention), so SignCert-PO is exactly Dr.GRPO; any q > 0 takes
    the plain quantile of the radii, and rho_k = 1 - eps/Delta_k (eq. 10)."""
    pi = np.full(len(H), 1 / len(H))
    adv = bt.advantages(pi, H @ bt.W_PROXY)
    delta, dist = bt.radii(pi, H, adv)
    eps, _ = bt.signcert_eps(pi, H, adv, 0.0)
    assert eps == 0.0
    eps, _ = bt.signcert_eps(pi, H, adv, 1e-9)
    assert eps == pytest.approx(delta.min())
    atilde = bt.worst_case_advantages(adv, dist, eps)
    assert atilde[np.argmin(delta)] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(
        np.delete(atilde, np.argmin(delta)) / np.delete(adv, np.argmin(delta)),
        1 - eps / np.delete(delta, np.argmin(delta)),
        rtol=1e-6,
    )


def test_signcert_edge_cases_and_clip():
    adv = np.array([0.0, 0.5, -0.5, 0.2, -0.2])
    dist = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    eps = 0.3
    np.testing.assert_allclose(bt.worst_case_advantages(adv, dist, eps), [0.0, 0.5, -0.5, -0.1, 0.1])  # rho < 0 flips
    np.testing.assert_allclose(bt.worst_case_advantages(adv, dist, eps, clip=True), [0.0, 0.5, -0.5, 0.0, 0.0])
    delta, _ = bt.radii(np.array([0.5, 0.5]), np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0.3, 0.0]))
    assert np.all(np.isinf(delta))
    assert bt.quantile(delta, 0.25) == 0.0  # no finite radius: eps = 0


def test_policy_weighted_quantile():
    x = np.array([3.0, 1.0, 2.0, np.inf])
    assert bt.quantile(x, 0.5, np.array([0.1, 0.8, 0.1, 0.0])) == 1.0
    assert bt.quantile(x, 0.95, np.array([0.1, 0.8, 0.1, 0.0])) == 3.0
    assert bt.quantile(x, 0.5) == 2.0  # the inf is excluded


def test_construction_has_the_described_properties():
    pi = np.full(len(H), 1 / len(H))
    r, r_true = H @ bt.W_PROXY, H @ bt.W_TRUE
    adv, adv_true = bt.advantages(pi, r), bt.advantages(pi, r_true)
    delta, _ = bt.radii(pi, H, adv)
    reliable = np.arange(6)
    assert np.all(H[reliable][:, 3:] == 0) and np.all(H[bt.HACKING][:, :3] == 0)
    assert np.all(r[:3] > 0) and np.all(r_true[:3] > 0) and np.all(r[3:6] < 0) and np.all(r_true[3:6] < 0)
    assert adv[bt.HACKING].min() > adv[reliable].max()  # largest proxy advantage
    assert np.all(adv_true[bt.HACKING] < 0)  # ... but negative true advantage
    assert delta[bt.HACKING].max() < delta[reliable].min()  # smallest radii
    assert np.array_equal(np.sign(adv[reliable]), np.sign(adv_true[reliable]))  # the reliable arms are reliable


def test_script_run(tmp_path):
    out = subprocess.run(
        [sys.executable, "bandit_toy.py", "--output-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    for name in ["fig1a_advantages.png", "fig1c_radius.png", "fig1d_rewards.png"]:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "results.json").read_text())
    final = res["final"]
    glob = next(k for k in final if k.startswith("Global robust"))
    assert set(final) == {"Dr.GRPO", glob, "SignCert-PO"}
    # the reported global-robust run is the best of its sweep of 20 eps values (the oracle pick the paper reports)
    assert final[glob]["true_reward"] == pytest.approx(max(res["global_robust_sweep_true_reward"].values()))
    assert len(res["global_robust_sweep_true_reward"]) == 20
    assert final["Dr.GRPO"]["hacking_mass"] > 0.5  # Dr.GRPO ends on the hacking arms
    assert final["Dr.GRPO"]["proxy_reward"] > final["SignCert-PO"]["proxy_reward"]  # ... and wins on the proxy
    assert final["SignCert-PO"]["true_reward"] > final["Dr.GRPO"]["true_reward"]
    assert final["SignCert-PO"]["true_reward"] > final[glob]["true_reward"]
    assert final["SignCert-PO"]["hacking_mass"] < 0.05
    for row in final.values():
        assert sum(row["final_policy"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--quantile", "1.5"), "--quantile must lie in [0, 1]"),
        (("--quantile", "-0.1"), "--quantile must lie in [0, 1]"),
        (("--global-eps-num", "0"), "--global-eps-num must be >= 1"),
        (("--global-eps-min", "0"), "--global-eps-min and --global-eps-max"),
    ],
)
def test_bad_flags_are_named_and_write_nothing(tmp_path, flags, message):
    out = subprocess.run(
        [sys.executable, "bandit_toy.py", "--output-dir", str(tmp_path / "out"), *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and message in out.stderr and not (tmp_path / "out").exists()
