"""How surely an SFT policy copies a post's SECOND key noun: the policy's probability of it right after
" my X and" (X the first key), on the first posts of a split. This is the step the tiny world's proxy needs the
SFT samples to get right for "more nouns is better" to hold in its pairs (docs/TINY_WORLD.md, "A rise on every
chain"); with `tiny_world.py --title-keys 2` it is an induction step (copy the word after "X and" in the title).

    python tools/copy_probe.py --root runs/tiny_world --policy-paths runs/tiny_world/sft runs/tiny_world/seed2/sft
"""

import os
import sys
from dataclasses import dataclass, field
from typing import List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tiny_world.py, one level up

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_world as tw


@dataclass
class Args:
    root: str = "runs/tiny_world"
    """the world: data/, tokenizer/"""
    policy_paths: List[str] = field(default_factory=lambda: ["runs/tiny_world/sft"])
    """causal LMs to probe (SFT policies)"""
    split: str = "validation"
    num_prompts: int = 300
    """posts (the first ones of the split)"""
    threads: int = 1
    """torch CPU threads"""


@torch.no_grad()
def second_key_probability(model, tokenizer, rows, facts):
    """(mean probability of the second key after prompt + " my X and", share of posts where it is the argmax), over
    the posts with two keys or more (`tiny_world.py --num-keys-probs` also makes posts of one)."""
    probs, top = [], []
    for row, f in zip(rows, facts):
        if len(f["keys"]) < 2:
            continue
        x, y = f["keys"][:2]
        ids = tokenizer(tw.prompt_of(row) + f" my {x} and", return_tensors="pt").input_ids
        p = model(input_ids=ids).logits[0, -1].float().softmax(-1)
        y_id = tokenizer(" " + y).input_ids[0]  # every word of the world is one token
        probs.append(p[y_id].item())
        top.append(int(p.argmax().item() == y_id))
    return sum(probs) / len(probs), sum(top) / len(top)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    for path in [args.root + "/data", args.root + "/tokenizer", *args.policy_paths]:
        if not os.path.exists(path):
            raise SystemExit(f"{path} does not exist: build the world (`python tiny_world.py`) and the policies first")
    rows, facts = tw.read_posts(args.root, args.split, args.num_prompts)
    tokenizer = AutoTokenizer.from_pretrained(f"{args.root}/tokenizer")
    for path in args.policy_paths:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        mean, top = second_key_probability(model, tokenizer, rows, facts)
        print(
            f"{path}: P(second key | ' my X and') {mean:.3f} on {len(rows)} {args.split} posts; the argmax in {top:.1%}"
        )
