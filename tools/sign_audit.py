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

The gold input is built as every stage builds it (`eval_radius.gold_rewards`); a completion without EOS scores the
run's `--missing-eos-penalty`, as in the trainer, and is not audited (its reward is not the RM's). Prints a table per run and writes
the JSON (per step, and every step pooled: counts summed, each step split at its own median radius) to
`--output`.
"""

import json
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
