"""The baselines grpo_uwo.py, grpo_advpo.py, grpo_bspo.py and train_rm.py --lm-coef: each method's maths
against an independent computation (numpy, KKT conditions and feasible points, a token-by-token loop), then each script end to
end on a very small tiny world (2 steps), its bad inputs, 2 processes and resume after a kill."""

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import minimize
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import built_once, copy_of, read_jsonl, read_metrics, run_checks_in_process, short_run_cmd  # noqa: E402

import grpo_advpo  # noqa: E402
import grpo_bspo  # noqa: E402
import grpo_uwo  # noqa: E402


# ------------------------------------------------------------------ UWO
@pytest.mark.parametrize("penalty", ["var", "std"])
def test_uwo_reward_matches_numpy(penalty):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(7, 3)) * rng.uniform(0.1, 3, size=(7, 1))
    lam = 0.37
    reward, term, spread = grpo_uwo.uwo_rewards(torch.tensor(r), lam, penalty)
    var = np.var(r, axis=1)  # numpy's default: population variance (ddof = 0), Coste's definition
    expected_term = lam * (var if penalty == "var" else np.std(r, axis=1))
    np.testing.assert_allclose(term.numpy(), expected_term, rtol=1e-12)
    np.testing.assert_allclose(reward.numpy(), r.mean(axis=1) - expected_term, rtol=1e-12)
    np.testing.assert_allclose(spread.numpy(), np.std(r, axis=1), rtol=1e-12)


def test_uwo_needs_two_members_and_dr_grpo_advantages_by_definition():
    with pytest.raises(ValueError, match="k >= 2 ensemble members"):
        grpo_uwo.uwo_rewards(torch.randn(5, 1), 0.1)
    r = torch.randn(3, 4, dtype=torch.float64)
    adv = grpo_uwo.dr_grpo_advantages(r)
    for b in range(3):
        for j in range(4):
            assert adv[b, j].item() == pytest.approx(r[b, j].item() - sum(r[b].tolist()) / 4, abs=1e-12)


# ------------------------------------------------------------------ AdvPO
def advpo_problem(seed, n=6, d=4, n_ref=5):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    e_ref = torch.randn(n_ref, d, generator=g, dtype=torch.float64) + 0.5
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    M = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    phi_hat = torch.randn(d, generator=g, dtype=torch.float64)
    return e, e_ref, M, phi_hat


