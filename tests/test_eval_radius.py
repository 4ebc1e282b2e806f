"""eval_radius.py, the radius validation of Figure 4: its binning and Spearman against brute force, the scale of
its parameter noise, sign survival at zero and at huge noise, and a run end to end on a micro world.
    python -m pytest tests/test_eval_radius.py -q
"""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from conftest import built_once  # noqa: E402
from test_stages import ENV, build_micro_world  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
)

import eval_radius  # noqa: E402
from eval_radius import (  # noqa: E402
    decile_bins,
    group_centred,
    perturb_parameters,
    radius_table,
    reward_and_features,
    sign_survival,
    signcert_advantages,
    spearman,
)


# ------------------------------------------------------------------ binning and Spearman, by brute force
def brute_bins(values, num_bins):
    """Sort (value, position) pairs; the r-th smallest goes to bin floor(r * num_bins / n)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    bins = [0] * len(values)
    for r, i in enumerate(order):
        bins[i] = r * num_bins // len(values)
    return bins


def brute_spearman(x, y):
    """Ranks by counting (ties: 1 + #smaller + (#equal - 1) / 2), then Pearson's formula, in plain Python."""
    rank = lambda v: [1 + sum(u < a for u in v) + (sum(u == a for u in v) - 1) / 2 for a in v]
    rx, ry = rank(x), rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


@pytest.mark.parametrize("n", [10, 11, 23, 40])
def test_decile_bins_equal_counts_in_order_with_ties(n):
    rng = random.Random(n)
    values = [rng.choice([0.1, 0.2, 0.2, 0.3, 0.5]) for _ in range(n)]  # many ties
    bins = decile_bins(values, 10)
    assert bins.tolist() == brute_bins(values, 10)
    counts = np.bincount(bins, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    for b in range(9):  # every value of a bin <= every value of the next
        assert max(v for v, c in zip(values, bins) if c == b) <= min(v for v, c in zip(values, bins) if c == b + 1)
    with pytest.raises(ValueError, match="cannot fill 10 bins"):
        decile_bins(values[:9], 10)


@pytest.mark.parametrize("seed", range(6))
def test_spearman_with_ties_matches_brute_force_and_scipy(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 25)
    x = [rng.choice([0.0, 0.5, 1.0, 2.0, rng.random()]) for _ in range(n)]
    y = [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)]  # survival rates: few values, ties
    if len(set(x)) == 1 or len(set(y)) == 1:
        assert math.isnan(spearman(x, y))
        return
    assert spearman(x, y) == pytest.approx(brute_spearman(x, y), abs=1e-12)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_of_a_constant_is_nan_and_a_monotone_map_gives_one():
    assert math.isnan(spearman([1, 2, 3], [1, 1, 1]))
    assert spearman([0.1, 0.5, 0.3, 2.0], [1, 5, 3, 9]) == pytest.approx(1.0)


def test_radius_table_per_bin_means_and_spearman():
    rng = np.random.default_rng(0)
    radius = rng.random(37)
    rates = {"param": rng.random(37), "gold": (rng.random(37) > 0.5).astype(float)}
    table, rho = radius_table(radius, rates, 10)
    bins = brute_bins(radius.tolist(), 10)
    for row in table:
        sel = [i for i, b in enumerate(bins) if b == row["bin"] - 1]
        assert row["count"] == len(sel)
        assert row["radius_min"] == min(radius[sel]) and row["radius_max"] == max(radius[sel])
        assert row["param"] == pytest.approx(sum(rates["param"][sel]) / len(sel))
        assert row["gold"] == pytest.approx(sum(rates["gold"][sel]) / len(sel))
    assert rho["gold"] == pytest.approx(brute_spearman(radius.tolist(), rates["gold"].tolist()))


def test_group_advantages_and_radius_are_the_trainers():
    """group_centred (groups of any size, listed flat) gives signcert_advantages' A_j group by group."""
    torch.manual_seed(0)
    sizes = [2, 5, 3, 8]
    rewards = torch.randn(sum(sizes), dtype=torch.float64)
    group = torch.cat([torch.full((s,), g) for g, s in enumerate(sizes)])
    adv = group_centred(rewards, group)
    start = 0
    for s in sizes:
        r = rewards[start : start + s]
        a, _, _ = signcert_advantages(r[None], torch.randn(1, s, 4, dtype=torch.float64), 0.0)
        assert torch.allclose(adv[start : start + s], a[0]) and torch.allclose(adv[start : start + s], r - r.mean())
        start += s


# ------------------------------------------------------------------ the perturbations
def tiny_rm(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=1
    )
    config.pad_token_id = 0
    return GPTNeoXForSequenceClassification(config).eval()


def test_parameter_noise_has_the_std_of_each_tensors_rms_and_hits_every_tensor():
    rm = tiny_rm()
    with torch.no_grad():  # every tensor nonzero, with its own scale (fresh biases and LayerNorm shifts are 0)
        for i, p in enumerate(rm.parameters()):
            p.copy_(torch.randn_like(p) * (0.01 + 0.3 * (i % 5)))
    before = {n: p.detach().clone() for n, p in rm.named_parameters()}
    assert "score.weight" in before and "gpt_neox.embed_in.weight" in before
    perturb_parameters(rm, 0.1, torch.Generator().manual_seed(0))
    pooled = []
    for name, p in rm.named_parameters():
        delta, old = (p.detach() - before[name]).flatten(), before[name]
        expected = 0.1 * old.norm() / math.sqrt(old.numel())
        assert (delta != 0).all(), f"{name} got no noise"
        z = delta / expected
        pooled.append(z)
        if old.numel() >= 32:  # the std of a std estimate from n draws is about 1 / sqrt(2n)
            assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * old.numel()), name
    pooled = torch.cat(pooled)
    assert abs(pooled.std().item() - 1) < 0.02 and abs(pooled.mean().item()) < 0.02


