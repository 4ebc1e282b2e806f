"""Benchmark: grpo_signcert.py's training step at Pythia-1B's shape on one GPU, in bf16, for Dr.GRPO and
SignCert-PO, against TRL's GRPOTrainer on the same models, weights, prompts and dtypes.

    python benchmarks/gpu_step.py --output runs/gpu_step.json                  # one GPU: Pythia-1B's shape, matched
    python benchmarks/gpu_step.py --best --generation-backend compiled --checks # + best against best, CUDA checks
    python benchmarks/gpu_step.py --shape tiny --device cpu --no-bf16 ...      # any CPU, seconds (the CI test)

No download: the models are random-init GPTNeoX of Pythia-1B's sizes (a policy, its frozen reference and a reward
model with a one-output `score` head), built once here and saved to a temporary folder, with prompts of random
words of a word-level tokenizer built here (prompt_length - 20 to prompt_length tokens, so rows are left-padded).
Every completion runs to `--max-new-tokens`, on both sides: ours samples with no EOS (the policy's generation
config has none, and no id is cut), TRL with `min_new_tokens = max_new_tokens`.

Each framework runs in its OWN process, in this order: ours, TRL, ours again (nothing one leaves allocated, a
cache, a compiled graph, counts against the other; the two runs of ours show the spread between processes). Both
load the same saved weights: the policy in fp32 (the master weights) under bf16 autocast, the reference and the
reward model in bf16 (TRL's reference built with `model_init_kwargs={"dtype": bfloat16}`), AdamW with weight decay
0, lr `--learning-rate`, clip 1.0, `loss_type="dr_grpo"`, `scale_rewards="none"`, beta `--kl-coef`.

Configurations:
- MATCHED: both at `--micro-batch-size` with `--gradient-checkpointing` (defaults: the paper preset's 2, on);
- BEST (`--best`): each at its fastest setting that fits: ours `--micro-batch-size 0` (auto: measured, the largest
  divisor that fits) without checkpointing; TRL at the largest of `--best-micro-batches` that runs without running
  out of memory, without checkpointing.
Per framework and configuration: `--warmup-steps` untimed steps, then `--steps` timed (median and range of each
phase: generation, scoring, update, step), peak allocated and reserved GPU memory per phase, and the first update's
loss, per-token KL and gradient norm. The second run of ours also updates, from the initial weights, on TRL's first
batch (its prompts, completions, reference log-probs and advantages), so the two frameworks' first update on the
SAME rollouts is compared. `--profile N` profiles N micro-batches of the update on a copy of the weights after the
timed steps (nothing of the training state is touched); `--checks` adds the bf16-vs-fp32 update and reward checks.
"""

import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import List, Literal, Optional

import torch
import tyro
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    PreTrainedTokenizerFast,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import grpo_signcert as gs  # noqa: E402

PHASES = ("generation", "scoring", "update", "step")


