"""Stage 3 of the gold-model pipeline: the proxy reward model, Bradley-Terry on the gold-labelled pairs.

The proxy RM is the SFT backbone with a fresh scalar head:
`AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1)`, the `score` Linear
re-initialised with std 1/sqrt(hidden + 1) (as summarize_from_feedback_details) from `--seed`, so
that several seeds give the ensemble members UWO needs (`--seed 2 --output-dir runs/tiny_world/rm_2`).
All parameters are trained with the Bradley-Terry loss `-log sigmoid(r(x, y_chosen) - r(x, y_rejected))`.
The reward is read at the last real token (the EOS appended to every response), found from the
attention mask, from the same last-layer feature h that SignCert-PO perturbs: r = w^T h.

Input format (the RL stage must feed the proxy the same): token ids of the prompt, then of the
response, then EOS, in the SFT tokenizer; inputs longer than `--max-length` lose their beginning.

Normalisation: after training, the mean reward of the reference responses of `--num-norm-samples`
prompts of the validation split is stored as `reward_offset` in the saved config.json; the proxy
reward is `score(h) - config.reward_offset`, so that reference responses score about 0 (the GPT-NeoX
`score` Linear has no bias to absorb it). Downstream scripts subtract it.

Plain Hugging Face code reads the saved RM the same way: the tokenizer's pad token is distinct from
its EOS (`<|padding|>` or `[PAD]`, see `distinct_pad_token`) and so is `config.pad_token_id`, so
`AutoModelForSequenceClassification`'s pooling (the last token that is not pad) lands on the same EOS.
It does not know the offset: on the same token ids (prompt + response + EOS, at most `--max-length`),
right-padded, `model(**tokenizer(texts, padding=True, return_tensors="pt")).logits` = our reward +
`config.reward_offset` (tests/test_rm_artifacts.py checks this, and the same for the tiny world's gold).

Accuracy: the fraction of held-out pairs (`{prefs_path}/test.jsonl`, on-policy completions of
held-out prompts labelled by the gold) where the proxy ranks the gold-chosen response strictly higher;
every `--eval-steps` updates and at the end.

BSPO's ScoreLM (`--lm-coef alpha > 0`, Dai et al. 2025): an LM head on the same backbone, initialised from
the SFT's LM head, and the loss BT + alpha * the mean next-token loss of the training responses (chosen
and rejected; response tokens and their EOS, not the prompt). The head then estimates the behaviour
distribution of the responses the RM was trained on; backbone + LM head are saved as a standard causal
LM in `{output_dir}/behavior_lm/` (grpo_bspo.py reads it). `--lm-coef 0` (default) is the plain BT RM,
bit for bit: no LM head is built.

Paper setting (appendix F.4): Pythia-1B SFT backbone, lr 2e-5, cosine, warmup 0.03, weight decay 0.1,
1 epoch, max length 512, per-device batch 16, gradient checkpointing, bf16, 8 GPUs. The tiny preset
uses lr 1e-3 (our choice: the tiny backbone is small and trained from scratch; 2e-5 barely moves it)
and otherwise the paper's schedule.

Run it:
    python train_rm.py                                     # tiny world, after gen_prefs.py
    accelerate launch --config_file configs/cpu_2proc.yaml train_rm.py --seed 2 --output-dir runs/tiny_world/rm_2
    accelerate launch --config_file configs/deepspeed_zero2.yaml train_rm.py --preset paper
Logged metrics: losses/rm_loss, train/accuracy, train/reward_margin (chosen - rejected),
charts/learning_rate, eval/accuracy, eval/reward_margin, and at the end eval/reference_reward_mean
(before the offset) = eval/reward_offset, eval/chosen_reward_mean and eval/rejected_reward_mean (after).
"""

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (head init and data order: vary it to train ensemble members)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "signcert-po"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""

    # Algorithm specific arguments
    preset: Literal["tiny", "paper"] = "tiny"
    """`tiny`: the offline tiny world on a CPU; `paper`: Pythia-1B on TL;DR as in the paper. Explicit flags override the preset"""
    policy_path: str = "runs/tiny_world/sft"
    """the SFT model whose backbone becomes the proxy RM (output of sft.py)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    prefs_path: str = "runs/tiny_world/prefs"
    """folder with train.jsonl and test.jsonl of gold-labelled pairs (output of gen_prefs.py)"""
    dataset: str = "runs/tiny_world/data"
    """hub id or local path of the prompts + reference responses used for the reward offset"""
    dataset_config: Optional[str] = None
    """hub dataset config (e.g. `alpaca_instructions` for tatsu-lab/alpaca_farm)"""
    norm_split: str = "validation"
    """split whose reference responses define reward 0 (AlpacaFarm: `val`)"""
    num_norm_samples: int = 256
    """reference responses averaged for the offset"""
    max_train_pairs: Optional[int] = None
    """use only the first N training pairs (default: all)"""
    output_dir: str = "runs/tiny_world/rm"
    """where the proxy RM (+ tokenizer, metrics.jsonl, eval.json) is written (atomically)"""
    max_length: int = 256
    """tokens of prompt + response + EOS (longer inputs lose their beginning)"""
    max_prompt_length: int = 128
    """prompt budget of the reference prompts (as in sft.py / gen_prefs.py)"""
    num_train_epochs: int = 1
    """passes over the training pairs"""
    learning_rate: float = 1e-3
    """peak learning rate of AdamW"""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name"""
    warmup_ratio: float = 0.03
    """fraction of the updates spent in linear warmup"""
    weight_decay: float = 0.1
    """AdamW weight decay (not on biases and norms)"""
    max_grad_norm: float = 1.0
    """gradient clipping (<= 0: off)"""
    per_device_train_batch_size: int = 32
    """pairs per device per forward pass"""
    gradient_accumulation_steps: int = 1
    """forward passes per update (ignored when --total-batch-size is given)"""
    total_batch_size: Optional[int] = None
    """pairs per update over all devices; sets gradient_accumulation_steps (must be a multiple of per_device_train_batch_size * num_processes)"""
    per_device_eval_batch_size: int = 64
    """sequences per forward pass in evaluation"""
    eval_steps: int = 100
    """held-out accuracy every N updates (and at the end)"""
    logging_steps: int = 10
    """log the training loss every N updates"""
    bf16: bool = False
    """bf16 mixed precision (autocast; GPU; the paper: on)"""
    gradient_checkpointing: bool = False
    """trade compute for memory (the paper: on)"""
    lm_coef: float = 0.0
    """alpha >= 0: add alpha x the next-token loss of the responses (BSPO's ScoreLM) and save behavior_lm/; 0: plain BT"""

    # to be filled in runtime
    num_processes: Annotated[int, tyro.conf.Suppress] = 0
    """number of processes"""
    batch_size: Annotated[int, tyro.conf.Suppress] = 0
    """pairs per update, all processes: per_device_train_batch_size * num_processes * gradient_accumulation_steps"""
    num_updates: Annotated[int, tyro.conf.Suppress] = 0
    """optimiser updates in the whole run"""
    run_name: Annotated[str, tyro.conf.Suppress] = ""
    """f"{exp_name}__{seed}__{time}", the same on every process"""


PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        policy_path="runs/paper/sft",
        prefs_path="runs/paper/prefs",
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        num_norm_samples=1024,
        output_dir="runs/paper/rm",
        max_length=512,
        max_prompt_length=512,
        learning_rate=2e-5,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        eval_steps=200,
        bf16=True,
        gradient_checkpointing=True,
    ),
}


def parse_args() -> Args:
    # `--preset` picks the defaults; every other flag still overrides them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=PRESETS)
    return tyro.cli(Args, default=PRESETS[pre.parse_known_args()[0].preset])


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, or an error that names both ways out: a multiple of b for the first, a divisor of a for the second."""
    if b < 1 or a % b != 0:
        multiples = sorted({m for m in (b * (a // b), b * (a // b + 1)) if m > 0}) if b >= 1 else []
        divisors = [d for d in range(1, a + 1) if a % d == 0]
        raise ValueError(
            f"{what}: {a} is not a multiple of {b}; make the first a multiple of {b} (e.g. {multiples}) "
            f"or the second a divisor of {a} ({divisors})"
        )
    return a // b


def require_path(path: Optional[str], flag: str) -> None:
    """Fail now, naming the flag and saying what to do, on a path that cannot be what was meant: a local folder
    that does not exist, a run folder instead of its model, or a hub id that cannot be had (the hub offline or
    unreachable, and no cached copy), instead of a hub lookup that fails later under a long traceback."""
    if not path:
        return
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        raise FileNotFoundError(f"{flag} {path} is a run folder, not a model: pass its model, {p / 'model'}")
    if p.exists():
        return
    missing = f"{flag} {path}: no such local folder"
    todo = "run the stage that writes it, `python pipeline.py` for the tiny world, or give an existing folder"
    first = p.parts[0] if p.parts else ""
    # a hub id is `name` or `owner/name`; anything else, or an `owner` that is a local folder, is a local path
    if path.startswith((".", "/", "~", "runs/")) or path.count("/") > 1 or Path(first).is_dir():
        raise FileNotFoundError(f"{missing} ({todo})")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(huggingface_hub.try_to_load_from_cache(path, "config.json"), str):
        return  # the hub's local cache has it: it loads offline too
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{missing}, and the hub is offline (HF_HUB_OFFLINE=1) with no cached copy of {path!r} ({todo}; "
            "for a hub model, unset HF_HUB_OFFLINE where the hub can be reached)"
        )
    try:
        huggingface_hub.model_info(path, timeout=10)
    except GatedRepoError:
        return  # it exists; loading it says what access it needs
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{missing}, nor a hub model you can read ({todo})") from None
    except HfHubHTTPError:
        return  # the hub answered: loading it reports the rest
    except Exception as e:  # no answer: no network, a proxy, a wrong HF_ENDPOINT
        raise FileNotFoundError(
            f"{missing}, and the hub is unreachable ({type(e).__name__}: {e}) ({todo}; for a hub model, "
            "check the network or HF_ENDPOINT)"
        ) from None


# ---------------------------------------------------------------- data
TLDR_COLUMNS = ("subreddit", "title", "post", "summary")
ALPACA_COLUMNS = ("instruction", "input", "output")
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl (.json: one object per line) or .parquet file; errors name the file and 1-based line."""
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); every line must be "
                        "one JSON object: fix or delete that line"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}, line {number}: a {type(row).__name__}, not a JSON object; every line must be "
                        "one object with the dataset's columns"
                    )
                rows.append(row)
        return rows
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def load_split(dataset: str, split: str, config: Optional[str] = None) -> tuple[list[dict], str]:
    """(rows, where) of one split from a hub id or a local path (a folder of {split}.jsonl/.parquet, one
    file, or save_to_disk); `where` names the file the rows came from, for error messages."""
    path = Path(dataset)
    if path.is_file():  # one file is every split: said, so that an evaluation on the training rows is never silent
        print(f"[data] {path} is one file: the {split!r} split reads all of its rows, as every other split does (for a "
              f"held-out split, pass a folder with one file per split: train.jsonl, validation.jsonl, test.jsonl)")  # fmt: skip
        return read_rows(path), str(path)
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.parquet", f"{split}.json"):
            if (path / name).is_file():
                return read_rows(path / name), str(path / name)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{dataset} has splits {list(data)}, not {split!r}: pass one of them")
                data = data[split]
            return data.to_list(), f"{dataset} [{split}]"
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{dataset} has no {split}.jsonl, {split}.parquet or save_to_disk data (found: {found})"
        )
    # a path-looking string that does not exist is a mistake, not a hub id
    first = path.parts[0] if path.parts else ""
    if (
        dataset.startswith((".", "/", "~", "runs/"))
        or dataset.count("/") != 1
        or path.suffix in (".jsonl", ".parquet", ".json")
        or Path(first).is_dir()
    ):
        raise FileNotFoundError(
            f"dataset {dataset!r} does not exist: no such file or folder (run `python tiny_world.py` for the "
            "tiny world, or pass --dataset)"
        )
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split).to_list(), f"{dataset} [{split}]"
    except Exception as e:
        raise RuntimeError(f"could not load {dataset!r} (config {config}, split {split}) from the hub: {e}") from e


