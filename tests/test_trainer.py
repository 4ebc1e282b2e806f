"""grpo_signcert.py, the trainer: its loss against an independent computation, the invariance of the
update to how a batch is split, the reward read at the right token, and the script end to end (1 and
2 processes, resume after a kill, bad arguments) on a very small tiny world."""

import contextlib
import copy
import fcntl
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import accelerate_cmd, built_once, read_metrics, run_checks_in_process, short_run_cmd  # noqa: E402
from update_worker import N as WORKER_N  # noqa: E402
from update_worker import T as WORKER_T
from update_worker import model_and_batch

import grpo_signcert  # noqa: E402
from grpo_signcert import (  # noqa: E402
    dr_grpo_loss,
    in_chunks,
    pairwise_agreement,
    policy_update,
    prompt_indices,
    response_logprobs,
    reward_and_features,
    save_checkpoint,
    truncate_after_eos,
)


# ------------------------------------------------------------------ the loss
def test_dr_grpo_loss_matches_a_token_by_token_computation():
    g = torch.Generator().manual_seed(0)
    n, t = 5, 7
    lp, old, ref = (-torch.rand(n, t, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=g) > 0.3).double()
    clip, beta, norm = 0.2, 0.05, n * t
    loss, kl_mean = dr_grpo_loss(lp, old, ref, adv, mask, clip, beta, norm)
    total, kls = 0.0, []
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            ratio = float(torch.exp(lp[i, j] - old[i, j]))
            a = float(adv[i])
            clipped = min(max(ratio, 1 - clip), 1 + clip)
            surrogate = min(ratio * a, clipped * a)  # PPO: the pessimistic of the two
            x = float(ref[i, j] - lp[i, j])
            k3 = (2.718281828459045**x) - x - 1
            kls.append(k3)
            total += -surrogate + beta * k3
    assert loss.item() == pytest.approx(total / norm, rel=1e-12)
    assert kl_mean.item() == pytest.approx(sum(kls) / len(kls), rel=1e-12)
    assert min(kls) >= 0


def test_update_is_the_same_for_1x4_2x2_and_1x1_and_matches_the_full_batch_gradient(tmp_path):
    """1 process x accumulation 4, 2 processes x accumulation 2 and 1 process x 1 micro-batch give the same
    update, and it equals the gradient of the Dr.GRPO objective over the whole batch computed here with
    no micro-batching, no accelerate and no dr_grpo_loss (ratio = 1, so the loss is -A + beta k3)."""
    updates = {}
    for procs, micro in ((1, 4), (2, 4), (1, 16)):
        out = tmp_path / f"{procs}_{micro}.pt"
        head = accelerate_cmd(procs) if procs > 1 else [sys.executable]
        cmd = head + [os.path.join(ROOT, "tests", "update_worker.py"), str(micro), str(procs), str(out)]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
        updates[(procs, micro)] = torch.load(out)
    policy, batch = model_and_batch()
    query, qmask, response, rmask = batch["query"], batch["query_mask"], batch["response"], batch["response_mask"]
    ref, adv = batch["ref_logprobs"], batch["advantages"]
    ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits[:, query.shape[1] - 1 : -1], -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    x = ref - logp
    objective = ((-adv.unsqueeze(1) * torch.exp(logp - logp.detach()) + 0.1 * (torch.exp(x) - x - 1)) * rmask).sum()
    (objective / (WORKER_N * WORKER_T)).backward()
    expected = {k: p.grad for k, p in policy.named_parameters()}
    for key, update in updates.items():
        for name, grad in expected.items():
            torch.testing.assert_close(update[name], grad, rtol=1e-4, atol=1e-7, msg=f"{key} {name}")
    a, b = updates[(1, 4)], updates[(2, 4)]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # float32 all-reduce rounding only


def update_args(**kw):
    base = dict(micro_batch_size=4, num_ppo_epochs=1, temperature=1.0, clip_range=0.2, kl_coef=0.1)
    return SimpleNamespace(**(base | dict(max_new_tokens=WORKER_T, max_grad_norm=1e9) | kw))


def full_batch_objective(policy, batch, kl_coef, old_logprobs=None, clip_range=0.2, temperature=1.0):
    """The Dr.GRPO objective of the whole batch, written out here: -min(ratio A, clip(ratio) A) + beta k3,
    summed over real tokens, over (completions x max_new_tokens). Returns (objective, log-probs)."""
    query, qmask, response, rmask = batch["query"], batch["query_mask"], batch["response"], batch["response_mask"]
    ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logits = logits[:, query.shape[1] - 1 : -1] / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
    old = logp.detach() if old_logprobs is None else old_logprobs
    ratio, adv = torch.exp(logp - old), batch["advantages"].unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv)
    x = batch["ref_logprobs"] - logp
    per_token = -surrogate + kl_coef * (torch.exp(x) - x - 1)
    return (per_token * rmask).sum() / (rmask.shape[0] * WORKER_T), logp


def one_process_update(policy, batch, args, lr=1.0):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=batch["response"].shape[0] // args.micro_batch_size)
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    return policy_update(accelerator, policy, optimizer, batch, args)