@dataclass
class Args:
    shape: Literal["pythia-1b", "tiny"] = "pythia-1b"
    """the models' sizes: `pythia-1b` (hidden 2048, 16 layers, 8 heads, vocabulary 50304) or `tiny` (a CPU, seconds)"""
    steps: int = 3
    """timed training steps per method and framework (median and range reported)"""
    warmup_steps: int = 2
    """untimed steps before them (allocator warm-up, CUDA graph capture, compilation)"""
    num_prompts: int = 32
    """prompts per step (the paper: 32)"""
    num_generations: int = 8
    """K, completions per prompt (the paper: 8)"""
    max_new_tokens: int = 53
    """completion length, forced on both sides (the paper: 53)"""
    prompt_length: int = 300
    """tokens per prompt: lengths are drawn in [prompt_length - 20, prompt_length], so rows are left-padded"""
    micro_batch_size: int = 2
    """completions per forward/backward of the MATCHED configuration, both sides (the paper preset: 2)"""
    gradient_checkpointing: bool = True
    """checkpoint the policy's layers in the MATCHED configuration, both sides"""
    matched: bool = True
    """run the MATCHED configuration"""
    best: bool = False
    """also run the BEST configuration: each framework at its fastest setting that fits, no checkpointing"""
    signcert: bool = True
    """also time our SignCert-PO step (beside our Dr.GRPO, the one compared with TRL's)"""
    best_micro_batches: List[int] = field(default_factory=lambda: [256, 128, 64, 32, 16, 8])
    """TRL's candidates in the BEST configuration, tried largest first until one runs"""
    generation_batch_size: int = 256
    """our completions generated at once (256: the whole step's rollouts, as TRL generates them)"""
    generation_backend: Literal["hf", "static", "compiled"] = "hf"
    """our decoding: transformers' `generate`, our static-cache loop, or that loop with CUDA graphs"""
    quantile: float = 0.4
    """SignCert-PO's quantile q (Dr.GRPO is q = 0)"""
    kl_coef: float = 0.01
    """beta, the KL weight"""
    learning_rate: float = 1e-6
    """AdamW's learning rate (the paper's)"""
    bf16: bool = True
    """bf16 autocast for the policy, the reference and reward model held in bf16 (as the trainer's --bf16)"""
    trl: bool = True
    """also run TRL's GRPOTrainer when `trl` is importable (skipped, with a message, when not)"""
    profile: int = 0
    """if > 0: profile the update on this many micro-batches (torch profiler), on a copy of the weights after the
    timed steps, and print the operators that take the most GPU and CPU time: what limits the update"""
    checks: bool = False
    """run the correctness checks (bf16 vs fp32 update, finite loss/KL, reward under left padding)"""
    device: Optional[str] = None
    """cuda or cpu (default: cuda when available)"""
    output: Optional[str] = None
    """write the results as JSON here"""
    seed: int = 1
    """seed of the models, the prompts and the sampling"""
    # set by the driver for its child processes
    role: Literal["driver", "ours", "trl"] = "driver"
    """internal: `driver` runs the others, each in its own process"""
    folder: Optional[str] = None
    """internal: the saved models and prompts"""
    first_batch: Optional[str] = None
    """internal: TRL's first batch (`ours` updates on it too)"""


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


