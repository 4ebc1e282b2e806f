"""Reward models we save are read the same by plain Hugging Face code, and the trainer refuses a proxy RM
whose tokenizer is not the policy's (issue 8, items 1 and 2).

On the tiny world (`tiny_world.py --preset ci`) and a proxy RM trained for a few steps by train_rm.py:
`AutoModelForSequenceClassification(...)(**tokenizer(texts, padding=True)).logits` on a padded batch
equals our scripts' reward (read at the last real token, minus `config.reward_offset`) + reward_offset.
With pad == eos, HF's pooling would read the token before the EOS and this would fail."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import built_once  # noqa: E402

import tiny_world as tw  # noqa: E402
import train_rm  # noqa: E402
from grpo_signcert import check_same_tokenizer, reward_and_features  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def run(cmd, check=True):
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def read_rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="session")
def world(ci_world):
    """The CI tiny world (its EOS policy unused here), shared: read only."""
    return ci_world


@pytest.fixture(scope="session")
def proxy(tmp_path_factory, world):
    """A proxy RM saved by train_rm.py (a few updates from the base policy on hand-made pairs: the
    reference against another post's reference), so its head and offset are non-trivial. Built once per session
    (conftest.built_once), with its preference pairs beside it."""
    return built_once(tmp_path_factory, "rm_artifacts/rm", lambda out: train_proxy(world, out))


def train_proxy(world, out):
    rng = random.Random(0)
    prefs = out.parent / "prefs"
    prefs.mkdir(parents=True, exist_ok=True)
    for split, source, n in (("train", "train", 64), ("test", "validation", 16)):
        rows = read_rows(world / "data" / f"{source}.jsonl")[:n]
        with open(prefs / f"{split}.jsonl", "w") as f:
            for r in rows:
                other = rng.choice([o for o in rows if o["id"] != r["id"]])
                pair = {"prompt": tw.prompt_of(r), "chosen": " " + r["summary"], "rejected": " " + other["summary"]}
                f.write(json.dumps(pair) + "\n")
    run(
        [
            "train_rm.py",
            "--policy-path",
            str(world / "base_policy"),
            "--prefs-path",
            str(prefs),
            "--dataset",
            str(world / "data"),
            "--output-dir",
            str(out),
            "--per-device-train-batch-size",
            "8",
            "--num-norm-samples",
            "16",
            "--learning-rate",
            "3e-3",
        ]
    )


def scored_texts(world, n=20):
    """prompt + " " + response + EOS, as the stage scripts build them; responses of 1 to ~12 words, so the
    sequences have different lengths and the batch is padded."""
    rows = read_rows(world / "data" / "test.jsonl")[:n]
    rng = random.Random(1)
    out = []
    for r in rows:
        words = r["summary"].split()
        out.append((tw.prompt_of(r), " " + " ".join(words[: rng.randint(1, len(words))])))
    return out


@pytest.mark.parametrize("which", ["gold_rm", "rm"])
def test_plain_hugging_face_gives_our_score_plus_offset(world, proxy, which):
    path = proxy if which == "rm" else world / which
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert tok.pad_token_id != tok.eos_token_id and rm.config.pad_token_id == tok.pad_token_id
    offset = getattr(rm.config, "reward_offset", 0.0)
    if which == "rm":
        assert offset != 0.0  # the proxy's offset is real, so the test checks that it is the only difference
    pairs = scored_texts(world)
    seqs = [train_rm.rm_input_ids(tok, p, r, 256, chat=False) for p, r in pairs]
    texts = [p + r + tok.eos_token for p, r in pairs]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert len(set(map(len, seqs))) > 5 and (batch["attention_mask"] == 0).any()
    # the same token ids: the difference can only be where the score is read
    assert [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])] == seqs
    with torch.no_grad():
        hf = rm(**batch).logits.squeeze(-1)
        # our scripts: the trainer's reward_and_features, each sequence alone (no padding at all) ...
        ours = torch.stack(
            [reward_and_features(rm, torch.tensor([s]), torch.ones(1, len(s)).long())[0][0] for s in seqs]
        )
        # ... and train_rm.py's batched reading, right-padded with the tokenizer's pad id
        ids, mask = train_rm.pad_right(seqs, tok.pad_token_id, "cpu")
        ours_batched = train_rm.reward_and_features(rm, ids, mask)[0]
    torch.testing.assert_close(hf, ours + offset, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf, ours_batched + offset, atol=1e-5, rtol=0)
    if which == "gold_rm":  # and the tiny world's own scoring of its gold
        world_scores = tw.reward_and_features(rm, batch["input_ids"], batch["attention_mask"])[0]
        torch.testing.assert_close(hf, world_scores + offset, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- item 2: a proxy RM with another tokenizer
def copy_rm(proxy, dest, with_tokenizer=True):
    dest.mkdir()
    for f in os.listdir(proxy):
        if f in ("config.json", "model.safetensors") or (with_tokenizer and f.startswith(("tokenizer", "special"))):
            shutil.copy(proxy / f, dest / f)
    return dest


def swap_two_ids(proxy, dest, policy_tok):
    """The proxy with the same vocabulary but two ids of the probe's tokens exchanged in its tokenizer."""
    copy_rm(proxy, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    # two distinct ids of the probe text's head (its first words: their tokens do not depend on the world's merges)
    ids = list(dict.fromkeys(policy_tok("SUBREDDIT: r/relationships", add_special_tokens=False).input_ids))
    inv = {v: k for k, v in vocab.items()}
    a, b = inv[ids[0]], inv[ids[1]]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return dest


def other_bpe(proxy, dest, world):
    """The proxy with a BPE retrained on the same data with another vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    copy_rm(proxy, dest, with_tokenizer=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [tw.prompt_of(r) + " " + r["summary"] for r in read_rows(world / "data" / "train.jsonl")]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=500, special_tokens=[tw.EOS, tw.PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tw.EOS, pad_token=tw.PAD).save_pretrained(dest)
    return dest


def test_the_proxy_trained_from_the_policy_passes(world, proxy):
    check_same_tokenizer(AutoTokenizer.from_pretrained(world / "base_policy"), str(proxy), False)


@pytest.mark.parametrize("make", ["swapped_ids", "other_vocab_size"])
def test_a_proxy_with_another_tokenizer_is_refused(world, proxy, tmp_path, make):
    policy_tok = AutoTokenizer.from_pretrained(world / "base_policy")
    rm_path = (
        swap_two_ids(proxy, tmp_path / "rm", policy_tok)
        if make == "swapped_ids"
        else other_bpe(proxy, tmp_path / "rm", world)
    )
    with pytest.raises(ValueError, match="has another tokenizer than the policy.*train_rm.py"):
        check_same_tokenizer(policy_tok, str(rm_path), False)


def test_a_proxy_without_a_tokenizer_is_refused(world, proxy, tmp_path):
    rm_path = copy_rm(proxy, tmp_path / "rm", with_tokenizer=False)
    with pytest.raises(ValueError, match="has no tokenizer.*train_rm.py"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(world / "base_policy"), str(rm_path), False)


def test_the_trainer_refuses_a_proxy_with_another_tokenizer(world, proxy, tmp_path):
    rm_path = swap_two_ids(proxy, tmp_path / "rm", AutoTokenizer.from_pretrained(world / "base_policy"))
    res = run(
        [
            "grpo_signcert.py",
            "--policy-path",
            str(world / "base_policy"),
            "--reward-model-path",
            str(rm_path),
            "--gold-rm-path",
            str(world / "gold_rm"),
            "--dataset",
            str(world / "data"),
            "--output-dir",
            str(tmp_path / "run"),
            "--total-steps",
            "1",
        ],
        check=False,
    )
    assert res.returncode != 0 and "has another tokenizer than the policy" in res.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
