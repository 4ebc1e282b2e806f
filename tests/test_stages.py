"""End-to-end and unit tests of the pipeline stages sft.py -> gen_prefs.py -> train_rm.py -> eval_gold.py.

Every stage runs in a subprocess on a micro world built here in a second (a ByteLevel BPE tokenizer
trained in-process, 24 TL;DR rows, random GPT-NeoX models of a few thousand parameters), so the
tests do not depend on tiny_world.py's build time. Nothing is downloaded (HF_HUB_OFFLINE=1).
    python -m pytest tests/test_stages.py -q
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import built_once, free_port, read_jsonl, run_checks_in_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
TOPICS = {
    "pets": ["cat", "dog", "fish", "leash"],
    "money": ["rent", "loan", "bank", "paycheck"],
    "food": ["pizza", "bread", "sauce", "dinner"],
}


def make_rows(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        sub = rng.choice(list(TOPICS))
        a, b = rng.sample(TOPICS[sub], 2)
        post = f"my mom broke the {a} today . then my friend lost the {b} . please help me ."
        rows.append(
            {
                "id": f"{split}-{i}",
                "subreddit": sub,
                "title": f"problem with my {a}",
                "post": post,
                "summary": f"{a} and {b}",
            }
        )
    return rows


def build_micro_world(root: Path) -> Path:
    """{root}/data/{train,validation,test}.jsonl, tokenizer/, base_policy/ (CausalLM), gold_rm/ (SeqCls, score head)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        GPTNeoXForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    splits = {
        "train": make_rows("train", 24, 0),
        "validation": make_rows("validation", 8, 1),
        "test": make_rows("test", 8, 2),
    }
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        with open(root / "data" / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    texts = [
        f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR: {r['summary']}"
        for rows in splits.values()
        for r in rows
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(root / "tokenizer")
    eos = tokenizer.eos_token_id
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**config)).save_pretrained(root / "base_policy")
    tokenizer.save_pretrained(root / "base_policy")
    GPTNeoXForSequenceClassification(GPTNeoXConfig(**config, num_labels=1)).save_pretrained(root / "gold_rm")
    tokenizer.save_pretrained(root / "gold_rm")
    return root


def run_refused(args: list[str]) -> subprocess.CompletedProcess:
    """A stage run that must stop in its argument or input checks, run in this process (conftest)."""
    return run_checks_in_process([sys.executable, *args], ROOT)


def run(args: list[str], launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + args
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# The micro world and its stages, each built once per session whichever worker asks first (conftest.built_once),
# and read by the tests: a test that writes, writes into its own tmp_path.
@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "micro_world", build_micro_world)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory, world) -> Path:
    # enough steps on 24 rows for the policy to emit EOS often, so that gen_prefs makes pairs
    data = ["--model-name-or-path", str(world / "base_policy"), "--dataset", str(world / "data")]
    opts = ["--num-train-epochs", "15", "--per-device-train-batch-size", "8", "--learning-rate", "1e-2"]
    opts += ["--max-eval-samples", "8", "--logging-steps", "5"]
    return built_once(
        tmp_path_factory, "micro_world/sft", lambda out: run(["sft.py", *data, "--output-dir", str(out), *opts])
    )


@pytest.fixture(scope="session")
def prefs_dir(tmp_path_factory, world, sft_dir) -> Path:
    data = ["--policy-path", str(sft_dir), "--gold-rm-path", str(world / "gold_rm"), "--dataset", str(world / "data")]
    opts = ["--num-test-prompts", "8", "--max-new-tokens", "8", "--generation-batch-size", "16"]
    return built_once(
        tmp_path_factory, "micro_world/prefs", lambda out: run(["gen_prefs.py", *data, "--output-dir", str(out), *opts])
    )


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory, world, sft_dir, prefs_dir) -> Path:
    data = ["--policy-path", str(sft_dir), "--prefs-path", str(prefs_dir), "--dataset", str(world / "data")]
    opts = ["--per-device-train-batch-size", "4", "--eval-steps", "2", "--logging-steps", "1"]
    opts += ["--num-norm-samples", "8"]
    return built_once(
        tmp_path_factory, "micro_world/rm", lambda out: run(["train_rm.py", *data, "--output-dir", str(out), *opts])
    )


def eval_args(world, sft_dir, rm_dir, out) -> list[str]:
    return [
        "eval_gold.py",
        "--policy-path",
        str(sft_dir),
        "--gold-rm-path",
        str(world / "gold_rm"),
        "--reward-model-path",
        str(rm_dir),
        "--dataset",
        str(world / "data"),
        "--num-prompts",
        "7",
        "--max-new-tokens",
        "8",
        "--output-dir",
        str(out),
    ]