def build_and_save(args, folder):
    """The random-init policy and RM, the tokenizer and the prompts of every step, saved for every process."""
    config = GPTNeoXConfig(**SHAPES[args.shape], eos_token_id=EOS, bos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(args.seed)
    policy = GPTNeoXForCausalLM(config)
    rm = GPTNeoXForSequenceClassification(GPTNeoXConfig(**config.to_dict(), num_labels=1))
    tokenizer = word_tokenizer(SHAPES[args.shape]["vocab_size"])
    policy.save_pretrained(os.path.join(folder, "policy"))
    tokenizer.save_pretrained(os.path.join(folder, "policy"))
    rm.save_pretrained(os.path.join(folder, "rm"))
    g = torch.Generator().manual_seed(args.seed)
    n = (args.warmup_steps + args.steps) * args.num_prompts
    lengths = torch.randint(args.prompt_length - 20, args.prompt_length + 1, (n,), generator=g)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [" ".join(f"w{i}" for i in torch.randint(2, vocab, (int(k),), generator=g).tolist()) for k in lengths]
    with open(os.path.join(folder, "prompts.json"), "w") as f:
        json.dump(prompts, f)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Phases:
    """Wall time and peak allocated / reserved GPU memory of each phase of a step (reset at the start of each)."""

    def __init__(self, device):
        self.device, self.out = device, {}

    def start(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.t = time.perf_counter()

    def stop(self, name):
        sync(self.device)
        self.out[name] = time.perf_counter() - self.t
        if self.device.type == "cuda":
            self.out[f"{name}_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            self.out[f"{name}_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9


def summary(steps, warmup):
    """Median and range of each phase over the timed steps; peak memory per phase over all steps."""
    timed = steps[warmup:]
    out = {p: dict(median=statistics.median(s[p] for s in timed), min=min(s[p] for s in timed),
                   max=max(s[p] for s in timed)) for p in PHASES}  # fmt: skip
    for key in steps[0]:
        if key.endswith("_gb"):
            out[key] = max(s[key] for s in steps)
    return out


def train_args(args, micro_batch_size):
    return SimpleNamespace(
        **asdict(replace(args, micro_batch_size=micro_batch_size)),
        num_ppo_epochs=1,
        clip_range=0.2,
        max_grad_norm=1.0,
        temperature=1.0,
    )


# ------------------------------------------------------------------------- ours
def load_ours(args, micro_batch_size, checkpointing, device):
    from accelerate import Accelerator

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    folder = args.folder
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"))  # fp32 master weights
    policy.generation_config.eos_token_id = (
        None  # no EOS: every completion runs to max_new_tokens (TRL: min_new_tokens)
    )
    policy.generation_config.pad_token_id = PAD
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy"), dtype=dtype).to(device).eval()
    rm = GPTNeoXForSequenceClassification.from_pretrained(os.path.join(folder, "rm"), dtype=dtype).to(device).eval()
    ref.requires_grad_(False), rm.requires_grad_(False)
    if checkpointing:
        policy.gradient_checkpointing_enable()
        policy.disable_input_require_grads()  # as the trainer: the hook breaks the compiled decoding
    n = args.num_prompts * args.num_generations
    targs = train_args(args, micro_batch_size)
    if micro_batch_size == 0:  # the trainer's auto: measured on a GPU, capped on a CPU
        policy.to(device)
        if device.type == "cuda":
            length = args.prompt_length + args.max_new_tokens
            targs.micro_batch_size, _ = gs.measured_micro_batch(policy, n, length, targs, device)
        else:
            targs.micro_batch_size = gs.fit_micro_batch(n, 0, 1, gs.CPU_MICRO_BATCH)
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision="bf16" if args.bf16 else "no",
        gradient_accumulation_steps=n // targs.micro_batch_size,
    )
    policy = accelerator.prepare_model(policy.to(device))
    return accelerator, policy, ref, rm, targs


def queries(tokenizer, chosen, args, device):
    """The step's prompts, left-padded, each repeated for its K completions: (ids, mask)."""
    enc = tokenizer(chosen, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    K = args.num_generations
    return enc.input_ids.repeat_interleave(K, 0), enc.attention_mask.repeat_interleave(K, 0)


def rollouts(policy, ref, rm, query, qmask, targs, phases):
    """Steps 1-2 of the trainer (timed into `phases`): the batch without advantages, reward and features."""
    sampler = gs.sample if targs.generation_backend == "hf" else gs.sample_static
    phases.start()
    gen = gs.in_chunks(lambda q, m: sampler(policy, q, m, targs, PAD), targs.generation_batch_size, query, qmask)
    response, rmask, _ = gs.truncate_after_eos(gen, -1, PAD)  # no id is EOS: the forced length
    phases.stop("generation")
    phases.start()
    with torch.no_grad():
        ref_lp = gs.in_chunks(
            lambda *t: gs.response_logprobs(ref, *t, 1.0), targs.generation_batch_size, query, qmask, response, rmask
        )
        reward, feats = gs.in_chunks(
            lambda q, qm, r, rm_: gs.reward_and_features(rm, torch.cat([q, r], 1), torch.cat([qm, rm_], 1)),
            targs.generation_batch_size,
            query,
            qmask,
            response,
            rmask,
        )
    phases.stop("scoring")
    batch = dict(query=query, query_mask=qmask, response=response, response_mask=rmask, ref_logprobs=ref_lp)
    K = targs.num_generations
    return batch, reward.view(-1, K), feats.view(-1, K, feats.shape[-1])


def update_stats(stats):
    return dict(
        loss=float(stats["loss"]),
        kl=float(stats["k3_sum"] / stats["tokens"].clamp(min=1)),  # k3 per token, as TRL's `kl`
        grad_norm=float(stats["grad_norm"]),
    )


def profile_update(accelerator, policy, batch, targs, device):
    """`targs.profile` micro-batches of the update under torch.profiler, on a COPY of the policy and a fresh
    optimiser, with the accelerator's step counter put back after: the training state is not touched. Reports wall
    time per micro-batch against the GPU's busy time (the kernels' own device time, each counted once), the kernel
    launches, and the top operators by GPU and by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    n = targs.profile * targs.micro_batch_size
    part = {k: v[:n] for k, v in batch.items()}
    model = copy.deepcopy(policy)
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0))
    saved_step = accelerator.step
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        gs.policy_update(accelerator, model, optimizer, part, targs)
        sync(device)
    wall = time.perf_counter() - t0
    accelerator.step = saved_step
    accelerator._optimizers.remove(optimizer)
    del model, optimizer
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # device-side kernel events
    gpu_us = sum(e.device_time for e in kernels) if device.type == "cuda" else 0.0
    print(
        f"profile: {targs.profile} micro-batches in {wall:.3f}s ({1e3 * wall / targs.profile:.1f} ms each, profiler "
        f"on); GPU busy {gpu_us / 1e6:.3f}s ({100 * gpu_us / 1e6 / wall:.0f}% of the wall time)"
    )
    ev = prof.key_averages()
    for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
        print(ev.table(sort_by=key, row_limit=15, max_name_column_width=60))
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    return dict(micro_batches=targs.profile, wall_seconds=wall, gpu_busy_seconds=gpu_us / 1e6, kernel_launches=launches)


def run_ours(args, micro_batch_size, checkpointing, device):
    """Dr.GRPO then SignCert-PO, each warmup + timed steps from the same initial weights; then (optional) the
    update on TRL's first batch, the profile and the checks."""
    accelerator, policy, ref, rm, targs = load_ours(args, micro_batch_size, checkpointing, device)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.folder, "policy"), padding_side="left")
    prompts = json.load(open(os.path.join(args.folder, "prompts.json")))
    start = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(policy).state_dict().items()}
    out = dict(micro_batch_size=targs.micro_batch_size, gradient_checkpointing=checkpointing, methods={})

    def fresh_optimizer():
        accelerator.unwrap_model(policy).load_state_dict(start)
        accelerator.step = 0
        adamw = torch.optim.AdamW(
            policy.parameters(), lr=args.learning_rate, weight_decay=0.0, fused=device.type == "cuda"
        )
        return accelerator.prepare_optimizer(adamw)

    for method, q in (("Dr.GRPO", 0.0), ("SignCert-PO", args.quantile))[: 2 if args.signcert else 1]:
        optimizer = fresh_optimizer()
        torch.manual_seed(args.seed)
        steps, first = [], None
        for i in range(args.warmup_steps + args.steps):
            query, qmask = queries(tokenizer, prompts[i * args.num_prompts : (i + 1) * args.num_prompts], args, device)
            phases = Phases(device)
            batch, reward, feats = rollouts(accelerator.unwrap_model(policy), ref, rm, query, qmask, targs, phases)
            phases.start()
            adv, _, _ = gs.signcert_advantages(reward, feats, q)
            batch["advantages"] = adv.flatten()
            stats = update_stats(gs.policy_update(accelerator, policy, optimizer, batch, targs))
            phases.stop("update")
            row = dict(phases.out, step=sum(phases.out[p] for p in PHASES[:3]), **stats)
            row["completion_tokens"] = float(batch["response_mask"].sum(1).float().mean())
            steps.append(row)
            first = first or stats
            print(f"  ours {method:12s} step {i + 1}{' (warm-up)' if i < args.warmup_steps else ''}: " + fmt(row))
        out["methods"][method] = dict(summary=summary(steps, args.warmup_steps), steps=steps, first_update=first)
        if args.profile and method == "Dr.GRPO":
            out["profile"] = profile_update(accelerator, policy, batch, targs, device)
        accelerator._optimizers.remove(optimizer)
        del optimizer
    if args.first_batch:  # the first update on TRL's own first batch, from the same initial weights
        trl_batch = torch.load(args.first_batch)
        optimizer = fresh_optimizer()
        batch = {k: v.to(device) for k, v in trl_batch["batch"].items()}
        out["update_on_trl_batch"] = update_stats(gs.policy_update(accelerator, policy, optimizer, batch, targs))
        accelerator._optimizers.remove(optimizer)
    if args.checks:
        out["checks"] = checks(accelerator, policy, start, ref, rm, prompts, tokenizer, targs, device)
    return out


