"""Benchmark: grpo_signcert.py's training step at Pythia-1B's shape on one GPU, in bf16, for Dr.GRPO and
SignCert-PO, and (when `trl` is importable) TRL's GRPOTrainer on the same models and shapes, in one run.

    python benchmarks/gpu_step.py --output runs/gpu_step.json                  # one GPU: Pythia-1B's shape
    python benchmarks/gpu_step.py --generation-backend compiled --checks       # our decoding loop, CUDA checks
    python benchmarks/gpu_step.py --shape tiny --steps 2 --no-trl              # any CPU, seconds (the CI test)

No download: the models are random-init GPTNeoX of Pythia-1B's sizes (a policy, its frozen reference and a
reward model with a one-output `score` head), the prompts are random words of a word-level tokenizer built
here (about 300 tokens each). A random policy almost never samples EOS, so every completion runs to
`--max-new-tokens`: the worst case of the step's time. Our step is the trainer's own functions (`sample` or
`sample_static`, `truncate_after_eos`, `response_logprobs`, `reward_and_features`, `signcert_advantages`,
`policy_update` with an Accelerator in bf16 mixed precision); each method runs `--warmup-steps` + `--steps`
steps from the same initial weights, and the medians of the timed steps are reported. TRL runs the same
initial weights, saved to a temporary folder, with `loss_type="dr_grpo"`, `scale_rewards="none"` and
transformers' `generate`.

`--checks` adds: the first update in bf16 against fp32 on the same batch (relative difference of the
parameter change), the loss and KL finite over every step, and the reward read at the last real token of
left-padded rows under the run's dtype against each row scored alone, unpadded.
"""

import gc
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal, Optional

import torch
import tyro
from accelerate import Accelerator
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_signcert import (  # noqa: E402
    in_chunks,
    policy_update,
    response_logprobs,
    reward_and_features,
    sample,
    sample_static,
    signcert_advantages,
    truncate_after_eos,
)


@dataclass
class Args:
    shape: Literal["pythia-1b", "tiny"] = "pythia-1b"
    """the models' sizes: `pythia-1b` (hidden 2048, 16 layers, 8 heads, vocabulary 50304) or `tiny` (a CPU, seconds)"""
    steps: int = 3
    """timed training steps per method (the median is reported)"""
    warmup_steps: int = 1
    """untimed steps before them, per method (allocator warm-up, CUDA graph capture, compilation)"""
    num_prompts: int = 32
    """prompts per step (the paper: 32)"""
    num_generations: int = 8
    """K, completions per prompt (the paper: 8)"""
    max_new_tokens: int = 53
    """completion length (the paper: 53)"""
    prompt_length: int = 300
    """tokens per prompt: lengths are drawn in [prompt_length - 20, prompt_length], so rows are left-padded"""
    micro_batch_size: int = 2
    """completions per forward/backward of the update (the paper: 2)"""
    generation_batch_size: int = 256
    """completions generated at once (256: the whole step's rollouts, as TRL generates them)"""
    generation_backend: Literal["hf", "static", "compiled"] = "hf"
    """our decoding: transformers' `generate`, our static-cache loop, or that loop with CUDA graphs"""
    quantile: float = 0.4
    """SignCert-PO's quantile q (Dr.GRPO is q = 0)"""
    kl_coef: float = 0.01
    """beta, the KL weight"""
    learning_rate: float = 1e-6
    """AdamW's learning rate (the paper's)"""
    bf16: bool = True
    """bf16 mixed precision for the policy, reference and reward model in bf16 (as the trainer's --bf16)"""
    gradient_checkpointing: bool = True
    """checkpoint the policy's layers in the update (the paper preset's choice), on both sides"""
    trl: bool = True
    """also run TRL's GRPOTrainer when `trl` is importable (it is skipped, with a message, when not)"""
    profile: int = 0
    """if > 0: after the timed steps, profile the update on this many micro-batches of the last batch (torch
    profiler) and print the operators that take the most GPU and CPU time: what limits the update"""
    checks: bool = False
    """run the correctness checks (bf16 vs fp32 update, finite loss/KL, reward under left padding)"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)"""
    output: Optional[str] = None
    """write the results as JSON here"""
    seed: int = 1
    """seed of the models, the prompts and the sampling"""


SHAPES = {  # Pythia-1B's config (EleutherAI/pythia-1b), and a tiny one of the same family
    "pythia-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=8,
        intermediate_size=8192,
        vocab_size=50304,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=512,
        rotary_pct=0.25,
        max_position_embeddings=512,
        use_parallel_residual=True,
    ),
}
EOS, PAD = 0, 1  # Pythia's EOS is id 0; a separate pad id, so the RM's last-token index comes from the mask