def feasible_upper_bounds(objective, centre, scale, radius, rng, starts=3):
    """Objective values (`objective` maps (d,) to a number and (d, n) to n of them) at feasible points of
    {x : ||scale^T (x - centre)|| <= radius} (scale^T: a matrix whose
    norm defines the ellipsoid): many random points on its boundary, and scipy's SLSQP from several starts, each
    result pulled back inside when it ends outside. Any feasible point is an upper bound of the
    minimum whether or not a solver converged, so nothing here hinges on one line search (SLSQP can stop with
    "Positive directional derivative for linesearch" on one CPU and not on another)."""
    d = len(centre)
    inv = np.linalg.inv(scale.T)  # x = centre + inv @ u maps the ball ||u|| <= radius onto the ellipsoid
    norm = lambda x: np.linalg.norm(scale.T @ (x - centre))
    u = rng.normal(size=(2000, d))
    points = list(centre + (inv @ (radius * u / np.linalg.norm(u, axis=1, keepdims=True)).T).T)
    constraint = {"type": "ineq", "fun": lambda x: radius**2 - norm(x) ** 2}
    for k in range(starts):
        x0 = centre + inv @ (rng.normal(size=d) * radius / (2 * math.sqrt(d)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a solver that stops early still returns a point
            x = minimize(objective, x0, constraints=[constraint], method="SLSQP", options={"maxiter": 300}).x
        n = norm(x)
        points.append(x if n <= radius else centre + (x - centre) * radius / n)
    return objective(np.array(points).T)


@pytest.mark.parametrize("seed", range(50))
def test_advpo_penalty_is_the_minimiser_over_the_ellipsoid(seed):
    """The per-sample penalty is phi_hat^T e_j - phi*^T e_j for one head phi*, and phi* minimises the batch
    objective c^T phi = mean_pi phi^T e - mean_ref phi^T e over ||phi - phi_hat||_M <= b. Optimality is certified
    by the KKT conditions (a linear objective over a convex set with an interior: they are sufficient), checked
    numerically at phi*, and no feasible point (random ones, scipy's local solvers from several starts) beats it."""
    e, e_ref, M, phi_hat = advpo_problem(seed)
    budget, bias = 2.5, 0.3
    b = budget**0.5
    e_np, ref_np, M_np, hat_np = e.numpy(), e_ref.numpy(), M.numpy(), phi_hat.numpy()
    objective = lambda phi: (e_np @ phi).mean(0) - (ref_np @ phi).mean(0)
    rewards = e @ phi_hat + bias
    pessimistic, penalty, g_norm = grpo_advpo.advpo_rewards(rewards, e, torch.linalg.cholesky(M), e_ref.mean(0), budget)
    # the head the penalties imply (e has full column rank): penalty_j = (phi_hat - phi*)^T e_j exactly
    shift = np.linalg.lstsq(e_np, penalty.numpy(), rcond=None)[0]
    phi_star = hat_np - shift
    np.testing.assert_allclose(e_np @ shift, penalty.numpy(), atol=1e-10)
    np.testing.assert_allclose(pessimistic.numpy(), e_np @ phi_star + bias, atol=1e-10)
    # KKT: feasible with the constraint active, and grad c^T phi = c = -mu grad ||phi - phi_hat||_M^2 with mu >= 0
    assert (phi_star - hat_np) @ M_np @ (phi_star - hat_np) == pytest.approx(b**2, rel=1e-9)
    c = e_np.mean(0) - ref_np.mean(0)
    grad_constraint = 2 * M_np @ (phi_star - hat_np)
    mu = -(c @ grad_constraint) / (grad_constraint @ grad_constraint)
    assert mu > 0
    np.testing.assert_allclose(c, -mu * grad_constraint, atol=1e-9 * np.linalg.norm(c))
    # no feasible point does better
    bounds = feasible_upper_bounds(objective, hat_np, np.linalg.cholesky(M_np), b, np.random.default_rng(seed))
    assert bounds.min() >= objective(phi_star) - 1e-9
    # the batch objective at the pessimistic head: its closed-form minimum phi_hat^T g - b sqrt(g^T M^-1 g)
    assert objective(phi_star) == pytest.approx(objective(hat_np) - b * g_norm.item(), abs=1e-9)


def test_advpo_g_over_two_processes_equals_g_of_the_whole_batch():
    e, e_ref, M, phi_hat = advpo_problem(7, n=8)
    rewards, chol, ref = e @ phi_hat, torch.linalg.cholesky(M), e_ref.mean(0)
    whole, whole_pen, whole_norm = grpo_advpo.advpo_rewards(rewards, e, chol, ref, 5.0)
    a, b = slice(0, 4), slice(4, 8)
    rows = lambda half, t: (e[half] - ref) if t.ndim == 2 else torch.ones(4, dtype=t.dtype)  # the other's e - ref, in_g
    first = grpo_advpo.advpo_rewards(rewards[a], e[a], chol, ref, 5.0, gather=lambda t: torch.cat([t, rows(b, t)]))
    second = grpo_advpo.advpo_rewards(rewards[b], e[b], chol, ref, 5.0, gather=lambda t: torch.cat([rows(a, t), t]))
    torch.testing.assert_close(torch.cat([first[0], second[0]]), whole, rtol=1e-12, atol=1e-12)
    assert first[2].item() == pytest.approx(whole_norm.item(), rel=1e-12)
    # and without the gather, each half alone would use a different g
    alone = grpo_advpo.advpo_rewards(rewards[a], e[a], chol, ref, 5.0)
    assert not torch.allclose(alone[1], whole_pen[a])


def test_advpo_paired_references_g_by_brute_force_and_over_two_processes():
    """--references paired: g is the mean of e_j - reference_j over the completions whose prompt has a reference
    (each completion minus its OWN prompt's reference), summed here one completion at a time; the others stay out
    of g but get the one head's penalty; over two processes (gather) the same as over the whole batch."""
    e, e_ref, M, phi_hat = advpo_problem(11, n=8)
    budget, K = 3.0, 2
    references = e_ref[:4].repeat_interleave(K, 0)  # 4 prompts x K completions, one reference per prompt
    in_g = torch.tensor([True, False, True, False]).repeat_interleave(K)  # prompts 1 and 3 have no reference
    rewards, chol = e @ phi_hat, torch.linalg.cholesky(M)
    pessimistic, penalty, g_norm = grpo_advpo.advpo_rewards(rewards, e, chol, references, budget, in_g=in_g)
    g = sum(e[j] - e_ref[j // K] for j in range(8) if in_g[j]) / int(in_g.sum())
    m_inv_g = torch.linalg.solve(M, g)
    expected = budget**0.5 * (e @ m_inv_g) / (g @ m_inv_g).sqrt()
    torch.testing.assert_close(penalty, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pessimistic, rewards - expected, rtol=1e-10, atol=1e-12)
    assert g_norm.item() == pytest.approx((g @ m_inv_g).sqrt().item(), rel=1e-10)
    assert penalty[1] != 0  # a completion outside g still gets the adversarial head's penalty
    # the pooled form is the paired one with every completion in g and one shared reference
    pooled = grpo_advpo.advpo_rewards(rewards, e, chol, e_ref.mean(0), budget)
    shared = grpo_advpo.advpo_rewards(rewards, e, chol, e_ref.mean(0).expand(8, -1), budget, in_g=torch.ones(8) > 0)
    torch.testing.assert_close(pooled[1], shared[1], rtol=1e-12, atol=1e-12)
    # two processes: each gathers the other's (e_j - ref_j) x in_g rows and in_g counts
    a, b = slice(0, 4), slice(4, 8)
    other = {0: b, 1: a}

    def gather_for(rank):
        mine = (a, b)[rank]

        def gather(t):
            if t.ndim == 2:  # (e - reference) * in_g, this process's rows
                theirs = (e[other[rank]] - references[other[rank]]) * in_g[other[rank]].double().unsqueeze(1)
            else:
                theirs = in_g[other[rank]].double()
            return torch.cat([t, theirs] if mine == a else [theirs, t])

        return gather

    first = grpo_advpo.advpo_rewards(rewards[a], e[a], chol, references[a], budget, in_g=in_g[a], gather=gather_for(0))
    second = grpo_advpo.advpo_rewards(rewards[b], e[b], chol, references[b], budget, in_g=in_g[b], gather=gather_for(1))
    torch.testing.assert_close(torch.cat([first[1], second[1]]), penalty, rtol=1e-10, atol=1e-12)
    # no completion with a reference anywhere in the batch: g = 0, no penalty
    none = grpo_advpo.advpo_rewards(rewards, e, chol, references, budget, in_g=torch.zeros(8) > 0)
    assert none[1].abs().max() == 0 and none[2] == 0


def tiny_neox(cls, seed=0, **extra):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=0,
        **extra,
    )
    return cls(config).eval()


class FakeTokenizer:
    """Words are token ids: "3 4 5" -> [3, 4, 5]; EOS = pad = 0."""

    eos_token_id = pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[int(w) for w in text.split()])


def test_advpo_statistics_match_a_sum_over_responses_scored_one_at_a_time():
    rm = tiny_neox(GPTNeoXForSequenceClassification, num_labels=1)
    rows = [
        {"prompt": "3 4 5", "chosen": "6 7", "rejected": "8"},
        {"prompt": "9", "chosen": "10 11 12", "rejected": "13 14"},
        {"prompt": "15 16", "chosen": "17", "rejected": "18 19 20 21"},
    ]
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        is_main_process=True,
        split_between_processes=contextlib.nullcontext,
        reduce=lambda t, reduction: t,
    )
    M, ref = grpo_advpo.advpo_statistics(rm, FakeTokenizer(), rows, 0.7, 2, 64, accelerator)
    feats = {}
    for column in ("chosen", "rejected"):
        feats[column] = []
        for r in rows:
            ids = [int(w) for w in (r["prompt"] + " " + r[column]).split()] + [0]
            with torch.no_grad():
                hidden = rm.gpt_neox(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double()
            feats[column].append(hidden)
    every = torch.stack(feats["chosen"] + feats["rejected"])
    expected = 0.7 * torch.eye(16, dtype=torch.float64) + sum(torch.outer(x, x) for x in every)
    torch.testing.assert_close(M, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, torch.stack(feats["chosen"]).mean(0), rtol=1e-5, atol=1e-6)


def test_advpo_paired_references_without_a_shared_prompt_are_refused(world, tmp_path):
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    (prefs / "train.jsonl").write_text(json.dumps({"prompt": "not a prompt", "chosen": " a", "rejected": " b"}) + "\n")
    cmd = baseline_cmd("grpo_advpo.py", world, tmp_path / "run")
    cmd[cmd.index("--prefs-path") + 1] = str(prefs)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "none of the" in res.stderr and "--references pooled" in res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_advpo_singular_m_and_prefs_without_pairs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="singular or not positive definite"):
        grpo_advpo.advpo_cholesky(torch.zeros(3, 3, dtype=torch.float64))
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "score": 1}) + "\n")
    with pytest.raises(ValueError, match=r"has columns \['chosen', 'prompt', 'score'\]"):
        grpo_advpo.load_preference_rows(str(tmp_path))