def checks(accelerator, policy, start, ref, rm, prompts, tokenizer, targs, device):
    """Correctness under bf16: the first update against fp32 on the same batch, and the reward under left padding."""
    out = {}
    accelerator.unwrap_model(policy).load_state_dict(start)
    query, qmask = queries(tokenizer, prompts[: targs.num_prompts], targs, device)
    torch.manual_seed(targs.seed)
    batch, reward, feats = rollouts(accelerator.unwrap_model(policy), ref, rm, query, qmask, targs, Phases(device))
    adv, _, _ = gs.signcert_advantages(reward, feats, targs.quantile)
    batch["advantages"] = adv.flatten()
    changes = {}
    fp32 = AutoModelForCausalLM.from_pretrained(os.path.join(targs.folder, "policy")).to(device)  # no autocast
    for name, model in (("bf16", policy), ("fp32", fp32)):
        accelerator.step = 0
        optimizer = accelerator.prepare_optimizer(
            torch.optim.AdamW(model.parameters(), lr=targs.learning_rate, weight_decay=0.0)
        )
        before = [p.detach().float().clone() for p in model.parameters()]
        gs.policy_update(accelerator, model, optimizer, batch, targs)
        changes[name] = torch.cat([(p.detach().float() - b).flatten() for p, b in zip(model.parameters(), before)])
        accelerator._optimizers.remove(optimizer)
        del optimizer, before
    del fp32
    d16, d32 = changes["bf16"], changes["fp32"]
    out["update_bf16_vs_fp32"] = dict(
        relative_difference=((d16 - d32).norm() / d32.norm()).item(),
        cosine=torch.nn.functional.cosine_similarity(d16, d32, dim=0).item(),
        sign_agreement=(torch.sign(d16) == torch.sign(d32)).float().mean().item(),
    )
    ids, mask = batch["query"][:: targs.num_generations][:8], batch["query_mask"][:: targs.num_generations][:8]
    with torch.no_grad():
        together, _ = gs.reward_and_features(rm, ids, mask)
        alone = torch.cat(
            [gs.reward_and_features(rm, i[m.bool()][None], m[m.bool()][None])[0] for i, m in zip(ids, mask)]
        )
    spread, diff = (reward.max() - reward.min()).item(), (together - alone).abs().max().item()
    out["reward_left_padding"] = dict(
        padded_rows=int((mask == 0).any(1).sum()),
        max_abs_difference=diff,
        reward_spread_of_the_batch=spread,
        ok=diff <= 0.02 * max(spread, 1e-6),
    )
    accelerator.unwrap_model(policy).load_state_dict(start)
    return out


