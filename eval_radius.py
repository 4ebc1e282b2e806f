"""Radius validation (the paper's Figure 4, appendix F.5): is a small certified radius a sign that the
advantage's sign is fragile?

For K completions of each held-out prompt (temperature 0.7), ONE forward of the proxy RM gives the reward r_j
and the features h_j (the input of its linear `score` head); then, within each prompt's group,

    A_j     = r_j - mean_k r_k                  eq. (4)   the Dr.GRPO advantage
    Delta_j = |A_j| / ||h_j - hbar||            eq. (8)   the certified radius (`signcert_advantages`, quantile 0:
                                                          the trainer's own definition, copied verbatim)

The completions are binned into deciles of Delta (equal counts), and per bin we measure how often sign(A_j)
survives
    (a) parameter noise: every parameter tensor p of the proxy RM (the head included) gets Gaussian noise of std
        `--param-noise` x ||p||_F / sqrt(numel p), the rewards and the group advantages are recomputed;
        `--num-draws` draws, each a fresh copy of the noise;
    (b) embedding noise: Gaussian noise of std `--embedding-noise` added to the RM's input embeddings (a forward
        hook on its input embedding layer), `--num-draws` draws;
    (c) the gold RM: the sign of the gold advantage (the gold rewards of the same group, centred the same way).
and the Spearman correlation (ranks, ties averaged) of Delta with each completion's survival rate ((a), (b):
the fraction of draws; (c): 0/1). A certified radius that means something gives rates that rise with Delta.

What is left out, and counted in radius.json (`counts`):
  - a completion without EOS within `--max-new-tokens`: the trainer gives it a fixed penalty, not an RM score,
    so it has no radius; it is dropped, and its group's mean is over the completions WITH an EOS;
  - a group with fewer than 2 completions with an EOS (no advantage), or whose rewards spread (max - min) less
    than `--min-spread` (1e-4: every sign is noise);
  - a completion whose radius is 0 (A_j = 0: no sign) or infinite (h_j = hbar: no feature moves it); it still
    counts in its group's mean.
The proxy reads prompt ids + response ids (EOS included) in the policy's tokenizer, exactly as the trainer feeds
it; the gold reads the decoded text in its own tokenizer (`gold_rewards`, as the trainer and eval_gold.py).

Paper setting (appendix F.5, `--preset paper`): the Pythia-1B SFT policy and proxy RM on TL;DR, 500 test prompts x
8 completions at temperature 0.7, sigma 0.1 (parameters, per tensor) and 0.01 (embeddings), 10 draws each (the number
of draws is ours: the paper does not give it); gold Skywork-Reward-Llama-3.1-8B-v0.2. The tiny preset keeps all of
it but 200 prompts and 5 draws (2 to 2.5 minutes on 2 busy CPU cores).

Run it (one process; CUDA when there is one, else the CPU):
    python eval_radius.py                                           # runs/tiny_world/sft with runs/tiny_world/rm
    python eval_radius.py --policy-path runs/<rl run>/model
    python eval_radius.py --preset paper --policy-path runs/paper/sft --reward-model-path runs/paper/rm
Writes to `--output-dir` (default runs/eval_radius/<the policy's folder name>, the run folder name for
`runs/<run>/model`): radius.json (settings, counts, the per-decile table, the Spearman values), radius.png (the
Figure 4 plot: survival rate per radius decile) and samples.jsonl (one line per completion: text, status,
rewards, advantages, radius, decile, survival rates).
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (sampling, and the noise draws)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    track: bool = False
    """if toggled, the Spearman values, the table and the figure are logged to Weights and Biases"""
    wandb_project_name: str = "signcert-po"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    preset: Literal["tiny", "paper"] = "tiny"
    """`tiny`: the offline tiny world on a CPU; `paper`: Pythia-1B on TL;DR as in the paper. Explicit flags override
    the preset"""

    # Algorithm specific arguments
    # -- models and data
    policy_path: str = "runs/tiny_world/sft"
    """the policy whose completions are analysed (paper: the Pythia-1B SFT)"""
    reward_model_path: str = "runs/tiny_world/rm"
    """the proxy RM (train_rm.py): a *ForSequenceClassification with a linear `score` head, one output, with the
    policy's tokenizer"""
    gold_rm_path: str = "runs/tiny_world/gold_rm"
    """the gold RM (paper: Skywork-Reward-Llama-3.1-8B-v0.2)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dataset: str = "runs/tiny_world/data"
    """hub id or local path of the prompts (TL;DR or AlpacaFarm format)"""
    dataset_config: Optional[str] = None
    """hub dataset config (e.g. `alpaca_instructions` for tatsu-lab/alpaca_farm)"""
    split: str = "test"
    """held-out split whose first --num-prompts prompts are used (paper: the TL;DR test split)"""
    num_prompts: int = 200
    """prompts (groups) analysed (paper: 500; tiny: 200, to stay within about 3 minutes on 2 CPU cores)"""
    max_prompt_length: int = 128
    """prompts longer than this (tokens) are cut in the POST/input (paper: 512)"""

    # -- sampling
    num_generations: int = 8
    """K, completions per prompt: one group (paper: 8)"""
    temperature: float = 0.7
    """sampling temperature (paper: 0.7)"""
    max_new_tokens: int = 24
    """completion length budget; a completion without EOS within it is dropped (paper: 53)"""
    generation_batch_size: int = 512
    """completions generated at once"""

    # -- the perturbations
    param_noise: float = 0.1
    """(a) std of the noise on every RM parameter tensor p, relative to its RMS ||p||_F / sqrt(numel p) (paper: 0.1)"""
    embedding_noise: float = 0.01
    """(b) std of the noise added to the RM's input embeddings (paper: 0.01)"""
    num_draws: int = 5
    """noise draws for (a) and for (b) each (paper preset: 10, our choice, the paper does not say; tiny: 5)"""
    num_bins: int = 10
    """bins of equal counts along Delta (paper: 10, deciles)"""
    min_spread: float = 1e-4
    """groups whose proxy rewards spread (max - min) less than this are dropped"""

    # -- scoring
    score_batch_size: int = 512
    """sequences per proxy-RM forward"""
    gold_batch_size: int = 64
    """sequences per gold forward"""
    gold_max_length: int = 256
    """gold input tokens (longer inputs lose their beginning), as in the trainer and eval_gold.py (paper: 1024)"""
    bf16: bool = False
    """hold the policy and the reward models in bf16 (GPU; else float32); the reward head is applied in float32"""
    output_dir: Optional[str] = None
    """where radius.json, radius.png and samples.jsonl go (atomically); default runs/eval_radius/<policy folder name>"""
    mark: Optional[str] = None
    """a regular expression: per radius decile, the share of completions whose text matches it, beside the survival
    rates (e.g. `thanks.*thanks`: where the outlier world's hack sits among the radii)"""


PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        policy_path="runs/paper/sft",
        reward_model_path="runs/paper/rm",
        gold_rm_path="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        num_prompts=500,
        max_prompt_length=512,
        max_new_tokens=53,
        num_draws=10,
        generation_batch_size=256,
        score_batch_size=64,
        gold_batch_size=16,
        gold_max_length=1024,
        bf16=True,
    ),
}


def parse_args() -> Args:
    # `--preset` picks the defaults; every other flag still overrides them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=PRESETS)
    return tyro.cli(Args, default=PRESETS[pre.parse_known_args()[0].preset])


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


# ---------------------------------------------------------------- the certified radius (grpo_signcert.py)
@torch.no_grad()  # eq. (11): A, Delta and rho are constants of the policy update (stop-gradient)
def signcert_advantages(
    rewards, features, quantile, eps_mode="delta", clip=False, certified=None, gather=lambda t: t, other=None
):
    """SignCert-PO advantages for B prompts with K completions each. Self-contained: copy it into any trainer.

    What the caller supplies:
    rewards:   (B, K) proxy rewards r_j = w^T h_j + b, and
    features:  (B, K, d) the h_j of THE SAME forward: the input of the RM's linear head (`reward_and_features`).
    quantile:  q in [0, 1]; eps is the q-quantile of the radii (q = 0: eps = 0, the advantage unchanged: Dr.GRPO's,
               or `other`'s A).
    eps_mode:  "delta" (default): quantile of {Delta_j}; "inv_delta": of {1 / Delta_j} (the paper's Algorithm 1;
               docs/METHOD.md section 3.1).
    clip:      clip rho_j at 0 (ablation); the paper is unclipped: Delta_j < eps reverses the sign of A_j.
    certified: (B, K) bool, False where r_j is NOT the RM's score but a fixed value the RM did not give (the
               missing-EOS penalty). Such a reward does not move with the head, so it is not the RM's to certify:
               the completion keeps its Dr.GRPO advantage and stays out of the eps pool, and it enters the group
               mean of the features as h = 0, which keeps the other completions' radii exact. None: all True.
    gather:    maps this process's (B, K) radii to the global batch's (e.g. accelerator.gather), so every
               process uses the same eps; the identity on one process.
    other:     None (the paper's method), or (A, s), each (B, K): another advantage and its sensitivity
               s_j = ||dA_j / dtheta|| under another uncertainty model (App. C.2 and E, `other_advantages`), used
               instead of eq. (4) and ||h_j - hbar||; the radius is then |A_j| / s_j and the rest is the same.
    Returns (advantages (B, K), radius (B, K), eps (0-d)), float32 (float64 for float64 inputs), no gradient.
    Only radii 0 < Delta_j < inf (a sign to certify, features that move it) enter the quantile.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2 or features.shape[:2] != rewards.shape or features.ndim != 3:
        raise ValueError(
            f"need rewards (B, K >= 2) and features (B, K, d), got {list(rewards.shape)}, {list(features.shape)}"
        )
    if not 0.0 <= quantile <= 1.0 or eps_mode not in ("delta", "inv_delta"):
        raise ValueError(f"need 0 <= quantile <= 1 and eps_mode 'delta' or 'inv_delta', got {quantile}, {eps_mode!r}")
    if not (rewards.isfinite().all() and features.isfinite().all()):
        raise ValueError("rewards and features must be finite: found NaN or inf (check the reward model's outputs)")
    dtype = torch.promote_types(rewards.dtype, torch.float32)  # bf16 RM outputs: compute in float32
    rewards = rewards.to(dtype)
    certified = torch.ones_like(rewards, dtype=torch.bool) if certified is None else certified.bool()
    h = features.to(dtype) * certified.unsqueeze(-1)  # a fixed reward does not move with the head: h = 0
    adv = rewards - rewards.mean(dim=1, keepdim=True)  # eq. (4)
    if dtype == torch.float64:  # equal rewards: A = 0 exactly (0.1 thrice: mean 1.4e-17 off, a radius dragging eps)
        adv = torch.where(
            (rewards == rewards[:, :1]).all(1, keepdim=True), 0.0, adv
        )  # float32: as recorded (METHOD 3.3)
    dev = (h - h.mean(dim=1, keepdim=True)).norm(dim=-1) * certified  # ||h_j - hbar|| = ||dA_j / dw||, 0 if fixed
    if other is not None:  # another advantage (App. E) or uncertainty model (App. C.2): its A_j and ||dA_j / dtheta||
        adv, dev = other[0].to(dtype), other[1].to(dtype) * certified
    radius = torch.where(dev > 0, adv.abs() / dev, torch.full_like(adv, math.inf))  # eq. (8)
    pool = gather(radius).flatten()  # eps from the global batch
    pool = pool[torch.isfinite(pool) & (pool > 0)]
    pool = pool if eps_mode == "delta" else 1.0 / pool
    eps = torch.quantile(pool, quantile) if quantile > 0 and pool.numel() > 0 else adv.new_zeros(())
    shrunk = adv.abs() - eps * dev  # |A_j| rho_j
    if clip:
        shrunk = shrunk.clamp(min=0.0)
    return adv.sign() * shrunk, radius, eps  # eq. (10)-(11)


# ---------------------------------------------------------------- data (as in the stage scripts)
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


def build_prompts(rows, tokenizer, max_prompt_length, where):
    """Prompt strings, exactly as the stage scripts build them (to_prompt_response: the post, the input or
    the instruction is cut to fit --max-prompt-length)."""
    fmt = detect_format(rows, where)
    return [to_prompt_response(r, fmt, tokenizer, max_prompt_length)[0] for r in rows]


# ---------------------------------------------------------------- models, sampling and scoring (as in the trainer)
def check_reward_config(path: str, trust_remote_code: bool, flag: str) -> None:
    """Refuse a checkpoint that is not a one-output sequence classifier BEFORE loading its weights:
    transformers would silently put a random `score` head on a causal LM."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise ValueError(
            f"{flag} {path} is not a reward model: its architectures are {archs} with num_labels={config.num_labels}; "
            "a reward model is a *ForSequenceClassification checkpoint with num_labels=1, a linear head `score` "
            "with one output (e.g. the output of train_rm.py or runs/tiny_world/gold_rm)"
        )


