"""grpo_signcert_trl.py: SignCert-PO as a subclass of TRL's GRPOTrainer, checked against TRL's own advantages and
against our trainer's functions recomputed independently on the same token ids (the CI world, an untrained proxy).

    python -m pytest tests/test_trl.py -q
"""

import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
trl = pytest.importorskip("trl")
from conftest import accelerate_cmd, built_once  # noqa: E402
from trl_worker import with_trl_advantages  # noqa: E402

import grpo_signcert  # noqa: E402
import grpo_signcert_trl as ours  # noqa: E402

K, L = 4, 8  # completions per prompt, max completion length


def test_the_overridden_private_methods_have_the_tested_signatures():
    """The subclass overrides private methods of GRPOTrainer; an upgrade that changes them must fail here, loudly."""
    tested = {
        "_generate": ["self", "prompts"],
        "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
        "_generate_and_score_completions": ["self", "inputs"],
        "_compute_loss": ["self", "model", "inputs"],
        # the subclass passes the rest through; it reads the first four and the log-probs returned first
        "_get_per_token_logps_and_entropies": ["self", "model", "input_ids", "attention_mask", "logits_to_keep"],
    }
    for name, params in tested.items():
        got = list(inspect.signature(getattr(trl.GRPOTrainer, name)).parameters)[: len(params)]
        assert got == params, (
            f"grpo_signcert_trl.py was written against trl {ours.TESTED_TRL}; trl {trl.__version__} changed "
            f"GRPOTrainer.{name}{tuple(got)} (tested: {tuple(params)}): re-read it and adapt the override"
        )
    # the reward function's keywords and the advantage slice the subclass relies on
    source = inspect.getsource(trl.GRPOTrainer._calculate_rewards)
    assert "completion_ids=completion_ids_list" in source, f"tested with trl {ours.TESTED_TRL}"
    assert "process_slice" in inspect.getsource(trl.GRPOTrainer._generate_and_score_completions)
    # `policy/kl` reads the log-probs of the one forward _compute_loss makes, and the reference's from its inputs
    loss_source = inspect.getsource(trl.GRPOTrainer._compute_loss)
    assert loss_source.count("self._get_per_token_logps_and_entropies(") == 1, f"tested with trl {ours.TESTED_TRL}"
    assert 'inputs["ref_per_token_logps"]' in loss_source, f"tested with trl {ours.TESTED_TRL}"


def make_trainer(world, out, quantile, scale_rewards="none", **extra):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(world, "policy"), padding_side="left")
    config = ours.SignCertGRPOConfig(
        output_dir=str(out),
        quantile=quantile,
        scale_rewards=scale_rewards,
        loss_type="dr_grpo",
        beta=0.01,
        use_bias_correction_kl=False,
        num_generations=K,
        max_completion_length=L,
        per_device_train_batch_size=4 * K,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        top_k=0,
        seed=1,
        **extra,
    )
    from datasets import Dataset

    rows, where = ours.load_split(os.path.join(world, "data"), "train")
    prompts = ours.build_prompts(rows[:4], tok, 128, where)
    trainer = ours.SignCertGRPOTrainer(
        model=os.path.join(world, "policy"),
        reward_model=os.path.join(world, "rm"),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tok,
    )
    return trainer, prompts


def score_batch(trainer, prompts, seed=0):
    """One generation batch through the trainer's `_generate_and_score_completions` (4 prompts x K, grouped as TRL's
    sampler groups them), with TRL's own advantages kept beside ours."""
    trainer.model.train()
    torch.manual_seed(seed)
    rows = [{"prompt": p} for p in prompts for _ in range(K)]
    out, trl_advantages = with_trl_advantages(lambda: trainer._generate_and_score_completions(rows))
    return out, trl_advantages, trainer._rewards[:, 0].clone()


def trl_group_scale(r):
    """TRL's scale_rewards="group": each group's unbiased reward std + 1e-4, computed here in float64. r: (B, K)."""
    return r.double().std(1, keepdim=True).float() + 1e-4