def test_update_stats_are_the_loss_kl_and_grad_norm_of_the_whole_batch():
    """policy_update's stats (what `losses/loss`, `policy/kl`, `policy/kl_k3_per_token`, `policy/grad_norm`
    log) against the whole-batch objective computed independently: the loss itself (not accumulation x loss),
    the per-sequence k1 KL, the per-token k3, and the gradient norm before clipping; clipping is active."""
    policy, batch = model_and_batch()
    reference = copy.deepcopy(policy)
    objective, logp = full_batch_objective(reference, batch, 0.1)
    objective.backward()
    grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in reference.parameters())).item()
    rmask = batch["response_mask"]
    before = [p.detach().clone() for p in policy.parameters()]
    stats = one_process_update(policy, batch, update_args(max_grad_norm=1e-3))  # 4 micro-batches of 4
    assert stats["loss"] == pytest.approx(objective.item(), rel=1e-5)
    torch.testing.assert_close(stats["seq_kl"], ((logp - batch["ref_logprobs"]) * rmask).sum(1).detach())
    x = (batch["ref_logprobs"] - logp).detach()
    k3 = ((torch.exp(x) - x - 1) * rmask).sum() / rmask.sum()
    assert stats["k3_sum"] / stats["tokens"] == pytest.approx(k3.item(), rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    step = torch.sqrt(sum(((a - b.detach()) ** 2).sum() for a, b in zip(before, policy.parameters()))).item()
    assert step == pytest.approx(1e-3, rel=1e-3)  # SGD, lr 1: the clipped gradient has norm max_grad_norm
    assert not policy.training  # back to eval mode for generation


def test_response_logprobs_run_the_lm_head_on_the_response_positions_only():
    """The LM head sees the T + 1 last positions (logits_to_keep), not the prompt's, and the log-probs equal a
    log-softmax over the full logits computed here, with left-padded prompts."""
    policy, batch = model_and_batch()
    seen = []
    policy.get_output_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    with torch.no_grad():
        lp = response_logprobs(
            policy, batch["query"], batch["query_mask"], batch["response"], batch["response_mask"], 1.0
        )
        _, expected = full_batch_objective(policy, batch, 0.1)  # its log-probs: a log-softmax of the full logits
    T, full_length = batch["response"].shape[1], batch["query"].shape[1] + batch["response"].shape[1]
    assert seen[0][1] == T + 1 and seen[1][1] == full_length  # ours, then the full forward of the reference
    torch.testing.assert_close(lp, expected, rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def host_syncs_counted(monkeypatch):
    """Count the ways a tensor's value reaches Python (item, tolist, bool, float, int) from the project's own code
    while the block runs (transformers' mask builder checks whether a padding mask is all ones: not ours)."""
    counts = {}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ROOT) and "site-packages" not in caller:
                counts[_name] = counts.get(_name, 0) + 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield counts
    monkeypatch.undo()


def test_the_update_never_waits_for_the_device_and_the_metrics_sync_once(monkeypatch):
    """policy_update over 4 micro-batches reads no tensor value into Python (a GPU runs ahead through all of them;
    before, 4 `.item()` per micro-batch); `on_host` turns the step's metrics into floats with one copy."""
    policy, batch = model_and_batch()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=4)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    with host_syncs_counted(monkeypatch) as counts:
        stats = policy_update(accelerator, policy, optimizer, batch, update_args(max_grad_norm=1e-3))
    assert counts == {}, counts
    with host_syncs_counted(monkeypatch) as counts:
        out = grpo_signcert.on_host({"step": 3, "loss": stats["loss"], "kl": stats["seq_kl"].mean(), "inf": math.inf})
    assert counts == {"tolist": 1}, counts
    assert out == {"step": 3, "loss": stats["loss"].item(), "kl": stats["seq_kl"].mean().item(), "inf": math.inf}
    assert all(type(v) in (int, float) for v in out.values())


def test_auto_micro_batch_is_the_largest_divisor_that_fits():
    """--micro-batch-size 0: the largest divisor of the per-process batch whose update fits (fixed + d x per
    completion <= budget), 1 when none does; on a CPU capped at CPU_MICRO_BATCH; the paper preset uses it."""
    fit = grpo_signcert.fit_micro_batch
    assert fit(256, 10, 1, 50) == 32  # divisors of 256 up to 40
    assert fit(256, 10, 1, 266) == 256 and fit(256, 10, 1, 265) == 128
    assert fit(48, 0, 1, grpo_signcert.CPU_MICRO_BATCH) == 24 and fit(128, 0, 1, grpo_signcert.CPU_MICRO_BATCH) == 32
    assert fit(256, 60, 1, 50) == 1  # nothing fits: the smallest, and the run finds out at its first step
    assert grpo_signcert.PRESETS["paper"].micro_batch_size == 0


def test_fused_adamw_gives_the_same_update():
    """The trainer's AdamW is fused where the device has it (a GPU): the same step as the per-parameter loop, to
    float rounding (checked here on the CPU, where torch has the fused kernel too)."""
    policy, batch = model_and_batch()
    steps = {}
    for fused in (False, True):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=fused)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(3):
            objective, _ = full_batch_objective(model, batch, 0.1)
            objective.backward()
            optimizer.step()
            optimizer.zero_grad()
        steps[fused] = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert steps[False].abs().max() > 1e-3  # it moved
    assert ((steps[True] - steps[False]).norm() / steps[False].norm()).item() < 1e-4  # measured: 7e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_is_active_when_asked(checkpointing):
    """A model fresh from from_pretrained is in eval mode, where transformers never checkpoints; the update must
    put it in train mode. Checkpointing shows as a second forward of every layer, during the backward."""
    policy, batch = model_and_batch()
    policy.eval()
    if checkpointing:
        policy.gradient_checkpointing_enable()
    calls = []
    layer = policy.gpt_neox.layers[0]
    layer.input_layernorm.register_forward_hook(lambda *a: calls.append(1))  # the first op inside the checkpoint
    one_process_update(policy, batch, update_args())
    assert len(calls) == 4 * (2 if checkpointing else 1)  # 4 micro-batches