# ------------------------------------------------------------------ BSPO
def test_bspo_support_mask_against_token_probabilities_one_token_at_a_time():
    lm = tiny_neox(GPTNeoXForCausalLM, seed=3)
    eos, T = 0, 4
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11], [12]]
    responses = [[13, 14, eos], [15, eos], [16, 17, 18, 19], [20, 21, 22, eos]]
    P = max(map(len, prompts))
    query = torch.tensor([[eos] * (P - len(p)) + p for p in prompts])
    qmask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    resp = torch.tensor([r + [eos] * (T - len(r)) for r in responses])
    resp, rmask, _ = grpo_bspo.truncate_after_eos(resp, eos, eos)
    with torch.no_grad():
        lp = grpo_bspo.response_logprobs(lm, query, qmask, resp, rmask, 1.0)
    lp = lp.masked_fill(rmask == 0, -100.0)  # whatever the padding after EOS scores, it is not a response token
    probs = []  # beta(y_t | x, y_<t), each from its own unpadded forward
    for p, r in zip(prompts, responses):
        row = []
        for t in range(len(r)):
            with torch.no_grad():
                logits = lm(input_ids=torch.tensor([p + r[:t]])).logits[0, -1]
            row.append(torch.softmax(logits.double(), -1)[r[t]].item())
        probs.append(row)
    threshold = float(np.median([q for row in probs for q in row]))
    rewards = torch.tensor([0.5, -0.2, 1.5, 0.1])
    out_rewards, out, floor = grpo_bspo.bspo_rewards(rewards, lp, rmask, threshold)
    expected = [any(q < threshold for q in row) for row in probs]
    assert out.tolist() == expected and 0 < sum(expected) < len(expected)
    assert floor.item() == pytest.approx(-0.2)
    assert out_rewards.tolist() == pytest.approx([-0.2 if o else r for o, r in zip(expected, rewards.tolist())])
    # the minimum comes from the global batch
    _, _, global_floor = grpo_bspo.bspo_rewards(rewards, lp, rmask, threshold, gather=lambda t: torch.cat([t, -t - 9]))
    assert global_floor.item() == pytest.approx(-10.5)