def independent_scores(trainer, out, penalty=-1.0):
    """Rewards and features recomputed here: each row's prompt ids + completion ids (EOS kept) alone, unpadded,
    through the RM's backbone and its `score` head, minus its reward_offset; the missing-EOS penalty."""
    rm, eos = trainer.rm, trainer.processing_class.eos_token_id
    rewards, feats, ended = [], [], []
    for p, pm, c, cm in zip(out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]):
        ids = torch.cat([p[pm.bool()], c[cm.bool()]]).unsqueeze(0)
        with torch.no_grad():
            h = rm.gpt_neox(input_ids=ids).last_hidden_state[0, -1]
            r = rm.score(h).squeeze() - getattr(rm.config, "reward_offset", 0.0)
        has_eos = bool(cm.sum() > 0 and c[cm.bool()][-1] == eos)
        rewards.append(r.item() if has_eos or penalty is None else penalty)
        feats.append(h)
        ended.append(has_eos)
    return torch.tensor(rewards).view(-1, K), torch.stack(feats).view(-1, K, feats[0].numel()), torch.tensor(ended)


@pytest.fixture(scope="module")
def trained(ci_world_with_rm, tmp_path_factory):
    """The scored batch of one trainer per setting (q, scale_rewards), on one process."""
    out = {}
    for q, scale in ((0.0, "none"), (0.0, "group"), (0.5, "none"), (0.5, "group")):
        trainer, prompts = make_trainer(ci_world_with_rm, tmp_path_factory.mktemp("trl"), q, scale)
        out[q, scale] = (trainer, *score_batch(trainer, prompts))
    return out


