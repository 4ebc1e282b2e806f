"""On-policy sign audit: are the proxy's wrong advantage signs the small-radius ones during RL, and what does a
method's re-weighting do to them?

For RL run folders (`grpo_signcert.py` and its baselines write every completion of every `--log-samples-every`-th
step to samples.jsonl, with its proxy reward, the advantage the update used and its certified radius), this scores
each logged completion with the gold RM and, per logged step, over the completions whose raw Dr.GRPO advantage
(proxy reward minus its group's mean) and gold advantage (the same with the gold) are both non-zero, reports:

- `wrong_small`, `wrong_large`: the share of raw proxy signs that disagree with the gold's, among the completions
  in the lower and in the upper half of the step's radii (the paper's premise: the first is the larger);
- `reversed`: how many completions the update used with the strictly opposite sign to the raw one (SignCert-PO
  reverses exactly those with radius < eps; `--clip` sets them to 0, which is not a reversal), and `reversed_wrong`: the share of them whose raw sign was wrong. A reversal
  corrects the training signal only where that share is above one half; below it, it turns right signs wrong.

    python tools/sign_audit.py --runs runs/tiny_world/rl/signcert_q0.5_kl0.01_s1 runs/tiny_world/rl/drgrpo_kl0.01_s1

`--radii head feature full` (the uncertainty models of grpo_signcert.py `--uncertainty`, docs/METHOD.md section 2b)
recomputes each logged completion's Dr.GRPO radius under each model with the run's proxy RM (prompt ids + response
ids + EOS, as the trainer feeds it: the recomputed proxy reward and head radius are checked against the logged ones)
and reports `wrong_small` / `wrong_large` with the steps split at each model's median instead (`radii` in the JSON).

The gold input is built as every stage builds it (`eval_radius.gold_rewards`); a completion without EOS scores the
run's `--missing-eos-penalty`, as in the trainer, and is not audited (its reward is not the RM's). Prints a table per run and writes
the JSON (per step, and every step pooled: counts summed, each step split at its own median radius) to
`--output`.
"""

import json
import math
import os
import sys
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # eval_radius.py, one level up

import torch
import tyro
from transformers import AutoTokenizer

import eval_radius
import grpo_signcert as gs


@dataclass
class Args:
    runs: List[str] = field(default_factory=lambda: ["runs/tiny_world/rl/signcert_q0.5_kl0.01_s1"])
    """RL run folders, each with its samples.jsonl"""
    gold_rm_path: str = "runs/tiny_world/gold_rm"
    """the gold RM (a *ForSequenceClassification folder with its tokenizer)"""
    output: str = "runs/sign_audit.json"
    """where the JSON goes"""
    threads: int = 1
    """torch CPU threads"""
    gold_batch_size: int = 64
    gold_max_length: int = 256
    radii: List[str] = field(default_factory=list)
    """uncertainty models (head, feature, full) whose radius is recomputed with the run's proxy RM and audited beside
    the logged one; empty: only the logged radius"""