# ------------------------------------------------------------------ a very small tiny world
@pytest.fixture(scope="session")
def world(tmp_path_factory, ci_world):
    """A copy of the CI tiny world (pad `<|padding|>` distinct from EOS); a `policy` that emits EOS sometimes (as in
    test_trainer.py), so that the missing-EOS penalty and EOS-ended completions both occur; UWO members = the base
    policy with 3 fresh heads, each saved with the policy's tokenizer as train_rm.py saves it; an RM with
    behavior_lm/ (the base policy) for BSPO; a preference folder (chosen = the reference summary, rejected =
    another row's). Built once per session (conftest.built_once), read only."""
    return built_once(tmp_path_factory, "baselines_world", lambda root: build_baselines_world(ci_world, root))


def build_baselines_world(ci_world, root):
    copy_of(ci_world, root)
    tok = AutoTokenizer.from_pretrained(root / "base_policy")
    assert tok.pad_token_id != tok.eos_token_id  # the world's convention, which the fixtures below keep
    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        rm = AutoModelForSequenceClassification.from_pretrained(root / "base_policy", num_labels=1)
        rm.save_pretrained(root / f"rm_{seed}")
        tok.save_pretrained(root / f"rm_{seed}")
    shutil.copytree(root / "rm_1", root / "rm_bspo")
    policy.save_pretrained(root / "rm_bspo" / "behavior_lm")  # the behaviour LM is the policy itself
    tok.save_pretrained(root / "rm_bspo" / "behavior_lm")
    import train_rm

    (root / "prefs").mkdir()
    for split, n in (("train", 24), ("test", 8)):
        rows = train_rm.load_split(str(root / "data"), split)[0][:n]
        with open(root / "prefs" / f"{split}.jsonl", "w") as f:
            for i, r in enumerate(rows):
                prompt, chosen = train_rm.to_prompt_response(r, "tldr", tok, 128)
                rejected = " " + rows[(i + 1) % n]["summary"]
                f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def baseline_cmd(script, world, out, *extra, procs=None):
    model = {
        "grpo_uwo.py": ["--reward-model-paths"] + [str(world / f"rm_{s}") for s in (1, 2, 3)],
        "grpo_advpo.py": ["--reward-model-path", str(world / "rm_1"), "--prefs-path", str(world / "prefs")],
        "grpo_bspo.py": ["--reward-model-path", str(world / "rm_bspo")],
    }[script]
    return short_run_cmd(
        script, world, out, *model, "--log-samples-every", "1", "--total-steps", "2", *extra, procs=procs
    )


