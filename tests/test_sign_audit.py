"""tools/sign_audit.py: its shares against an independent numpy computation, and end to end on a short SignCert-PO
run of the CI world: its gold scores are the trainer's own gold monitor, and the completions it counts as reversed
are exactly those whose radius is below the step's logged eps."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))
from conftest import built_once, read_jsonl, read_metrics, short_run_cmd  # noqa: E402
from sign_audit import audit, pooled  # noqa: E402


def expected(samples, gold):
    """The shares of the module docstring, in numpy: group-centre proxy and gold, drop zeros and completions without
    EOS, split at the median; per step also the kept completions' radii, sorted."""
    step = np.array([s["step"] for s in samples])
    group = np.array([s["group"] for s in samples])
    proxy, g = np.array([s["proxy"] for s in samples]), np.array(gold)
    adv, radius = np.array([s["advantage"] for s in samples]), np.array([s["radius"] for s in samples])
    eos = np.array([s.get("has_eos", True) for s in samples])
    raw, gadv = np.zeros_like(proxy), np.zeros_like(g)
    for key in set(zip(step, group)):
        m = (step == key[0]) & (group == key[1])
        raw[m], gadv[m] = proxy[m] - proxy[m].mean(), g[m] - g[m].mean()
    out = {}
    for st in np.unique(step):
        m = (step == st) & eos & (np.abs(raw) > 1e-6) & (np.abs(gadv) > 1e-6)
        order = np.argsort(radius[m], kind="stable")
        wrong = (np.sign(raw[m]) != np.sign(gadv[m]))[order]
        rev = (np.sign(adv[m]) == -np.sign(raw[m]))[order]
        h = len(order) // 2
        out[int(st)] = (len(order), wrong[:h], wrong[h:], rev, wrong[rev], radius[m][order])
    return out


def test_shares_match_numpy_on_random_batches():
    rng = np.random.default_rng(0)
    samples, gold = [], []
    for step in (1, 2):
        for grp in range(6 if step == 1 else 3):  # steps of unequal size: pooling is not averaging
            for _ in range(8):
                proxy = float(rng.normal())
                samples.append(
                    dict(step=step, group=grp, proxy=proxy, radius=float(rng.random()), advantage=float(rng.normal()))
                )
                gold.append(proxy + float(rng.normal()))  # a gold that agrees with the proxy more often than not
    steps = audit(samples, gold)
    got = {r["step"]: r for r in steps}
    want = expected(samples, gold)
    for st, (n, ws, wl, rev, rw, _) in want.items():
        r = got[st]
        assert (r["n"], r["reversed"]) == (n, rev.sum())
        assert r["wrong_small"] == pytest.approx(ws.mean()) and r["wrong_large"] == pytest.approx(wl.mean())
        assert r["reversed_wrong"] == pytest.approx(rw.mean())
    every = pooled(steps)  # the steps together: each split at its own median, then pooled
    assert every["wrong_small"] == pytest.approx(np.concatenate([w[1] for w in want.values()]).mean())
    assert every["wrong_large"] == pytest.approx(np.concatenate([w[2] for w in want.values()]).mean())
    assert every["reversed_wrong"] == pytest.approx(np.concatenate([w[4] for w in want.values()]).mean())


def test_a_hand_made_group():
    """One group of 4: raw advantages -1.5, -0.5, 0.5, 1.5 (proxy 0..3); gold disagrees on the two smallest radii's
    signs only; the update reversed the completion of radius 0.1, zeroed (clip) the one of 0.2."""
    proxy, radius = [0.0, 1.0, 2.0, 3.0], [0.3, 0.1, 0.2, 0.4]
    gold = [0.0, 2.0, 1.0, 3.0]  # gold advantages -1.5, 0.5, -0.5, 1.5: completions 1 and 2 disagree
    adv = [-1.0, 0.4, 0.0, 1.0]
    samples = [dict(step=5, group=0, proxy=p, radius=r, advantage=a) for p, r, a in zip(proxy, radius, adv)]
    (r,) = audit(samples, gold)
    keys = ("step", "n", "wrong_small", "wrong_large", "reversed", "reversed_wrong")
    assert {k: r[k] for k in keys} == dict(
        step=5, n=4, wrong_small=1.0, wrong_large=0.0, reversed=1, reversed_wrong=1.0
    )


