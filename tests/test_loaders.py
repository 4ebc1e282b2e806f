"""The data loaders of the stage scripts on small local files in the real schemas.

TL;DR (`vwxyzjn/summarize_from_feedback_tldr_3_filtered`: id, subreddit, title, post, summary) as a
folder of jsonl, a single jsonl file, a folder of parquet and a `datasets.save_to_disk` folder;
AlpacaFarm (`tatsu-lab/alpaca_farm`: instruction, input, output) with and without input.
Every script carries its own copy of the loader (scripts share nothing), so every copy is tested.
    python -m pytest tests/test_loaders.py -q
"""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SCRIPTS = ["sft", "gen_prefs", "train_rm", "eval_gold"]
TLDR = [
    {
        "id": "t3_a",
        "subreddit": "relationships",
        "title": "My boyfriend forgot my birthday",
        "post": "We have been together for two years and he forgot my birthday again this year. What should I do?",
        "summary": "boyfriend forgot my birthday twice",
    },
    {
        "id": "t3_b",
        "subreddit": "personalfinance",
        "title": "Should I pay off my car loan?",
        "post": "I have 5k in savings and 4k left on a car loan at 6%.",
        "summary": "pay off car loan or keep savings?",
    },
]
ALPACA = [
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """A whitespace word-level fast tokenizer trained in-process: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = [w for r in TLDR for v in r.values() for w in v.split()] + "SUBREDDIT: TITLE: POST: TL;DR:".split()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "[UNK]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tldr_sources(tmp_path_factory) -> dict:
    import datasets

    root = tmp_path_factory.mktemp("tldr")
    (root / "jsonl").mkdir()
    write_jsonl(root / "jsonl" / "train.jsonl", TLDR)
    write_jsonl(root / "single.jsonl", TLDR)
    (root / "parquet").mkdir()
    datasets.Dataset.from_list(TLDR).to_parquet(str(root / "parquet" / "train.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(TLDR)}).save_to_disk(str(root / "disk"))
    datasets.Dataset.from_list(TLDR).save_to_disk(str(root / "disk_single"))
    return {k: str(root / k) for k in ("jsonl", "single.jsonl", "parquet", "disk", "disk_single")}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("source", ["jsonl", "single.jsonl", "parquet", "disk", "disk_single"])
def test_tldr_sources_load_the_same_rows(script, source, tldr_sources, tokenizer):
    mod = __import__(script)
    rows = mod.load_split(tldr_sources[source], "train")
    assert [{k: r[k] for k in TLDR[0]} for r in rows] == TLDR
    assert mod.detect_format(rows, source) == "tldr"
    prompt, response = mod.to_prompt_response(rows[1], "tldr", tokenizer, 512)
    assert (
        prompt
        == f"SUBREDDIT: r/personalfinance\n\nTITLE: Should I pay off my car loan?\n\nPOST: {TLDR[1]['post']}\n\nTL;DR:"
    )
    assert response == " pay off car loan or keep savings?"


@pytest.mark.parametrize("script", SCRIPTS)
def test_tldr_long_post_is_cut_at_whitespace(script, tokenizer):
    mod = __import__(script)
    row = TLDR[0]
    full = len(tokenizer(mod.to_prompt_response(row, "tldr", tokenizer, 512)[0]).input_ids)
    for budget in (full - 1, full - 7, 16):
        prompt, _ = mod.to_prompt_response(row, "tldr", tokenizer, budget)
        assert len(tokenizer(prompt).input_ids) <= budget
        post = prompt.split("POST: ")[1].removesuffix("\n\nTL;DR:")
        assert row["post"].startswith(post) and row["post"][len(post)] == " "  # cut at a word boundary
        assert prompt.startswith(
            f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: "
        ) and prompt.endswith("\n\nTL;DR:")
    with pytest.raises(ValueError, match="raise --max-prompt-length"):
        mod.to_prompt_response(row, "tldr", tokenizer, 5)


@pytest.mark.parametrize("script", SCRIPTS)
def test_alpaca_with_and_without_input(script, tmp_path, tokenizer):
    mod = __import__(script)
    write_jsonl(tmp_path / "sft.jsonl", ALPACA)
    rows = mod.load_split(str(tmp_path), "sft")
    assert mod.detect_format(rows, "alpaca") == "alpaca"
    with_input, response = mod.to_prompt_response(rows[0], "alpaca", tokenizer, 10_000)
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
    )
    assert response == "Bonjour"
    no_input, response = mod.to_prompt_response(rows[1], "alpaca", tokenizer, 10_000)
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a primary colour.\n\n### Response:\n"
    )
    assert response == "Red"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_datasets_give_clear_errors(script, tmp_path):
    mod = __import__(script)
    write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    rows = mod.load_split(str(tmp_path), "train")
    with pytest.raises(
        ValueError, match=r"has columns \['answer', 'question'\]; need the TL;DR columns .*AlpacaFarm columns"
    ):
        mod.detect_format(rows, "x")
    with pytest.raises(FileNotFoundError, match=r"no validation.jsonl, validation.parquet .*found: \['train.jsonl'\]"):
        mod.load_split(str(tmp_path), "validation")
    with pytest.raises(FileNotFoundError, match="does not exist.*tiny_world.py"):
        mod.load_split(str(tmp_path / "missing" / "data"), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mod.load_split("./nowhere.jsonl", "train")


@pytest.mark.parametrize("script", SCRIPTS)
def test_save_to_disk_unknown_split(script, tldr_sources):
    mod = __import__(script)
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'test'"):
        mod.load_split(tldr_sources["disk"], "test")