def run_ok(cmd):
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def assert_group_advantages(samples, K, reward_of):
    """Every logged advantage is Dr.GRPO's: reward_of(sample) minus the mean of its group of K."""
    assert len(samples) % K == 0 and samples
    for s in range(0, len(samples), K):
        group = samples[s : s + K]
        mean = sum(map(reward_of, group)) / K
        for row in group:
            assert row["advantage"] == pytest.approx(reward_of(row) - mean, abs=1e-5)


def assert_activity(metrics, samples, K, plain_of):
    """`adv/std` and `adv/relative_change` of every step, recomputed with numpy from all its completions
    (samples.jsonl): the spread of the logged advantages, and sum |A - A0| / sum |A0| with A0 the group-centred
    plain reward that the method starts from (`plain_of`)."""
    for m in metrics:
        step = [s for s in samples if s["step"] == m["step"]]
        adv = np.array([s["advantage"] for s in step])
        plain = np.array([plain_of(s) for s in step]).reshape(-1, K)
        a0 = (plain - plain.mean(1, keepdims=True)).ravel()
        assert m["adv/std"] == pytest.approx(np.std(adv), rel=1e-5, abs=1e-6)
        assert m["adv/relative_change"] == pytest.approx(np.abs(adv - a0).sum() / np.abs(a0).sum(), rel=1e-4, abs=1e-6)


def test_uwo_end_to_end(world, tmp_path):
    # lambda = 0 with identical members: the ensemble reward is the proxy's, the advantages Dr.GRPO's
    same = tmp_path / "same"
    cmd = baseline_cmd("grpo_uwo.py", world, same, "--uwo-lambda", "0")
    i = cmd.index("--reward-model-paths")
    cmd[i + 2 : i + 4] = [str(world / "rm_1")] * 2
    run_ok(cmd)
    for row in read_metrics(same):
        assert row["uwo/spread"] == 0.0 and row["uwo/penalty"] == 0.0
        assert row["uwo/reward"] == pytest.approx(row["reward/proxy"], abs=1e-6)
    assert_group_advantages(read_jsonl(same / "samples.jsonl")[:8], 4, lambda r: r["proxy"])
    # different members: a spread, and a penalty lambda * Var; the UWO reward is below the members' mean
    diff = tmp_path / "diff"
    run_ok(baseline_cmd("grpo_uwo.py", world, diff, "--uwo-lambda", "1.0"))
    rows = read_metrics(diff)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["uwo/spread"] > 0 and row["uwo/penalty"] > 0
        assert row["uwo/penalty"] >= row["uwo/spread"] ** 2 - 1e-6  # mean of Var >= (mean of std)^2 (Jensen)
        for key in ("policy/kl_k3_per_token", "policy/grad_norm", "losses/loss", "completion/no_eos_rate"):
            assert math.isfinite(row[key])
        assert "reward/gold" in row and "rm/proxy_accuracy" in row and not any(k.startswith("signcert/") for k in row)
    # a completion without EOS gets the penalty from every member: no UWO penalty, and its advantage is Dr.GRPO's
    # of the penalised rewards (no certification in UWO)
    samples = read_jsonl(diff / "samples.jsonl")
    assert set(samples[0]) == {*SAMPLE_FIELDS, "uwo_reward", "penalty", "spread"}
    no_eos = [s for s in samples if not s["has_eos"]]
    assert no_eos and len(no_eos) < len(samples)  # both kinds occur
    assert all(s["proxy"] == s["uwo_reward"] == -1.0 and s["penalty"] == s["spread"] == 0.0 for s in no_eos)
    assert_group_advantages(samples[:8], 4, lambda r: r["uwo_reward"])
    assert_activity(rows, samples, 4, lambda r: r["uwo_reward"] + r["penalty"])  # A0: the members' mean (lambda 0)
    assert all(r["adv/relative_change"] > 0 for r in rows)
    assert os.path.exists(diff / "model" / "model.safetensors")


# what every trainer writes per completion (grpo_signcert.py adds `radius`, each baseline its own fields)
SAMPLE_FIELDS = ("step", "group", "prompt", "response", "has_eos", "length", "proxy", "gold", "advantage")