def check_columns(rows: list[dict], columns: tuple, where: str) -> None:
    """Every row has every column, as a string: a missing or null field is an error that names the row."""
    if not rows:
        raise ValueError(f"{where} is empty (no rows): point --dataset at a file or folder with data")
    for number, row in enumerate(rows, 1):
        for column in columns:
            if column not in row:
                raise ValueError(
                    f"{where}, row {number}: no column {column!r} (every row needs {list(columns)}): "
                    "add it or delete that row"
                )
            if not isinstance(row[column], str):
                value = "null" if row[column] is None else f"a {type(row[column]).__name__}"
                raise ValueError(
                    f"{where}, row {number}: column {column!r} is {value}, not a string: give it a string "
                    '("" for an empty Alpaca input) or delete that row'
                )


def detect_format(rows: list[dict], where: str) -> str:
    """'tldr' or 'alpaca' from the columns of the first row; then every row must have them (check_columns)."""
    if not rows:
        raise ValueError(f"{where} is empty (no rows): point --dataset at a file or folder with data")
    columns = set(rows[0])
    for fmt, need in (("tldr", TLDR_COLUMNS), ("alpaca", ALPACA_COLUMNS)):
        if set(need) <= columns:
            check_columns(rows, need, where)
            return fmt
    raise ValueError(
        f"{where} has columns {sorted(columns)}; need the TL;DR columns {list(TLDR_COLUMNS)} "
        f"or the AlpacaFarm columns {list(ALPACA_COLUMNS)}"
    )