def groups_of_sequences(num_groups=12, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (num_groups * K,), generator=g)
    ids = torch.randint(1, 50, (num_groups * K, 12), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return ids * mask, mask, torch.arange(num_groups).repeat_interleave(K)


def test_zero_noise_keeps_every_sign_and_huge_noise_is_a_coin_and_the_rm_is_restored():
    rm = tiny_rm(1)
    ids, mask, group = groups_of_sequences()
    score = lambda model: reward_and_features(model, ids, mask)[0]
    with torch.no_grad():
        adv = group_centred(score(rm).double(), group)
    state = {k: v.clone() for k, v in rm.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    assert (sign_survival(rm, score, group, adv, 3, 0.0, 0.0, gen) == 1).all()
    small = sign_survival(rm, score, group, adv, 20, 0.01, 0.0, gen)
    for param, emb in ((100.0, 0.0), (0.0, 100.0)):
        huge = sign_survival(rm, score, group, adv, 20, param, emb, gen)
        assert 0.35 < huge.mean().item() < 0.65, (param, emb, huge.mean())
    assert small.mean() > 0.9  # a small noise keeps most signs: the comparison is not a coin by construction
    assert all(torch.equal(state[k], v) for k, v in rm.state_dict().items())  # restored after every draw


# ------------------------------------------------------------------ end to end on a micro world
@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The micro world of test_stages.py (8 test prompts, pad = EOS); a policy that emits EOS often (its EOS logit
    raised by 2.5), an untrained proxy RM (the base policy with a fresh head, the policy's tokenizer). Built once per
    session (conftest.built_once), read only."""
    return built_once(tmp_path_factory, "radius_world", build_radius_world)


def build_radius_world(root):
    build_micro_world(root)
    tok = AutoTokenizer.from_pretrained(root / "base_policy")
    policy = AutoModelForCausalLM.from_pretrained(root / "base_policy")
    with torch.no_grad():
        policy.gpt_neox.final_layer_norm.bias[0] = 5.0
        policy.get_output_embeddings().weight[tok.eos_token_id, 0] = 0.5
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(root / "base_policy", num_labels=1)
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return root


def radius_cmd(world, out, *extra):
    return [
        sys.executable,
        "eval_radius.py",
        "--policy-path",
        str(world / "policy"),
        "--reward-model-path",
        str(world / "rm"),
        "--gold-rm-path",
        str(world / "gold_rm"),
        "--dataset",
        str(world / "data"),
        "--num-prompts",
        "8",
        "--num-generations",
        "4",
        "--max-new-tokens",
        "10",
        "--num-draws",
        "2",
        "--output-dir",
        str(out),
        *extra,
    ]


MARK = r"^\s*[a-k]"  # the micro world's completions that start with a word of the first letters


def test_end_to_end_zero_noise_survives_everywhere_and_gold_agreement_recomputes(world, tmp_path):
    out = tmp_path / "radius"
    cmd = radius_cmd(world, out, "--param-noise", "0", "--embedding-noise", "0", "--mark", MARK)
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "radius.json").read_text())
    assert (out / "radius.png").stat().st_size > 10_000
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    counts, table = result["counts"], result["table"]
    assert len(samples) == counts["completions"] == 32 and len(table) == 10
    assert counts["no_eos"] == sum(not s["has_eos"] for s in samples) > 0  # both kinds occur
    assert all(s["proxy"] is None for s in samples if not s["has_eos"])  # dropped: no RM score
    assert all(row["param"] == 1.0 and row["embedding"] == 1.0 for row in table)  # no noise: every sign stays
    # the gold agreement, recomputed from the dump: the groups' members are its completions with a gold score
    analysed = [s for s in samples if s["status"] == "analysed"]
    assert len(analysed) == counts["analysed"] == sum(row["count"] for row in table)
    agree = {}
    for s in analysed:
        group = [m for m in samples if m["group"] == s["group"] and m["gold"] is not None]
        proxy_adv = s["proxy"] - sum(m["proxy"] for m in group) / len(group)
        gold_adv = s["gold"] - sum(m["gold"] for m in group) / len(group)
        assert proxy_adv == pytest.approx(s["proxy_advantage"], abs=1e-6)
        agree[id(s)] = float(np.sign(proxy_adv) == np.sign(gold_adv))
    bins = brute_bins([s["radius"] for s in analysed], 10)
    assert [s["decile"] for s in analysed] == [b + 1 for b in bins]
    for row in table:
        members = [agree[id(s)] for s, b in zip(analysed, bins) if b == row["bin"] - 1]
        assert row["gold"] == pytest.approx(sum(members) / len(members))
    expected = spearmanr([s["radius"] for s in analysed], [agree[id(s)] for s in analysed]).statistic
    assert result["spearman"]["gold"] == pytest.approx(expected)
    # --mark: each completion's match of the regex, and per bin the share of matches
    assert [s["marked"] for s in samples] == [re.search(MARK, s["response"]) is not None for s in samples]
    assert 0 < sum(s["marked"] for s in analysed) < len(analysed)  # both kinds occur
    for row in table:
        members = [float(s["marked"]) for s, b in zip(analysed, bins) if b == row["bin"] - 1]
        assert row["marked"] == pytest.approx(sum(members) / len(members))
    expected = spearmanr([s["radius"] for s in analysed], [s["marked"] for s in analysed]).statistic
    assert result["spearman"]["marked"] == pytest.approx(expected)
    assert result["spearman"]["param"] is None  # constant survival: no correlation to report


# ------------------------------------------------------------------ bad input, before any model loads
def make_args(world, **kw):
    base = dict(
        policy_path=str(world / "policy"),
        reward_model_path=str(world / "rm"),
        gold_rm_path=str(world / "gold_rm"),
        dataset=str(world / "data"),
        num_prompts=8,
    )
    return eval_radius.Args(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(num_generations=1), ValueError, "--num-generations must be >= 2"),
        (dict(num_prompts=9), ValueError, "more than the 8 prompts of .*test.jsonl: pass --num-prompts 8 or fewer"),
        (dict(reward_model_path="runs/nowhere/rm"), FileNotFoundError, "--reward-model-path runs/nowhere/rm: no such"),
        (dict(reward_model_path="POLICY"), ValueError, "--reward-model-path .* is not a reward model"),
        (dict(param_noise=-0.1), ValueError, "--param-noise"),
        (dict(mark="(unclosed"), ValueError, "--mark '\\(unclosed' is not a regular expression"),
    ],
)
def test_bad_input_fails_early_saying_what_to_do(world, kw, error, message):
    kw = {k: str(world / "policy") if v == "POLICY" else v for k, v in kw.items()}
    with pytest.raises(error, match=message):
        eval_radius.check_inputs(make_args(world, **kw))
    eval_radius.check_inputs(make_args(world))  # the good arguments pass


def test_presets_give_the_papers_protocol_and_flags_override_them(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["eval_radius.py", "--preset", "paper", "--num-draws", "3"])
    args = eval_radius.parse_args()
    assert (args.num_prompts, args.num_generations, args.temperature) == (500, 8, 0.7)
    assert (args.param_noise, args.embedding_noise, args.num_bins, args.num_draws) == (0.1, 0.01, 10, 3)
    assert args.max_new_tokens == 53 and args.split == "test"
    monkeypatch.setattr(sys, "argv", ["eval_radius.py"])
    assert eval_radius.parse_args().num_prompts == 200