# ---------------------------------------------------------------- end to end
def test_sft_writes_a_trained_model(sft_dir):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl", "eval.json"):
        assert (sft_dir / name).is_file(), name
    losses = [m["losses/sft_loss"] for m in read_jsonl(sft_dir / "metrics.jsonl") if "losses/sft_loss" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert json.loads((sft_dir / "eval.json").read_text())["eval/loss"] > 0
    assert not list(sft_dir.parent.glob(".sft.tmp-*")), "the staging dir must be moved into place"
    # the micro world's tokenizer has pad == eos and no <|padding|>: sft.py added [PAD] and grew the embeddings
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(sft_dir), AutoConfig.from_pretrained(sft_dir)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id
    assert config.pad_token_id == tok.pad_token_id and config.vocab_size == len(tok)
    assert json.loads((sft_dir / "generation_config.json").read_text())["pad_token_id"] == tok.pad_token_id


def test_gen_prefs_pairs(prefs_dir):
    stats = json.loads((prefs_dir / "stats.json").read_text())
    for split, n_prompts in (("train", 24), ("test", 8)):
        rows = read_jsonl(prefs_dir / f"{split}.jsonl")
        assert stats[f"{split}/num_prompts"] == n_prompts
        assert stats[f"{split}/num_pairs"] == len(rows) == round(n_prompts * (1 - stats[f"{split}/tie_rate"]))
        assert 0 <= stats[f"{split}/eos_rate"] <= 1
        for r in rows:
            assert {"id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"} <= set(r)
            assert r["chosen_score"] > r["rejected_score"] and r["prompt"].endswith("TL;DR:")
    assert len(read_jsonl(prefs_dir / "train.jsonl")) > 0


def test_train_rm_saves_offset_and_accuracy(rm_dir):
    config = json.loads((rm_dir / "config.json").read_text())
    assert isinstance(config["reward_offset"], float) and len(config["id2label"]) == 1
    assert (rm_dir / "model.safetensors").is_file() and (rm_dir / "tokenizer.json").is_file()
    tok = json.loads((rm_dir / "tokenizer_config.json").read_text())
    assert tok["pad_token"] == "[PAD]" and config["pad_token_id"] not in (None, config["eos_token_id"])
    assert any("eval/accuracy" in m for m in read_jsonl(rm_dir / "metrics.jsonl")[:-1]), "periodic evaluation"


def test_train_rm_offset_centres_references(world, rm_dir):
    """Reference responses scored by the saved RM, minus reward_offset, average 0."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import train_rm

    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(rm_dir)
    rows = read_jsonl(world / "data" / "validation.jsonl")
    seqs = [train_rm.rm_input_ids(tok, *train_rm.to_prompt_response(r, "tldr", tok, 128), 256, False) for r in rows]
    ids, mask = train_rm.pad_right(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        rewards = train_rm.reward_and_features(rm, ids, mask)[0]  # score(h) - reward_offset
    assert rm.config.reward_offset != 0 and rewards.mean().abs() < 1e-4


def test_eval_gold_metrics_match_samples(world, sft_dir, rm_dir):
    out = world / "eval1"
    run(eval_args(world, sft_dir, rm_dir, out))
    metrics = json.loads((out / "eval.json").read_text())
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 7 == metrics["eval/num_prompts"]
    assert 0.0 <= metrics["eval/win_rate"] <= 1.0
    assert metrics["eval/win_rate"] == pytest.approx(
        np.mean([s["gold_score"] > s["reference_gold_score"] for s in samples])
    )
    assert metrics["eval/gold_reward_mean"] == pytest.approx(np.mean([s["gold_score"] for s in samples]))
    assert metrics["eval/eos_rate"] == pytest.approx(np.mean([s["has_eos"] for s in samples]))
    assert "eval/proxy_reward_mean" in metrics and all("proxy_score" in s for s in samples)
    for s in samples:
        if not s["has_eos"]:
            assert s["gold_score"] == -1.0 and s["length"] == 8


def test_eval_gold_two_processes_match_one(world, sft_dir, rm_dir):
    """2 CPU processes (configs/cpu_2proc.yaml): each scores its share; the gathered result equals 1 process."""
    one, two = world / "eval1p", world / "eval2p"
    run(eval_args(world, sft_dir, rm_dir, one))
    run(
        eval_args(world, sft_dir, rm_dir, two),
        launcher=[
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs/cpu_2proc.yaml"),
            "--main_process_port",
            free_port(),
        ],
    )
    a, b = read_jsonl(one / "samples.jsonl"), read_jsonl(two / "samples.jsonl")
    assert json.load(open(two / "eval.json"))["num_processes"] == 2  # really two processes
    assert [s["id"] for s in a] == [s["id"] for s in b]  # the same prompts, in the same order
    # references do not depend on sampling: their gold and proxy scores must agree across process counts
    np.testing.assert_allclose(
        [s["reference_gold_score"] for s in a], [s["reference_gold_score"] for s in b], atol=1e-5
    )
    np.testing.assert_allclose(
        [s["reference_proxy_score"] for s in a], [s["reference_proxy_score"] for s in b], atol=1e-5
    )


# ---------------------------------------------------------------- units: reward at the last real token, EOS
def tiny_rm(eos: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        eos_token_id=eos,
        pad_token_id=eos,
        num_labels=1,
    )
    return GPTNeoXForSequenceClassification(config).eval()


@pytest.mark.parametrize("script", ["gen_prefs", "train_rm", "eval_gold"])
def test_reward_read_at_last_real_token_with_left_and_right_padding(script):
    mod = __import__(script)
    rm, eos = tiny_rm(), 0
    # prompt | response ending with EOS (== pad); one response also contains... nothing after EOS
    seqs = [
        [5, 6, 7, 8, 9, eos],
        [3, 4, 11, eos],
        [12, 13, 14, 15, 16, 17, 18, 19, eos],
        [
            21,
            22,
            eos,
        ],
    ]
    with torch.no_grad():
        alone = [mod.reward_and_features(rm, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs]
        # right padding with pad == eos
        n = max(map(len, seqs))
        ids = torch.tensor([s + [eos] * (n - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
        right_r, right_h = mod.reward_and_features(rm, ids, mask)
        # left-padded prompts + right-padded completions (how a generated batch looks)
        prompts, responses = [s[:2] for s in seqs], [s[2:] for s in seqs]
        p, q = max(map(len, prompts)), max(map(len, responses))
        ids = torch.tensor([[eos] * (p - len(a)) + a + b + [eos] * (q - len(b)) for a, b in zip(prompts, responses)])
        mask = torch.tensor(
            [[0] * (p - len(a)) + [1] * (len(a) + len(b)) + [0] * (q - len(b)) for a, b in zip(prompts, responses)]
        )
        both_r, both_h = mod.reward_and_features(rm, ids, mask)
    for i, (r, h) in enumerate(alone):
        assert torch.allclose(right_r[i], r[0], atol=1e-5) and torch.allclose(both_r[i], r[0], atol=1e-5)
        assert torch.allclose(right_h[i], h[0], atol=1e-5) and torch.allclose(both_h[i], h[0], atol=1e-5)
        assert torch.allclose(rm.score(h)[0, 0], r[0])  # the reward is the head applied to the returned feature
    # and it is NOT what reading the last non-pad token would give (the token before the EOS)
    with torch.no_grad():
        wrong = mod.reward_and_features(
            rm, torch.tensor([seqs[0][:-1]]), torch.ones(1, len(seqs[0]) - 1, dtype=torch.long)
        )[0]
    assert not torch.allclose(wrong, alone[0][0])


@pytest.mark.parametrize("script", ["gen_prefs", "eval_gold"])
def test_truncate_after_eos_and_penalty(script):
    mod = __import__(script)
    eos = pad = 0
    tokens = torch.tensor([[5, eos, 7, eos], [5, 6, 7, 8], [eos, 1, 2, 3], [4, 5, 6, eos]])
    out, mask, has_eos = mod.truncate_after_eos(tokens, eos, pad)
    assert out.tolist() == [[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad], [4, 5, 6, eos]]
    assert mask.sum(1).tolist() == [2, 4, 1, 4] and has_eos.tolist() == [True, False, True, True]
    scores = mod.apply_missing_eos_penalty(torch.tensor([0.5, 2.0, -0.3, 1.0]), has_eos, -1.0)
    assert scores.tolist() == pytest.approx([0.5, -1.0, -0.3, 1.0])
    # eos != pad: tokens after the EOS become pad, the EOS stays
    out, mask, _ = mod.truncate_after_eos(torch.tensor([[3, 9, 4, 9]]), 9, 1)
    assert out.tolist() == [[3, 9, 1, 1]] and mask.tolist() == [[1, 1, 0, 0]]
    # several end ids (`completion_end_ids`): the first of any
    out, mask, has_eos = mod.truncate_after_eos(torch.tensor([[3, 4, 9, 4], [3, 5, 6, 7]]), [9, 4], 1)
    assert out.tolist() == [[3, 4, 1, 1], [3, 5, 6, 7]] and has_eos.tolist() == [True, False]


@pytest.mark.parametrize("script", ["gen_prefs", "eval_gold"])
def test_generate_hf_stops_at_every_end_id(script, ci_world, tmp_path):
    """generate_hf with a policy whose generation config lists ' mess' as its only end id: the completions stop at
    the tokenizer's EOS or at ' mess', whichever comes first (both occur), with nothing after it; has_eos is True for
    both. Seen failing with generate_hf stopping and cutting at the tokenizer's EOS only (' mess' mid-completion)."""
    from types import SimpleNamespace

    from test_trainer import policy_with_a_second_end_id
    from transformers import AutoModelForCausalLM

    mod = __import__(script)
    folder, second = policy_with_a_second_end_id(ci_world, tmp_path / "policy")
    tok = mod.load_tokenizer(str(folder), False)
    policy = AutoModelForCausalLM.from_pretrained(folder).eval()
    args = SimpleNamespace(temperature=1.0, max_new_tokens=8, generation_batch_size=64)
    torch.manual_seed(0)
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=False)
    responses, has_eos = mod.generate_hf(policy, tok, ["my savings are"], 64, args, cpu)
    ends = {tok.eos_token_id, second}
    for ids, ended in zip(responses, has_eos):
        assert not ends & set(ids[:-1]) and ended == (ids[-1] in ends) and (ended or len(ids) == 8), ids
    assert ends <= {ids[-1] for ids in responses}  # both end some completions