def load_reward_model(path: str, trust_remote_code: bool, dtype, flag: str):
    """A reward model whose last layer is a linear `score` head with one output, in eval mode and frozen."""
    check_reward_config(path, trust_remote_code, flag)
    rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    head = getattr(rm, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(
            f"{flag} {path}: a reward model here needs its last layer to be a linear head `score` with one "
            f"output (a *ForSequenceClassification with num_labels=1), got {head!r}"
        )
    return rm.eval().requires_grad_(False)


def check_same_tokenizer(policy_tok, rm_path, trust_remote_code):
    """Refuse a proxy RM whose tokenizer is not the policy's: the RM is fed the policy's token ids as they
    are, so another tokenizer (other ids for the same text, another EOS) would score meaningless inputs.
    Compares the ids of a probe text (unicode, digits, the EOS) and the EOS id; cheap, before any model loads."""
    fix = (
        "train the proxy RM from the policy's SFT with train_rm.py (--policy-path <the SFT folder the policy starts "
        "from>), which saves the SFT tokenizer with it"
    )
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if os.path.isdir(rm_path) and not any(os.path.exists(os.path.join(rm_path, f)) for f in tokenizer_files):
        raise ValueError(
            f"--reward-model-path {rm_path} has no tokenizer, so nothing shows that it reads the policy's token "
            f"ids (the trainer feeds it the policy's ids): {fix}; or, if it was trained on exactly the tokenizer "
            f"of {policy_tok.name_or_path}, save that tokenizer into {rm_path} (tokenizer.save_pretrained)"
        )
    rm_tok = AutoTokenizer.from_pretrained(rm_path, trust_remote_code=trust_remote_code)
    probe = (
        "SUBREDDIT: r/relationships\n\nTITLE: Café bill: 3 crêpes for €12.50?\n\nPOST: On 2024-03-07 we paid "
        "1,234 ¥ in 東京, naïve me 🙂. Don't ask!\n\nTL;DR: we overpaid" + (policy_tok.eos_token or "")
    )
    mine = policy_tok(probe, add_special_tokens=False).input_ids
    theirs = rm_tok(probe, add_special_tokens=False).input_ids
    if mine != theirs or policy_tok.eos_token_id != rm_tok.eos_token_id:
        at = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise ValueError(
            f"the proxy RM {rm_path} has another tokenizer than the policy {policy_tok.name_or_path}: a probe "
            f"text gives ids {mine[at : at + 5]} (policy) vs {theirs[at : at + 5]} (RM) from token {at} on, EOS id "
            f"{policy_tok.eos_token_id} vs {rm_tok.eos_token_id}; the RM would score token ids it does not read "
            f"as the policy meant them: {fix}"
        )


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


def truncate_after_eos(response, eos_ids, pad_id):
    """Keep each completion up to and including its first EOS, any id of `eos_ids` (one id or a list: see
    `completion_end_ids`); the tokens after it become `pad_id`. Returns (response, mask (1 on the kept tokens),
    has_eos (N,) bool)."""
    is_eos = torch.isin(response, torch.as_tensor(eos_ids, dtype=response.dtype, device=response.device))
    has_eos = is_eos.any(1)
    first = torch.where(has_eos, is_eos.int().argmax(1), response.shape[1])
    mask = torch.arange(response.shape[1], device=response.device).unsqueeze(0) <= first.unsqueeze(1)
    return response.masked_fill(~mask, pad_id), mask.long(), has_eos


def completion_end_ids(tokenizer, generation_config) -> list:
    """The ids a completion ends at, in every stage (as TRL's GRPOTrainer and vLLM end it): the tokenizer's EOS and
    every EOS id of the model's generation config, where a chat model lists its end-of-turn token (Qwen2.5-Instruct:
    <|im_end|> and <|endoftext|>). Sampling stops at any of them and `truncate_after_eos` cuts at the first."""
    eos = generation_config.eos_token_id
    return sorted({tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])} - {None})


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