def test_two_ppo_epochs_follow_the_clipped_objective_computed_by_hand():
    """num_ppo_epochs = 2: the first step is at ratio 1, the second at ratios against the sampling policy,
    where the PPO clip is active (checked): the updated weights equal two SGD steps on the objective by hand."""
    policy, batch = model_and_batch()
    batch["advantages"] = batch["advantages"] * 50  # large steps, so that ratios leave [0.8, 1.2]
    by_hand = copy.deepcopy(policy)
    with torch.no_grad():
        _, old = full_batch_objective(by_hand, batch, 0.1)
    batch["old_logprobs"] = old
    for _ in range(2):
        by_hand.zero_grad()
        objective, logp = full_batch_objective(by_hand, batch, 0.1, old_logprobs=old)
        objective.backward()
        with torch.no_grad():
            for p in by_hand.parameters():
                p -= 0.05 * p.grad
    ratio = torch.exp(logp - old)[batch["response_mask"].bool()]
    assert ((ratio < 0.8) | (ratio > 1.2)).any(), "the clip must be active in the second epoch"
    one_process_update(policy, batch, update_args(num_ppo_epochs=2), lr=0.05)
    for (name, a), b in zip(policy.named_parameters(), by_hand.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_in_sampling_and_log_probs(temperature):
    """Rollouts are sampled from softmax(logits / T) and the loss reads log softmax(logits / T): the first sampled
    token's frequencies against softmax(logits / T) (chi-square at level 1e-6, 20000 draws: a correct sampler fails it
    once in a million draws, whatever CPU draws the sample), and response_logprobs against it."""
    policy, batch = model_and_batch()
    policy.eval()
    with torch.no_grad():
        policy.get_output_embeddings().weight *= (
            40  # logits spread over a few units, so that T changes the distribution
        )
    n = 20000
    query, qmask = batch["query"][:1].repeat(n, 1), batch["query_mask"][:1].repeat(n, 1)
    args = SimpleNamespace(temperature=temperature, max_new_tokens=1)
    torch.manual_seed(0)
    first = grpo_signcert.sample(policy, query, qmask, args, pad_id=0)[:, 0]
    with torch.no_grad():
        logits = policy(
            input_ids=query[:1], attention_mask=qmask[:1], position_ids=(qmask[:1].cumsum(1) - 1).clamp(min=0)
        ).logits[0, -1]
    probs = torch.softmax(logits / temperature, -1)
    counts = torch.bincount(first, minlength=probs.numel()).double()
    expected = probs.double() * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum() + (
        counts[~keep].sum() - expected[~keep].sum()
    ) ** 2 / max(expected[~keep].sum().item(), 1e-9)
    assert chi2 < scipy.stats.chi2.ppf(1 - 1e-6, int(keep.sum())), chi2
    if temperature != 1.0:  # the check tells T from 1: the same counts against softmax(logits) fail it by far
        p1 = torch.softmax(logits, -1).double() * n
        assert (((counts - p1) ** 2 / p1.clamp(min=1e-9))[keep]).sum() > 10 * scipy.stats.chi2.ppf(
            1 - 1e-6, int(keep.sum())
        )
    lp = response_logprobs(
        policy, batch["query"], batch["query_mask"], batch["response"], batch["response_mask"], temperature
    )
    _, expected_lp = full_batch_objective(policy, batch, 0.1, temperature=temperature)
    torch.testing.assert_close(lp, expected_lp)


def test_in_chunks_over_several_chunks_equals_one_call():
    x, y = torch.randn(10, 3), torch.randn(10)
    out = in_chunks(lambda a, b: (a * 2, b + 1), 3, x, y)  # chunks of 3, 3, 3, 1
    assert torch.equal(out[0], x * 2) and torch.equal(out[1], y + 1)
    assert torch.equal(in_chunks(lambda a: a.sum(1), 4, x), x.sum(1))


def test_prompt_indices_depend_on_their_arguments_alone():
    """Called with another seed or dataset size in the same process, the order is that of a fresh process."""
    first = [prompt_indices(s, 10, 4, seed=1) for s in range(1, 8)]
    assert sorted(sum(first[:5], [])[:20]) == sorted(list(range(10)) * 2)  # every prompt once per epoch
    other = [prompt_indices(s, 7, 4, seed=2) for s in range(1, 8)]
    assert all(0 <= i < 7 for step in other for i in step)
    code = "from grpo_signcert import prompt_indices; print([prompt_indices(s, 7, 4, seed=2) for s in range(1, 8)])"
    fresh = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == str(other)


# ------------------------------------------------------------------ rollouts and scoring
def test_truncate_after_eos():
    eos = 0
    response = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 3, 3, 3, 3]])
    out, mask, has_eos = truncate_after_eos(response, eos, 1)
    assert out.tolist() == [[5, 6, 0, 1, 1], [5, 6, 7, 8, 9], [0, 1, 1, 1, 1]]  # filled with pad = 1
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]
    # several end ids (`completion_end_ids`): the cut is at the first of any of them
    out, mask, has_eos = truncate_after_eos(response, [0, 7], 1)
    assert out.tolist() == [[5, 6, 0, 1, 1], [5, 6, 7, 1, 1], [0, 1, 1, 1, 1]]
    assert mask.sum(1).tolist() == [3, 3, 1] and has_eos.tolist() == [True, True, True]


@pytest.mark.parametrize(
    "config_eos, ends", [(0, [0]), (None, [0]), ([7], [0, 7]), ([7, 0], [0, 7]), (7, [0, 7]), ([], [0])]
)
def test_completion_end_ids_are_the_tokenizers_eos_and_the_generation_configs(config_eos, ends):
    tokenizer = SimpleNamespace(eos_token_id=0)
    assert grpo_signcert.completion_end_ids(tokenizer, SimpleNamespace(eos_token_id=config_eos)) == ends


SECOND_END_WORD = " mess"  # a word of the world, made an end token of the generation config below


def policy_with_a_second_end_id(world, dest):
    """A copy of the CI world's EOS-emitting policy whose generation config lists ' mess' as its ONLY end id (not the
    tokenizer's EOS: both sides of the union are needed), with the logit of ' mess' raised as the EOS's is (each ends
    about 1 token in 11). Returns (folder, the id of ' mess')."""
    shutil.copytree(world / "policy", dest)
    tok = AutoTokenizer.from_pretrained(dest)
    (second,) = tok(SECOND_END_WORD, add_special_tokens=False).input_ids
    policy = AutoModelForCausalLM.from_pretrained(dest)
    with torch.no_grad():
        policy.get_output_embeddings().weight[second, 0] = 0.7
    policy.generation_config.eos_token_id = [second]
    policy.save_pretrained(dest)
    return dest, second