def word_tokenizer(vocab_size):
    """A word-level tokenizer whose every id is one word `w{id}`: prompts and completions survive the text
    round trip TRL makes (decode, then tokenize again for the reward model)."""
    vocab = {"<eos>": EOS, "<pad>": PAD, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def build_models(args):
    config = GPTNeoXConfig(**SHAPES[args.shape], eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(args.seed)
    policy = GPTNeoXForCausalLM(config)
    policy.generation_config.eos_token_id, policy.generation_config.pad_token_id = EOS, PAD
    rm = GPTNeoXForSequenceClassification(GPTNeoXConfig(**config.to_dict(), num_labels=1))
    return policy, rm


def fake_prompts(args, n):
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.prompt_length - 20, args.prompt_length + 1, (n,), generator=g)
    vocab = SHAPES[args.shape]["vocab_size"]
    return [" ".join(f"w{i}" for i in torch.randint(2, vocab, (int(k),), generator=g).tolist()) for k in lengths]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def rollouts(policy, ref, rm, query, qmask, args, device):
    """Steps 1-2 of the trainer: (batch without advantages, reward, features, seconds of generation and scoring)."""
    K = args.num_generations
    sampler = sample if args.generation_backend == "hf" else sample_static
    sync(device)
    t0 = time.perf_counter()
    gen = in_chunks(lambda q, m: sampler(policy, q, m, args, PAD), args.generation_batch_size, query, qmask)
    response, rmask, _ = truncate_after_eos(gen, EOS, PAD)
    sync(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        ref_lp = in_chunks(
            lambda *t: response_logprobs(ref, *t, 1.0), args.generation_batch_size, query, qmask, response, rmask
        )
        reward, feats = in_chunks(
            lambda q, qm, r, rm_: reward_and_features(rm, torch.cat([q, r], 1), torch.cat([qm, rm_], 1)),
            args.generation_batch_size,
            query,
            qmask,
            response,
            rmask,
        )
    sync(device)
    batch = dict(query=query, query_mask=qmask, response=response, response_mask=rmask, ref_logprobs=ref_lp)
    return batch, reward.view(-1, K), feats.view(-1, K, feats.shape[-1]), t1 - t0, time.perf_counter() - t1


def run_ours(accelerator, policy, start, ref, rm, prompts, tokenizer, args, device):
    """Dr.GRPO then SignCert-PO, each `warmup_steps + steps` steps from the initial weights."""
    results = {}
    train_args = SimpleNamespace(**asdict(args), num_ppo_epochs=1, clip_range=0.2, max_grad_norm=1.0, temperature=1.0)
    for method, q in (("Dr.GRPO", 0.0), ("SignCert-PO", args.quantile)):
        policy.load_state_dict(start)
        optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(policy.parameters(), lr=args.learning_rate))
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(args.seed)
        steps = []
        for i in range(args.warmup_steps + args.steps):
            chosen = prompts[i * args.num_prompts : (i + 1) * args.num_prompts]
            enc = tokenizer(chosen, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            query = enc.input_ids.repeat_interleave(args.num_generations, 0)
            qmask = enc.attention_mask.repeat_interleave(args.num_generations, 0)
            batch, reward, feats, t_gen, t_score = rollouts(
                accelerator.unwrap_model(policy), ref, rm, query, qmask, train_args, device
            )
            t0 = time.perf_counter()
            adv, _, eps = signcert_advantages(reward, feats, q)
            stats = policy_update(accelerator, policy, optimizer, dict(batch, advantages=adv.flatten()), train_args)
            sync(device)
            t_update = time.perf_counter() - t0
            steps.append(
                dict(
                    generation=t_gen,
                    scoring=t_score,
                    update=t_update,
                    step=t_gen + t_score + t_update,
                    loss=float(stats["loss"]),
                    kl=float(stats["k3_sum"] / stats["tokens"].clamp(min=1)),  # k3 per token, as policy/kl_k3_per_token
                    eps=eps.item(),
                    prompt_tokens=query.shape[1],
                    completion_tokens=int(batch["response_mask"].sum(1).float().mean()),
                )
            )
            print(f"  {method:12s} step {i + 1}{' (warm-up)' if i < args.warmup_steps else ''}: " + fmt(steps[-1]))
        profiled = None
        if args.profile and method == "Dr.GRPO":
            part = {
                k: v[: args.profile * args.micro_batch_size] for k, v in dict(batch, advantages=adv.flatten()).items()
            }
            profiled = profile_update(accelerator, policy, optimizer, part, train_args, device)
        timed = sorted(steps[args.warmup_steps :], key=lambda s: s["step"])
        med = timed[(len(timed) - 1) // 2]  # the timed step of median time, whose phases add up to it
        med = {k: med[k] for k in ("generation", "scoring", "update", "step")}
        results[method] = dict(median=med, steps=steps, peak_memory_gb=peak_gb(device))
        if profiled:
            results[method]["profile"] = profiled
        del optimizer
        accelerator._optimizers.clear()
    return results


def profile_update(accelerator, policy, optimizer, batch, args, device):
    """The update on `batch` under torch.profiler: wall time per micro-batch against the GPU's busy time
    (launch-bound when the GPU idles), the kernel launches, and the top operators by GPU and by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        policy_update(accelerator, policy, optimizer, batch, args)
        sync(device)
    wall = time.perf_counter() - t0
    ev = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ev) if device.type == "cuda" else 0.0
    print(
        f"profile: {args.profile} micro-batches in {wall:.3f}s ({1e3 * wall / args.profile:.1f} ms each, profiler on); "
        f"GPU busy {gpu_us / 1e6:.3f}s ({100 * gpu_us / 1e6 / wall:.0f}% of the wall time)"
    )
    for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
        print(ev.table(sort_by=key, row_limit=15, max_name_column_width=60))
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    return dict(micro_batches=args.profile, wall_seconds=wall, gpu_busy_seconds=gpu_us / 1e6, kernel_launches=launches)


def fmt(s):
    return " ".join(f"{k} {s[k]:.3f}s" for k in ("generation", "scoring", "update", "step")) + (
        f" | loss {s['loss']:.4g} kl {s['kl']:.3g}" if "loss" in s else ""
    )


def run_trl(folder, tokenizer, prompts, args, device):
    """TRL's GRPOTrainer, Dr.GRPO, on the same initial weights: seconds per optimiser step and peak memory."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):  # one optimiser step = one generation of 256 completions + 128 micro-batches
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            sync(device)
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            sync(device)
            self.marks.append(time.perf_counter())

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"))  # fp32 master weights, as ours
    rm = GPTNeoXForSequenceClassification.from_pretrained(os.path.join(folder, "rm"), dtype=dtype)
    n_steps = args.warmup_steps + args.steps
    config = GRPOConfig(
        output_dir=os.path.join(folder, "trl"),
        max_steps=n_steps,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.num_prompts * args.num_generations // args.micro_batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.kl_coef,
        loss_type="dr_grpo",
        scale_rewards="none",
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=rm,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts[: n_steps * args.num_prompts]}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[timer],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    timed = sorted(steps[args.warmup_steps :])
    out = dict(steps=steps, median_step=timed[(len(timed) - 1) // 2], peak_memory_gb=peak_gb(device))
    del trainer, policy, rm
    return out


def checks(accelerator, policy, start, folder, ref, rm, prompts, tokenizer, args, device):
    """Correctness under bf16: the first update against fp32 on the same batch, and the reward under left padding."""
    out = {}
    train_args = SimpleNamespace(**asdict(args), num_ppo_epochs=1, clip_range=0.2, max_grad_norm=1.0, temperature=1.0)
    policy.load_state_dict(start)
    enc = tokenizer(prompts[: args.num_prompts], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    query = enc.input_ids.repeat_interleave(args.num_generations, 0)
    qmask = enc.attention_mask.repeat_interleave(args.num_generations, 0)
    torch.manual_seed(args.seed)
    batch, reward, feats, _, _ = rollouts(accelerator.unwrap_model(policy), ref, rm, query, qmask, train_args, device)
    adv, _, _ = signcert_advantages(reward, feats, args.quantile)
    batch["advantages"] = adv.flatten()
    changes = {}
    fp32 = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy")).to(device)  # unprepared: no autocast
    if args.gradient_checkpointing:
        fp32.gradient_checkpointing_enable()
        fp32.disable_input_require_grads()  # as the trainer: the hook breaks the compiled decoding
    for name, model in (("bf16", policy), ("fp32", fp32)):
        optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=args.learning_rate))
        before = [p.detach().float().clone() for p in model.parameters()]
        policy_update(accelerator, model, optimizer, batch, train_args)
        changes[name] = torch.cat([(p.detach().float() - b).flatten() for p, b in zip(model.parameters(), before)])
        del optimizer, before
        accelerator._optimizers.clear()
    del fp32
    d16, d32 = changes["bf16"], changes["fp32"]
    out["update_bf16_vs_fp32"] = dict(
        relative_difference=((d16 - d32).norm() / d32.norm()).item(),
        cosine=torch.nn.functional.cosine_similarity(d16, d32, dim=0).item(),
        sign_agreement=(torch.sign(d16) == torch.sign(d32)).float().mean().item(),
    )
    del changes, d16, d32
    # the reward at the last real token: rows of different lengths, left-padded in one batch vs each alone
    ids, mask = batch["query"][:: args.num_generations][:8], batch["query_mask"][:: args.num_generations][:8]
    with torch.no_grad():
        together, _ = reward_and_features(rm, ids, mask)
        alone = torch.cat([reward_and_features(rm, i[m.bool()][None], m[m.bool()][None])[0] for i, m in zip(ids, mask)])
    spread = (reward.max() - reward.min()).item()
    diff = (together - alone).abs().max().item()
    out["reward_left_padding"] = dict(
        padded_rows=int((mask == 0).any(1).sum()),
        max_abs_difference=diff,
        reward_spread_of_the_batch=spread,
        ok=diff <= 0.02 * max(spread, 1e-6),
    )
    policy.load_state_dict(start)
    return out


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.prompt_length <= 20 or args.steps < 1 or args.warmup_steps < 0:
        raise ValueError("--prompt-length must be > 20, --steps >= 1 and --warmup-steps >= 0")
    if (args.num_prompts * args.num_generations) % args.micro_batch_size:
        raise ValueError(
            f"--micro-batch-size {args.micro_batch_size} must divide the {args.num_prompts * args.num_generations} "
            "completions of a step (--num-prompts x --num-generations)"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU: run on a GPU machine or pass --device cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    n_prompts = (args.warmup_steps + args.steps) * args.num_prompts
    tokenizer = word_tokenizer(SHAPES[args.shape]["vocab_size"])
    prompts = fake_prompts(args, n_prompts)
    policy, rm = build_models(args)
    folder = tempfile.mkdtemp(prefix="gpu_step_")
    policy.save_pretrained(os.path.join(folder, "policy"))  # the initial weights, for TRL and for the reference
    rm.save_pretrained(os.path.join(folder, "rm"))
    tokenizer.save_pretrained(os.path.join(folder, "policy"))
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_steps=args.num_prompts * args.num_generations // args.micro_batch_size,
    )
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"), dtype=dtype).to(device).eval()
    ref.requires_grad_(False)
    rm = rm.to(device, dtype).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.disable_input_require_grads()  # as the trainer: the hook breaks the compiled decoding
    policy = accelerator.prepare_model(policy.to(device))
    start = {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{args.shape} on {gpu}{' (bf16)' if args.bf16 else ''}: {args.num_prompts} prompts x {args.num_generations} "
        f"completions, ~{args.prompt_length} prompt tokens, {args.max_new_tokens} new tokens, micro-batch "
        f"{args.micro_batch_size}, generation `{args.generation_backend}`; {args.warmup_steps} warm-up + "
        f"{args.steps} timed steps per method"
    )
    result = dict(args=asdict(args), device=gpu, torch=torch.__version__)
    result["ours"] = run_ours(accelerator, policy, start, ref, rm, prompts, tokenizer, args, device)
    dr, sc = result["ours"]["Dr.GRPO"]["median"], result["ours"]["SignCert-PO"]["median"]
    result["signcert_over_drgrpo"] = sc["step"] / dr["step"]
    all_steps = result["ours"]["Dr.GRPO"]["steps"] + result["ours"]["SignCert-PO"]["steps"]
    result["loss_and_kl_finite"] = all(math.isfinite(s["loss"]) and math.isfinite(s["kl"]) for s in all_steps)
    if args.checks:
        result["checks"] = checks(accelerator, policy, start, folder, ref, rm, prompts, tokenizer, args, device)
    try:
        import trl
    except ImportError:
        trl = None
    if not args.trl:
        print("TRL: skipped (--no-trl)")
    elif trl is None:
        print("TRL: not importable here (pip install trl, or bring its wheel): skipped")
    else:
        del policy, ref, rm, start
        accelerator.free_memory()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # TRL's Trainer builds its own Accelerator
        result["trl"] = dict(version=trl.__version__, **run_trl(folder, tokenizer, prompts, args, device))
        result["ours_over_trl"] = dr["step"] / result["trl"]["median_step"]

    print("\nmedian seconds per step (generation / scoring / update = step), peak GPU memory:")
    for method in ("Dr.GRPO", "SignCert-PO"):
        r = result["ours"][method]
        mem = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] is not None else "n/a (cpu)"
        print(f"  ours {method:12s} {fmt(r['median'])}  peak {mem}")
    if "trl" in result:
        t = result["trl"]
        mem = f"{t['peak_memory_gb']:.1f} GB" if t["peak_memory_gb"] is not None else "n/a (cpu)"
        print(f"  TRL {t['version']} Dr.GRPO  step {t['median_step']:.3f}s  peak {mem}")
        print(f"ours (Dr.GRPO) / TRL step time: {result['ours_over_trl']:.3f}")
    print(f"SignCert-PO / Dr.GRPO step time: {result['signcert_over_drgrpo']:.4f}")
    print(f"loss and KL finite over every step: {result['loss_and_kl_finite']}")
    if "checks" in result:
        print("checks:", json.dumps(result["checks"], indent=1))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}")
