"""Which forms an RL policy ends on: the completions an RL run logged (samples.jsonl), read with the tiny world's own
notion of quality, early against late.

For each run folder, the logged completions of its first `--window` logged steps and of its last `--window` (up to
`--upto`), each matched to its post (the prompt's subreddit, title and the start of its post) and the post's hidden
facts (`{split}_facts.jsonl`); per window, the mean of the world's quality and its terms (tiny_world.quality_terms:
keys covered, invented words, repeated words, more than 12 words), the mean length and proxy reward, and the share
of the forms a proxy may over-pay (docs/RESULTS.md, the premise on SmolLM2): the title copied, a key alone (one
non-glue word, a key), the "my P and my X" template, the list template ("my ... are a mess"), no EOS. Then the
window's most frequent templates: each word of a completion replaced by its role in the post (K a key noun, P the
person, V one of the post's verbs, W a word absent from the title and the post; glue and the post's other words as
they are; punctuation dropped, as the world drops it).

    python tools/rl_forms.py --data runs/smollm2_chain/data --runs runs/smollm2_chain/rl/drgrpo_kl0.01_s1 ...

Text only: no model is loaded. Writes the JSON to `--output` (default: beside the first run, rl_forms.json).
"""

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tiny_world.py, one level up
import tiny_world as tw  # noqa: E402

PROMPT = re.compile(r"SUBREDDIT: r/(.*?)\n\nTITLE: (.*?)\n\nPOST: (.*?)\n\nTL;DR:", re.S)


@dataclass
class Args:
    runs: List[str] = field(default_factory=list)
    """RL run folders (each with samples.jsonl)"""
    data: str = "runs/tiny_world/data"
    """the world's data folder ({split}.jsonl and {split}_facts.jsonl)"""
    split: str = "train"
    """the split the RL prompts come from"""
    window: int = 3
    """logged steps per window"""
    upto: Optional[int] = None
    """ignore logged steps after this one (runs compared at the same budget)"""
    top: int = 5
    """templates shown per window"""
    output: str = ""


def post_index(data, split):
    """{(subreddit, title, the post's first 40 characters): (row, facts)} of a split."""
    rows = [json.loads(line) for line in open(os.path.join(data, f"{split}.jsonl"))]
    facts = [json.loads(line) for line in open(os.path.join(data, f"{split}_facts.jsonl"))]
    return {(r["subreddit"], r["title"], r["post"][:40]): (r, f) for r, f in zip(rows, facts)}


def template(row, facts, response):
    """The completion with each word replaced by its role in the post (the docstring)."""
    post_words = set(tw.words(row["title"] + " " + row["post"]))
    out = []
    for w in tw.words(response):
        if w in facts["keys"]:
            out.append("K")
        elif w == facts["person"]:
            out.append("P")
        elif w in facts["verbs"]:
            out.append("V")
        elif w not in post_words and w not in tw.GLUE:
            out.append("W")
        else:
            out.append(w)
    return " ".join(out)


def describe(sample, row, facts):
    """The quality terms and form flags of one logged completion."""
    text = sample["response"]
    sw = tw.words(text)
    joined = " ".join(sw)
    nonglue = [w for w in sw if w not in tw.GLUE]
    terms = tw.quality_terms(row, text, facts["keys"])
    return {
        "quality": tw.quality(row, text, facts["keys"]),
        **{k: float(v) for k, v in terms.items()},
        "length": sample["length"],
        "proxy": sample["proxy"],
        "title copied": float(bool(sw) and " ".join(tw.words(row["title"])) in joined),
        "a key alone": float(len(nonglue) == 1 and nonglue[0] in facts["keys"]),
        "my P and my X": float(re.fullmatch(r"my \w+ and my \w+", joined) is not None),
        "list template": float(re.fullmatch(r"my .+ (are|is) a mess.*", joined) is not None),
        "no EOS": float(not sample["has_eos"]),
    }


def window_summary(samples, index, args):
    described, templates = [], Counter()
    for s in samples:
        m = PROMPT.search(s["prompt"])
        row, facts = index[(m.group(1), m.group(2), m.group(3)[:40])]
        described.append(describe(s, row, facts))
        templates[template(row, facts, s["response"])] += 1
    keys = described[0].keys()
    means = {k: sum(d[k] for d in described) / len(described) for k in keys}
    return {"n": len(described), **means, "templates": templates.most_common(args.top)}


def main():
    args = tyro.cli(Args)
    index = post_index(args.data, args.split)
    result = {}
    for run in args.runs:
        samples = [json.loads(line) for line in open(os.path.join(run, "samples.jsonl"))]
        steps = sorted({s["step"] for s in samples if args.upto is None or s["step"] <= args.upto})
        windows = {"early": steps[: args.window], "late": steps[-args.window :]}
        result[run] = {}
        for name, chosen in windows.items():
            summary = window_summary([s for s in samples if s["step"] in chosen], index, args)
            result[run][name] = {"steps": chosen, **summary}
        print(f"\n{run}")
        cols = ("quality", "coverage", "invented", "repeated", "too_long", "length", "proxy", "title copied",
                "a key alone", "my P and my X", "list template", "no EOS")  # fmt: skip
        print(f"{'window':24} " + " ".join(f"{c[:9]:>9}" for c in cols))
        for name, w in result[run].items():
            print(f"{name + ' ' + str(w['steps']):24} " + " ".join(f"{w[c]:9.2f}" for c in cols))
        for name, w in result[run].items():
            print(f"  {name} templates: " + "; ".join(f"{t!r} x{n}" for t, n in w["templates"]))
    output = args.output or os.path.join(args.runs[0], "..", "rl_forms.json")
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwritten {output}")


if __name__ == "__main__":
    main()