def fmt(s):
    return " ".join(f"{p} {s[p]:.3f}s" for p in PHASES) + (
        f" | loss {s['loss']:.4g} kl {s['kl']:.3g} grad norm {s['grad_norm']:.3g}" if "loss" in s else ""
    )


# ------------------------------------------------------------------------- TRL
def run_trl(args, micro_batch_size, checkpointing, device):
    """TRL's GRPOTrainer, Dr.GRPO, on the same weights, prompts and dtypes: each step's phases and memory, the
    first step's loss, KL and gradient norm, and its first batch (saved for ours to update on)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    n_steps = args.warmup_steps + args.steps
    n = args.num_prompts * args.num_generations
    rows, first_batch = [], {}

    class Timed(GRPOTrainer):  # the phases as ours: generation, then scoring (RM + reference), the rest is update
        def _generate(self, prompts):
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            sync(device)
            self._gen_time = time.perf_counter() - t0
            return out

        def _generate_and_score_completions(self, inputs):
            sync(device)
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync(device)
            rows[-1]["generation"] = self._gen_time
            rows[-1]["scoring"] = time.perf_counter() - t0 - self._gen_time
            if device.type == "cuda":
                rows[-1]["generation_scoring_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
                rows[-1]["generation_scoring_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
                torch.cuda.reset_peak_memory_stats()
            if not first_batch:  # TRL's first batch, in its order, for ours to update on
                first_batch["batch"] = dict(
                    query=out["prompt_ids"].cpu(),
                    query_mask=out["prompt_mask"].cpu(),
                    response=out["completion_ids"].cpu(),
                    response_mask=out["completion_mask"].cpu(),
                    ref_logprobs=out["ref_per_token_logps"].float().cpu(),
                    advantages=out["advantages"].float().cpu(),
                )
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rows.append({"t0": time.perf_counter()})

        def on_step_end(self, *a, **k):
            sync(device)
            r = rows[-1]
            r["step"] = time.perf_counter() - r.pop("t0")
            r["update"] = r["step"] - r["generation"] - r["scoring"]
            if device.type == "cuda":
                r["update_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
                r["update_peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9

    policy = AutoModelForCausalLM.from_pretrained(os.path.join(args.folder, "policy"))  # fp32 master weights, as ours
    rm = GPTNeoXForSequenceClassification.from_pretrained(os.path.join(args.folder, "rm"), dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(args.folder, "policy"), padding_side="left")
    prompts = json.load(open(os.path.join(args.folder, "prompts.json")))
    config = GRPOConfig(
        output_dir=os.path.join(args.folder, "trl"),
        max_steps=n_steps,
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=n // micro_batch_size,
        steps_per_generation=n // micro_batch_size,  # one generation of all 256 completions per optimiser step
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},  # forced length, as ours
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.kl_coef,
        use_bias_correction_kl=False,
        loss_type="dr_grpo",
        scale_rewards="none",
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.bf16,
        gradient_checkpointing=checkpointing,
        model_init_kwargs={"dtype": dtype},  # the reference TRL builds: bf16, as ours
        use_cpu=device.type == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = Timed(
        model=policy,
        reward_funcs=rm,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts[: n_steps * args.num_prompts]}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    first = dict(loss=logs[0]["loss"], kl=logs[0]["kl"], grad_norm=logs[0]["grad_norm"])
    steps = [dict(r, completion_tokens=lg["completions/mean_length"]) for r, lg in zip(rows, logs)]
    path = os.path.join(args.folder, "trl_first_batch.pt")
    torch.save(first_batch, path)
    return dict(
        micro_batch_size=micro_batch_size,
        gradient_checkpointing=checkpointing,
        summary=summary(steps, args.warmup_steps),
        steps=steps,
        first_update=first,
        first_batch=path,
    )


# ------------------------------------------------------------------------- the driver
def child(args, role, micro_batch_size, checkpointing, out, first_batch=None):
    """One framework's run in its own process; its result, or None (e.g. out of memory)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--folder", args.folder, "--output", out]
    cmd += ["--micro-batch-size", str(micro_batch_size)]
    cmd += ["--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"]
    for name, value in asdict(args).items():
        if name in ("role", "folder", "output", "micro_batch_size", "gradient_checkpointing", "best", "matched",
                    "first_batch"):  # fmt: skip
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag if value else "--no-" + flag[2:]]
        elif isinstance(value, list):
            cmd += [flag, *map(str, value)]
        elif value is not None:
            cmd += [flag, str(value)]
    cmd += ["--first-batch", first_batch] if first_batch else []
    print(f"--- {role}, micro-batch {micro_batch_size or 'auto'}, checkpointing {checkpointing}", flush=True)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        print(f"--- {role} exited with {res.returncode}", flush=True)
        return None
    return json.load(open(out))