CHAT_EOS_CHECKED = set()  # (chat template, EOS) pairs seen to end a turn with that EOS


def as_query(tokenizer, prompt: str) -> str:
    """The text the policy reads for `prompt` (and the proxy RM, which reads the policy's tokens): where the tokenizer
    has a chat template (an instruct model, e.g. SmolLM2-135M-Instruct), the prompt as the user's turn with the
    assistant's turn opened; else the prompt as it is (Pythia, the tiny world). The gold always reads the prompt
    itself. A chat model must end its turn with the tokenizer's EOS, where completions are cut and rewards read."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    key = (tokenizer.chat_template, tokenizer.eos_token)
    if key not in CHAT_EOS_CHECKED:
        turn = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        if tokenizer.eos_token is None or "y" + tokenizer.eos_token not in tokenizer.apply_chat_template(
            turn, tokenize=False
        ):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path} does not end an assistant turn with the tokenizer's "
                f"EOS {tokenizer.eos_token!r}: set the tokenizer's eos_token to the token that ends a turn "
                "(tokenizer.eos_token = ...; save_pretrained), or remove the chat template to train on plain prompts"
            )
        CHAT_EOS_CHECKED.add(key)
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def fit_prompt(build, text: str, tokenizer, max_len: int) -> str:
    """build(text) -> prompt; shorten `text` until the prompt has <= max_len tokens. The cut is at a token
    boundary about on budget, moved back to the last whitespace when there is one in the kept part's second
    half: words stay whole, and text without whitespace (Japanese, a long URL) is cut, not dropped whole."""
    while True:
        prompt = build(text)
        n = len(tokenizer(as_query(tokenizer, prompt), add_special_tokens=False).input_ids)  # as the policy reads it
        if n <= max_len:
            return prompt
        if not text:
            raise ValueError(
                f"prompt is {n} tokens even with an empty post/input/instruction; raise --max-prompt-length "
                f"(now {max_len})"
            )
        keep = len(tokenizer(text, add_special_tokens=False).input_ids) - (n - max_len)
        if keep <= 0:
            cut = ""
        elif getattr(tokenizer, "is_fast", False):  # the exact prefix of `text` that its first `keep` tokens cover
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
            cut = text[: offsets[keep - 1][1]]
        else:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            cut = tokenizer.decode(ids[:keep]).rstrip("\ufffd")  # no half character at the end
        space = max(cut.rfind(" "), cut.rfind("\n"))
        at_word_end = text.startswith(cut) and text[len(cut) : len(cut) + 1].isspace()
        if not at_word_end and space > len(cut) // 2:
            cut = cut[:space]
        cut = cut.rstrip()
        text = cut if len(cut) < len(text) else text[:-1]  # always progress


def to_prompt_response(row: dict, fmt: str, tokenizer, max_prompt_length: int) -> tuple[str, str]:
    """The prompt (fitted to max_prompt_length: the TL;DR post, the Alpaca input, or else the Alpaca
    instruction is cut) and the reference response of one row; every script builds its prompts here."""
    if fmt == "tldr":
        build = lambda post: f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: {post}\n\nTL;DR:"
        return fit_prompt(build, row["post"].strip(), tokenizer, max_prompt_length), " " + row["summary"].strip()
    if row["input"]:
        build = lambda inp: ALPACA_PROMPT_INPUT.format(instruction=row["instruction"], input=inp)
        return fit_prompt(build, row["input"], tokenizer, max_prompt_length), row["output"]
    build = lambda ins: ALPACA_PROMPT_NO_INPUT.format(instruction=ins)
    return fit_prompt(build, row["instruction"], tokenizer, max_prompt_length), row["output"]


PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: run gen_prefs.py first, or pass --prefs-path (a folder with train.jsonl and test.jsonl)"
        )
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path} has no pairs: gen_prefs.py dropped every pair as a tie? (see its stats.json)")
    if not set(PAIR_COLUMNS) <= set(rows[0]):
        raise ValueError(
            f"{path} has columns {sorted(rows[0])}; preference pairs need {list(PAIR_COLUMNS)} (the output of gen_prefs.py)"
        )
    check_columns(rows, PAIR_COLUMNS, str(path))  # every row, not only the first
    return rows


# ---------------------------------------------------------------- models
def distinct_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token distinct from its EOS, so that plain Hugging Face code, which reads a
    sequence's score at its last token that is not the pad id, reads it at the EOS as our scripts do (with
    pad == eos it would read the token before). Pythia's own `<|padding|>` if the vocabulary has it, else
    a new `[PAD]` special token (then the model's embeddings must be resized to `len(tokenizer)`)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if "<|padding|>" in tokenizer.get_vocab():
        tokenizer.pad_token = "<|padding|>"
    else:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})


def rm_input_ids(tokenizer, prompt: str, response: str, max_length: int, chat: bool) -> list[int]:
    """What a reward model reads. chat: the tokenizer's chat template (user = prompt, assistant =
    response), for a gold like Skywork; else prompt ids + response ids + EOS (the tiny-world gold, and
    the proxy RM, whose RL stage concatenates policy tokens the same way)."""
    if chat:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response.strip()}]
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    else:
        ids = (
            tokenizer(prompt, add_special_tokens=False).input_ids
            + tokenizer(response, add_special_tokens=False).input_ids
        )
        ids = ids + [tokenizer.eos_token_id]
    return ids[-max_length:]  # keep the end: that is where the reward is read


def pad_right(seqs: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_token_id] * (n - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], device=device)
    return ids, mask


def position_ids_of(mask):
    """Positions that skip the left padding, so a padded prompt is seen exactly as an unpadded one."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def reward_and_features(rm, ids, mask):
    """ONE forward of a reward model: (reward (N,), features h (N, d)), both float32, read at the last real
    token of every row (the EOS when there is one; any padding, left or right). h is the input of the linear
    `score` head and reward = w^T h + b - reward_offset (the constant that centres the references, in the
    RM's config). The index comes from the mask, never from searching for pad ids; the head is applied in
    float32, so a bf16 backbone does not quantise the reward. No `no_grad` here: train_rm.py trains through it."""
    hidden = getattr(rm, rm.base_model_prefix)(input_ids=ids, attention_mask=mask, position_ids=position_ids_of(mask))
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
    h = hidden.last_hidden_state[torch.arange(ids.shape[0], device=ids.device), last].float()
    bias = None if rm.score.bias is None else rm.score.bias.float()
    with torch.autocast(h.device.type, enabled=False):  # float32 even inside an autocast region (bf16 training)
        reward = F.linear(h, rm.score.weight.float(), bias).squeeze(-1)
    return reward - getattr(rm.config, "reward_offset", 0.0), h