def audit(samples: list[dict], gold: list[float], tol: float = 1e-6) -> list[dict]:
    """Per logged step, the shares described in the module docstring. `gold`: the gold score of each sample (the
    group means include every completion, as the trainer's do; completions without EOS are not audited)."""
    groups = defaultdict(list)
    for s, g in zip(samples, gold):
        groups[(s["step"], s["group"])].append((s, g))
    per_step = defaultdict(list)  # step -> (radius, raw sign wrong, reversed by the update)
    for (step, _), members in sorted(groups.items()):
        proxy_mean = sum(s["proxy"] for s, _ in members) / len(members)
        gold_mean = sum(g for _, g in members) / len(members)
        for s, g in members:
            raw, gold_adv = s["proxy"] - proxy_mean, g - gold_mean
            if not s.get("has_eos", True) or s["radius"] is None or abs(raw) < tol or abs(gold_adv) < tol:
                continue  # a fixed missing-EOS reward is not the RM's: no sign of the proxy's to audit
            reversed_ = s["advantage"] * raw < 0 and abs(s["advantage"]) > tol  # radius == eps: rho = 0 up to rounding
            per_step[step].append((s["radius"], (raw > 0) != (gold_adv > 0), reversed_))
    out = []
    for step, rows in sorted(per_step.items()):
        rows.sort(key=lambda r: r[0])
        half = len(rows) // 2
        small, large = rows[:half], rows[half:]
        rev = [wrong for _, wrong, reversed_ in rows if reversed_]
        counts = dict(
            n=len(rows),
            n_small=len(small),
            wrong_small_n=sum(w for _, w, _ in small),
            n_large=len(large),
            wrong_large_n=sum(w for _, w, _ in large),
            reversed=len(rev),
            reversed_wrong_n=sum(rev),
        )
        out.append(dict(step=step, **counts, **shares(counts)))
    return out


def shares(c: dict) -> dict:
    """The shares of a step's counts, or of counts summed over steps (None where nothing was counted)."""
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return dict(
        wrong_small=ratio(c["wrong_small_n"], c["n_small"]),
        wrong_large=ratio(c["wrong_large_n"], c["n_large"]),
        reversed_wrong=ratio(c["reversed_wrong_n"], c["reversed"]),
    )


def pooled(steps: list[dict]) -> dict:
    """Every logged step together: the counts summed (each step split at its own median radius), then the shares."""
    keys = ("n", "n_small", "wrong_small_n", "n_large", "wrong_large_n", "reversed", "reversed_wrong_n")
    counts = {k: sum(r[k] for r in steps) for k in keys}
    return dict(step="pooled", **counts, **shares(counts))


