"""The data loaders of the stage scripts on small local files in the real schemas.

TL;DR (`vwxyzjn/summarize_from_feedback_tldr_3_filtered`: id, subreddit, title, post, summary) as a
folder of jsonl, a single jsonl file, a folder of parquet and a `datasets.save_to_disk` folder;
AlpacaFarm (`tatsu-lab/alpaca_farm`: instruction, input, output) with and without input.
Every script carries its own copy of the loader (scripts share nothing), so every copy is tested
(tests/test_shared_helpers.py checks that the copies are the same source).
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
SCRIPTS = ["sft", "gen_prefs", "train_rm", "eval_gold", "grpo_signcert"]
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
    rows, where = mod.load_split(tldr_sources[source], "train")
    assert [{k: r[k] for k in TLDR[0]} for r in rows] == TLDR
    assert mod.detect_format(rows, where) == "tldr" and where.startswith(tldr_sources[source])
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
    rows, _ = mod.load_split(str(tmp_path), "sft")
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
    rows, _ = mod.load_split(str(tmp_path), "train")
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
def test_one_file_says_every_split_reads_its_rows(script, tldr_sources, capsys):
    """A dataset given as one file is every split: sft.py's evaluation then reads the training rows, and says so
    (issue 43); a folder of splits says nothing."""
    mod = __import__(script)
    for split in ("train", "validation"):
        rows, _ = mod.load_split(tldr_sources["single.jsonl"], split)
        assert len(rows) == len(TLDR)
        out = capsys.readouterr().out
        assert f"is one file: the {split!r} split reads all of its rows, as every other split does" in out
    mod.load_split(tldr_sources["jsonl"], "train")
    assert "one file" not in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_save_to_disk_unknown_split(script, tldr_sources):
    mod = __import__(script)
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'test'"):
        mod.load_split(tldr_sources["disk"], "test")


# ---------------------------------------------------------------- data errors that say where (issue 8 item 8)
@pytest.mark.parametrize("script", SCRIPTS)
def test_malformed_jsonl_line_names_file_and_line(script, tmp_path):
    mod = __import__(script)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(TLDR[0]) + "\n\n" + '{"subreddit": "x", "title": \n' + json.dumps(TLDR[1]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 3: not valid JSON .*fix or delete that line"):
        mod.load_split(str(tmp_path), "train")
    path.write_text(json.dumps(TLDR[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: a list, not a JSON object"):
        mod.load_split(str(path), "train")


@pytest.mark.parametrize("script", SCRIPTS)
def test_empty_file_says_it_is_empty(script, tmp_path):
    mod = __import__(script)
    (tmp_path / "train.jsonl").write_text("\n")
    rows, where = mod.load_split(str(tmp_path), "train")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'train.jsonl'} is empty \(no rows\)"):
        mod.detect_format(rows, where)


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_or_null_field_in_a_later_row_names_file_row_and_column(script, tmp_path):
    mod = __import__(script)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, [TLDR[0], TLDR[1], {k: v for k, v in TLDR[1].items() if k != "title"}])
    with pytest.raises(ValueError, match=rf"{path}, row 3: no column 'title' .*add it or delete that row"):
        mod.detect_format(*mod.load_split(str(tmp_path), "train"))
    write_jsonl(path, [TLDR[0], {**TLDR[1], "post": None}])
    with pytest.raises(ValueError, match=rf"{path}, row 2: column 'post' is null, not a string"):
        mod.detect_format(*mod.load_split(str(tmp_path), "train"))
    write_jsonl(path, [ALPACA[0], {**ALPACA[1], "input": None}])
    with pytest.raises(ValueError, match=r"row 2: column 'input' is null"):
        mod.detect_format(*mod.load_split(str(tmp_path), "train"))


# ---------------------------------------------------------------- paths (issue 8 item 9)
def fake_hub_cache(cache: Path, repo_id: str) -> None:
    """The hub cache's layout for one model, as a download leaves it: refs/main names a snapshot with a config."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_local_paths_say_no_such_folder(script, tmp_path, monkeypatch):
    import huggingface_hub

    mod = __import__(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "mymodels").mkdir()
    for path in ("mymodels/sft", "runs/nope", "./sft", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=rf"--policy-path {path}: no such local folder \(run the stage"):
            mod.require_path(path, "--policy-path")
    # a hub id (one slash at most, no local owner folder) offline: refused now unless the hub cache has it
    for path in ("EleutherAI/pythia-1b", "gpt2", "mymodel/rm"):
        with pytest.raises(
            FileNotFoundError,
            match=rf"--reward-model-path {path}: no such local folder, and the hub is offline \(HF_HUB_OFFLINE=1\) with no cached copy",
        ):
            mod.require_path(path, "--reward-model-path")
    fake_hub_cache(tmp_path / "hub", "EleutherAI/pythia-1b")
    mod.require_path("EleutherAI/pythia-1b", "--policy-path")  # cached: loads offline
    mod.require_path(None, "--gold-rm-path")  # optional and not given
    run = tmp_path / "runs" / "grpo"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"is a run folder, not a model: pass its model, {run / 'model'}"):
        mod.require_path(str(run), "--policy-path")
    mod.require_path(str(run / "model"), "--policy-path")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        mod.load_split("mymodels/data", "train")  # owner is a local folder: not a hub dataset