def reward_and_lm_loss(rm, lm_head, input_ids, attention_mask, lm_mask):
    """BSPO's ScoreLM: ONE backbone forward -> (reward (B,), the mean next-token loss of the LM head over the
    tokens where lm_mask is 1 (the response tokens and their EOS)). The reward is `reward_and_features`'s own
    (the same last token, the float32 head, the offset); the LM head reads the hidden states of that same
    forward, caught by a hook on the backbone, so no second forward and no second copy of the scoring."""
    caught = {}
    backbone = getattr(rm, rm.base_model_prefix)
    hook = backbone.register_forward_hook(lambda module, inputs, output: caught.update(hidden=output.last_hidden_state))
    try:
        reward = reward_and_features(rm, input_ids, attention_mask)[0]
    finally:
        hook.remove()
    logits = lm_head(caught["hidden"][:, :-1]).float()  # position t predicts token t + 1
    target, weight = input_ids[:, 1:], lm_mask[:, 1:].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return reward, (nll * weight).sum() / weight.sum().clamp(min=1)


class LastTokenReward(torch.nn.Module):
    """Makes the scoring the wrapped module's forward: DDP/DeepSpeed sync gradients only through it."""

    def __init__(self, rm, lm_head=None):
        super().__init__()
        self.rm = rm
        self.lm_head = lm_head  # BSPO's ScoreLM head (--lm-coef > 0), else None: no parameters added

    def forward(self, input_ids, attention_mask, lm_mask=None):
        if lm_mask is None:
            return reward_and_features(self.rm, input_ids, attention_mask)[0]
        return reward_and_lm_loss(self.rm, self.lm_head, input_ids, attention_mask, lm_mask)