@pytest.mark.parametrize("scale", ["none", "group"])
def test_quantile_zero_is_exactly_trls_own_advantages(trained, scale):
    trainer, out, trl_adv, rewards = trained[0.0, scale]
    assert torch.equal(out["advantages"], trl_adv)
    r = rewards.double().numpy().reshape(-1, K)
    expected = r - r.mean(1, keepdims=True)
    if scale == "group":  # TRL's group scale: the unbiased std + 1e-4
        expected = expected / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(out["advantages"].numpy(), expected.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", ["none", "group"])
def test_advantages_are_signcert_of_an_independent_rm_forward_on_the_token_ids(trained, scale):
    """The advantages in the loss equal grpo_signcert.signcert_advantages of rewards and features recomputed from an
    RM forward on the same completions' token ids; with scale "group" divided by TRL's positive group scale."""
    trainer, out, trl_adv, rewards = trained[0.5, scale]
    r, h, has_eos = independent_scores(trainer, out)
    assert has_eos.any() and not has_eos.all()  # both kinds of completion occur
    torch.testing.assert_close(rewards.view(-1, K), r, rtol=1e-5, atol=1e-5)
    adv, radius, eps = grpo_signcert.signcert_advantages(r, h, 0.5, certified=has_eos.view(-1, K))
    assert eps > 0
    if scale == "group":
        adv = adv / trl_group_scale(r)
    torch.testing.assert_close(out["advantages"], adv.flatten(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["advantages"], trl_adv)  # the re-weighting acted
    # a completion without EOS: the penalty as its reward, and its Dr.GRPO advantage (times the same scale)
    dr_grpo = r - r.mean(1, keepdim=True)
    if scale == "group":
        dr_grpo = dr_grpo / trl_group_scale(r)
    no_eos = ~has_eos
    assert (rewards[no_eos] == -1.0).all()
    torch.testing.assert_close(out["advantages"][no_eos], dr_grpo.flatten()[no_eos], rtol=1e-5, atol=1e-6)
    # the signs TRL's advantage had are certified with the radius of the unscaled advantage (the scale is positive)
    assert (torch.sign(trl_adv) == torch.sign(dr_grpo.flatten())).all()


def test_the_reward_is_the_one_grpo_signcert_gives_the_same_token_ids(trained):
    """Our trainer scores left-padded prompt ids + right-padded completion ids (cut after EOS) with
    reward_and_features: the TRL subclass must give the same reward for the same tokens."""
    trainer, out, _, rewards = trained[0.5, "none"]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        theirs = grpo_signcert.reward_and_features(trainer.rm, ids, mask)[0]
    _, _, has_eos = independent_scores(trainer, out)
    torch.testing.assert_close(rewards[has_eos], theirs[has_eos], rtol=1e-5, atol=1e-5)


def test_dr_grpo_loss_matches_our_loss_on_the_same_batch(trained):
    """TRL's loss_type="dr_grpo" (use_bias_correction_kl off) on a batch equals grpo_signcert.dr_grpo_loss with the
    log-probs of our response_logprobs and the normaliser completions x max_new_tokens."""
    trainer, out, _, _ = trained[0.5, "none"]
    trainer.current_gradient_accumulation_steps = 1  # what train() sets: one micro-batch per optimiser step here
    loss = trainer._compute_loss(trainer.model, dict(out))
    lp = grpo_signcert.response_logprobs(
        trainer.model, out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"], 1.0
    )
    mask = out["completion_mask"].float()
    ours_loss, _ = grpo_signcert.dr_grpo_loss(
        lp, lp.detach(), out["ref_per_token_logps"], out["advantages"], mask, 0.2, 0.01, mask.shape[0] * L
    )
    assert loss.item() == pytest.approx(ours_loss.item(), rel=1e-5, abs=1e-7)


def test_policy_kl_is_the_rollouts_sequence_log_ratio_to_the_reference(trained):
    """`policy/kl` (the pipeline's KL axis) is grpo_signcert.py's: per completion, the sum over its tokens of
    log pi - log pi_ref, averaged; here recomputed with our response_logprobs on the policy and on TRL's reference
    model, after moving the policy off the reference (at the SFT weights it is 0)."""
    trainer, out, _, _ = trained[0.5, "none"]
    trainer.current_gradient_accumulation_steps = 1
    saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        trainer._compute_loss(trainer.model, dict(out))
        logged = trainer._metrics["train"]["policy/kl"][-1]
        args = (out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"], 1.0)
        with torch.no_grad():
            lp = grpo_signcert.response_logprobs(trainer.model, *args)
            ref = grpo_signcert.response_logprobs(trainer.ref_model, *args)
        expected = ((lp - ref) * out["completion_mask"]).sum(1).mean().item()
    finally:
        trainer.model.load_state_dict(saved)
    assert abs(expected) > 0.05  # the check is not 0 = 0
    assert logged == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_config_refuses_bad_fields_and_the_trainer_refuses_other_rewards(ci_world_with_rm, tmp_path):
    with pytest.raises(ValueError, match=r"quantile must lie in \[0, 1\]"):
        ours.SignCertGRPOConfig(output_dir=str(tmp_path), quantile=1.5, use_cpu=True)
    with pytest.raises(ValueError, match="eps_mode must be 'delta' or 'inv_delta'"):
        ours.SignCertGRPOConfig(output_dir=str(tmp_path), eps_mode="inverse", use_cpu=True)
    config = ours.SignCertGRPOConfig(output_dir=str(tmp_path), beta=0.0, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="does not take reward_funcs"):
        ours.SignCertGRPOTrainer(model="unused", reward_model="unused", args=config, reward_funcs=[len])
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(os.path.join(ci_world_with_rm, "policy"))
    with pytest.raises(ValueError, match="linear head `score` with one output"):
        ours.SignCertGRPOTrainer(model=policy, reward_model=policy, args=config)
    with pytest.raises(ValueError, match="rebuilds the reference model"):
        policy.config._name_or_path = ""
        ours.SignCertGRPOTrainer(
            model=policy,
            reward_model="unused",
            args=ours.SignCertGRPOConfig(output_dir=str(tmp_path), beta=0.01, use_cpu=True, bf16=False),
        )


@pytest.fixture(scope="session")
def two_process_run(ci_world_with_rm, tmp_path_factory):
    """One generation batch of 3 prompts x 4 on 2 processes (6 completions each: the second group straddles them)."""

    def build(out):
        os.makedirs(out)
        cmd = accelerate_cmd(2) + ["tests/trl_worker.py", str(out), str(ci_world_with_rm), "0.5", "group", "3"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    return built_once(tmp_path_factory, "trl_two_processes", build)


def test_two_processes_with_a_straddling_group_use_the_whole_batch(two_process_run, ci_world_with_rm, tmp_path):
    batches = [torch.load(os.path.join(two_process_run, f"batches_{r}.pt"))[0] for r in (0, 1)]
    assert all(b["advantages"].shape[0] == 6 for b in batches)
    whole = {k: torch.cat([batches[0][k], batches[1][k]]) for k in ("prompt_ids", "prompt_mask")}
    width = max(b["completion_ids"].shape[1] for b in batches)
    for k in ("completion_ids", "completion_mask"):  # each process pads to its own longest completion
        whole[k] = torch.cat([torch.nn.functional.pad(b[k], (0, width - b[k].shape[1])) for b in batches])
    trainer, _ = make_trainer(ci_world_with_rm, tmp_path, 0.5, "group")  # its RM and tokenizer, to recompute
    r, h, _ = independent_scores(trainer, whole, penalty=None)  # the worker runs without the penalty
    torch.testing.assert_close(batches[0]["rewards"].view(-1, K), r, rtol=1e-5, atol=1e-5)  # gathered: all 12
    adv, radius, eps = grpo_signcert.signcert_advantages(r, h, 0.5)
    adv = (adv / trl_group_scale(r)).flatten()
    torch.testing.assert_close(torch.cat([b["advantages"] for b in batches]), adv, rtol=1e-4, atol=1e-5)
    # rows 4-7 are one group across the two processes: its mean and features came from both
    assert torch.equal(batches[0]["prompt_ids"][4], batches[1]["prompt_ids"][0])
    log = json.load(open(os.path.join(two_process_run, "log_0.json")))
    assert log[0]["signcert/eps"] == pytest.approx(eps.item(), rel=1e-5)


def cli(world, out, *extra):
    cmd = [sys.executable, "grpo_signcert_trl.py", "--policy-path", f"{world}/policy", "--reward-model-path"]
    cmd += [f"{world}/rm", "--gold-rm-path", f"{world}/gold_rm", "--dataset", f"{world}/data", "--output-dir", str(out)]
    cmd += ["--num-prompts-per-step", "4", "--num-generations", "4", "--micro-batch-size", "16", "--max-new-tokens"]
    cmd += ["8", "--eval-num-prompts", "6", *extra]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_the_command_line_refuses_one_completion_per_prompt_before_anything_loads(tmp_path):
    """K = 1 has no group baseline: its own message, before the batch arithmetic and before any path is read."""
    cmd = [sys.executable, "grpo_signcert_trl.py", "--policy-path", str(tmp_path / "none"), "--num-generations", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "--num-generations must be >= 2" in res.stderr, res.stderr[-2000:]
    assert "multiple of" not in res.stderr and "no such local folder" not in res.stderr
    assert not (tmp_path / "none").exists()


def test_the_command_line_raises_the_proxy_reward_evaluates_and_resumes(ci_world_with_rm, tmp_path):
    """`python grpo_signcert_trl.py` on the CI world: the proxy reward rises (the policy learns to end, the penalty
    is -1) in 6 steps, the held-out gold evaluation is in metrics.jsonl at step 0 and every --eval-every steps;
    a second command with --resume continues from TRL's checkpoint to the new last step."""
    out = tmp_path / "run"
    rows = cli(ci_world_with_rm, out, "--total-steps", "6", "--eval-every", "3", "--save-every", "3",
               "--learning-rate", "3e-3", "--quantile", "0.5")  # fmt: skip
    rewards = [r["trl/rewards/proxy_reward/mean"] for r in rows if "trl/rewards/proxy_reward/mean" in r]
    assert len(rewards) == 6 and np.mean(rewards[-2:]) > np.mean(rewards[:2])
    assert [r["step"] for r in rows if "eval/test/gold_reward" in r] == [0, 3, 6]
    logged = [r for r in rows if "trl/rewards/proxy_reward/mean" in r]
    assert all("signcert/eps" in r and "policy/kl" in r for r in logged)  # under grpo_signcert.py's names
    for r in logged:  # our reward/proxy is TRL's own reward mean (one reward function, weight 1)
        assert r["reward/proxy"] == pytest.approx(r["trl/reward"], rel=1e-5, abs=1e-6)
        # the phases as grpo_signcert.py logs them: the step's wall time is their sum, each part positive
        parts = [r[f"time/{p}"] for p in ("generation", "scoring", "update")]
        assert min(parts) > 0 and sum(parts) == pytest.approx(r["time/step"], rel=1e-9)
        assert r["trl/step_time"] < r["time/step"]  # TRL's own excludes the optimiser step
    rows = cli(ci_world_with_rm, out, "--total-steps", "8", "--eval-every", "3", "--save-every", "3",
               "--learning-rate", "3e-3", "--quantile", "0.5", "--resume")  # fmt: skip
    steps = [r["step"] for r in rows if "trl/rewards/proxy_reward/mean" in r]
    assert steps[:6] == list(range(1, 7)) and steps[6:] == [7, 8]  # continued from checkpoint-6
    assert [r["step"] for r in rows if "eval/test/gold_reward" in r] == [0, 3, 6, 8]  # none evaluated twice
