"""Benchmark: sampling time of vLLM against Hugging Face's `generate` on SmolLM2-135M-Instruct at the RL shapes, side
by side in one run (docs/TRAINER.md, "Sampling with vLLM").

    python tools/real_model.py                                   # -> runs/smollm2/policy (main environment)
    bash tools/install_vllm.sh ~/vllm-venv                      # vLLM's own environment (requirements-vllm.txt)
    ~/vllm-venv/bin/python benchmarks/vllm_sample_time.py

Each shape is prompts x completions per prompt, and a budget of new tokens: 4 x 4 = 16 completions (an RL step of
`pipeline.py --policy smollm2`) and 16 x 8 = 128 (the tiny world's RL step), with 24 and 48 new tokens. HF is
gen_prefs.generate_hf (what gen_prefs.py and eval_gold.py sample with, and the trainers' rollouts in kind): the whole
shape in one left-padded batch, float32, on 1 thread and on torch's default threads (all cores). vLLM is one
`LLM.generate` of the same templated query ids with generate_vllm's sampling parameters (temperature 1, top_p 1,
stopped at the tokenizer's EOS only) on an engine started beforehand (its start-up, paid once per script run, is
reported apart); two engines: with vLLM's CPU defaults (on this 2-core machine it computes on 1 core and reserves
the other) and on all cores (VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0). All four stay loaded;
per shape each is called once to warm up, then the four in turn for --repeats rounds (so that a change in the
machine's load falls on all of them), and each timing is the median of its calls; beside it, the completions' mean
length (tokens), so that the backends are compared at the same work (both sample the same distribution:
tests/test_vllm.py). The load average at the start and end is recorded. The body is under
`if __name__ == "__main__":`, as vLLM's engine processes need.
"""

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import List

import tyro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
WORDS = (
    "my girlfriend and i have been together for two years and she wants to move to another city for a new job "
    "but i just started my degree here and my parents say i should stay while my friends think i should go with her"
).split()


@dataclass
class Args:
    policy_path: str = "runs/smollm2/policy"
    """the policy (tools/real_model.py's SmolLM2-135M-Instruct)"""
    shapes: List[str] = field(default_factory=lambda: ["4x4", "16x8"])
    """prompts x completions per prompt"""
    max_new_tokens: List[int] = field(default_factory=lambda: [24, 48])
    """completion budgets"""
    repeats: int = 3
    """timed calls per shape and backend (after one warm-up call)"""
    seed: int = 1
    output: str = "runs/smollm2/vllm_sample_time.json"


def prompts_of(n: int, tokenizer) -> list[str]:
    """n TL;DR prompts of 60-110 words, fitted to 128 tokens as the tiny world's stages fit them."""
    import gen_prefs

    rows = []
    for i in range(n):
        post = " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(60 + (17 * i) % 50))
        rows.append(
            {"subreddit": "relationships", "title": f"should i move with her ({i})", "post": post, "summary": "x"}
        )
    return [gen_prefs.to_prompt_response(r, "tldr", tokenizer, 128)[0] for r in rows]


if __name__ == "__main__":
    args = tyro.cli(Args)
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    import gen_prefs

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB (on a CPU vLLM would otherwise reserve 92% of the RAM)
    tokenizer = gen_prefs.load_tokenizer(args.policy_path, False)
    shapes = [(*map(int, s.split("x")), t) for s in args.shapes for t in args.max_new_tokens]
    prompts = {p: prompts_of(p, tokenizer) for p, _, _ in shapes}
    load_at_start = os.getloadavg()

    # the two engines first (each in processes of its own), then the HF policy; all stay loaded
    startup, engines = {}, {}
    every_core = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    for name, env in (("vllm", {}), ("vllm_all_cores", every_core)):
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # read by the engine's processes as they start
        start = time.perf_counter()
        engines[name] = LLM(model=args.policy_path, seed=args.seed, dtype="float32")
        startup[name] = time.perf_counter() - start
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(args.policy_path, dtype=torch.float32).eval()
    startup["hf"] = time.perf_counter() - start
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=False)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)

    def hf(p, k, t, n):
        def call():
            torch.set_num_threads(n)
            hf_args = SimpleNamespace(temperature=1.0, max_new_tokens=t, generation_batch_size=p * k)
            return gen_prefs.generate_hf(policy, tokenizer, prompts[p], k, hf_args, cpu)[0]

        return call

    def vllm(p, k, t, llm):
        queries = [{"prompt_token_ids": tokenizer(gen_prefs.as_query(tokenizer, q), add_special_tokens=False).input_ids}
                   for q in prompts[p]]  # fmt: skip
        params = SamplingParams(n=k, temperature=1.0, top_p=1.0, max_tokens=t, ignore_eos=True,
                                stop_token_ids=[tokenizer.eos_token_id])  # fmt: skip
        return lambda: [list(o.token_ids) for r in llm.generate(queries, params, use_tqdm=False) for o in r.outputs]

    rows = {}
    for p, k, t in shapes:  # per shape, the backends in turn, --repeats rounds: a drift of the machine falls on all
        calls = {"hf_1_thread": hf(p, k, t, 1), "hf": hf(p, k, t, threads),
                 **{name: vllm(p, k, t, llm) for name, llm in engines.items()}}  # fmt: skip
        times, lengths = {name: [] for name in calls}, {name: [] for name in calls}
        for name, call in calls.items():
            call()  # warm-up
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                ids = call()
                times[name].append(time.perf_counter() - start)
                lengths[name] += [len(x) for x in ids]
        rows[(p, k, t)] = {name: (statistics.median(times[name]), statistics.mean(lengths[name])) for name in calls}
        print(
            f"{p}x{k}, {t} tokens: " + ", ".join(f"{n} {s:.2f} s" for n, (s, _) in rows[(p, k, t)].items()), flush=True
        )
    torch.set_num_threads(threads)

    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())  # fmt: skip
    result = {
        "machine": f"{cpu_name}, {os.cpu_count()} cores",
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "torch_threads": threads,
        "startup_seconds": startup,
        "rows": [
            {
                "prompts": p,
                "completions": p * k,
                "max_new_tokens": t,
                **{name: {"seconds": s, "mean_length": m} for name, (s, m) in v.items()},
            }
            for (p, k, t), v in rows.items()
        ],  # fmt: skip
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    backends = ("hf_1_thread", "hf", "vllm", "vllm_all_cores")
    print(
        f"| completions | new tokens | HF, 1 thread | HF, {threads} threads | vLLM (its defaults) | vLLM (all cores) |"
    )
    for r in result["rows"]:
        cells = [f"{r[b]['seconds']:.2f} s ({r[b]['mean_length']:.1f})" for b in backends]
        shape = f"{r['completions']} ({r['prompts']} x {r['completions'] // r['prompts']})"
        print(f"| {shape} | {r['max_new_tokens']} | " + " | ".join(cells) + " |")
    startup_text = ", ".join(f"{k} {v:.1f} s" for k, v in startup.items())
    print(f"start-up: {startup_text}; {result['machine']}; load average {result['load_average']}")