def recomputed_radii(samples: list[dict], run_args: dict, kinds: list[str]) -> tuple[dict, dict]:
    """{kind: each sample's Dr.GRPO radius |A_j| / ||dA_j / dtheta|| under that uncertainty model} from the run's proxy
    RM, groups as logged (their K completions in order; a completion without EOS has its logged penalty and g = 0, as
    in the trainer), and the largest differences of the recomputed proxy reward and head radius from the logged ones."""
    rm = gs.load_reward_model(run_args["reward_model_path"], False, torch.float32, "the run's --reward-model-path")
    tok = AutoTokenizer.from_pretrained(run_args["policy_path"])
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s["step"], s["group"])].append(i)
    order = [i for key in sorted(groups) for i in groups[key]]
    K = len(next(iter(groups.values())))
    if any(len(g) != K for g in groups.values()):
        raise SystemExit("samples.jsonl: groups of different sizes (a run with every completion logged is needed)")
    ids = [
        eval_radius.rm_input_ids(
            tok, eval_radius.as_query(tok, samples[i]["prompt"]), samples[i]["response"], 10**9, False
        )
        for i in order
    ]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id or 0] * (width - len(x)) + x for x in ids])  # left padding
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    with torch.no_grad():
        reward, h = gs.reward_and_features(rm, input_ids, mask)
    eos = torch.tensor([samples[i]["has_eos"] for i in order]).view(-1, K)
    logged = torch.tensor([samples[i]["proxy"] for i in order], dtype=torch.float64).view(-1, K)
    h = h.view(-1, K, h.shape[-1])
    # a response whose decoded text does not re-encode to its own tokens (a byte-level token cut in a character)
    differs = [len(tok(samples[i]["response"], add_special_tokens=False).input_ids) + 1 != samples[i]["length"]
               for i in order]  # fmt: skip
    exact = eos & ~torch.tensor(differs).view(-1, K)
    check = {
        "proxy": (reward.double().view(-1, K) - logged).abs()[exact].max().item(),
        "re_encoded": int((eos & ~exact).sum()),
    }
    out = {}
    for kind in kinds:
        gram = gs.uncertainty_gram(kind, rm, h, input_ids, mask)
        adv, sens = gs.other_advantages(logged, gram, "drgrpo", certified=eos)
        sens = sens * eos  # the penalty is not the RM's to certify: no radius (as signcert_advantages)
        radius = torch.where(sens > 0, adv.abs() / sens, torch.inf).flatten().tolist()
        out[kind] = [0.0] * len(samples)
        for i, r in zip(order, radius):
            out[kind][i] = r
    if "head" in out:
        pairs = [
            (a, s["radius"]) for a, s in zip(out["head"], samples) if s["has_eos"] and s["radius"] not in (None, 0)
        ]
        # the share within 1e-3: where a group's completions are (nearly) identical, ||h_j - hbar|| is float noise
        # (another padding here than in the trainer), so is its radius; those few differ
        both = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        check["head_radius_within_1e-3"] = sum(abs(a - b) <= 1e-3 * b for a, b in both) / max(len(both), 1)
    return out, check


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    for path in [args.gold_rm_path] + [os.path.join(r, f) for r in args.runs for f in ("samples.jsonl", "args.json")]:
        if not os.path.exists(path):
            raise SystemExit(
                f"{path} does not exist (--runs: RL run folders with samples.jsonl and args.json; --gold-rm-path)"
            )
    gold = eval_radius.load_reward_model(args.gold_rm_path, False, torch.float32, "--gold-rm-path")
    tok = AutoTokenizer.from_pretrained(args.gold_rm_path)
    sizes = types.SimpleNamespace(gold_batch_size=args.gold_batch_size, gold_max_length=args.gold_max_length)
    report = {"args": vars(args), "runs": {}}
    for run in args.runs:
        with open(os.path.join(run, "samples.jsonl")) as f:
            samples = [json.loads(line) for line in f]
        with torch.no_grad():
            scores = eval_radius.gold_rewards(
                gold, tok, [s["prompt"] for s in samples], [s["response"] for s in samples], sizes, "cpu"
            ).tolist()
        with open(os.path.join(run, "args.json")) as f:
            penalty = json.load(f).get("missing_eos_penalty")
        if penalty is not None:  # the trainer's convention: a completion without EOS scores the penalty, gold too
            scores = [g if s["has_eos"] else penalty for s, g in zip(samples, scores)]
        steps = audit(samples, scores)
        report["runs"][run] = dict(steps=steps, pooled=pooled(steps), gold=scores)
        if args.radii:
            with open(os.path.join(run, "args.json")) as f:
                radii, check = recomputed_radii(samples, json.load(f), args.radii)
            per_kind = {
                k: pooled(audit([s | {"radius": r} for s, r in zip(samples, v)], scores)) for k, v in radii.items()
            }
            report["runs"][run] |= dict(radii=per_kind, radii_check=check)
            print(f"\n{run}: pooled over its logged steps, each split at the model's median radius (recomputed; the "
                  f"proxy within {check['proxy']:.1e} of the logged, {check['re_encoded']} completions re-encoded "
                  "otherwise)")  # fmt: skip
            print("| uncertainty | n | raw sign wrong, small-radius half | large-radius half |\n|---|---|---|---|")
            for kind, r in per_kind.items():
                print(f"| {kind} | {r['n']} | {r['wrong_small']:.3f} | {r['wrong_large']:.3f} |")
        print(
            f"\n{run}\n| step | n | raw sign wrong, small-radius half | large-radius half | reversed | of them raw-wrong |"
        )
        print("|---|---|---|---|---|---|")
        fmt = lambda v: "-" if v is None else str(v) if isinstance(v, int) else f"{v:.2f}"  # noqa: E731
        for r in steps + [pooled(steps)]:
            cols = ("wrong_small", "wrong_large", "reversed", "reversed_wrong")
            print(f"| {r['step']} | {r['n']} | " + " | ".join(fmt(r[k]) for k in cols) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.output}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