def compare(ours_runs, trl, warmup):
    """ours / TRL per phase (the median over both of our runs' timed steps), and the first update on the same batch."""
    every = [s for r in ours_runs for m in r["methods"].values() for s in m["steps"]] + (trl["steps"] if trl else [])
    out = {"loss_and_kl_finite": all(math.isfinite(s["loss"]) and math.isfinite(s["kl"]) for s in every if "loss" in s)}
    timed = {m: [s for r in ours_runs for s in r["methods"][m]["steps"][warmup:]] for m in ours_runs[0]["methods"]}
    for method, steps in timed.items():
        out[f"ours_{method}_step_median"] = statistics.median(s["step"] for s in steps)
    if trl:
        out["ours_over_trl"] = {
            p: statistics.median(s[p] for s in timed["Dr.GRPO"]) / trl["summary"][p]["median"] for p in PHASES
        }
        mine = ours_runs[-1].get("update_on_trl_batch")
        if mine:
            out["first_update_on_the_same_batch"] = dict(
                ours=mine,
                trl=trl["first_update"],
                abs_difference={k: abs(mine[k] - trl["first_update"][k]) for k in mine},  # the first loss is about 0
                relative_difference={
                    k: abs(mine[k] - trl["first_update"][k]) / max(abs(trl["first_update"][k]), 1e-12) for k in mine
                },
            )
    return out