@torch.no_grad()
def gold_rewards(gold, gold_tok, prompts, responses, args, device):
    """The gold RM's score of each (prompt, response text), built exactly as gen_prefs.py and eval_gold.py
    build it (`rm_input_ids`: the chat format if the gold's tokenizer has a chat template), right-padded."""
    out = []
    for i in range(0, len(prompts), args.gold_batch_size):
        seqs = [
            rm_input_ids(gold_tok, p, r, args.gold_max_length, bool(gold_tok.chat_template))
            for p, r in zip(prompts[i : i + args.gold_batch_size], responses[i : i + args.gold_batch_size])
        ]
        width = max(map(len, seqs))
        ids = torch.tensor([x + [gold_tok.pad_token_id] * (width - len(x)) for x in seqs], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=device)
        out.append(reward_and_features(gold, ids, mask)[0])
    return torch.cat(out)


def in_chunks(fn, size, *tensors):
    """fn over slices of `size` rows, outputs concatenated (bounds the memory of no-grad forwards)."""
    outs = [fn(*(t[i : i + size] for t in tensors)) for i in range(0, tensors[0].shape[0], size)]
    return tuple(torch.cat(o) for o in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


@torch.no_grad()
def sample(policy, query, query_mask, args, pad_id):
    """K completions of temperature `args.temperature` (pure sampling: no top-k, no top-p), padded to
    `max_new_tokens` (generate stops early when every row has finished)."""
    out = policy.generate(
        input_ids=query,
        attention_mask=query_mask,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=pad_id,
    )
    return F.pad(out[:, query.shape[1] :], (0, args.max_new_tokens - (out.shape[1] - query.shape[1])), value=pad_id)


# ---------------------------------------------------------------- outputs (as in eval_gold.py)
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


# ---------------------------------------------------------------- the radius analysis
def check_inputs(args: Args) -> tuple[list[dict], str]:
    """Every check that needs no model, before any is loaded: the numbers, the paths, the reward models' configs,
    the split's size. Returns the first --num-prompts rows of --split and where they came from."""
    if args.num_generations < 2:
        raise ValueError(
            f"--num-generations must be >= 2 (an advantage needs a group; paper: 8), got {args.num_generations}"
        )
    if args.num_prompts < 1 or args.num_draws < 1 or args.num_bins < 2:
        raise ValueError(
            f"need --num-prompts >= 1, --num-draws >= 1 and --num-bins >= 2, got {args.num_prompts}, "
            f"{args.num_draws}, {args.num_bins}"
        )
    if args.mark is not None:
        try:
            re.compile(args.mark)
        except re.error as e:
            raise ValueError(f"--mark {args.mark!r} is not a regular expression ({e})") from None
    if args.param_noise < 0 or args.embedding_noise < 0 or args.min_spread < 0 or args.temperature <= 0:
        raise ValueError(
            f"need --param-noise, --embedding-noise, --min-spread >= 0 and --temperature > 0, got {args.param_noise}, "
            f"{args.embedding_noise}, {args.min_spread}, {args.temperature}"
        )
    for flag in ("policy_path", "reward_model_path", "gold_rm_path"):
        require_path(getattr(args, flag), f"--{flag.replace('_', '-')}")
    check_reward_config(args.reward_model_path, args.trust_remote_code, "--reward-model-path")
    check_reward_config(args.gold_rm_path, args.trust_remote_code, "--gold-rm-path")
    rows, where = load_split(args.dataset, args.split, args.dataset_config)
    if args.num_prompts > len(rows):
        raise ValueError(
            f"--num-prompts {args.num_prompts} is more than the {len(rows)} prompts of {where}: pass "
            f"--num-prompts {len(rows)} or fewer, or another --split"
        )
    return rows[: args.num_prompts], where


def group_centred(values, group):
    """values[i] minus the mean of its group group[i] (ids 0..G-1): the Dr.GRPO advantage, eq. (4), of completions
    listed flat, groups of any size. In the dtype of `values`."""
    sums = values.new_zeros(int(group.max()) + 1).index_add_(0, group, values)
    counts = torch.bincount(group, minlength=sums.numel()).to(values.dtype)
    return values - (sums / counts)[group]


@torch.no_grad()
def perturb_parameters(model, scale: float, generator) -> None:
    """In place: every parameter tensor p (each once, the head included) gets Gaussian noise of std
    scale * ||p||_F / sqrt(numel p), i.e. `scale` times the tensor's RMS entry (a tensor of zeros gets none)."""
    for p in model.parameters():
        std = scale * p.float().norm() / math.sqrt(p.numel())
        p.add_((torch.randn(p.shape, generator=generator, device=p.device) * std).to(p.dtype))


@contextlib.contextmanager
def embedding_noise(model, std: float, generator):
    """Inside the block, every forward of `model` adds Gaussian noise of std `std` to its input embeddings (the
    output of its input embedding layer, padding included: attention masks it)."""

    def add_noise(module, inputs, output):
        noise = torch.randn(output.shape, generator=generator, device=output.device) * std
        return output + noise.to(output.dtype)

    handle = model.get_input_embeddings().register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def sign_survival(rm, score, group, advantages, num_draws: int, param_noise: float, emb_noise: float, generator):
    """Per completion, the fraction of `num_draws` noisy copies of `rm` under which sign(A_j) stays: each draw
    perturbs every parameter (perturb_parameters, `param_noise`) AND adds `emb_noise` to the input embeddings,
    recomputes the rewards `score(rm)` (flat, like `advantages`) and their group advantages. The parameters are
    restored after each draw (and a zero noise is applied as such: the same forward gives the same rewards)."""
    originals = [p.detach().clone() for p in rm.parameters()]
    survived = torch.zeros_like(advantages)
    for _ in tqdm(range(num_draws), desc=f"noise (param {param_noise:g}, embedding {emb_noise:g})"):
        perturb_parameters(rm, param_noise, generator)
        with embedding_noise(rm, emb_noise, generator):
            rewards = score(rm)
        for p, p0 in zip(rm.parameters(), originals):
            p.copy_(p0)
        survived += (torch.sign(group_centred(rewards.to(advantages.dtype), group)) == torch.sign(advantages)).to(
            survived.dtype
        )
    return survived / num_draws


def decile_bins(values, num_bins: int) -> np.ndarray:
    """The bin (0..num_bins-1) of every value: sorted ascending (ties in order of position) and cut into num_bins
    runs of equal count (counts differ by at most 1). Needs len(values) >= num_bins."""
    values = np.asarray(values, dtype=float)
    if len(values) < num_bins:
        raise ValueError(f"{len(values)} values cannot fill {num_bins} bins")
    bins = np.empty(len(values), dtype=int)
    bins[np.argsort(values, kind="stable")] = np.arange(len(values)) * num_bins // len(values)
    return bins


def average_ranks(values) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (as scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(np.asarray(values, dtype=float), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.ravel()]


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties averaged): the Pearson correlation of the ranks; nan when x or y is
    constant (every completion survived, say: no ordering to correlate with)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


SURVIVAL = {"param": "(a) parameter noise", "embedding": "(b) embedding noise", "gold": "(c) gold sign agreement"}
LABELS = SURVIVAL | {"marked": "share matching --mark"}


def radius_table(radius, survival: dict, num_bins: int) -> tuple[list[dict], dict]:
    """The Figure 4 numbers: per bin of equal counts along the radius, its count, min/mean/max radius and mean of
    each per-completion survival rate in `survival` (name -> array like radius); and the Spearman correlation
    of the radius with each of them."""
    radius = np.asarray(radius, dtype=float)
    bins = decile_bins(radius, num_bins)
    table = []
    for b in range(num_bins):
        sel = bins == b
        row = {"bin": b + 1, "count": int(sel.sum())}
        row.update(radius_mean=float(radius[sel].mean()), radius_min=float(radius[sel].min()))
        row["radius_max"] = float(radius[sel].max())
        row.update({name: float(np.asarray(rate, dtype=float)[sel].mean()) for name, rate in survival.items()})
        table.append(row)
    return table, {name: spearman(radius, rate) for name, rate in survival.items()}


def plot_radius(table: list[dict], rho: dict, path: Path, title: str) -> None:
    """Figure 4: survival rate per radius decile, one line per kind of perturbation, chance (0.5) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [row["bin"] for row in table]
    for (name, label), marker in zip(LABELS.items(), "osDx"):
        if name in rho:
            ax.plot(x, [row[name] for row in table], marker=marker, label=f"{label} (Spearman {rho[name]:+.2f})")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{row['bin']}\n{row['radius_mean']:.2g}" for row in table], fontsize=8)
    ax.set_xlabel("radius decile (mean Delta below)")
    ax.set_ylabel("advantage-sign survival rate")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def finite_or_none(x):
    """JSON has no nan or inf: write null."""
    return x if isinstance(x, (int, str, bool)) or x is None or math.isfinite(x) else None


if __name__ == "__main__":
    args = parse_args()
    rows, where = check_inputs(args)  # a bad number, path, model or split fails here, before any model loads
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.output_dir is None:
        folder = Path(args.policy_path.rstrip("/"))
        args.output_dir = str(
            Path("runs/eval_radius") / (folder.parent.name if folder.name == "model" else folder.name)
        )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    trust = dict(trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path, padding_side="left", **trust)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # only if it has none (pad is masked anyway)
    pad_id = tokenizer.pad_token_id
    check_same_tokenizer(tokenizer, args.reward_model_path, args.trust_remote_code)  # it reads the policy's ids
    prompts = build_prompts(rows, tokenizer, args.max_prompt_length, where)
    K = args.num_generations
    print(
        f"[{args.exp_name}] {len(prompts)} prompts of {where} x {K} completions on {device}; writing to {args.output_dir}"
    )
    for k, v in asdict(args).items():
        print(f"  {k}: {v}")
    timing = {}

    # 1. K completions per prompt, cut after the first EOS (as the trainer)
    t0 = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(args.policy_path, dtype=dtype, **trust).to(device).eval()
    policy.generation_config.pad_token_id = pad_id
    policy.generation_config.eos_token_id = completion_end_ids(tokenizer, policy.generation_config)  # as the trainer
    enc = tokenizer(
        [as_query(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    ).to(device)
    query, query_mask = enc.input_ids.repeat_interleave(K, 0), enc.attention_mask.repeat_interleave(K, 0)
    chunks = range(0, query.shape[0], args.generation_batch_size)
    generated = torch.cat(
        [
            sample(
                policy,
                query[i : i + args.generation_batch_size],
                query_mask[i : i + args.generation_batch_size],
                args,
                pad_id,
            )
            for i in tqdm(chunks, desc="generate")
        ]
    )
    response, response_mask, has_eos = truncate_after_eos(generated, policy.generation_config.eos_token_id, pad_id)
    del policy
    texts = tokenizer.batch_decode([r[: int(m.sum()) - int(e)] for r, m, e in zip(response, response_mask, has_eos)])
    timing["generation"] = time.perf_counter() - t0

    # 2. proxy reward and features of the completions with an EOS (one forward), the groups, the radii
    t0 = time.perf_counter()
    rm = load_reward_model(args.reward_model_path, args.trust_remote_code, dtype, "--reward-model-path").to(device)

    def scorer(index):
        """A function: model -> (rewards, features) of the completions `index` under `model`, batched as in the trainer."""
        parts = (query[index], query_mask[index], response[index], response_mask[index])
        read = lambda model, q, qm, r, m: reward_and_features(model, torch.cat([q, r], 1), torch.cat([qm, m], 1))
        return lambda model: in_chunks(lambda *t: read(model, *t), args.score_batch_size, *parts)

    ended = has_eos.nonzero().squeeze(1)
    reward, features = torch.full((len(texts),), math.nan, device=device), None
    if len(ended):
        reward[ended], ended_features = scorer(ended)(rm)
        features = torch.zeros(len(texts), ended_features.shape[1], device=device)
        features[ended] = ended_features
    status = ["no_eos" if not e else "analysed" for e in has_eos.tolist()]
    radius = torch.full((len(texts),), math.nan, dtype=torch.float64)
    members, member_group = [], []  # the completions of the kept groups, and their group (0..G-1)
    for g in range(len(prompts)):
        mine = [i for i in range(g * K, (g + 1) * K) if has_eos[i]]
        r = reward[mine]
        if len(mine) < 2 or (r.max() - r.min()).item() < args.min_spread:
            for i in mine:
                status[i] = "group_too_few_eos" if len(mine) < 2 else "group_flat"
            continue
        _, delta, _ = signcert_advantages(r[None], features[mine][None], 0.0)  # eq. (8), the trainer's definition
        radius[mine] = delta[0].double().cpu()
        for i in mine:
            if not (0 < radius[i] < math.inf):
                status[i] = "radius_zero_or_infinite"
        member_group += [member_group[-1] + 1 if member_group else 0] * len(mine)
        members += mine
    members_t, group = torch.tensor(members, dtype=torch.long), torch.tensor(member_group, dtype=torch.long)
    analysed = torch.tensor([status[i] == "analysed" for i in members], dtype=torch.bool)
    counts = {
        "prompts": len(prompts),
        "completions": len(texts),
        "no_eos": status.count("no_eos"),
        "groups_too_few_eos": sum(sum(has_eos[g * K : (g + 1) * K].tolist()) < 2 for g in range(len(prompts))),
        "groups_flat": len({i // K for i, s in enumerate(status) if s == "group_flat"}),
        "groups_analysed": member_group[-1] + 1 if member_group else 0,
        "radius_zero_or_infinite": status.count("radius_zero_or_infinite"),
        "analysed": int(analysed.sum()),
    }
    if counts["analysed"] < args.num_bins:
        raise ValueError(
            f"only {counts['analysed']} completions have a radius ({json.dumps(counts)}), fewer than the "
            f"{args.num_bins} bins: raise --num-prompts or --max-new-tokens (completions need an EOS), or lower --num-bins"
        )
    score = lambda model, read=scorer(members_t.to(device)): read(model)[0]  # rewards only
    advantages = group_centred(reward[members_t].double(), group.to(device))  # eq. (4), as signcert_advantages
    timing["proxy"] = time.perf_counter() - t0

    # 3. survival of sign(A): (a) parameter noise, (b) embedding noise, each num_draws fresh draws
    t0 = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    group_d = group.to(device)
    survival = {
        "param": sign_survival(rm, score, group_d, advantages, args.num_draws, args.param_noise, 0.0, generator),
        "embedding": sign_survival(
            rm, score, group_d, advantages, args.num_draws, 0.0, args.embedding_noise, generator
        ),
    }
    del rm
    timing["noise"] = time.perf_counter() - t0

    # (c) the gold's advantage sign, the gold rewards of the same groups centred the same way
    t0 = time.perf_counter()
    gold = load_reward_model(args.gold_rm_path, args.trust_remote_code, dtype, "--gold-rm-path").to(device)
    gold_tok = AutoTokenizer.from_pretrained(args.gold_rm_path, padding_side="right", **trust)
    gold_tok.pad_token = gold_tok.pad_token or gold_tok.eos_token
    member_prompts = [prompts[i // K] for i in members]
    gold_reward = torch.cat(
        [
            gold_rewards(
                gold,
                gold_tok,
                member_prompts[i : i + 8 * args.gold_batch_size],
                [texts[j] for j in members[i : i + 8 * args.gold_batch_size]],
                args,
                device,
            )
            for i in tqdm(range(0, len(members), 8 * args.gold_batch_size), desc="gold")
        ]
    )
    gold_advantages = group_centred(gold_reward.double(), group_d)
    survival["gold"] = (torch.sign(gold_advantages) == torch.sign(advantages)).double()
    del gold
    timing["gold"] = time.perf_counter() - t0

    # 4. the table, the Spearman values, the files
    keep = analysed.to(device)
    rates = {name: s[keep].cpu().numpy() for name, s in survival.items()}
    marked = [re.search(args.mark, text) is not None for text in texts] if args.mark else None
    if args.mark:
        rates["marked"] = np.array([marked[i] for i in members_t[analysed].tolist()], dtype=float)
    table, rho = radius_table(radius[members_t[analysed]].numpy(), rates, args.num_bins)
    bins = decile_bins(radius[members_t[analysed]].numpy(), args.num_bins)
    per_member = {
        i: dict(
            proxy_advantage=advantages[n].item(),
            gold=gold_reward[n].item(),
            gold_advantage=gold_advantages[n].item(),
            **{f"survival_{name}": s[n].item() for name, s in survival.items()},
        )
        for n, i in enumerate(members)
    }
    decile = dict(zip(members_t[analysed].tolist(), (bins + 1).tolist()))
    out = staging_dir(args.output_dir, run_name)
    with open(out / "samples.jsonl", "w") as f:
        for i, text in enumerate(texts):
            line = dict(
                group=i // K,
                prompt=prompts[i // K],
                response=text,
                has_eos=bool(has_eos[i]),
                length=int(response_mask[i].sum()),
                status=status[i],
                proxy=finite_or_none(reward[i].item()),
                radius=finite_or_none(radius[i].item()),
                decile=decile.get(i),
                **({"marked": marked[i]} if args.mark else {}),
                **per_member.get(i, dict.fromkeys(next(iter(per_member.values())))),  # null where not computed
            )
            f.write(json.dumps(line) + "\n")
    result = {
        "policy_path": args.policy_path,
        "reward_model_path": args.reward_model_path,
        "gold_rm_path": args.gold_rm_path,
        "counts": counts,
        "spearman": {name: finite_or_none(v) for name, v in rho.items()},
        "overall": {name: float(r.mean()) for name, r in rates.items()},
        "table": table,
        "timing_seconds": timing,
        "device": str(device),
        "run_name": run_name,
        "args": asdict(args),
    }
    (out / "radius.json").write_text(json.dumps(result, indent=1))
    title = f"{args.policy_path}, proxy {args.reward_model_path}: {counts['analysed']} completions"
    plot_radius(table, rho, out / "radius.png", title)
    commit_dir(out, args.output_dir)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, config=asdict(args))
        wandb.log({f"radius/spearman_{name}": v for name, v in rho.items()})
        wandb.log({"radius/table": wandb.Table(columns=list(table[0]), data=[list(r.values()) for r in table])})
        wandb.log({"radius/figure": wandb.Image(str(Path(args.output_dir) / "radius.png"))})
        wandb.finish()

    print(f"\n{counts['analysed']} completions analysed; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(
        f"{'decile':>6} {'count':>6} {'Delta mean':>11} {'min':>9} {'max':>9}  {'(a) param':>9} {'(b) embed':>9} {'(c) gold':>9}"
        + (f" {'marked':>9}" if args.mark else "")
    )
    for row in table:
        print(
            f"{row['bin']:>6} {row['count']:>6} {row['radius_mean']:>11.4g} {row['radius_min']:>9.3g} "
            f"{row['radius_max']:>9.3g}  {row['param']:>9.3f} {row['embedding']:>9.3f} {row['gold']:>9.3f}"
            + (f" {row['marked']:>9.3f}" if args.mark else "")
        )
    print("Spearman(Delta, survival): " + ", ".join(f"{LABELS[k]} {v:+.3f}" for k, v in rho.items()))
    print(f"wrote {args.output_dir}/radius.json, radius.png, samples.jsonl in {sum(timing.values()):.0f}s")