def test_completions_end_at_the_tokenizers_eos_and_at_every_end_id_of_the_generation_config(world, tmp_path):
    """A chat model's generation config lists its end-of-turn token besides (or instead of) the tokenizer's EOS. The
    trainer's policy stops at both (`load_policies` writes `completion_end_ids` into its generation config, which
    `generate` reads) and the rollouts are cut at the first of them: no end id inside a kept completion, nothing but
    pad after one, and both ids end some completions. Seen failing with the cut and the stop at one id only."""
    folder, second = policy_with_a_second_end_id(world, tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    eos, pad, budget = tok.eos_token_id, tok.pad_token_id, 8
    args = SimpleNamespace(policy_path=str(folder), trust_remote_code=False, gradient_checkpointing=False,
                           generation_backend="hf", generation_batch_size=64, temperature=1.0, max_new_tokens=budget)  # fmt: skip
    policy, _ = grpo_signcert.load_policies(args, None, tok, torch.float32)
    assert grpo_signcert.end_ids(policy) == sorted([eos, second]) and eos != second != pad
    enc = tok(["my savings are"] * 64, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    generated = grpo_signcert.rollouts(policy, enc.input_ids, enc.attention_mask, args, pad)
    response, mask, has_eos = truncate_after_eos(generated, grpo_signcert.end_ids(policy), pad)
    last = []
    for row, kept, ended in zip(generated.tolist(), mask.sum(1).tolist(), has_eos.tolist()):
        ends_at = [i for i, t in enumerate(row) if t in (eos, second)]
        assert kept == (ends_at[0] + 1 if ends_at else budget) and ended == bool(ends_at)
        assert all(t == pad for t in row[kept:])  # generation stopped at the first end id, whichever it was
        last += [row[kept - 1]] if ended else []
    assert {eos, second} <= set(last), last  # both end ids end completions


def test_the_run_counts_a_completion_stopped_by_the_second_end_id_as_ended(world, tmp_path):
    """End to end (the loop's own cut): with the policy above (which samples ' mess' often: the test before), no
    logged completion holds ' mess': each that sampled it ended there, and its text, as the gold reads it, stops
    before its end token, as before an EOS. Seen failing with the cut at the tokenizer's EOS only: ' mess' then
    followed by the pads, and the completion without EOS (the missing-EOS penalty)."""
    folder, _ = policy_with_a_second_end_id(world, tmp_path / "world" / "policy")
    for name in ("gold_rm", "data", "rm"):
        (tmp_path / "world" / name).symlink_to(world / name)
    out = tmp_path / "run"
    proc = subprocess.run(trainer_cmd(tmp_path / "world", out, "--total-steps", "2", "--log-samples-every", "1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [s for rows in read_samples(out).values() for s in rows]
    assert len(samples) == 2 * 16 and any(s["has_eos"] for s in samples)
    assert [s for s in samples if SECOND_END_WORD.strip() in s["response"]] == []


def test_reward_is_read_at_the_last_real_token_with_any_padding_and_pad_equal_eos():
    """The reward and features of a padded batch (left-padded prompts, right-padded responses, pad ==
    eos == 0) equal those of each sequence scored alone, with no padding at all."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=30,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=0,
        num_labels=1,
    )
    rm = GPTNeoXForSequenceClassification(config).eval()
    eos = 0
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    responses = [[12, 13, eos], [14, eos], [15, 16, 17]]  # the last one has no EOS
    P, T = 4, 3
    query = torch.tensor([[eos] * (P - len(p)) + p for p in prompts])
    qmask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    resp = torch.tensor([r + [eos] * (T - len(r)) for r in responses])
    _, rmask, _ = truncate_after_eos(resp, eos, eos)
    reward, feats = reward_and_features(rm, torch.cat([query, resp], 1), torch.cat([qmask, rmask], 1))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        alone_r, alone_h = reward_and_features(rm, torch.tensor([p + r]), torch.ones(1, len(p + r), dtype=torch.long))
        torch.testing.assert_close(reward[i], alone_r[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(feats[i], alone_h[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reward[i], rm.score(feats[i]).squeeze(), rtol=1e-6, atol=1e-6)  # the head's input


def test_pairwise_agreement_by_brute_force():
    g = torch.Generator().manual_seed(0)
    proxy, gold = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    gold[0, 1] = gold[0, 2]  # a gold tie: not counted
    agree = total = 0
    for b in range(4):
        for i in range(5):
            for j in range(i + 1, 5):
                if gold[b, i] != gold[b, j]:
                    total += 1
                    agree += (proxy[b, i] - proxy[b, j]) * (gold[b, i] - gold[b, j]) > 0
    assert pairwise_agreement(proxy, gold) == pytest.approx(agree / total)
    assert pairwise_agreement(gold, gold) == 1.0 and pairwise_agreement(-gold, gold) == 0.0


# ------------------------------------------------------------------ the script end to end
@pytest.fixture(scope="session")
def world(ci_world_with_rm):
    return ci_world_with_rm  # conftest: the CI world with an untrained proxy RM, shared, read only


def trainer_cmd(world, out, *extra, procs=None):
    rm = ["--reward-model-path", str(world / "rm")]
    return short_run_cmd("grpo_signcert.py", world, out, *rm, "--log-samples-every", "2", *extra, procs=procs)


def read_samples(out):
    by_step = {}
    with open(out / "samples.jsonl") as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(row["step"], []).append(row)
    return {step: sorted(rows, key=lambda r: r["group"]) for step, rows in by_step.items()}


def expected_metrics(rows, K, quantile):
    """Every logged metric of a step that its completions determine, recomputed from samples.jsonl (all the
    completions of the step, from every process) with numpy, independently of the trainer's code."""
    proxy, gold = (
        np.array([r["proxy"] for r in rows]).reshape(-1, K),
        np.array([r["gold"] for r in rows]).reshape(-1, K),
    )
    radius, has_eos = np.array([r["radius"] for r in rows]), np.array([r["has_eos"] for r in rows])
    A = (proxy - proxy.mean(1, keepdims=True)).ravel()
    pool = radius[np.isfinite(radius) & (radius > 0)]
    eps = float(np.quantile(pool, quantile)) if quantile > 0 and pool.size else 0.0
    reweighted = np.isfinite(radius) & (radius > 0) & (eps > 0)
    with np.errstate(divide="ignore"):
        advantage = np.where(reweighted, A * (1 - eps / radius), A)  # eq. (11); others keep eq. (4)
    agree = total = 0
    for p, g in zip(proxy, gold):
        for i in range(K):
            for j in range(i + 1, K):
                if g[i] != g[j]:
                    total, agree = total + 1, agree + ((p[i] - p[j]) * (g[i] - g[j]) > 0)
    return advantage, {
        "reward/proxy": proxy.mean(),
        "reward/gold": gold.mean(),
        "rm/proxy_accuracy": agree / max(total, 1),
        "signcert/eps": eps,
        "signcert/frac_rho_nonpositive": float(np.mean((radius <= eps) & (eps > 0))),
        "signcert/frac_reweighted": float(np.mean(reweighted)),
        "signcert/mean_rho": float(np.mean(1 - eps / pool)) if pool.size else 1.0,
        "signcert/mean_radius": float(np.mean(pool)) if pool.size else math.inf,
        "completion/length": float(np.mean([r["length"] for r in rows])),
        "completion/no_eos_rate": float(np.mean(~has_eos)),
        "adv/std": float(np.std(advantage)),
        "adv/relative_change": float(np.abs(advantage - A).sum() / np.abs(A).sum()),
    }


@pytest.mark.parametrize("procs", [None, 2])
def test_every_logged_metric_against_an_independent_computation(world, tmp_path, procs):
    """Two steps with the missing-EOS penalty on, every completion in samples.jsonl: each metric of each step
    (over both processes: eps is global) recomputed from the completions; penalised completions keep their
    Dr.GRPO advantage; the run's folder holds the final policy and the arguments with the derived sizes."""
    out, K, q = tmp_path / "run", 4, 0.3
    subprocess.run(
        trainer_cmd(world, out, "--total-steps", "2", "--quantile", str(q), "--log-samples-every", "1", procs=procs),
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    metrics, samples = read_metrics(out), read_samples(out)
    assert [m["step"] for m in metrics] == [1, 2] and sorted(samples) == [1, 2]
    for m in metrics:
        rows = samples[m["step"]]
        assert len(rows) == 16 and [r["group"] for r in rows] == [i // K for i in range(16)]
        assert all(r["proxy"] == -1.0 for r in rows if not r["has_eos"])  # the penalty, not the RM's score
        advantage, expected = expected_metrics(rows, K, q)
        for key, value in expected.items():
            assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        np.testing.assert_allclose([r["advantage"] for r in rows], advantage, rtol=1e-5, atol=1e-6)
        assert m["time/step"] == pytest.approx(m["time/generation"] + m["time/scoring"] + m["time/update"])
    assert any(not r["has_eos"] for rows in samples.values() for r in rows), "the penalty path must be exercised"
    assert metrics[0]["signcert/eps"] > 0 and metrics[0]["policy/kl"] == 0.0  # step 1: the policy is the reference
    assert os.path.exists(out / "model" / "model.safetensors")
    args = json.load(open(out / "args.json"))
    assert args["num_processes"] == (procs or 1) and args["gradient_accumulation_steps"] == 4 // (procs or 1)


# what score_texts reads of an Accelerator: one process on the CPU
ONE_CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=False, num_processes=1)


@pytest.mark.parametrize("chat", [False, True])
def test_the_gold_reads_what_gen_prefs_and_eval_gold_read(world, chat):
    """`reward/gold` during training and the gold labels and evaluation score the same input: the trainer's
    gold_rewards equals eval_gold.py's score_texts on the same texts, with a chat template (a gold like Skywork:
    the response stripped, no EOS added) and without (prompt + response + EOS), batched with padding."""
    import eval_gold

    gold = AutoModelForSequenceClassification.from_pretrained(world / "gold_rm").eval()
    tok = AutoTokenizer.from_pretrained(world / "gold_rm")
    if chat:
        tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    prompts = ["SUBREDDIT: r/pets\n\nTITLE: my dog\n\nPOST: my dog ate my shoe\n\nTL;DR:"] * 3 + ["TL;DR:"] * 2
    responses = [" my dog ate my shoe ", " dog shoe", "", " a much longer answer about the dog and the shoe", " ok"]
    args = SimpleNamespace(gold_batch_size=2, gold_max_length=64)
    with torch.no_grad():
        ours = grpo_signcert.gold_rewards(gold, tok, prompts, responses, args, torch.device("cpu"))
        theirs = eval_gold.score_texts(gold, tok, prompts, responses, chat, 5, 64, ONE_CPU, "gold")[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0  # different texts, different scores: the comparison is not vacuous


def test_scoring_batches_in_threads_gives_the_same_scores_to_the_bit(world, monkeypatch):
    """eval_gold.py's and gen_prefs.py's score_texts and tiny_world.gold_scores score several batches at once, in
    threads, when torch runs on fewer threads than there are cores (as pipeline.py runs every stage): the scores
    and features, in order, are those of one batch at a time, bit for bit (the pipeline's chains depend on it)."""
    import eval_gold
    import tiny_world

    gold = AutoModelForSequenceClassification.from_pretrained(world / "gold_rm").eval()
    tok = AutoTokenizer.from_pretrained(world / "gold_rm")
    rng = random.Random(0)
    words = "my dog cat ate the shoe ring oven pasta boss lost found".split()
    prompts = [f"SUBREDDIT: r/pets\n\nTITLE: t{i}\n\nPOST: my dog ate my shoe {i}\n\nTL;DR:" for i in range(37)]
    responses = [" " + " ".join(rng.choices(words, k=rng.randint(1, 9))) for _ in prompts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = {}
        for cores in (1, 4):  # 1: one batch at a time; 4: four batches at once, one torch thread each
            monkeypatch.setattr(os, "cpu_count", lambda: cores)
            got[cores] = eval_gold.score_texts(gold, tok, prompts, responses, False, 4, 64, ONE_CPU, "gold") + (
                tiny_world.gold_scores(gold, tok, prompts, [r[1:] for r in responses], batch_size=4),
            )
    finally:
        torch.set_num_threads(threads)
    for one, four in zip(got[1], got[4]):
        assert torch.equal(one, four)
    assert got[1][0].unique().numel() > 30 and torch.equal(got[1][0], got[1][2])  # distinct scores; the two agree


def test_a_short_run_raises_the_proxy_reward(world, tmp_path):
    """The trainer learns at all: with the missing-EOS penalty (-1, against proxy scores near 0), 12 steps at a
    large learning rate teach the policy to end its completions, and the mean proxy reward rises."""
    out = tmp_path / "run"
    extra = ("--total-steps", "12", "--learning-rate", "3e-3", "--quantile", "0.3")
    subprocess.run(trainer_cmd(world, out, *extra), check=True, cwd=ROOT, capture_output=True, timeout=600)
    metrics = read_metrics(out)
    proxy, no_eos = [m["reward/proxy"] for m in metrics], [m["completion/no_eos_rate"] for m in metrics]
    assert np.mean(proxy[-4:]) > proxy[0] + 0.3, proxy  # step 1 samples the initial policy
    assert np.mean(no_eos[-4:]) < no_eos[0] - 0.3, no_eos


def read_sample_steps(out):
    with open(out / "samples.jsonl") as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.parametrize("procs", [None, 2])
def test_resume_after_kill_continues_with_no_lost_or_repeated_step(world, tmp_path, procs):
    """kill -9 of the whole run (launcher and workers) after its first checkpoint, then --resume: the metrics, the
    samples and the final weights equal those of an uninterrupted run, with no step lost or written twice."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ("--total-steps", "5", "--save-every", "2", "--log-samples-every", "1", "--eval-every", "2")
    common += ("--eval-num-prompts", "6")  # the held-out evaluation on: at steps 0, 2, 4 and 5
    subprocess.run(
        trainer_cmd(world, straight, *common, procs=procs), check=True, cwd=ROOT, capture_output=True, timeout=600
    )
    proc = subprocess.Popen(
        trainer_cmd(world, killed, *common, procs=procs),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the workers too
    )
    deadline = time.time() + 300
    # kill once it has written the samples of step 3, after checkpoint-2: the resumed run must not repeat them
    while proc.poll() is None and time.time() < deadline:
        if (killed / "samples.jsonl").exists() and '"step": 3,' in (killed / "samples.jsonl").read_text():
            break
        time.sleep(0.01)
    # every process of the run: the workers torchrun starts need not share the launcher's process group, and a
    # worker that outlives the kill finishes the run (seen on a busy machine)
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()
    # the launcher is gone at once, its workers a moment later (on a busy machine, seconds): a dying worker still
    # holds the run folder's lock, and the resume would rightly be refused as a second live run; wait for the lock
    with open(killed / ".lock") as lock:
        while time.time() < deadline:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
                break
            except BlockingIOError:
                time.sleep(0.05)
    # killed after a checkpoint with steps past it under way: checkpoint-2 (step 3's samples written), or, when a
    # busy machine delays the kill, checkpoint-4; the resume must drop what came after its checkpoint either way
    assert (killed / "latest").read_text() in ("checkpoint-2", "checkpoint-4") and not (killed / "model").exists()
    resumed = subprocess.run(
        trainer_cmd(world, killed, *common, "--resume", procs=procs), cwd=ROOT, capture_output=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]  # step 0 once: the held-out evaluation of the initial policy
    assert [r["step"] for r in b if "eval/test/gold_reward" in r] == [0, 2, 4, 5]
    for ra, rb in zip(a, b):  # every metric but the timings, held-out evaluation included
        assert {k: v for k, v in ra.items() if not k.startswith("time/")} == {
            k: v for k, v in rb.items() if not k.startswith("time/")
        }
    assert read_sample_steps(killed) == read_sample_steps(straight)
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.load(open(killed / "args.json"))["run_name"] == json.load(open(killed / "args.json"))["run_name"]


def test_run_folders_cannot_be_mixed_up(world, tmp_path):
    """A folder that holds a run is refused without --resume or --overwrite (nothing appended to its logs);
    --overwrite starts afresh; --resume needs --output-dir, refuses arguments that change the run and keeps the
    run's name (its wandb id); a folder locked by a live run is refused."""
    out = tmp_path / "run"
    one = ("--total-steps", "1")

    def trainer(*extra, out=out):
        return subprocess.run(
            trainer_cmd(world, out, *one, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600
        )

    assert trainer().returncode == 0
    name = json.load(open(out / "args.json"))["run_name"]
    again = trainer()
    assert again.returncode != 0 and "already holds a run" in again.stderr and "--resume" in again.stderr
    assert [m["step"] for m in read_metrics(out)] == [1]
    changed = trainer("--resume", "--quantile", "0.5")
    assert changed.returncode != 0 and "quantile" in changed.stderr and "change the run" in changed.stderr
    resumed = trainer("--resume", "--total-steps", "2")  # a longer run may continue: --total-steps may change
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.load(open(out / "args.json"))["run_name"] == name
    assert trainer("--overwrite").returncode == 0 and [m["step"] for m in read_metrics(out)] == [1]
    cmd = [c for c in trainer_cmd(world, out, *one, "--resume") if c not in ("--output-dir", str(out))]
    no_dir = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert no_dir.returncode != 0 and "--resume needs --output-dir" in no_dir.stderr
    with open(out / ".lock", "a+") as held:  # a live run holds this lock for its whole life
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = trainer("--resume")
    assert busy.returncode != 0 and "in use by a live run" in busy.stderr


class Crash(Exception):
    pass


def test_a_kill_at_any_moment_of_a_checkpoint_leaves_a_complete_one_and_a_resumable_run(tmp_path, monkeypatch):
    """save_checkpoint killed at each of its renames and deletions in turn (simulated by an exception there):
    `latest` always names a complete checkpoint, and the resumed run's next save of the same step succeeds
    (it once failed forever: a leftover checkpoint-N that `latest` did not name yet)."""
    policy, _ = model_and_batch()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    real = {"replace": os.replace, "rmtree": shutil.rmtree}
    count = {"n": 0, "crash_at": None}

    def failing(name):
        def op(*a, **kw):
            count["n"] += 1
            if count["n"] == count["crash_at"]:
                raise Crash(name)
            return real[name](*a, **kw)

        return op

    monkeypatch.setattr(os, "replace", failing("replace"))
    monkeypatch.setattr(shutil, "rmtree", failing("rmtree"))
    for crash_at in range(1, 20):
        out = tmp_path / str(crash_at)
        out.mkdir()
        count["crash_at"] = None
        save_checkpoint(accelerator, policy, optimizer, 2, str(out))
        count["n"], count["crash_at"] = 0, crash_at
        try:
            save_checkpoint(accelerator, policy, optimizer, 4, str(out))
            crashed = True
        except Crash:
            crashed = False
        ckpt = grpo_signcert.latest_checkpoint(str(out))
        for name in ("state.json", "optimizer.pt", "rng_0.pt", "model/model.safetensors", "model/config.json"):
            assert os.path.exists(os.path.join(ckpt, name)), (crash_at, ckpt, name)
        count["crash_at"] = None
        save_checkpoint(accelerator, policy, optimizer, 4, str(out))  # the resumed run reaches step 4 again
        assert grpo_signcert.latest_checkpoint(str(out)).endswith("checkpoint-4")
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4", "latest"]
        if crashed:  # past the last operation: every moment has been tried
            break
    assert crashed


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--quantile", "1.5"), "--quantile must lie in"),
        (("--num-prompts-per-step", "4", "--micro-batch-size", "5"), "or the second a divisor of 16"),
        (
            ("--reward-model-path", "runs/does_not_exist"),
            "--reward-model-path runs/does_not_exist: no such local folder",
        ),
        (("--dataset", "./no_such_data"), "does not exist"),
    ],
)
def test_bad_arguments_fail_early_with_a_clear_message(world, tmp_path, extra, message):
    res = run_checks_in_process(trainer_cmd(world, tmp_path / "run", "--total-steps", "1", *extra), ROOT)
    assert res.returncode != 0 and message in res.stderr


BAD_DATA = {
    "wrong columns": ('{"question": "q", "answer": "a"}\n', "has columns ['answer', 'question']"),
    "empty file": ("", "is empty (no rows)"),
    "missing column in a later row": (
        '{"instruction": "i", "input": "", "output": "o"}\n{"instruction": "i", "output": "o"}\n',
        "row 2: no column 'input'",
    ),
    "malformed line": (
        '{"instruction": "i", "input": "", "output": "o"}\n{"instruction": \n',
        "line 2: not valid JSON",
    ),
}


BAD_HELDOUT = {  # the held-out evaluation on (--eval-every 1), its arguments wrong
    "eval every": (("--eval-every", "-1"), "needs --eval-every >= 0 (0: off)"),
    "eval temperature": (("--eval-temperature", "0"), "--eval-temperature > 0"),
    "eval split": (("--eval-splits", "validation", "dev", "--eval-num-prompts", "8"), "--eval-splits dev: "),
    "eval prompts": (("--eval-num-prompts", "51"), "than the 50 rows of"),
}


@pytest.mark.parametrize("case", [*BAD_DATA, "prompt length", "causal LM as reward model", *BAD_HELDOUT])
def test_bad_input_fails_in_seconds_and_leaves_no_run_folder(world, tmp_path, case):
    """Checked before any model loads and before the run folder exists (issue 8 item 7)."""
    extra = ()
    if case in BAD_DATA:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "train.jsonl").write_text(BAD_DATA[case][0])
        extra, message = ("--dataset", str(tmp_path / "data")), BAD_DATA[case][1]
    elif case in BAD_HELDOUT:
        extra, message = ("--eval-every", "1", *BAD_HELDOUT[case][0]), BAD_HELDOUT[case][1]
    elif case == "prompt length":
        extra, message = ("--max-prompt-length", "3"), "raise --max-prompt-length (now 3)"
    else:
        extra, message = ("--reward-model-path", str(world / "base_policy")), "is not a reward model"
    t0 = time.perf_counter()
    res = run_checks_in_process(trainer_cmd(world, tmp_path / "run", "--total-steps", "1", *extra), ROOT)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    assert elapsed < 10, f"took {elapsed:.0f}s: the check must come before the models load"


def test_reward_model_without_a_single_linear_head_is_refused(world, tmp_path):
    two = AutoModelForSequenceClassification.from_pretrained(world / "base_policy", num_labels=2)
    two.save_pretrained(tmp_path / "rm2")
    AutoTokenizer.from_pretrained(world / "base_policy").save_pretrained(tmp_path / "rm2")  # passes the tokenizer check
    for path, message in (
        (tmp_path / "rm2", "linear head `score` with one output"),
        (world / "base_policy", "is not a reward model"),
    ):
        res = subprocess.run(
            trainer_cmd(world, tmp_path / "run", "--total-steps", "1", "--reward-model-path", str(path)),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode != 0 and message in res.stderr


# ------------------------------------------------------------------ the held-out gold evaluation
HELDOUT_KEYS = ("gold_reward", "win_rate", "proxy_reward", "length", "no_eos_rate")


def training_keys(row):
    return {k: v for k, v in row.items() if not k.startswith(("eval/", "time/"))}


def heldout_setup(world, splits, n, gold_path=None, **kw):
    """What the trainer passes heldout_eval, built here in-process for `n` prompts of each split."""
    tok = AutoTokenizer.from_pretrained(world / "policy", padding_side="left")
    heldout = {}
    for split in splits:
        rows, where = grpo_signcert.load_split(str(world / "data"), split)
        rows = rows[:n]
        refs = [grpo_signcert.to_prompt_response(r, "tldr", tok, 128)[1] for r in rows]
        heldout[split] = (grpo_signcert.build_prompts(rows, tok, 128, where), refs)
    policy = AutoModelForCausalLM.from_pretrained(world / "policy").eval()
    rm = AutoModelForSequenceClassification.from_pretrained(world / "rm").eval()
    gold = AutoModelForSequenceClassification.from_pretrained(gold_path or world / "gold_rm").eval()
    gold_tok = AutoTokenizer.from_pretrained(world / "gold_rm", padding_side="right")
    args = grpo_signcert.Args(max_new_tokens=8, **kw)
    return policy, tok, rm, gold, gold_tok, heldout, args


def test_heldout_eval_win_is_strict_and_a_completion_without_eos_gets_the_penalty(world, tmp_path):
    """A gold RM with a zero head scores every text 0, the references included: a completion with EOS ties with
    its reference (no win: the win is strict), one without gets the penalty, 0.5 here, and wins. So the win rate
    is the no-EOS rate and the gold mean 0.5 x the no-EOS rate. Two calls give the same metrics (fixed prompts,
    the evaluation's own seed) and leave the caller's RNG stream where it was."""
    gold = AutoModelForSequenceClassification.from_pretrained(world / "gold_rm")
    with torch.no_grad():
        gold.score.weight.zero_()
    gold.config.reward_offset = 0.0
    gold.save_pretrained(tmp_path / "flat_gold")
    policy, tok, rm, gold, gold_tok, heldout, args = heldout_setup(
        world, ["validation"], 24, tmp_path / "flat_gold", eval_temperature=1.0, missing_eos_penalty=0.5
    )
    accelerator, cache = Accelerator(cpu=True), {}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m = grpo_signcert.heldout_eval(policy, tok, rm, gold, gold_tok, heldout, cache, args, accelerator)
    assert torch.equal(torch.get_rng_state(), before)
    no_eos = m["eval/validation/no_eos_rate"]
    assert 0.2 < no_eos < 0.8, no_eos  # both kinds of completion occur (temperature 1)
    assert m["eval/validation/win_rate"] == pytest.approx(no_eos)
    assert m["eval/validation/gold_reward"] == pytest.approx(0.5 * no_eos, abs=1e-6)
    assert torch.equal(cache["validation"], torch.zeros(24))  # the references' gold, cached
    assert grpo_signcert.heldout_eval(policy, tok, rm, gold, gold_tok, heldout, cache, args, accelerator) == m


HELDOUT_PENALTY = "3"  # the held-out tests' missing-EOS penalty: above every reference's gold, so no EOS wins


@pytest.fixture(scope="session")
def heldout_runs(world, tmp_path_factory):
    """Two 3-step runs, the held-out evaluation off and every 2 steps (24 prompts of each split, at temperature 1:
    with and without EOS both occur, where the CI policy's near-greedy completion is EOS alone; a missing-EOS
    penalty of +3, above the references' gold, so that the completions without EOS win and the win rate is neither
    0 nor 1: no completion of the random-init policy beats a reference of the CI world); once per session."""

    def build(root):
        for name, every in (("off", "0"), ("on", "2")):
            extra = ("--total-steps", "3", "--eval-every", every, "--eval-num-prompts", "24", "--eval-temperature", "1")
            extra += ("--missing-eos-penalty", HELDOUT_PENALTY)
            cmd = trainer_cmd(world, root / name, *extra)
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)

    root = built_once(tmp_path_factory, "trainer_heldout", build)
    return root / "off", root / "on"


def test_heldout_eval_does_not_change_training(heldout_runs):
    """The evaluation samples from its own RNG stream and does not touch the policy: with it on, every training
    metric and the final weights are bitwise those of the run with it off; it is logged at step 0 (the initial
    policy), every --eval-every steps and at the last step."""
    off, on = (read_metrics(out) for out in heldout_runs)
    assert [r["step"] for r in off] == [1, 2, 3] and [r["step"] for r in on] == [0, 1, 2, 3]
    with_eval = [r["step"] for r in on if "eval/validation/gold_reward" in r and "eval/test/win_rate" in r]
    assert with_eval == [0, 2, 3]
    assert set(on[0]) == {"step", "time/eval"} | {f"eval/{s}/{k}" for s in ("validation", "test") for k in HELDOUT_KEYS}
    for a, b in zip(off, on[1:]):
        assert training_keys(a) == training_keys(b)
    wa, wb = (load_file(out / "model" / "model.safetensors") for out in heldout_runs)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_heldout_eval_at_step_0_equals_eval_gold(world, heldout_runs, tmp_path):
    """The step-0 evaluation of a run is eval_gold.py's evaluation of the initial policy on the same first 24
    prompts of the split (the second split: each split is sampled from a fresh seed, as eval_gold.py samples it):
    the same completions, so the same gold mean (missing-EOS penalty included), strict win rate, length and
    EOS rate. The proxy is read from the policy's token ids, as in training, where eval_gold.py re-tokenises the
    decoded text: the CI policy (random weights) emits byte tokens that do not survive the round trip, so the
    proxy mean is compared to 2e-3 (a missing penalty moves it by about 3)."""
    cmd = [sys.executable, "eval_gold.py", "--policy-path", str(world / "policy"), "--gold-rm-path"]
    cmd += [str(world / "gold_rm"), "--reward-model-path", str(world / "rm"), "--dataset", str(world / "data")]
    cmd += ["--split", "test", "--num-prompts", "24", "--max-new-tokens", "8", "--temperature", "1"]
    cmd += ["--missing-eos-penalty", HELDOUT_PENALTY]  # the runs' (heldout_runs)
    subprocess.run(cmd + ["--output-dir", str(tmp_path / "ev")], check=True, cwd=ROOT, capture_output=True, timeout=600)
    theirs = json.load(open(tmp_path / "ev" / "eval.json"))
    ours = read_metrics(heldout_runs[1])[0]
    assert ours["step"] == 0 and theirs["eval/num_prompts"] == 24
    assert 0 < theirs["eval/eos_rate"] < 1 and 0 < theirs["eval/win_rate"] < 1  # the penalty and the win matter
    assert ours["eval/test/gold_reward"] == pytest.approx(theirs["eval/gold_reward_mean"], abs=1e-5)
    assert ours["eval/test/win_rate"] == theirs["eval/win_rate"]
    assert ours["eval/test/length"] == theirs["eval/response_length_mean"]
    assert ours["eval/test/no_eos_rate"] == pytest.approx(1 - theirs["eval/eos_rate"], abs=1e-12)
    assert ours["eval/test/proxy_reward"] == pytest.approx(theirs["eval/proxy_reward_mean"], abs=2e-3)


def test_heldout_eval_over_two_processes_equals_one(world, tmp_path):
    """23 prompts split 12 + 11 over two processes and gathered: the step-0 evaluation equals heldout_eval's in
    one process (at the default temperature 0.01, where the samples do not depend on the process's seed)."""
    out = tmp_path / "run"
    extra = ("--total-steps", "1", "--eval-every", "1", "--eval-num-prompts", "23")
    subprocess.run(trainer_cmd(world, out, *extra, procs=2), check=True, cwd=ROOT, capture_output=True, timeout=600)
    two = read_metrics(out)[0]
    policy, tok, rm, gold, gold_tok, heldout, args = heldout_setup(world, ["validation", "test"], 23)
    one = grpo_signcert.heldout_eval(policy, tok, rm, gold, gold_tok, heldout, {}, args, Accelerator(cpu=True))
    assert two["step"] == 0 and set(one) == {k for k in two if k.startswith("eval/")}
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert one["eval/validation/gold_reward"] != one["eval/test/gold_reward"]  # the splits' own prompts


def test_a_failed_start_does_not_block_the_next_run_into_its_folder(world, tmp_path):
    """A run that fails after its folder was made (here: its step-0 row and args.json written, no step) leaves a
    folder that holds no run: the next run into it says so and starts afresh (issue 43); a folder with a step is
    still refused."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/test/gold_reward": 0.0}) + "\n")
    res = subprocess.run(trainer_cmd(world, out, "--total-steps", "1"), cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "holds no run, only what a start that failed before its first step left" in res.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 1
    again = run_checks_in_process(trainer_cmd(world, out, "--total-steps", "1"), ROOT)
    assert again.returncode != 0 and "already holds a run" in again.stderr
