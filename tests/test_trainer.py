"""grpo_signcert.py, the trainer: its loss against an independent computation, the invariance of the
update to how a batch is split, the reward read at the right token, and the script end to end (1 and
2 processes, resume after a kill, bad arguments) on a very small tiny world."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, GPTNeoXConfig, GPTNeoXForSequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import free_port  # noqa: E402
from update_worker import N as WORKER_N  # noqa: E402
from update_worker import T as WORKER_T
from update_worker import model_and_batch

from grpo_signcert import dr_grpo_loss, pairwise_agreement, reward_and_features, truncate_after_eos  # noqa: E402


# several CPU processes: `--multi_gpu` makes accelerate start them with torchrun, and the scripts, seeing no GPU,
# run them on the CPU with gloo (`--cpu --num_processes 2` starts ONE process in accelerate 1.x)
def accelerate_cmd(procs):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        free_port(),
        "--num_processes",
        str(procs),
    ]


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


def test_dr_grpo_normaliser_is_constant_so_splits_add_up():
    """Sum of the losses of two halves, each over the FULL constant, equals the full loss; a per-sequence
    length normaliser (GRPO's) would not add up like this when lengths differ."""
    g = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    adv, mask = torch.randn(6, generator=g), (torch.rand(6, 5, generator=g) > 0.4).float()
    full, _ = dr_grpo_loss(lp, lp, ref, adv, mask, 0.2, 0.1, 6 * 5)
    halves = sum(
        dr_grpo_loss(lp[s], lp[s], ref[s], adv[s], mask[s], 0.2, 0.1, 6 * 5)[0] for s in (slice(0, 2), slice(2, 6))
    )
    assert full.item() == pytest.approx(halves.item(), rel=1e-6)


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


# ------------------------------------------------------------------ rollouts and scoring
def test_truncate_after_eos():
    eos = 0
    response = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 3, 3, 3, 3]])
    out, mask, has_eos = truncate_after_eos(response, eos, 1)
    assert out.tolist() == [[5, 6, 0, 1, 1], [5, 6, 7, 8, 9], [0, 1, 1, 1, 1]]  # filled with pad = 1
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


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
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A very small tiny world, with an untrained proxy RM (the base policy plus a fresh `score` head)."""
    root = tmp_path_factory.mktemp("world")
    subprocess.run(
        [sys.executable, "tiny_world.py", "--preset", "ci", "--output-dir", str(root)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    rm = AutoModelForSequenceClassification.from_pretrained(root / "base_policy", num_labels=1)
    rm.config.pad_token_id = rm.config.eos_token_id
    rm.save_pretrained(root / "rm")
    return root


def trainer_cmd(world, out, *extra, procs=None):
    head = accelerate_cmd(procs) if procs else [sys.executable]
    return head + [
        "grpo_signcert.py",
        "--policy-path",
        str(world / "base_policy"),
        "--reward-model-path",
        str(world / "rm"),
        "--gold-rm-path",
        str(world / "gold_rm"),
        "--dataset",
        str(world / "data"),
        "--num-prompts-per-step",
        "4",
        "--num-generations",
        "4",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--missing-eos-penalty",
        "None",
        "--output-dir",
        str(out),
        "--log-samples-every",
        "2",
        *extra,
    ]


def read_metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("procs", [None, 2])
def test_trainer_end_to_end(world, tmp_path, procs):
    out = tmp_path / "run"
    subprocess.run(
        trainer_cmd(world, out, "--total-steps", "3", "--quantile", "0.3", procs=procs),
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["signcert/eps"] > 0
        assert 0.0 <= r["rm/proxy_accuracy"] <= 1.0 and 0.0 <= r["completion/eos_rate"] <= 1.0
        assert 1 <= r["completion/length"] <= 8
    assert os.path.exists(out / "model" / "model.safetensors") and os.path.exists(out / "samples.jsonl")
    args = json.load(open(out / "args.json"))
    assert args["num_processes"] == (procs or 1) and args["gradient_accumulation_steps"] == 4 // (procs or 1)


def test_quantile_zero_logs_eps_zero(world, tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        trainer_cmd(world, out, "--total-steps", "1", "--quantile", "0"),
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    assert read_metrics(out)[0]["signcert/eps"] == 0.0


def test_resume_after_kill_continues_with_no_lost_or_repeated_step(world, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ("--total-steps", "5", "--save-every", "2")
    subprocess.run(trainer_cmd(world, straight, *common), check=True, cwd=ROOT, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        trainer_cmd(world, killed, *common), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "latest").read_text() == "checkpoint-2" and not (killed / "model").exists()
    subprocess.run(
        trainer_cmd(world, killed, *common, "--resume"), check=True, cwd=ROOT, capture_output=True, timeout=600
    )
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra["reward/proxy"] == rb["reward/proxy"] and ra["policy/kl"] == rb["policy/kl"]
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--quantile", "1.5"), "--quantile must lie in"),
        (("--num-prompts-per-step", "4", "--micro-batch-size", "5"), "or the second a divisor of 16"),
        (("--reward-model-path", "runs/does_not_exist"), "--reward-model-path runs/does_not_exist: no such folder"),
        (("--dataset", "./no_such_data"), "does not exist"),
    ],
)
def test_bad_arguments_fail_early_with_a_clear_message(world, tmp_path, extra, message):
    res = subprocess.run(
        trainer_cmd(world, tmp_path / "run", "--total-steps", "1", *extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
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


@pytest.mark.parametrize("case", [*BAD_DATA, "prompt length", "causal LM as reward model"])
def test_bad_input_fails_in_seconds_and_leaves_no_run_folder(world, tmp_path, case):
    """Checked before any model loads and before the run folder exists (issue 8 item 7)."""
    extra = ()
    if case in BAD_DATA:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "train.jsonl").write_text(BAD_DATA[case][0])
        extra, message = ("--dataset", str(tmp_path / "data")), BAD_DATA[case][1]
    elif case == "prompt length":
        extra, message = ("--max-prompt-length", "3"), "raise --max-prompt-length (now 3)"
    else:
        extra, message = ("--reward-model-path", str(world / "base_policy")), "is not a reward model"
    t0 = time.perf_counter()
    res = subprocess.run(
        trainer_cmd(world, tmp_path / "run", "--total-steps", "1", *extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    assert elapsed < 30, f"took {elapsed:.0f}s: the check must come before the models load"


def test_reward_model_without_a_single_linear_head_is_refused(world, tmp_path):
    two = AutoModelForSequenceClassification.from_pretrained(world / "base_policy", num_labels=2)
    two.save_pretrained(tmp_path / "rm2")
    res = subprocess.run(
        trainer_cmd(world, tmp_path / "run", "--total-steps", "1", "--reward-model-path", str(tmp_path / "rm2")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "linear head `score` with one output" in res.stderr
    res = subprocess.run(
        trainer_cmd(world, tmp_path / "run", "--total-steps", "1", "--reward-model-path", str(world / "base_policy")),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "is not a reward model" in res.stderr