@pytest.fixture(scope="session")
def audited(tmp_path_factory, ci_world_with_rm):
    world = ci_world_with_rm

    def build(folder):
        run = folder / "run"
        cmd = short_run_cmd(
            "grpo_signcert.py",
            world,
            run,
            "--reward-model-path",
            str(world / "rm"),
            "--quantile",
            "0.5",
            "--total-steps",
            "2",
            "--gold-every",
            "1",
            "--log-samples-every",
            "1",
        )
        subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)
        tool = [sys.executable, "tools/sign_audit.py", "--runs", str(run), "--gold-rm-path", str(world / "gold_rm")]
        tool += ["--radii", "head", "feature", "full"]
        subprocess.run(tool + ["--output", str(folder / "audit.json")], check=True, cwd=REPO, capture_output=True)

    folder = built_once(tmp_path_factory, "sign_audit", build)
    run = folder / "run"
    report = json.loads((folder / "audit.json").read_text())["runs"][str(run)]
    return read_jsonl(run / "samples.jsonl"), read_metrics(run), report, run


def test_gold_scores_are_the_trainers_gold_monitor(audited):
    samples, _, report, _ = audited
    logged = [(s["gold"], g) for s, g in zip(samples, report["gold"]) if s["gold"] is not None]
    assert len(logged) == len(samples)  # --gold-every 1: every logged completion has the trainer's gold score
    assert np.allclose([a for a, _ in logged], [b for _, b in logged], atol=1e-4)


def test_reversed_completions_are_those_below_eps(audited):
    samples, metrics, report, _ = audited
    eps = {m["step"]: m["signcert/eps"] for m in metrics if "signcert/eps" in m}
    steps = {r["step"]: r for r in report["steps"]}
    assert steps  # the analysis saw both steps
    want = expected(samples, report["gold"])
    for st, r in steps.items():
        kept_radii = want[st][5]  # the completions the audit analyses at that step, recomputed here
        assert r["reversed"] == (kept_radii < eps[st]).sum() > 0


def test_recomputed_radii_are_the_logged_head_radius_and_the_feature_ranking(audited):
    """`--radii`: the proxy RM re-reads prompt + response + EOS as the trainer fed it (its rewards within 1e-4 of the
    logged ones), its head radius is the logged radius, and the feature model's split is the split by |A| (its
    radius is |A| / const), recomputed here with numpy; the full model gives its own split of the same completions."""
    samples, _, report, _ = audited
    check = report["radii_check"]  # re_encoded: a byte-level token of the CI world cut in a character
    assert check["proxy"] < 1e-4 and check["head_radius_within_1e-3"] == 1.0 and check["re_encoded"] <= 2
    logged = report["pooled"]
    head = report["radii"]["head"]
    assert (head["n"], head["wrong_small_n"], head["wrong_large_n"]) == (
        logged["n"], logged["wrong_small_n"], logged["wrong_large_n"])  # fmt: skip
    by_adv = []
    for s in samples:
        members = [t["proxy"] for t in samples if (t["step"], t["group"]) == (s["step"], s["group"])]
        by_adv.append(s | {"radius": abs(s["proxy"] - sum(members) / len(members))})
    want = expected(by_adv, report["gold"])
    small = sum(int(w[1].sum()) for w in want.values())
    large = sum(int(w[2].sum()) for w in want.values())
    feature = report["radii"]["feature"]
    assert (feature["wrong_small_n"], feature["wrong_large_n"]) == (small, large)
    assert report["radii"]["full"]["n"] == logged["n"]


def test_recomputed_feature_radius_against_numpy(audited):
    """The feature model's radius of every logged completion: |A_j| / (||w|| sqrt((1 - 1/K)^2 + (n - 1) / K^2)) with n
    the group's completions that have an EOS (the others' rewards are the penalty: g = 0), w from the RM's file."""
    from safetensors.numpy import load_file
    from sign_audit import recomputed_radii

    samples, _, _, run = audited
    args = json.loads((run / "args.json").read_text())
    radii, _ = recomputed_radii(samples, args, ["feature"])
    w = load_file(str(Path(args["reward_model_path"]) / "model.safetensors"))["score.weight"].astype(np.float64)
    checked = 0
    for s, got in zip(samples, radii["feature"]):
        group = [t for t in samples if (t["step"], t["group"]) == (s["step"], s["group"])]
        K, n = len(group), sum(t["has_eos"] for t in group)
        adv = s["proxy"] - np.mean([t["proxy"] for t in group])
        if s["has_eos"]:
            assert got == pytest.approx(abs(adv) / (np.linalg.norm(w) * np.sqrt((1 - 1 / K) ** 2 + (n - 1) / K**2)))
            checked += 1
        else:
            assert got == float("inf")
    assert checked > 0 and checked < len(samples)  # both kinds seen