# ---------------------------------------------------------------- bad input
def test_missing_model_path_is_a_clear_error(world):
    proc = run_refused(["sft.py", "--model-name-or-path", str(world / "nope"), "--dataset", str(world / "data")])
    assert proc.returncode != 0 and f"--model-name-or-path {world / 'nope'}: no such local folder" in proc.stderr


def test_causal_lm_as_gold_is_a_clear_error(world):
    proc = run_refused(
        [
            "eval_gold.py",
            "--policy-path",
            str(world / "base_policy"),
            "--gold-rm-path",
            str(world / "base_policy"),
            "--dataset",
            str(world / "data"),
            "--output-dir",
            str(world / "bad"),
        ]
    )
    assert proc.returncode != 0 and "is not a reward model" in proc.stderr and "GPTNeoXForCausalLM" in proc.stderr


@pytest.mark.parametrize("script", ["gen_prefs", "eval_gold"])
def test_check_reward_config(world, script):
    mod = __import__(script)
    mod.check_reward_config(str(world / "gold_rm"), False, "--gold-rm-path")  # a reward model: fine
    with pytest.raises(ValueError, match="is not a reward model.*ForSequenceClassification"):
        mod.check_reward_config(str(world / "base_policy"), False, "--gold-rm-path")


def test_dataset_without_needed_columns(tmp_path, world):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "validation.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    proc = run_refused(["sft.py", "--model-name-or-path", str(world / "base_policy"), "--dataset", str(tmp_path)])
    assert (
        proc.returncode != 0
        and "['answer', 'question']" in proc.stderr
        and "summary" in proc.stderr
        and "instruction" in proc.stderr
    )


