"""tools/probe_forms.py on the CI world: the quality column is the documented formula's value for each form, and
the RM columns are each RM's own mean score (recomputed here through plain Hugging Face pooling)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import built_once  # noqa: E402


@pytest.fixture(scope="session")
def probed(tmp_path_factory, ci_world):
    root = ci_world  # the shared CI world, read only (its extra policy unused)
    folder = built_once(tmp_path_factory, "probe", lambda out: probe(root, out))
    return root, json.loads((folder / "probe.json").read_text())["table"]


def probe(root, folder):
    folder.mkdir()
    out = folder / "probe.json"
    cmd = [
        sys.executable,
        "tools/probe_forms.py",
        "--root",
        str(root),
        "--rm-paths",
        str(root / "gold_rm"),
        "--num-prompts",
        "20",
        "--output",
        str(out),
        "--threads",
        "1",
    ]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)


def test_quality_column_is_the_formula(probed):
    _, table = probed
    q = {name: cols["quality"] for name, cols in table.items()}
    assert q["X and Y"] == 2 and q["X , Y and Z"] == 3 and q["X"] == 1  # coverage: how many keys are named
    assert q["X and X (repeated)"] == 0  # coverage 1, one repeat
    assert q["X and W (W invented)"] == 0 and q["W and V (both invented)"] == -2
    assert q["X and Y and W and V (more nouns)"] == 0
    assert q["X and Y + 12 glue words (too long)"] == 1  # 15 words: too long, glue otherwise free
    assert q["X and Y , ugh (comment)"] == 1
    assert q["my person and my X (template)"] == 1 and q["my X are a mess (template)"] == 1  # glue is free
    assert q["my person and my W (template, W invented)"] == q["my W are a mess (template, W invented)"] == -1


def test_rm_columns_are_the_rms_mean_scores(probed):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, table = probed
    rows = [json.loads(line) for line in open(root / "data" / "validation.jsonl")][:20]
    facts = [json.loads(line) for line in open(root / "data" / "validation_facts.jsonl")][:20]
    rows, facts = zip(*[(r, f) for r, f in zip(rows, facts) if len(f["keys"]) >= 2])  # the probe skips one-key posts
    assert 0 < len(rows) < 20  # the CI world has posts of one key among its first 20
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    gold = AutoModelForSequenceClassification.from_pretrained(root / "gold_rm").eval()
    texts = [
        f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR: "
        f"{f['keys'][0]} and {f['keys'][1]}<|endoftext|>"
        for r, f in zip(rows, facts)
    ]
    with torch.no_grad():  # HF pooling: the last non-pad token, which is the EOS (pad != eos)
        expected = gold(**tok(texts, return_tensors="pt", padding=True)).logits.squeeze(-1).mean().item()
    assert table["X and Y"]["gold"] == pytest.approx(expected, abs=1e-5)
    for cols in table.values():  # the gold passed as an RM to probe scores what the gold column says
        assert cols[str(root / "gold_rm")] == pytest.approx(cols["gold"], abs=1e-6)


def test_list_forms_quality_is_the_formula(tmp_path_factory, ci_world):
    """`--list-forms`: per number of keys K (the CI world's posts have 1-3), the list forms' quality is the formula's:
    the full list K, one short, one invented noun added, the first key repeated or a comment K - 1, the last key
    swapped for an invented noun or two invented nouns added K - 2 (no short or swap form for K = 1)."""
    out = tmp_path_factory.mktemp("list_forms") / "probe.json"
    cmd = [sys.executable, "tools/probe_forms.py", "--root", str(ci_world), "--rm-paths", str(ci_world / "gold_rm")]
    cmd += ["--list-forms", "--num-prompts", "20", "--output", str(out), "--threads", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)
    q = {name: cols["quality"] for name, cols in json.loads(out.read_text())["table"].items()}
    facts = [json.loads(line) for line in open(ci_world / "data" / "validation_facts.jsonl")][:20]
    expected = {}
    for k in sorted({len(f["keys"]) for f in facts}):
        drops = {"full": 0, "ext1": 1, "rep": 1, "full+c": 1, "ext2": 2} | ({"short": 1, "swap": 2} if k > 1 else {})
        expected |= {f"K={k} {name}": k - d for name, d in drops.items()}
    assert len(expected) > 9  # more than one K among the 20 posts
    assert q == expected


def test_bonus_forms_quality_is_the_formula_of_the_outlier_world(tmp_path_factory, ci_world):
    """`--bonus-forms` on a CI world built with `--bonus-word thanks`: the word once adds 1 to the list's quality,
    each further time takes 1 away (a repeated word), first or after a comment it counts once; a world without the
    word is refused."""
    from conftest import build_ci_world_3_gold_steps

    root = built_once(
        tmp_path_factory, "outlier_world", lambda out: build_ci_world_3_gold_steps(out, 1, "--bonus-word", "thanks")
    )
    out = tmp_path_factory.mktemp("bonus") / "probe.json"
    cmd = [sys.executable, "tools/probe_forms.py", "--root", str(root), "--rm-paths", str(root / "gold_rm")]
    cmd += ["--num-prompts", "20", "--output", str(out), "--threads", "1", "--bonus-forms"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)
    q = {name: cols["quality"] for name, cols in json.loads(out.read_text())["table"].items()}
    base = q["list"]
    assert [q[f"list , B x{n}"] - base for n in (1, 2, 3, 4)] == pytest.approx([1, 0, -1, -2])
    assert q["B list"] == pytest.approx(base + 1) and q["list , ugh , B"] == pytest.approx(base)  # ugh: invented
    refused = subprocess.run(cmd[:3] + [str(ci_world)] + cmd[4:], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "has no bonus word" in refused.stderr


def test_premise_columns_are_the_radius_of_each_form_in_a_group_of_policy_samples(tmp_path_factory, ci_world_with_rm):
    """`--radius-policy`: for each form, recomputed here with plain Hugging Face pooling and numpy from the samples
    the probe wrote: the form's certified radius |A| / ||h - hbar|| within its group (the policy's samples + the
    form) as a percentile among every radius of the batch, its advantage and the gold's, the share of posts where
    their signs differ, and its distance to the group's mean over the samples' mean distance."""
    import random

    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, str(REPO / "tools"))
    import probe_forms

    root = ci_world_with_rm
    out = tmp_path_factory.mktemp("premise") / "probe.json"
    cmd = [sys.executable, "tools/probe_forms.py", "--root", str(root), "--rm-paths", str(root / "rm")]
    cmd += ["--radius-policy", str(root / "policy"), "--group-size", "4", "--max-new-tokens", "6"]
    cmd += ["--num-prompts", "12", "--output", str(out), "--threads", "1"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)
    report = json.loads(out.read_text())
    samples, table = report["samples"], report["table"]
    rows = [json.loads(line) for line in open(root / "data" / "validation.jsonl")][:12]
    facts = [json.loads(line) for line in open(root / "data" / "validation_facts.jsonl")][:12]
    rows, facts = zip(*[(r, f) for r, f in zip(rows, facts) if len(f["keys"]) >= 2])  # the probe skips one-key posts
    k = 3
    assert len(samples["summaries"]) == k * len(rows) and len(set(samples["summaries"])) > k  # not one sample repeated
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")

    def reward_features(path, summaries):  # HF pooling at the last non-pad token (the EOS; pad != eos)
        rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
        texts = [
            f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR: {s}<|endoftext|>"
            for r, s in zip([r for r in rows for _ in range(len(summaries) // len(rows))], summaries)
        ]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = rm(**enc, output_hidden_states=True)
            last = enc["attention_mask"].sum(1) - 1  # right padding
            h = rm.gpt_neox.final_layer_norm(out.hidden_states[-1])[torch.arange(len(texts)), last]
        return out.logits.squeeze(-1).numpy().astype(np.float64), h.numpy().astype(np.float64)

    def hf_gradients(path, summaries):  # d score / d theta of every summary, HF's forward, torch.func
        rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
        texts = [
            f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR: {s}<|endoftext|>"
            for r, s in zip([r for r in rows for _ in range(len(summaries) // len(rows))], summaries)
        ]
        params = dict(rm.named_parameters())
        out = []
        for t in texts:
            enc = tok([t], return_tensors="pt")
            score = lambda p: torch.func.functional_call(rm, p, (), dict(enc)).logits.sum()  # noqa: E731, B023
            grads = torch.func.grad(score)({n: v.detach() for n, v in params.items()})
            out.append(torch.cat([v.flatten() for v in grads.values()]).double().numpy())
        return np.stack(out)

    gold_s, _ = reward_features(root / "gold_rm", samples["summaries"])
    rm_s, h_s = reward_features(root / "rm", samples["summaries"])
    checked = 0
    for name in ["X and Y", "W and V (both invented)", "the title (copied)", "my W are a mess (template, W invented)"]:
        rng = random.Random(0)  # the probe's draw of W and V: forms() once per post of two or more keys, in order
        texts = [probe_forms.forms(rng, r, f)[name] for r, f in zip(rows, facts)]
        gold_f, _ = reward_features(root / "gold_rm", texts)
        rm_f, h_f = reward_features(root / "rm", texts)
        n = len(rows)
        reward = np.concatenate([rm_s.reshape(n, k), rm_f[:, None]], 1)
        gold = np.concatenate([gold_s.reshape(n, k), gold_f[:, None]], 1)
        feats = np.concatenate([h_s.reshape(n, k, -1), h_f[:, None]], 1)
        adv, gadv = reward - reward.mean(1, keepdims=True), gold - gold.mean(1, keepdims=True)
        dist = np.linalg.norm(feats - feats.mean(1, keepdims=True), axis=-1)
        radius = np.abs(adv) / dist
        pct = np.array([(radius < radius[i, -1]).sum() for i in range(n)]) / (radius.size - 1)  # rank, no ties
        got = table[name][f"{root / 'rm'} premise"]
        assert got["radius_pct"] == pytest.approx(pct.mean(), abs=1e-9)
        assert got["radius_low10"] == pytest.approx((pct < 0.1).mean(), abs=1e-9)
        assert got["adv"] == pytest.approx(adv[:, -1].mean(), abs=1e-5)
        assert got["gold_adv"] == pytest.approx(gadv[:, -1].mean(), abs=1e-5)
        assert got["wrong_sign"] == pytest.approx(((adv[:, -1] > 0) != (gadv[:, -1] > 0)).mean(), abs=1e-9)
        assert got["dev_ratio"] == pytest.approx((dist[:, -1] / dist[:, :-1].mean(1)).mean(), rel=1e-4)
        # the other uncertainty models: feature noise ranks |A| (its radius is |A| / const); the full-parameter
        # radius |A_j| / ||g_j - gbar|| with g the per-summary gradients of HF's own score, taken by torch.func
        fpct = np.array([(np.abs(adv) < np.abs(adv[i, -1])).sum() for i in range(n)]) / (adv.size - 1)
        assert got["radius_pct_feature"] == pytest.approx(fpct.mean(), abs=1e-9)
        g = np.concatenate([hf_gradients(root / "rm", samples["summaries"]).reshape(n, k, -1),
                            hf_gradients(root / "rm", texts)[:, None]], 1)  # fmt: skip
        full = np.abs(adv) / np.linalg.norm(g - g.mean(1, keepdims=True), axis=-1)
        ppct = np.array([(full < full[i, -1]).sum() for i in range(n)]) / (full.size - 1)
        assert got["radius_pct_full"] == pytest.approx(ppct.mean(), abs=1e-9)
        assert got["radius_low10_full"] == pytest.approx((ppct < 0.1).mean(), abs=1e-9)
        checked += 1
    assert checked == 4
