"""Stage 1 of the gold-model pipeline: supervised fine-tuning on reference responses.

Fine-tunes a causal LM on `prompt -> reference response + EOS` with the cross-entropy loss on the
response tokens only (prompt tokens are masked with -100). AdamW, cosine schedule with linear warmup.
The result (model + tokenizer, safetensors) is written atomically to `--output-dir`: it is the
policy the RL stage starts from and the backbone of the proxy reward model (`train_rm.py`).

Paper setting (SignCert-PO, appendix F.4): Pythia-1B on TL;DR
(`vwxyzjn/summarize_from_feedback_tldr_3_filtered`), lr 3e-6, cosine, 1 epoch, per-device batch 16,
bf16, 8 GPUs. The SFT warmup is not given in the paper: we use none at paper scale (our choice).
Tiny preset (our choice): the tiny world's policy is trained from scratch, so lr 1e-2, warmup 0.05,
6 epochs, per-device batch 64 (about 2 minutes on 2 idle CPU cores; validation loss 6.9 -> 0.95). With 2
epochs (the earlier default) the SFT policy copied too little of the post and won 2% against the references;
with 6 it wins about 22% (the paper's Pythia-1B SFT: 15.7%), leaving room both to improve and to be hacked.

Data: `--dataset` is a hub id or a local path (a folder with `{split}.jsonl`/`{split}.parquet`, a
single .jsonl/.parquet file, or a `datasets.save_to_disk` folder), in the TL;DR format (columns
subreddit, title, post, summary) or the AlpacaFarm format (instruction, input, output), detected
from the columns. Over-long TL;DR prompts are shortened by cutting the POST at a whitespace boundary.
Reference responses longer than `--max-response-length` tokens are cut and still end with EOS.

Run it:
    python sft.py                                          # tiny world (python tiny_world.py first)
    accelerate launch --config_file configs/cpu_2proc.yaml sft.py
    accelerate launch --config_file configs/deepspeed_zero2.yaml sft.py --preset paper
Logged metrics (`{output_dir}/metrics.jsonl`, wandb with `--track`): losses/sft_loss (mean over the
response tokens of the last `--logging-steps` updates), charts/learning_rate, charts/epoch,
eval/loss (validation response-token loss, at the end of every epoch).
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
import tyro
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (model init, data order)"""
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
    model_name_or_path: str = "runs/tiny_world/base_policy"
    """the pretrained causal LM to fine-tune (hub id or local folder)"""
    tokenizer_name_or_path: Optional[str] = None
    """the tokenizer (default: the model's)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dataset: str = "runs/tiny_world/data"
    """hub id or local path of the SFT data (TL;DR or AlpacaFarm format)"""
    dataset_config: Optional[str] = None
    """hub dataset config (e.g. `alpaca_instructions` for tatsu-lab/alpaca_farm)"""
    train_split: str = "train"
    """the split to train on (AlpacaFarm: `sft`)"""
    eval_split: str = "validation"
    """the split for the validation loss and the printed samples (AlpacaFarm: `val`)"""
    max_train_samples: Optional[int] = None
    """use only the first N training examples (default: all)"""
    max_eval_samples: int = 256
    """validation examples for eval/loss"""
    output_dir: str = "runs/tiny_world/sft"
    """where the fine-tuned model + tokenizer are written (atomically), with metrics.jsonl and eval.json"""
    max_prompt_length: int = 128
    """prompts longer than this (tokens) are shortened (TL;DR: the POST is cut at a whitespace)"""
    max_response_length: int = 32
    """reference responses are cut to this many tokens, EOS included"""
    num_train_epochs: int = 6
    """passes over the training data (paper: 1; the tiny world's random-init model needs 6 to copy the post's
    key nouns: gold win rate vs the references about 22% with 6 epochs, 2% with 2)"""
    learning_rate: float = 1e-2
    """peak learning rate of AdamW"""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name (cosine, linear, constant, constant_with_warmup, ...)"""
    warmup_ratio: float = 0.05
    """fraction of the updates spent in linear warmup"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (<= 0: off)"""
    per_device_train_batch_size: int = 64
    """examples per device per forward pass"""
    gradient_accumulation_steps: int = 1
    """forward passes per update (ignored when --total-batch-size is given)"""
    total_batch_size: Optional[int] = None
    """examples per update over all devices; sets gradient_accumulation_steps (must be a multiple of per_device_train_batch_size * num_processes)"""
    per_device_eval_batch_size: int = 64
    """examples per device per forward pass in evaluation"""
    bf16: bool = False
    """bf16 mixed precision (autocast; GPU; the paper: on)"""
    gradient_checkpointing: bool = False
    """trade compute for memory"""
    logging_steps: int = 10
    """log the training loss every N updates"""
    num_sample_prompts: int = 2
    """greedy samples printed at the end, on validation prompts"""

    # to be filled in runtime
    num_processes: Annotated[int, tyro.conf.Suppress] = 0
    """number of processes"""
    batch_size: Annotated[int, tyro.conf.Suppress] = 0
    """examples per update, all processes: per_device_train_batch_size * num_processes * gradient_accumulation_steps"""
    num_updates: Annotated[int, tyro.conf.Suppress] = 0
    """optimiser updates in the whole run"""
    run_name: Annotated[str, tyro.conf.Suppress] = ""
    """f"{exp_name}__{seed}__{time}", the same on every process"""


PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        model_name_or_path="EleutherAI/pythia-1b",
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        output_dir="runs/paper/sft",
        max_prompt_length=512,
        max_response_length=53,
        num_train_epochs=1,
        learning_rate=3e-6,
        warmup_ratio=0.0,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        bf16=True,
        max_eval_samples=1024,
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


def own_output_dir(args: Args) -> str:
    """--output-dir; but data other than the tiny world's, with --output-dir left at the tiny world's folder,
    gets a run folder of its own (runs/{run_name}): your data never overwrites the tiny world's models."""
    tiny = PRESETS["tiny"]
    if args.output_dir == tiny.output_dir and os.path.normpath(args.dataset) != os.path.normpath(tiny.dataset):
        return os.path.join("runs", args.run_name)
    return args.output_dir


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


def tokenize_sft(rows: list[dict], fmt: str, tokenizer, args: Args) -> list[dict]:
    """input_ids = prompt + response + EOS; labels = -100 on the prompt (loss on the response only)."""
    out = []
    for row in rows:
        prompt, response = to_prompt_response(row, fmt, tokenizer, args.max_prompt_length)
        query = as_query(tokenizer, prompt)  # in the chat template where the tokenizer has one
        p = tokenizer(query, add_special_tokens=False).input_ids
        r = tokenizer(response, add_special_tokens=False).input_ids[: args.max_response_length - 1] + [
            tokenizer.eos_token_id
        ]
        out.append({"input_ids": p + r, "labels": [-100] * len(p) + r, "prompt": prompt, "query": query})
    return out


def collate(batch: list[dict], pad_token_id: int) -> dict:
    # right padding: positions 0..n-1 are the real tokens, so the default position ids are right
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of response tokens) so that means over many batches are exact."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (labels != -100).sum()


