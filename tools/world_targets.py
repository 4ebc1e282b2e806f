"""The tiny world's targets, chain seed by chain seed, from what `pipeline.py` wrote (no training here):

    python pipeline.py --seeds 1 2 3 4 5 --methods drgrpo       # the chains and their default Dr.GRPO runs
    python tools/world_targets.py --seeds 1 2 3 4 5             # the table: each target, met or missed, per seed

Targets (the world is fit for its purpose when every one holds on every chain seed):
- proxy: the proxy RM agrees with the gold on 65-80% of the held-out SFT pairs (`rm/eval.json`);
- SFT: the SFT policy's gold win rate against the references is 10-35% (`eval_sft_test/eval.json`);
- gain: Dr.GRPO's held-out test gold peaks at least 0.15 above the SFT policy's (step 0 of its run);
- loss: by the last step it has lost at least half of that gain ...
- rising: ... while its held-out test proxy reward is still rising (the last evaluation above the one at the peak);
- accuracy: its on-policy proxy accuracy falls (mean of its last 3 measurements below the mean of its first 3).

One diagnostic, no target: how well the SFT policy copies the post's key nouns (`copy_rate`: of the topic nouns its
samples in the preference pairs name, the share that are key nouns of the post said for the first time; the rest
are invented or repeated). A proxy learns "more nouns is better" only from SFT samples whose nouns are mostly right,
and on the default world this share is what differs most between chain seeds (docs/TINY_WORLD.md).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402  (its chain folders and its reading of a run's held-out evaluations)
import tiny_world  # noqa: E402  (the world's words and topics)


@dataclass
class Args:
    root: str = "runs/tiny_world"
    """the pipeline's root (chain seed 1 there, chain seed s under seed{s}/)"""
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """the chain seeds"""
    run: str = "drgrpo_kl0.01"
    """the RL run of each chain (its folder rl/{run}_s{seed}: the default Dr.GRPO run)"""
    output: str = ""
    """also write the table as JSON here"""


def copy_rate(root, chain):
    """Of the topic nouns named by the SFT samples of the chain's training pairs, the share that are a key noun of
    the post named for the first time in that sample (None without pairs)."""
    if not os.path.exists(os.path.join(chain, "prefs", "train.jsonl")):  # chain seed 1 on the shipped SFT: no pairs
        return None
    read = lambda name: [json.loads(line) for line in open(os.path.join(root, "data", name))]
    facts = {f["id"]: f["keys"] for f in read("train_facts.jsonl")}
    topic = {row["id"]: row["subreddit"] for row in read("train.jsonl")}
    named = right = 0
    for line in open(os.path.join(chain, "prefs", "train.jsonl")):
        pair = json.loads(line)
        keys, nouns = facts[pair["id"]], set(tiny_world.TOPICS[topic[pair["id"]]])
        for text in (pair["chosen"], pair["rejected"]):
            seen = set()
            for w in tiny_world.words(text):
                if w in nouns:
                    named += 1
                    right += w in keys and w not in seen
                    seen.add(w)
    return right / max(named, 1)


def targets(root, seed, run):
    """Each measured value and whether its target holds, for one chain seed."""
    c = pipeline.chain_dir(SimpleNamespace(root=root), seed)
    rm = json.load(open(os.path.join(c, "rm", "eval.json")))["eval/accuracy"]
    sft = json.load(open(os.path.join(c, "eval_sft_test", "eval.json")))["eval/win_rate"]
    out = {"seed": seed, "proxy_accuracy": rm, "sft_win_rate": sft, "copy_rate": copy_rate(root, c)}
    out["proxy_ok"], out["sft_ok"] = 0.65 <= rm <= 0.80, 0.10 <= sft <= 0.35
    path = os.path.join(c, "rl", f"{run}_s{seed}", "metrics.jsonl")
    if not os.path.exists(path):
        return out
    rows = pipeline.read_metrics(path)
    steps, _, gold, _, proxy = zip(
        *pipeline.eval_curve(rows, "test")
    )  # (step, kl, gold, win rate, proxy) in step order
    peak = max(range(len(gold)), key=gold.__getitem__)
    gain = gold[peak] - gold[0]
    acc = [r["rm/proxy_accuracy"] for r in rows if "rm/proxy_accuracy" in r]
    out |= {
        "sft_gold": gold[0],
        "peak_gold": gold[peak],
        "peak_step": steps[peak],
        "final_gold": gold[-1],
        "gain": gain,
        "share_lost": (gold[peak] - gold[-1]) / gain if gain > 0 else None,
        "proxy_at_peak": proxy[peak],
        "proxy_final": proxy[-1],
        "accuracy_first3": sum(acc[:3]) / len(acc[:3]) if acc else None,
        "accuracy_last3": sum(acc[-3:]) / len(acc[-3:]) if acc else None,
    }
    out["gain_ok"] = gain >= 0.15
    out["loss_ok"] = gain > 0 and out["share_lost"] >= 0.5
    out["rising_ok"] = proxy[-1] > proxy[peak]
    out["accuracy_ok"] = bool(acc) and out["accuracy_last3"] < out["accuracy_first3"]
    return out


def cell(row, value, ok, fmt="{:.3f}"):
    if row.get(value) is None:
        return "-"
    return fmt.format(row[value]) + ("" if row.get(ok, True) else " **missed**")


if __name__ == "__main__":
    args = tyro.cli(Args)
    table = [targets(args.root, s, args.run) for s in args.seeds]
    print("| chain seed | SFT copy rate | proxy accuracy (65-80%) | SFT win rate (10-35%) | SFT gold | Dr.GRPO peak gold (step) | gain (>= 0.15) "
          "| final gold | share lost (>= 0.5) | held-out proxy at peak -> last (rising) | on-policy accuracy first 3 -> last 3 (falls) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        peak = f"{r['peak_gold']:.3f} ({r['peak_step']})" if "peak_gold" in r else "-"
        rising = f"{r['proxy_at_peak']:.2f} -> {r['proxy_final']:.2f}" if "proxy_final" in r else "-"
        rising += "" if r.get("rising_ok", True) else " **missed**"
        acc = f"{r['accuracy_first3']:.3f} -> {r['accuracy_last3']:.3f}" if r.get("accuracy_first3") else "-"
        acc += "" if r.get("accuracy_ok", True) else " **missed**"
        cells = [cell(r, "copy_rate", None, "{:.1%}"), cell(r, "proxy_accuracy", "proxy_ok", "{:.1%}"), cell(r, "sft_win_rate", "sft_ok", "{:.1%}"),
                 cell(r, "sft_gold", None), peak, cell(r, "gain", "gain_ok"), cell(r, "final_gold", None),
                 cell(r, "share_lost", "loss_ok", "{:.2f}"), rising, acc]  # fmt: skip
        print(f"| {r['seed']} | " + " | ".join(cells) + " |")
    checks = [k for k in ("proxy_ok", "sft_ok", "gain_ok", "loss_ok", "rising_ok", "accuracy_ok")]
    every = all(r.get(k) for r in table for k in checks)
    print(f"\nevery target on every chain seed: {every}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(table, f, indent=1)