def test_prefs_without_pair_columns(tmp_path):
    import train_rm

    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"need \['prompt', 'chosen', 'rejected'\]"):
        train_rm.load_pairs(tmp_path / "train.jsonl")
    with pytest.raises(FileNotFoundError, match="run gen_prefs.py first"):
        train_rm.load_pairs(tmp_path / "test.jsonl")
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "train.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "rejected": None}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl, row 2: column 'rejected' is null"):
        train_rm.load_pairs(tmp_path / "train.jsonl")


@pytest.mark.parametrize("script", ["sft", "train_rm"])
def test_distinct_pad_token(world, script):
    """pad == eos or no pad: Pythia's <|padding|> if the vocabulary has it, else a new [PAD]; a distinct pad stays."""
    from transformers import AutoTokenizer

    mod = __import__(script)
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")  # pad == eos, no <|padding|>
    n = len(tok)
    mod.distinct_pad_token(tok)
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("[PAD]", n, n + 1)
    mod.distinct_pad_token(tok)  # already distinct: unchanged
    assert (tok.pad_token, len(tok)) == ("[PAD]", n + 1)
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|padding|>"]})
    tok.pad_token = None  # no pad at all, as Pythia's tokenizer ships
    mod.distinct_pad_token(tok)
    assert tok.pad_token == "<|padding|>" and tok.pad_token_id == n and len(tok) == n + 1