def driver(args, device):
    folder = tempfile.mkdtemp(prefix="gpu_step_")
    args = replace(args, folder=folder)
    build_and_save(args, folder)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"{args.shape} on {gpu}{' (bf16)' if args.bf16 else ''}: {args.num_prompts} prompts x {args.num_generations} "
        f"completions, {args.prompt_length - 20}-{args.prompt_length} prompt tokens, {args.max_new_tokens} new tokens "
        f"(forced), generation `{args.generation_backend}`; {args.warmup_steps} warm-up + {args.steps} timed steps; "
        f"each framework in its own process"
    )
    try:
        import trl
    except ImportError:
        trl = None
    if args.trl and trl is None:
        print("TRL: not importable here (pip install trl, or bring its wheel): skipped")
    configs = [("matched", args.micro_batch_size, args.gradient_checkpointing, [args.micro_batch_size])]
    configs = configs if args.matched else []
    if args.best:
        configs.append(("best", 0, False, args.best_micro_batches))
    result = dict(args=asdict(args), device=gpu, torch=torch.__version__, trl=trl.__version__ if trl else None)
    for name, ours_mbs, ckpt, trl_candidates in configs:
        j = lambda tag: os.path.join(folder, f"{name}_{tag}.json")  # noqa: E731
        first = child(args, "ours", ours_mbs, ckpt, j("ours1"))
        trl_run = None
        if args.trl and trl is not None:
            for mbs in trl_candidates:  # the largest that runs (matched: the one given)
                trl_run = child(args, "trl", mbs, ckpt, j(f"trl{mbs}"))
                if trl_run:
                    break
        again = replace(args, profile=0, checks=False)  # the profile and the checks ran in the first
        second = child(again, "ours", ours_mbs, ckpt, j("ours2"), trl_run["first_batch"] if trl_run else None)
        ours_runs = [r for r in (first, second) if r]
        compared = compare(ours_runs, trl_run, args.warmup_steps) if ours_runs else {}
        result[name] = dict(ours=ours_runs, trl=trl_run, **compared)
    print_result(result)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.output}")
    return result


def print_result(result):
    for name in ("matched", "best"):
        if name not in result:
            continue
        r = result[name]
        print(f"\n{name}: median (min - max) seconds per step over the timed steps; peak memory per phase")
        rows = [(f"ours#{i + 1} {m}", o["micro_batch_size"], o["methods"][m]["summary"])
                for i, o in enumerate(r["ours"]) for m in o["methods"]]  # fmt: skip
        if r["trl"]:
            rows.append(("TRL Dr.GRPO", r["trl"]["micro_batch_size"], r["trl"]["summary"]))
        for label, mbs, s in rows:
            cells = " ".join(f"{p} {s[p]['median']:.3f} ({s[p]['min']:.3f}-{s[p]['max']:.3f})" for p in PHASES)
            mem = " ".join(f"{k[:-3]} {v:.1f}GB" for k, v in s.items() if k.endswith("_gb"))
            print(f"  {label:22s} micro-batch {mbs}: {cells} {mem}")
        if "ours_over_trl" in r:
            print("  ours / TRL (Dr.GRPO): " + " ".join(f"{p} {v:.3f}" for p, v in r["ours_over_trl"].items()))
        if "first_update_on_the_same_batch" in r:
            print(f"  first update on TRL's batch: {json.dumps(r['first_update_on_the_same_batch'])}")


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.prompt_length <= 20 or args.steps < 1 or args.warmup_steps < 0:
        raise ValueError("--prompt-length must be > 20, --steps >= 1 and --warmup-steps >= 0")
    n = args.num_prompts * args.num_generations
    if args.micro_batch_size < 0 or (args.micro_batch_size and n % args.micro_batch_size):
        raise ValueError(
            f"--micro-batch-size {args.micro_batch_size} must divide the {n} completions of a step (--num-prompts x "
            "--num-generations), or be 0 (auto)"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU: run on a GPU machine or pass --device cpu")
    if args.role == "driver":
        driver(args, device)
    else:
        run = run_ours if args.role == "ours" else run_trl
        out = run(args, args.micro_batch_size, args.gradient_checkpointing, device)
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
        gc.collect()