@torch.no_grad()
def score_seqs(rm, seqs: list[list[int]], batch_size: int, pad_token_id: int, accelerator) -> list[float]:
    """Rewards of this process's sequences (minus config.reward_offset: 0 until it is fitted at the end)."""
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i : i + batch_size], pad_token_id, accelerator.device)
        with accelerator.autocast():
            out += reward_and_features(rm, ids, mask)[0].tolist()
    return out


# ---------------------------------------------------------------- outputs
TINY_MODEL_PARAMETERS = 10**7  # the tiny world's models have under a million parameters; a pretrained LM, 100M and more


def learning_rate_warning(model, learning_rate: float, tiny_default: float) -> Optional[str]:
    """A warning for a pretrained model trained at the tiny world's default learning rate, or None. That default is set
    for the world's 2-layer models and moves a real LM far in a few steps (the SmolLM2-135M SFT policy at the RL
    trainer's 2e-4: policy/kl 9.2 after 2 steps, every evaluation completion one token long)."""
    n = sum(p.numel() for p in model.parameters())
    if learning_rate != tiny_default or n < TINY_MODEL_PARAMETERS:
        return None
    return (
        f"warning: --learning-rate {learning_rate:g} is the tiny world's default, set for its models of under "
        f"{TINY_MODEL_PARAMETERS // 10**6}M parameters; this model has {n / 1e6:.0f}M, which that rate moves far in a "
        "few steps. Pass --learning-rate for this model (SmolLM2-135M: 3e-5 for SFT, 1e-6 for RL; Pythia-1B: --preset "
        "paper)"
    )