@pytest.mark.parametrize("script", ["sft", "train_rm"])
def test_batch_sizes_that_do_not_divide(script):
    mod = __import__(script)
    assert mod.exact_div(64, 16, "x") == 4
    with pytest.raises(
        ValueError, match=r"make the first a multiple of 16 \(e.g. \[32, 48\]\) or the second a divisor of 40"
    ):
        mod.exact_div(40, 16, "--total-batch-size")


def test_total_batch_size_error_end_to_end(world, sft_dir, prefs_dir):
    proc = run_refused(
        [
            "train_rm.py",
            "--policy-path",
            str(sft_dir),
            "--prefs-path",
            str(prefs_dir),
            "--dataset",
            str(world / "data"),
            "--per-device-train-batch-size",
            "4",
            "--total-batch-size",
            "10",
            "--output-dir",
            str(world / "bad_rm"),
        ]
    )
    assert proc.returncode != 0 and "a multiple of 4 (e.g. [8, 12])" in proc.stderr


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("script", ["sft", "gen_prefs", "train_rm", "eval_gold"])
def test_presets_and_overrides(script, monkeypatch):
    mod = __import__(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    tiny = mod.parse_args()
    assert tiny.preset == "tiny" and "tiny_world" in str(tiny.dataset)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--preset", "paper", "--seed", "7"])
    paper = mod.parse_args()
    assert (
        paper.preset == "paper"
        and paper.dataset == "vwxyzjn/summarize_from_feedback_tldr_3_filtered"
        and paper.seed == 7
    )
    if script == "sft":
        assert (
            paper.learning_rate,
            paper.lr_scheduler_type,
            paper.num_train_epochs,
            paper.per_device_train_batch_size,
            paper.bf16,
        ) == (3e-6, "cosine", 1, 16, True)
        assert paper.model_name_or_path == "EleutherAI/pythia-1b"
    if script == "train_rm":
        assert (
            paper.learning_rate,
            paper.warmup_ratio,
            paper.weight_decay,
            paper.num_train_epochs,
            paper.max_length,
            paper.per_device_train_batch_size,
        ) == (2e-5, 0.03, 0.1, 1, 512, 16)
    if script in ("gen_prefs", "eval_gold"):
        assert paper.max_new_tokens == 53 and paper.gold_rm_path == "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
    if script == "gen_prefs":
        assert (paper.num_completions, paper.temperature) == (2, 1.0)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--preset", "paper", "--dataset", "elsewhere"])
    assert mod.parse_args().dataset == "elsewhere"  # explicit flags beat the preset


@pytest.mark.parametrize("script", ["sft", "gen_prefs"])
def test_own_data_never_overwrites_the_tiny_world(script, monkeypatch):
    """Without --output-dir, data other than the tiny world's goes to runs/{run_name}, not the tiny world's folder."""
    mod = __import__(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--dataset", "mydata/tldr"])
    args = mod.parse_args()
    args.run_name = f"{script}__1__123"
    assert mod.own_output_dir(args) == os.path.join("runs", f"{script}__1__123")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--dataset", "mydata/tldr", "--output-dir", "mine"])
    assert mod.own_output_dir(mod.parse_args()) == "mine"  # given: kept
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--dataset", "runs/tiny_world/data/"])
    tiny = mod.parse_args()
    assert mod.own_output_dir(tiny) == tiny.output_dir == mod.PRESETS["tiny"].output_dir  # the tiny world: as before


@pytest.mark.parametrize("script", ["sft", "gen_prefs", "train_rm", "eval_gold", "grpo_signcert"])
def test_help_hides_the_fields_filled_at_run_time(script):
    """The derived sizes (`# to be filled in runtime`) are not flags: a value given for one was silently
    overwritten, so `--help` must not offer them."""
    source = open(os.path.join(ROOT, f"{script}.py")).read()
    runtime = source[source.index("# to be filled in runtime") :].split("\n\n\n")[0]
    names = re.findall(r"^    ([a-z_]+): ", runtime, flags=re.M)
    assert names, "the runtime block lists its fields"
    res = run_checks_in_process([sys.executable, f"{script}.py", "--help"], ROOT)  # tyro prints and exits 0
    assert res.returncode == 0 and "--output-dir" in res.stdout  # the help was printed
    for name in names:
        assert f"--{name.replace('_', '-')} " not in res.stdout, name