# ---------------------------------------------------------------- tokenizer
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
    args.output_dir = own_output_dir(args)

    # same seed on every rank: identical initialisation, and accelerate shards one shared data order
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    # data and tokenizer (errors here are cheap: before any model is loaded)
    require_path(args.model_name_or_path, "--model-name-or-path")
    if args.tokenizer_name_or_path is not None:
        require_path(args.tokenizer_name_or_path, "--tokenizer-name-or-path")
    tokenizer = AutoTokenizer.from_pretrained(
        args.tokenizer_name_or_path or args.model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos_token: SFT teaches the policy to end with EOS; pick a tokenizer with one"
        )
    distinct_pad_token(tokenizer)  # saved with the policy: every later stage pads with it
    train_rows, train_where = load_split(args.dataset, args.train_split, args.dataset_config)
    eval_rows, eval_where = load_split(args.dataset, args.eval_split, args.dataset_config)
    train_rows, eval_rows = train_rows[: args.max_train_samples], eval_rows[: args.max_eval_samples]
    fmt = detect_format(train_rows, train_where)
    detect_format(eval_rows, eval_where)
    train_data = tokenize_sft(train_rows, fmt, tokenizer, args)
    eval_data = tokenize_sft(eval_rows, fmt, tokenizer, args)
    steps_per_epoch = math.ceil(
        math.ceil(len(train_data) / (args.per_device_train_batch_size * args.num_processes))
        / args.gradient_accumulation_steps
    )
    args.num_updates = steps_per_epoch * args.num_train_epochs
    if accelerator.is_main_process:
        print(f"{args.run_name}: {len(train_data)} train / {len(eval_data)} eval examples ({fmt} format)")
        for k, v in asdict(args).items():
            print(f"  {k}: {v}")

    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    warning = learning_rate_warning(model, args.learning_rate, PRESETS["tiny"].learning_rate)
    if warning and accelerator.is_main_process:
        print(warning)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a new [PAD] (Pythia has spare rows)
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    no_decay = [n for n, p in model.named_parameters() if p.ndim < 2]  # biases and norms: no weight decay
    optimizer = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in model.named_parameters() if n not in no_decay],
                "weight_decay": args.weight_decay,
            },
            {"params": [p for n, p in model.named_parameters() if n in no_decay], "weight_decay": 0.0},
        ],
        lr=args.learning_rate,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=int(args.warmup_ratio * args.num_updates),
        num_training_steps=args.num_updates,
    )
    pad = tokenizer.pad_token_id
    train_loader = torch.utils.data.DataLoader(
        train_data, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=lambda b: collate(b, pad)
    )
    eval_loader = torch.utils.data.DataLoader(
        eval_data, batch_size=args.per_device_eval_batch_size, collate_fn=lambda b: collate(b, pad)
    )
    model, optimizer, scheduler, train_loader, eval_loader = accelerator.prepare(
        model, optimizer, scheduler, train_loader, eval_loader
    )

    out = staging_dir(args.output_dir, args.run_name) if accelerator.is_main_process else None
    logger = MetricsLogger(out / "metrics.jsonl" if out else None, args, accelerator.is_main_process)

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=accelerator.device)
        with torch.no_grad():
            for batch in eval_loader:
                loss, n = response_loss(model, batch)
                total += torch.stack([loss.detach(), n.float()])
        model.train()
        total = accelerator.reduce(total, reduction="sum")  # exact token mean over all ranks
        return (total[0] / total[1]).item()

    update, window = 0, torch.zeros(2, device=accelerator.device)
    start = time.time()
    progress = tqdm(total=args.num_updates, desc="sft", disable=not accelerator.is_main_process)
    model.train()
    for epoch in range(args.num_train_epochs):
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss_sum, n_tokens = response_loss(model, batch)
                accelerator.backward(loss_sum / n_tokens.clamp(min=1))
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window += torch.stack([loss_sum.detach(), n_tokens.float()])
            if not accelerator.sync_gradients:
                continue
            update += 1
            progress.update(1)
            if update % args.logging_steps == 0 or update == args.num_updates:
                w = accelerator.reduce(window, reduction="sum")
                metrics = {
                    "losses/sft_loss": (w[0] / w[1]).item(),
                    "charts/learning_rate": scheduler.get_last_lr()[0],
                    "charts/epoch": update / steps_per_epoch,
                }
                progress.set_postfix(loss=f"{metrics['losses/sft_loss']:.3f}")
                logger.log(metrics, update)
                window.zero_()
        eval_loss = evaluate()
        logger.log({"eval/loss": eval_loss, "charts/epoch": epoch + 1}, update)
        if accelerator.is_main_process:
            print(f"epoch {epoch + 1}: eval/loss {eval_loss:.4f} ({time.time() - start:.0f}s)")
    progress.close()

    state_dict = accelerator.get_state_dict(model)  # every rank must call it (DeepSpeed gathers)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        # greedy samples: a quick look at what the policy learnt
        unwrapped.eval()
        tokenizer.padding_side = "left"
        for row in eval_data[: args.num_sample_prompts]:
            enc = tokenizer(row["query"], return_tensors="pt", add_special_tokens=False).to(accelerator.device)
            with torch.no_grad():
                gen = unwrapped.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=args.max_response_length,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            print(
                f"--- {row['prompt'][-200:]!r}\n>>> {tokenizer.decode(gen[0, enc.input_ids.shape[1] :], skip_special_tokens=True)!r}"
            )
        tokenizer.padding_side = "right"
        unwrapped.save_pretrained(out, state_dict=state_dict)
        tokenizer.save_pretrained(out)
        summary = {
            "eval/loss": eval_loss,
            "train_seconds": time.time() - start,
            "num_updates": update,
            "run_name": args.run_name,
        }
        (out / "eval.json").write_text(json.dumps(summary, indent=1))
        commit_dir(out, args.output_dir)
        print(f"saved {args.output_dir}: {json.dumps(summary)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # stops the trackers, destroys the process group
    if accelerator.num_processes > 1 and not accelerator.is_main_process and accelerator.device.type == "cpu":
        # all is written; a gloo worker of torch 2.13 can still abort in its C++ teardown at interpreter exit
        # ("terminate called without an active exception", exit -6, seen twice in CI runs): leave without it
        print(end="", flush=True)
        os._exit(0)