def test_a_path_typo_on_the_command_line_names_the_flag_offline_and_unreachable(tmp_path):
    """The user's case: `python grpo_signcert.py --reward-model-path mymodels/rm` with no such folder (one slash, so
    possibly a hub id). Offline, and with the hub unreachable (a closed local port as its address), the script stops
    in its argument checks with one error that names the flag and says why, instead of transformers' traceback."""
    import socket
    import subprocess

    with socket.socket() as sock:  # a port that nobody listens on once closed: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cases = {"1": "the hub is offline (HF_HUB_OFFLINE=1)", "0": "the hub is unreachable (ConnectError"}
    for offline, says in cases.items():
        env = {**os.environ, "HF_HUB_OFFLINE": offline, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
        env["HF_HUB_CACHE"] = str(tmp_path / "empty_cache")
        (tmp_path / "sft").mkdir(exist_ok=True)  # the policy exists: the RM's flag is the one at fault
        cmd = [
            sys.executable,
            str(ROOT / "grpo_signcert.py"),
            "--policy-path",
            "sft",
            "--reward-model-path",
            "mymodels/rm",
        ]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: --reward-model-path mymodels/rm: no such local folder"), last  # said plainly
        assert says in last, last
        assert "huggingface.co" not in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "runs").exists()  # refused before any folder is made


# ---------------------------------------------------------------- prompt fitting (issue 8 item 10)
@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE fast tokenizer (like Pythia's): text without spaces becomes several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(str(v) for r in TLDR + ALPACA for v in r.values()), "日本語の文章です。" * 20]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "post", ["今日は雨が降っていたので、家で本を読みました。" * 8, "https://example.com/" + "a1b2" * 60]
)
def test_text_without_whitespace_is_cut_at_a_token_not_dropped(script, post, bpe_tokenizer):
    mod = __import__(script)
    row = {**TLDR[0], "post": post}
    full = len(bpe_tokenizer(mod.to_prompt_response(row, "tldr", bpe_tokenizer, 10_000)[0]).input_ids)
    for budget in (full - 1, full - 20, full // 2):
        prompt, _ = mod.to_prompt_response(row, "tldr", bpe_tokenizer, budget)
        kept = prompt.split("POST: ")[1].removesuffix("\n\nTL;DR:")
        assert len(bpe_tokenizer(prompt).input_ids) <= budget
        assert kept and post.startswith(kept)  # a prefix of the post, not an empty POST
        assert len(bpe_tokenizer(prompt).input_ids) >= budget - 3  # cut about on budget, not far below


@pytest.mark.parametrize("script", SCRIPTS)
def test_alpaca_without_input_obeys_max_prompt_length(script, bpe_tokenizer):
    mod = __import__(script)
    row = {"instruction": "Name a primary colour and say why. " * 30, "input": "", "output": "Red"}
    full = len(bpe_tokenizer(mod.to_prompt_response(row, "alpaca", bpe_tokenizer, 10_000)[0]).input_ids)
    prompt, _ = mod.to_prompt_response(row, "alpaca", bpe_tokenizer, full // 2)
    assert len(bpe_tokenizer(prompt).input_ids) <= full // 2
    instruction = prompt.split("### Instruction:\n")[1].removesuffix("\n\n### Response:\n")
    assert instruction and row["instruction"].startswith(instruction)


def test_trainer_prompts_are_the_stage_scripts_prompts(bpe_tokenizer):
    """Training (grpo_signcert.build_prompts) and evaluation (eval_gold) see the same prompts, cut included."""
    import eval_gold
    import grpo_signcert

    rows = [
        {"instruction": "Name a primary colour and say why. " * 30, "input": "", "output": "Red"},
        {"instruction": "Translate.", "input": "Good morning " * 40, "output": "Bonjour"},
        ALPACA[1],
    ]
    trained = grpo_signcert.build_prompts(rows, bpe_tokenizer, 300, "x")
    evaluated = [eval_gold.to_prompt_response(r, "alpaca", bpe_tokenizer, 300)[0] for r in rows]
    assert trained == evaluated and all(len(bpe_tokenizer(p).input_ids) <= 300 for p in trained)
    assert rows[0]["instruction"][:100] in trained[0] and rows[0]["instruction"] not in trained[0]  # cut, not dropped
