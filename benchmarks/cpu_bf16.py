"""bfloat16 on the CPU for generation and scoring against float32, side by side on the same work (issue 44 item 3).

    python benchmarks/cpu_bf16.py                              # SmolLM2-135M-Instruct (tools/real_model.py), 3 reps
    python benchmarks/cpu_bf16.py --policy-path runs/smollm2/policy --reps 3 --max-new-tokens 24 --threads 1

The RL step's shape: `--num-prompts` chat-templated validation prompts of the tiny world x `--num-generations`
completions of up to `--max-new-tokens` sampled at temperature 1, then one forward of those sequences (what the
reference policy and the proxy do each step). Three variants, interleaved rep by rep so that a machine whose load
changes slows each alike: float32 weights; bfloat16 weights; float32 weights under `torch.autocast("cpu",
bfloat16)` (accelerate's mixed precision). Every variant scores the SAME sequences (the first sampled), and the
summary gives each one's times and how far a completion's summed log-probability moves from float32's.
"""

import copy
import json
import os
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one level up

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo_signcert as gs


@dataclass
class Args:
    policy_path: str = "runs/smollm2/policy"
    dataset: str = "runs/tiny_world/data"
    split: str = "validation"
    num_prompts: int = 4
    num_generations: int = 4
    max_new_tokens: int = 24
    max_prompt_length: int = 128
    reps: int = 3
    threads: int = 1


def summed_logprobs(model, seqs, mask, prompt_len):
    """Each completion's summed log-probability (the tokens after `prompt_len`, padding masked)."""
    logits = model(input_ids=seqs, attention_mask=mask).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, seqs[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:])[:, prompt_len - 1 :].sum(1)


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.policy_path, padding_side="left")
    rows, where = gs.load_split(args.dataset, args.split)
    fmt = gs.detect_format(rows, where)
    prompts = [gs.to_prompt_response(r, fmt, tok, args.max_prompt_length)[0] for r in rows[: args.num_prompts]]
    enc = tok([gs.as_query(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    n, prompt_len = args.num_generations, enc.input_ids.shape[1]
    f32 = AutoModelForCausalLM.from_pretrained(args.policy_path, dtype=torch.float32).eval()
    variants = {"float32": (f32, False), "bf16 weights": (copy.deepcopy(f32).to(torch.bfloat16), False),
                "float32 + autocast bf16": (f32, True)}  # fmt: skip
    out = {name: {"generation_s": [], "scoring_s": [], "eos_rate": []} for name in variants}
    scored, seqs = {}, None
    for rep in range(args.reps):
        for name, (model, autocast) in variants.items():
            torch.manual_seed(rep)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                t0 = time.perf_counter()
                gen = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                     max_new_tokens=args.max_new_tokens, num_return_sequences=n,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
                out[name]["generation_s"].append(time.perf_counter() - t0)
                out[name]["eos_rate"].append((gen[:, prompt_len:] == tok.eos_token_id).any(1).float().mean().item())
                seqs = gen if seqs is None else seqs  # every variant scores the first sampled sequences
                mask = (seqs != tok.pad_token_id).long()
                mask[:, :prompt_len] = enc.attention_mask.repeat_interleave(n, 0)
                t0 = time.perf_counter()
                scored[name] = summed_logprobs(model, seqs, mask, prompt_len)
                out[name]["scoring_s"].append(time.perf_counter() - t0)
            print(name, rep, {k: round(v[-1], 3) for k, v in out[name].items()}, flush=True)
    for name in variants:
        diff = (scored[name] - scored["float32"]).abs()
        out[name]["logprob_absdiff_vs_float32"] = {"mean": diff.mean().item(), "max": diff.max().item()}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(tyro.cli(Args))