def staging_dir(target: str, run_name: str) -> Path:
    """A temp dir next to the target: everything is written there, then moved in place at once."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{run_name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, target: str) -> None:
    # os.replace cannot overwrite a non-empty directory: move the old one aside first
    target = Path(target)
    old = target.parent / f".{target.name}.old-{tmp.name}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


class MetricsLogger:
    def __init__(self, path: Path, args: Args, enabled: bool):
        self.enabled, self.path, self.wandb = enabled, path, None
        if enabled and args.track:
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, config=asdict(args)
            )

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)


if __name__ == "__main__":
    args = parse_args()
    args.num_processes = PartialState(
        cpu=not torch.cuda.is_available()
    ).num_processes  # before the Accelerator: DeepSpeed fixes accumulation at init
    if args.total_batch_size is not None:
        args.gradient_accumulation_steps = exact_div(
            args.total_batch_size,
            args.per_device_train_batch_size * args.num_processes,
            "--total-batch-size must be a multiple of per_device_train_batch_size * num_processes",
        )
    args.batch_size = args.per_device_train_batch_size * args.num_processes * args.gradient_accumulation_steps
    # no GPU: the processes that `accelerate launch --multi_gpu` starts run on the CPU (gloo)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 else "no",
    )
    run_name = [f"{args.exp_name}__{args.seed}__{int(time.time())}"]
    broadcast_object_list(run_name)  # rank 0's clock, so all ranks agree
    args.run_name = run_name[0]
    # same seed on every rank: identical head init, one shared data order that accelerate shards
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # inputs first: a bad path or bad data fails before the model is loaded
    require_path(args.policy_path, "--policy-path")
    require_path(args.prefs_path, "--prefs-path")
    train_pairs = load_pairs(Path(args.prefs_path) / "train.jsonl")[: args.max_train_pairs]
    test_pairs = load_pairs(Path(args.prefs_path) / "test.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path, trust_remote_code=args.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {args.policy_path} has no eos_token: the reward is read at the EOS; pick a tokenizer with one"
        )
    distinct_pad_token(tokenizer)  # an SFT from sft.py has one already
    norm_rows, norm_where = load_split(args.dataset, args.norm_split, args.dataset_config)
    norm_rows = norm_rows[: args.num_norm_samples]
    fmt = detect_format(norm_rows, norm_where)
    references = [
        rm_input_ids(tokenizer, as_query(tokenizer, p), ref, args.max_length, False)
        for p, ref in (to_prompt_response(r, fmt, tokenizer, args.max_prompt_length) for r in norm_rows)
    ]
    encode = lambda rows: [
        (
            rm_input_ids(tokenizer, as_query(tokenizer, r["prompt"]), r["chosen"], args.max_length, False),
            rm_input_ids(tokenizer, as_query(tokenizer, r["prompt"]), r["rejected"], args.max_length, False),
        )
        for r in rows
    ]
    train_data, test_data = encode(train_pairs), encode(test_pairs)
    if args.lm_coef < 0:
        raise ValueError(f"--lm-coef (BSPO's alpha) must be >= 0, got {args.lm_coef}")
    if args.lm_coef > 0:  # the ScoreLM also needs how many tokens at the end are response (+ EOS): append them
        response_length = lambda text, ids: min(len(tokenizer(text, add_special_tokens=False).input_ids) + 1, len(ids))
        train_data = [
            (c, r, response_length(p["chosen"], c), response_length(p["rejected"], r))
            for (c, r), p in zip(train_data, train_pairs)
        ]
    steps_per_epoch = math.ceil(
        math.ceil(len(train_data) / (args.per_device_train_batch_size * args.num_processes))
        / args.gradient_accumulation_steps
    )
    args.num_updates = steps_per_epoch * args.num_train_epochs
    if accelerator.is_main_process:
        print(
            f"{args.run_name}: {len(train_data)} train / {len(test_data)} test pairs, {len(references)} references for the offset"
        )
        for k, v in asdict(args).items():
            print(f"  {k}: {v}")

    rm = AutoModelForSequenceClassification.from_pretrained(
        args.policy_path, num_labels=1, trust_remote_code=args.trust_remote_code
    )
    if not isinstance(getattr(rm, "score", None), torch.nn.Linear):
        raise ValueError(
            f"{type(rm).__name__} has no linear `score` head; the proxy RM needs an architecture whose classification head is `score` (GPT-NeoX, Llama, Qwen2, ...)"
        )
    warning = learning_rate_warning(rm, args.learning_rate, PRESETS["tiny"].learning_rate)
    if warning and accelerator.is_main_process:
        print(warning)
    torch.nn.init.normal_(rm.score.weight, std=1 / math.sqrt(rm.config.hidden_size + 1))  # fresh head, seeded
    if len(tokenizer) > rm.get_input_embeddings().num_embeddings:  # a new [PAD] (Pythia has spare rows)
        rm.resize_token_embeddings(len(tokenizer))
    rm.config.reward_offset = 0.0  # reward_and_features subtracts it: raw score(h) until it is fitted at the end
    rm.config.pad_token_id = tokenizer.pad_token_id  # != eos: plain HF pooling then reads the EOS, as we do
    if args.gradient_checkpointing:
        rm.gradient_checkpointing_enable()
    lm_head = None
    if args.lm_coef > 0:  # BSPO's ScoreLM: an LM head on the RM's backbone, initialised from the SFT's LM head
        sft_lm = AutoModelForCausalLM.from_pretrained(args.policy_path, trust_remote_code=args.trust_remote_code)
        lm_head = torch.nn.Linear(rm.config.hidden_size, sft_lm.config.vocab_size, bias=False)
        lm_head.weight.data.copy_(sft_lm.get_output_embeddings().weight.data)
        del sft_lm
    model = LastTokenReward(rm, lm_head)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]  # no decay on biases and norms
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * args.num_updates),
        num_training_steps=args.num_updates,
    )
    train_loader = torch.utils.data.DataLoader(
        train_data, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=lambda b: b
    )
    model, optimizer, scheduler, train_loader = accelerator.prepare(model, optimizer, scheduler, train_loader)

    out = staging_dir(args.output_dir, args.run_name) if accelerator.is_main_process else None
    logger = MetricsLogger(out / "metrics.jsonl" if out else None, args, accelerator.is_main_process)
    pad = tokenizer.pad_token_id

    def evaluate() -> dict:
        """Held-out pairs, split between processes: proxy accuracy against the gold labels."""
        rm_eval = accelerator.unwrap_model(model).rm
        rm_eval.eval()
        with accelerator.split_between_processes(test_data) as mine:
            chosen = score_seqs(rm_eval, [c for c, _ in mine], args.per_device_eval_batch_size, pad, accelerator)
            rejected = score_seqs(rm_eval, [r for _, r in mine], args.per_device_eval_batch_size, pad, accelerator)
        rm_eval.train()
        margins = np.array(gather_object([c - r for c, r in zip(chosen, rejected)]))
        return {"eval/accuracy": float((margins > 0).mean()), "eval/reward_margin": float(margins.mean())}

    update, window = 0, []
    start = time.time()
    progress = tqdm(total=args.num_updates, desc="rm", disable=not accelerator.is_main_process)
    model.train()
    for epoch in range(args.num_train_epochs):
        for batch in train_loader:
            lm_lengths = None
            if args.lm_coef > 0:  # split off the response lengths (see train_data)
                lm_lengths = [nc for _, _, nc, _ in batch] + [nr for _, _, _, nr in batch]
                batch = [(c, r) for c, r, _, _ in batch]
            with accelerator.accumulate(model):
                # chosen and rejected in one forward: the same padding, the same batch statistics
                ids, mask = pad_right([c for c, _ in batch] + [r for _, r in batch], pad, accelerator.device)
                if lm_lengths is None:
                    rewards = model(ids, mask).float()
                else:  # the last n real tokens of each row are its response + EOS
                    ends = mask.sum(1, keepdim=True)
                    starts = ends - torch.tensor(lm_lengths, device=ids.device).unsqueeze(1)
                    cols = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
                    rewards, lm_loss = model(ids, mask, ((cols >= starts) & (cols < ends)).long())
                    rewards = rewards.float()
                margin = rewards[: len(batch)] - rewards[len(batch) :]
                loss = -torch.nn.functional.logsigmoid(margin).mean()  # Bradley-Terry
                if lm_lengths is not None:
                    loss = loss + args.lm_coef * lm_loss  # BSPO's ScoreLM
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(torch.stack([loss.detach(), (margin > 0).float().mean(), margin.detach().mean()]))
            if not accelerator.sync_gradients:
                continue
            update += 1
            progress.update(1)
            if update % args.logging_steps == 0 or update == args.num_updates:
                w = accelerator.reduce(torch.stack(window).mean(0), reduction="mean")
                metrics = {
                    "losses/rm_loss": w[0].item(),
                    "train/accuracy": w[1].item(),
                    "train/reward_margin": w[2].item(),
                    "charts/learning_rate": scheduler.get_last_lr()[0],
                }
                progress.set_postfix(loss=f"{metrics['losses/rm_loss']:.3f}", acc=f"{metrics['train/accuracy']:.2f}")
                logger.log(metrics, update)
                window = []
            if update % args.eval_steps == 0 and update != args.num_updates:
                logger.log(evaluate(), update)
    progress.close()

    # final evaluation, then the offset that makes reference responses score ~0
    final = evaluate()
    rm = accelerator.unwrap_model(model).rm
    rm.eval()
    with accelerator.split_between_processes(references) as mine:
        reference_rewards = gather_object(score_seqs(rm, mine, args.per_device_eval_batch_size, pad, accelerator))
    offset = float(np.mean(reference_rewards))
    with accelerator.split_between_processes(test_data) as mine:
        chosen = gather_object(score_seqs(rm, [c for c, _ in mine], args.per_device_eval_batch_size, pad, accelerator))
        rejected = gather_object(
            score_seqs(rm, [r for _, r in mine], args.per_device_eval_batch_size, pad, accelerator)
        )
    final.update(
        {
            "eval/reference_reward_mean": offset,
            "eval/reward_offset": offset,
            "eval/chosen_reward_mean": float(np.mean(chosen)) - offset,
            "eval/rejected_reward_mean": float(np.mean(rejected)) - offset,
        }
    )
    logger.log(final, update)
    state_dict = accelerator.get_state_dict(model)  # every rank must call it (DeepSpeed gathers)
    if accelerator.is_main_process:
        rm.config.reward_offset = offset  # rewards are score(h) - reward_offset
        rm.save_pretrained(out, state_dict={k[3:]: v for k, v in state_dict.items() if k.startswith("rm.")})
        tokenizer.save_pretrained(out)
        if args.lm_coef > 0:  # the behaviour LM: the trained backbone + LM head, a standard causal-LM folder
            behavior = AutoModelForCausalLM.from_pretrained(
                args.policy_path, trust_remote_code=args.trust_remote_code, tie_word_embeddings=False
            )
            prefix = f"rm.{rm.base_model_prefix}."
            getattr(behavior, behavior.base_model_prefix).load_state_dict(
                {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
            )
            behavior.get_output_embeddings().weight.data.copy_(state_dict["lm_head.weight"])
            behavior.save_pretrained(out / "behavior_lm")
            tokenizer.save_pretrained(out / "behavior_lm")
        summary = {**final, "num_updates": update, "train_seconds": time.time() - start, "run_name": args.run_name}
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
        commit_dir(out, args.output_dir)
        print(f"saved {args.output_dir}: " + json.dumps(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # stops the trackers, destroys the process group
    if accelerator.num_processes > 1 and not accelerator.is_main_process and accelerator.device.type == "cpu":
        # all is written; a gloo worker of torch 2.13 can still abort in its C++ teardown at interpreter exit
        # ("terminate called without an active exception", exit -6, seen twice in CI runs): leave without it
        print(end="", flush=True)
        os._exit(0)