def test_advpo_end_to_end(world, tmp_path):
    out = tmp_path / "run"
    run_ok(baseline_cmd("grpo_advpo.py", world, out, "--budget", "5"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["advpo/g_norm"] > 0 and row["advpo/penalty_std"] > 0
        assert row["advpo/reward"] == pytest.approx(row["reward/proxy"] - row["advpo/penalty_mean"], abs=1e-5)
    samples = read_jsonl(out / "samples.jsonl")
    assert set(samples[0]) == {*SAMPLE_FIELDS, "penalty"}
    step1 = [s for s in samples if s["step"] == 1][:8]
    assert_group_advantages(step1, 4, lambda r: r["proxy"] - r["penalty"])
    assert_activity(rows, samples, 4, lambda r: r["proxy"])
    # a completion without EOS has the fixed reward, which does not depend on the head: no AdvPO penalty
    no_eos = [s for s in samples if not s["has_eos"]]
    assert no_eos and all(s["proxy"] == -1.0 and s["penalty"] == 0.0 for s in no_eos)
    # --references paired (the default): the completions of the prompts the preference data has enter g
    paired = {r["prompt"] for r in read_jsonl(world / "prefs" / "train.jsonl")}
    for row in rows:
        step = [s for s in samples if s["step"] == row["step"]]
        assert row["advpo/paired_fraction"] == pytest.approx(np.mean([s["prompt"] in paired for s in step]))
    assert 0 < np.mean([r["advpo/paired_fraction"] for r in rows]) < 1  # both kinds of prompt occur
    # pooled references: another g, so other penalties on the same first step's completions
    pooled = tmp_path / "pooled"
    run_ok(
        baseline_cmd("grpo_advpo.py", world, pooled, "--budget", "5", "--references", "pooled", "--total-steps", "1")
    )
    assert read_metrics(pooled)[0]["advpo/paired_fraction"] == 1.0
    assert read_metrics(pooled)[0]["advpo/g_norm"] != rows[0]["advpo/g_norm"]
    # budget 0: the proxy reward, Dr.GRPO
    zero = tmp_path / "zero"
    run_ok(baseline_cmd("grpo_advpo.py", world, zero, "--budget", "0", "--total-steps", "1"))
    assert read_metrics(zero)[0]["advpo/penalty_mean"] == 0.0
    assert_group_advantages(read_jsonl(zero / "samples.jsonl")[:8], 4, lambda r: r["proxy"])


def test_bspo_end_to_end(world, tmp_path):
    # the behaviour LM is the policy itself: a threshold of 1e-30 keeps everything in support (Dr.GRPO),
    # 0.5 sends almost every completion out of support, to the batch's minimum proxy reward
    low, high = tmp_path / "low", tmp_path / "high"
    run_ok(baseline_cmd("grpo_bspo.py", world, low, "--support-threshold", "1e-30"))
    for row in read_metrics(low):
        assert row["bspo/out_of_support_rate"] == 0.0
        assert row["bspo/reward"] == pytest.approx(row["reward/proxy"], abs=1e-6)
    assert_group_advantages(read_jsonl(low / "samples.jsonl")[:8], 4, lambda r: r["proxy"])
    run_ok(baseline_cmd("grpo_bspo.py", world, high, "--support-threshold", "0.5", "--total-steps", "1"))
    row = read_metrics(high)[0]
    assert row["bspo/out_of_support_rate"] > 0.5
    samples = read_jsonl(high / "samples.jsonl")[:8]
    assert set(samples[0]) == {*SAMPLE_FIELDS, "out_of_support"}
    assert any(s["out_of_support"] for s in samples)
    floor = row["bspo/min_return"]
    assert_group_advantages(samples, 4, lambda r: floor if r["out_of_support"] else r["proxy"])
    assert_activity([row], read_jsonl(high / "samples.jsonl"), 4, lambda r: r["proxy"])
    assert row["adv/relative_change"] > 0


@pytest.mark.parametrize(
    "script, edit, message",
    [
        ("grpo_uwo.py", "one_member", "at least 2 reward models"),
        ("grpo_uwo.py", "other_vocab", "vocabulary differs from the policy's"),
        ("grpo_uwo.py", "member_without_tokenizer", "has no tokenizer"),
        ("grpo_uwo.py", "member_not_rm", "is not a reward model"),
        ("grpo_advpo.py", "no_rejected", "has columns ['chosen', 'prompt']"),
        ("grpo_bspo.py", "no_behavior_lm", "train it with `train_rm.py --lm-coef"),
    ],
)
def test_bad_inputs_are_clear_errors(world, tmp_path, script, edit, message):
    cmd = baseline_cmd(script, world, tmp_path / "run")
    if edit == "one_member":
        i = cmd.index("--reward-model-paths")
        del cmd[i + 2 : i + 4]
    elif edit == "other_vocab":
        shutil.copytree(world / "rm_2", tmp_path / "member")
        tok = AutoTokenizer.from_pretrained(world / "base_policy")
        tok.add_tokens(["<a-token-the-policy-lacks>"])
        tok.save_pretrained(tmp_path / "member")
        cmd[cmd.index(str(world / "rm_2"))] = str(tmp_path / "member")
    elif edit == "member_without_tokenizer":  # check_same_tokenizer, as for the proxy
        (tmp_path / "member").mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(world / "rm_3" / name, tmp_path / "member" / name)
        cmd[cmd.index(str(world / "rm_3"))] = str(tmp_path / "member")
    elif edit == "member_not_rm":  # check_reward_config, before any model loads
        cmd[cmd.index(str(world / "rm_2"))] = str(world / "policy")
    elif edit == "no_rejected":
        (tmp_path / "prefs").mkdir()
        (tmp_path / "prefs" / "train.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
        cmd[cmd.index(str(world / "prefs"))] = str(tmp_path / "prefs")
    elif edit == "no_behavior_lm":
        cmd[cmd.index(str(world / "rm_bspo"))] = str(world / "rm_1")
    res = run_checks_in_process(cmd, ROOT)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_advpo_two_processes(world, tmp_path):
    out = tmp_path / "run"
    run_ok(baseline_cmd("grpo_advpo.py", world, out, procs=2))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["advpo/g_norm"] > 0 for r in rows)
    assert json.load(open(out / "args.json"))["num_processes"] == 2


def test_uwo_resume_after_kill_continues_with_no_lost_or_repeated_step(world, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ("--total-steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-num-prompts", "6")
    run_ok(baseline_cmd("grpo_uwo.py", world, straight, *common))
    proc = subprocess.Popen(
        baseline_cmd("grpo_uwo.py", world, killed, *common),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "latest").read_text() == "checkpoint-2" and not (killed / "model").exists()
    run_ok(baseline_cmd("grpo_uwo.py", world, killed, *common, "--resume"))
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]  # 0: the held-out evaluation of the initial policy
    assert [r["step"] for r in b if "eval/validation/win_rate" in r] == [0, 2, 4]
    for ra, rb in zip(a, b):  # every metric but the timings, held-out evaluation included
        assert {k: v for k, v in ra.items() if not k.startswith("time/")} == {
            k: v for k, v in rb.items() if not k.startswith("time/")
        }
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------ train_rm.py --lm-coef
def train_rm_cmd(script, world, out, *extra):
    return [
        sys.executable,
        script,
        "--policy-path",
        str(world / "base_policy"),
        "--prefs-path",
        str(world / "prefs"),
        "--dataset",
        str(world / "data"),
        "--output-dir",
        str(out),
        "--per-device-train-batch-size",
        "4",
        "--num-norm-samples",
        "8",
        "--eval-steps",
        "100",
        *extra,
    ]


def plain_bt_train_rm(tmp_path):
    """train_rm.py as it was before --lm-coef existed (the newest commit without it), from git."""
    try:
        log = subprocess.run(
            ["git", "log", "--format=%H", "--", "train_rm.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        for commit in log:
            text = subprocess.run(
                ["git", "show", f"{commit}:train_rm.py"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout
            if "lm_coef" not in text:
                path = tmp_path / "train_rm_plain.py"
                path.write_text(text)
                return path
    except (subprocess.CalledProcessError, FileNotFoundError):
        pass
    pytest.skip("no git history with a train_rm.py before --lm-coef (shallow clone?)")


def test_score_lm_reward_is_reward_and_features_and_its_lm_loss_a_token_by_token_nll():
    """train_rm.py's ScoreLM forward: its reward is exactly reward_and_features' (no second copy of the
    scoring), its LM loss the mean NLL of the lm_mask tokens, each from an unpadded forward; both backpropagate."""
    import train_rm

    rm = tiny_neox(GPTNeoXForSequenceClassification, seed=5, num_labels=1)
    torch.manual_seed(6)
    lm_head = torch.nn.Linear(16, 30, bias=False)
    ids = torch.tensor([[3, 4, 5, 6, 2, 1], [7, 8, 9, 2, 1, 1]])  # right-padded with 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    lm_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])  # the response tokens and their EOS
    reward, loss = train_rm.reward_and_lm_loss(rm, lm_head, ids, mask, lm_mask)
    torch.testing.assert_close(reward, train_rm.reward_and_features(rm, ids, mask)[0], rtol=0, atol=0)
    nll = []
    with torch.no_grad():
        for row, m, lm in zip(ids, mask, lm_mask):
            n = int(m.sum())
            logp = torch.log_softmax(lm_head(rm.gpt_neox(input_ids=row[:n].unsqueeze(0)).last_hidden_state[0]), -1)
            nll += [-logp[t - 1, row[t]].item() for t in range(1, n) if lm[t]]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    (reward.sum() + loss).backward()
    assert rm.score.weight.grad.abs().sum() > 0 and lm_head.weight.grad.abs().sum() > 0
    assert rm.gpt_neox.embed_in.weight.grad.abs().sum() > 0


def test_lm_coef_zero_trains_exactly_the_plain_bradley_terry_rm(world, tmp_path):
    plain = plain_bt_train_rm(tmp_path)
    run_ok(train_rm_cmd(str(plain), world, tmp_path / "plain"))
    run_ok(train_rm_cmd("train_rm.py", world, tmp_path / "zero", "--lm-coef", "0"))
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "zero" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "zero" / "behavior_lm").exists()


def test_lm_coef_saves_a_behaviour_lm_on_the_rm_backbone(world, tmp_path):
    out = tmp_path / "scorelm"
    run_ok(train_rm_cmd("train_rm.py", world, out, "--lm-coef", "1.0"))
    behavior = AutoModelForCausalLM.from_pretrained(out / "behavior_lm")
    rm = AutoModelForSequenceClassification.from_pretrained(out)
    sft = AutoModelForCausalLM.from_pretrained(world / "base_policy")
    b_backbone, r_backbone = behavior.gpt_neox.state_dict(), rm.gpt_neox.state_dict()
    assert all(torch.equal(b_backbone[k], r_backbone[k]) for k in r_backbone)  # the RM's trained backbone
    assert not torch.equal(rm.gpt_neox.embed_in.weight, sft.gpt_neox.embed_in.weight)  # it was trained
    head, sft_head = behavior.get_output_embeddings().weight, sft.get_output_embeddings().weight
    assert head.shape == sft_head.shape and not torch.equal(head, sft_head)  # the LM head was trained too


def test_step_time_benchmark_times_all_five_methods(world):
    res = subprocess.run(
        [
            sys.executable,
            "benchmarks/step_time.py",
            "--policy-path",
            str(world / "base_policy"),
            "--reward-model-path",
            str(world / "rm_bspo"),
            "--uwo-member-paths",
            *[str(world / f"rm_{s}") for s in (1, 2, 3)],
            "--dataset",
            str(world / "data"),
            "--num-prompts",
            "2",
            "--num-generations",
            "4",
            "--max-new-tokens",
            "4",
            "--repetitions",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    table = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.split()}
    assert float(table["Dr.GRPO"][2]) == 1.0
    for method in ("SignCert-PO", "UWO", "AdvPO", "BSPO"):
        assert float(table[method][2]) > 0
    assert "behavior_lm" in res.stdout  # BSPO's behaviour LM came from the RM folder


# ------------------------------------------------------------------ the copies cannot drift
TRAINERS = ("grpo_signcert.py", "grpo_uwo.py", "grpo_advpo.py", "grpo_bspo.py")


def top_level_sources(script):
    import ast

    text = open(os.path.join(ROOT, script)).read()
    tree = ast.parse(text)
    return {
        node.name: ast.get_source_segment(text, node)
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name != "Args"
    }


def test_every_helper_shared_by_the_trainers_is_the_same_source():
    """Rollouts, scoring, loss, update, checkpoints, data: every function the trainers have in common is
    byte-identical in each copy (the methods differ only in their own functions and main-body sections)."""
    sources = {script: top_level_sources(script) for script in TRAINERS}
    shared = set.intersection(*(set(s) for s in sources.values()))
    assert {"dr_grpo_loss", "policy_update", "sample", "reward_and_features", "save_checkpoint"} <= shared
    for name in sorted(set.union(*(set(s) for s in sources.values()))):
        copies = {script: s[name] for script, s in sources.items() if name in s}
        if len(copies) > 1 and name != "main":  # main differs in its method regions only: test_trainer_layout.py
            assert len(set(copies.values())) == 1, f"{name} differs between {sorted(copies)}"
