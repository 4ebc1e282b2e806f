"""SignCert-PO inside TRL's `GRPOTrainer`: the re-weighting where most people train.

    python grpo_signcert_trl.py --quantile 0.5                  # the tiny world, as grpo_signcert.py trains it
    python grpo_signcert_trl.py --quantile 0                    # exactly TRL's own Dr.GRPO advantages
    accelerate launch grpo_signcert_trl.py --quantile 0.5       # several processes (GPUs; configs/cpu_2proc.yaml)

In your own code, as TRL is used (tested with trl==1.16.0, pinned in requirements.txt):

    trainer = SignCertGRPOTrainer(model="runs/tiny_world/sft", reward_model="runs/tiny_world/rm",
                                  args=SignCertGRPOConfig(output_dir="runs/trl", quantile=0.3,
                                                          loss_type="dr_grpo", scale_rewards="none"),
                                  train_dataset=dataset, processing_class=tokenizer)   # dataset: a "prompt" column
    trainer.train()

What the subclass changes, and nothing else (TRL 1.16.0 has no hook for advantages, so it overrides private methods,
each calling super() first; `tests/test_trl.py` fails when their signatures change):
- `_generate`: keeps this process's prompt token ids, so that the reward model scores TOKEN IDS: prompt ids +
  completion ids with the EOS that TRL keeps (TRL's own reward-model path re-tokenises decoded text, with the EOS
  dropped; our reward models are trained and read at the EOS).
- the reward: `proxy_reward`, a callable reward function that runs ONE forward of the reward model
  (`reward_and_features`) and keeps the features h of that same forward; a completion without EOS gets
  `missing_eos_penalty` instead of the RM's score (TRL has no such penalty) and is not certified.
- `_calculate_rewards`: keeps TRL's gathered rewards (all processes).
- `_generate_and_score_completions`: after TRL's own, the advantages are replaced by `signcert_advantages` over the
  GLOBAL batch (rewards, features and EOS flags gathered, so a group that straddles two processes and the eps
  quantile are those of the whole batch), divided by the same positive scale as TRL's (`scale_rewards`: the group's
  or the batch's reward std + 1e-4, or 1 for "none"); then sliced back to this process as TRL slices them.
  quantile = 0 returns TRL's advantages untouched. It logs `signcert/eps`, `signcert/frac_reweighted`,
  `signcert/frac_rho_nonpositive`, `completion/no_eos_rate`, `reward/proxy` and `time/generation`, `time/scoring`
  into TRL's metrics (so to its loggers).
- `_get_per_token_logps_and_entropies` and `_compute_loss`: keep the log-probs of the loss's own forward, for
  `policy/kl` (per completion, the sum of log pi - log pi_ref over its tokens, as grpo_signcert.py logs it: the
  frontier's KL axis; TRL's own `kl` is the per-token k3 of the loss).
Why the scale keeps the certificate: a positive scale does not change a sign, so the radius of A_j / s is the radius
of A_j, exactly (docs/METHOD.md section 3.7). Any `loss_type` works: the advantages are what TRL reads.
"""

import inspect
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate.utils import broadcast_object_list, gather_object
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

TESTED_TRL = "1.16.0"  # the version whose private methods this file overrides (tests/test_trl.py guards them)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (TRL's `report_to="wandb"`)"""
    wandb_project_name: str = "signcert-po"
    """the wandb's project name"""

    # Algorithm specific arguments
    # -- models and data (the defaults are grpo_signcert.py's: the tiny world)
    policy_path: str = "runs/tiny_world/sft"
    """the SFT policy to optimise (a causal LM folder); also the reference policy of the KL"""
    reward_model_path: str = "runs/tiny_world/rm"
    """the proxy reward model: a *ForSequenceClassification with a linear `score` head, the policy's tokenizer"""
    dataset: str = "runs/tiny_world/data"
    """prompts: a hub id or a local folder/file (jsonl, parquet, save_to_disk); TL;DR or AlpacaFarm columns"""
    dataset_config: Optional[str] = None
    """the hub dataset's config name"""
    dataset_split: str = "train"
    """the split whose prompts are trained on"""
    max_prompt_length: int = 128
    """prompts longer than this are cut in the POST/input, as grpo_signcert.py cuts them"""

    # -- SignCert-PO (eq. 8-11)
    quantile: float = 0.3
    """q in [0, 1]: eps is the q-quantile of the radii over the global batch; 0 is exactly TRL's advantages"""
    eps_mode: Literal["delta", "inv_delta"] = "delta"
    """`delta`: quantile of the radii; `inv_delta`: of 1/radius (the paper's literal Algorithm 1)"""
    clip: bool = False
    """clip rho at 0 (ablation)"""
    missing_eos_penalty: Optional[float] = -1.0
    """the reward of a completion with no EOS instead of the RM's (None: score it as is); not certified"""

    # -- TRL's loss and the optimiser (grpo_signcert.py's values)
    loss_type: str = "dr_grpo"
    """TRL's loss_type (dr_grpo: the token sum over completions x max_new_tokens, as grpo_signcert.py)"""
    scale_rewards: Literal["none", "group", "batch"] = "none"
    """TRL's advantage scale (none: Dr.GRPO; group / batch: divided by that reward std + 1e-4)"""
    kl_coef: float = 0.01
    """beta, the weight of the k3 KL to the reference policy"""
    learning_rate: float = 2e-4
    """the learning rate, constant"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""

    # -- rollouts, batch sizes, steps
    num_generations: int = 8
    """K, completions per prompt"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    max_new_tokens: int = 24
    """the maximum completion length, also the constant of the Dr.GRPO normaliser"""
    total_steps: int = 300
    """the number of optimiser steps"""
    num_prompts_per_step: int = 16
    """prompts per optimiser step, over all processes"""
    micro_batch_size: int = 32
    """completions per forward/backward on one device (TRL's per_device_train_batch_size)"""

    # -- held-out gold evaluation, as grpo_signcert.py's (`eval/{split}/...` in metrics.jsonl)
    gold_rm_path: Optional[str] = "runs/tiny_world/gold_rm"
    """the gold reward model (monitoring only); None to skip the held-out evaluation"""
    eval_every: int = 10
    """held-out gold evaluation at step 0, every this many steps and at the last; 0: off"""
    eval_splits: tuple[str, ...] = ("validation", "test")
    """the dataset splits evaluated"""
    eval_num_prompts: int = 128
    """the FIRST this many prompts of each split"""
    eval_temperature: float = 0.01
    """sampling temperature of the evaluation, one completion per prompt"""
    generation_batch_size: int = 128
    """completions sampled at once in the evaluation"""
    generation_backend: Literal["hf"] = "hf"
    """the evaluation's sampler (transformers' `generate`)"""
    gold_batch_size: int = 64
    """sequences per gold forward"""
    gold_max_length: int = 256
    """gold input tokens, as in gen_prefs.py and eval_gold.py"""

    # -- outputs
    output_dir: Optional[str] = None
    """where everything goes (default: runs/{exp_name}__{seed}__{time}); TRL's checkpoints go there too"""
    save_every: int = 50
    """a TRL checkpoint every this many steps"""
    resume: bool = False
    """continue from the last TRL checkpoint in --output-dir (none yet: start the run again)"""
    overwrite: bool = False
    """delete what --output-dir holds and start again (without it, or --resume, a used folder is refused)"""


@dataclass
class SignCertGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig with SignCert-PO's fields (every TRL field keeps its meaning and default)."""

    quantile: float = field(
        default=0.3,
        metadata={"help": "q in [0, 1]: eps is the q-quantile of the radii over the global batch; 0: TRL's own"},
    )
    eps_mode: str = field(default="delta", metadata={"help": "`delta` (quantile of the radii) or `inv_delta`"})
    clip: bool = field(default=False, metadata={"help": "clip rho = 1 - eps / radius at 0 (ablation)"})
    missing_eos_penalty: Optional[float] = field(
        default=-1.0, metadata={"help": "the reward of a completion without EOS (None: the RM's score); not certified"}
    )

    def __post_init__(self):
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(
                f"SignCertGRPOConfig.quantile must lie in [0, 1] (0: TRL's own advantages), got {self.quantile}"
            )
        if self.eps_mode not in ("delta", "inv_delta"):
            raise ValueError(f"SignCertGRPOConfig.eps_mode must be 'delta' or 'inv_delta', got {self.eps_mode!r}")
        super().__post_init__()


def keep_steps_upto(path, step):
    """Drop the rows of a jsonl log written after `step` (a resumed run writes them again)."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


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


# ------------------------------------------------------------------------- data (as in the stage scripts)
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


# ------------------------------------------------------------------------- models
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


@torch.no_grad()
def heldout_eval(policy, tokenizer, rm, gold, gold_tok, heldout, reference_gold, args, accelerator):
    """The gold reward of the CURRENT policy on fixed held-out prompts, scored as eval_gold.py scores it.

    heldout: {split: (prompts, references)}, the prompts built by `build_prompts`, the same at every call.
    For each split the prompts are split over the processes; each gets ONE completion sampled at
    `args.eval_temperature` by the rollouts' sampler (`sample` or `sample_static`; `sample` under vllm, in chunks of
    `generation_batch_size`), cut after its first EOS and decoded as eval_gold.py decodes it; the gold RM scores
    it (`gold_rewards`) and the proxy `rm` too (`reward_and_features` on the policy's token ids, as the rollouts);
    a completion without EOS gets `args.missing_eos_penalty` for both. A win is gold(policy) > gold(reference),
    strictly. reference_gold caches {split: this process's references' gold scores}: computed at the first call.
    The sampling draws from the generator seeded with seed + rank, afresh for each split (as eval_gold.py seeds
    it), inside `fork_rng`: the training RNG stream is left as it was, so the evaluation does not change the run.
    Returns {"eval/{split}/gold_reward", "eval/{split}/win_rate", "eval/{split}/proxy_reward",
    "eval/{split}/length", "eval/{split}/no_eos_rate"}, over all the split's prompts, on every process."""
    device = accelerator.device
    model, pad_id = accelerator.unwrap_model(policy), tokenizer.pad_token_id
    sampler = sample if args.generation_backend in ("hf", "vllm") else sample_static
    at_eval = replace(args, temperature=args.eval_temperature)
    metrics = {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        for split, (prompts, references) in heldout.items():
            torch.manual_seed(args.seed + accelerator.process_index)
            with accelerator.split_between_processes(list(range(len(prompts)))) as mine:
                mine = list(mine)
            if split not in reference_gold:  # the references do not change: score them once
                refs = [references[i] for i in mine]
                local_prompts = [prompts[i] for i in mine]
                reference_gold[split] = (
                    gold_rewards(gold, gold_tok, local_prompts, refs, args, device).cpu() if mine else torch.zeros(0)
                )
            records = []
            for start in range(0, len(mine), args.generation_batch_size):
                chunk = [prompts[i] for i in mine[start : start + args.generation_batch_size]]
                enc = tokenizer(
                    [as_query(tokenizer, p) for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                generated = sampler(model, enc.input_ids, enc.attention_mask, at_eval, pad_id)
                response, response_mask, has_eos = truncate_after_eos(generated, end_ids(model), pad_id)
                texts = tokenizer.batch_decode(  # as eval_gold.py: the tokens up to the EOS, special ones dropped
                    [r[: int(m.sum())] for r, m in zip(response, response_mask)], skip_special_tokens=True
                )
                gold_score = gold_rewards(gold, gold_tok, chunk, texts, args, device)
                proxy = reward_and_features(
                    rm,
                    torch.cat([enc.input_ids, response], 1),
                    torch.cat([enc.attention_mask, response_mask], 1),
                )[0]
                if args.missing_eos_penalty is not None:  # as eval_gold.py: gold and proxy alike
                    gold_score = torch.where(has_eos, gold_score, args.missing_eos_penalty)
                    proxy = torch.where(has_eos, proxy, args.missing_eos_penalty)
                records += zip(
                    gold_score.tolist(),
                    reference_gold[split][start : start + len(chunk)].tolist(),
                    proxy.tolist(),
                    response_mask.sum(1).tolist(),
                    has_eos.tolist(),
                )
            records = gather_object(records)  # every prompt of the split, from every process
            g, ref, proxy, length, ended = (np.array(column, dtype=np.float64) for column in zip(*records))
            metrics |= {
                f"eval/{split}/gold_reward": float(g.mean()),
                f"eval/{split}/win_rate": float((g > ref).mean()),  # strict, as eval_gold.py
                f"eval/{split}/proxy_reward": float(proxy.mean()),
                f"eval/{split}/length": float(length.mean()),
                f"eval/{split}/no_eos_rate": float(1 - ended.mean()),
            }
    return metrics


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


def end_ids(policy) -> list:
    """The ids `generate` stops at: the EOS of `policy.generation_config`, one id or a list of them (`load_policies`
    sets them to `completion_end_ids`)."""
    eos = policy.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def sample_static(policy, query, query_mask, args, pad_id, _compiled={}):
    """What `sample` returns, from a sampling loop of our own over the model's forward with a static KV cache:
    the logits of every step are softmax-sampled at `args.temperature` (no top-k, no top-p), a finished row
    gets `pad_id` after its EOS (the EOS of `policy.generation_config`, as `generate`), and the loop stops
    when every row has finished. The cache and the inputs of a decoding step keep one shape for the whole
    loop (the prompt is left-padded to a multiple of 64), so with `args.generation_backend == "compiled"` the
    step is replayed as a CUDA graph instead of launching hundreds of small kernels per token: the overhead
    that bounds `generate`."""
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampling, got {args.temperature}")
    from transformers import StaticCache

    eos = torch.tensor(end_ids(policy), device=query.device)
    extra = -query.shape[1] % 64  # fixed shapes per 64-token bucket: few recompilations under `compiled`
    query, query_mask = F.pad(query, (extra, 0), value=pad_id), F.pad(query_mask, (extra, 0), value=0)
    (n, width), T = query.shape, args.max_new_tokens
    step, cache = policy.forward, None
    if args.generation_backend == "compiled":  # one compiled step and one cache per policy, reused: the graph reads
        # the cache and the weights (updated in place by the optimiser) at fixed addresses
        held = _compiled.setdefault(id(policy), {})
        if "step" not in held:
            held["step"] = torch.compile(policy.forward, mode="reduce-overhead", fullgraph=True)
        if held.get("shape") != (n, width + T):
            held["shape"], held["cache"] = (n, width + T), StaticCache(config=policy.config, max_cache_len=width + T)
        step, cache = held["step"], held["cache"]
        cache.reset()
    cache = cache or StaticCache(config=policy.config, max_cache_len=width + T)
    # transformers renamed `past_key_values` to `cache` in 5.x; pass the name this model's forward takes
    name = "cache" if "cache" in inspect.signature(type(policy).forward).parameters else "past_key_values"
    mask = torch.cat([query_mask, query_mask.new_ones(n, T)], 1)  # one shape; causality hides the future columns
    logits = policy(
        input_ids=query,
        attention_mask=mask[:, :width],
        position_ids=position_ids_of(query_mask),
        use_cache=True,
        logits_to_keep=1,
        **{name: cache},
    ).logits
    out = query.new_full((n, T), pad_id)
    unfinished = torch.ones(n, dtype=torch.bool, device=query.device)
    position = query_mask.sum(1, keepdim=True)  # the position of the first new token (left padding skipped)
    for t in range(T):
        probs = torch.softmax(logits[:, -1].to(torch.float32, copy=True) / args.temperature, -1)
        token = torch.multinomial(probs, 1).squeeze(1).masked_fill(~unfinished, pad_id)
        out[:, t] = token
        unfinished &= ~torch.isin(token, eos)
        if t == T - 1 or not unfinished.any():
            break
        logits = step(
            input_ids=token.unsqueeze(1),
            attention_mask=mask,
            position_ids=position + t,
            use_cache=True,
            **{name: cache},
        ).logits
    return out


# ------------------------------------------------------------------------- the trainer
class SignCertGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with SignCert-PO's advantages (the module docstring says what is overridden and why).

    reward_model: a path or a `*ForSequenceClassification` module with a linear `score` head of one output, that
    reads the policy's token ids (trained from the policy's SFT). It is the only reward: SignCert-PO certifies the
    signs of ITS advantages, so `reward_funcs` is refused. Everything else is GRPOTrainer's."""

    def __init__(self, model, reward_model, args: Optional[SignCertGRPOConfig] = None, **kwargs):
        args = args if args is not None else SignCertGRPOConfig(output_dir="runs/signcert_trl")
        if not isinstance(args, SignCertGRPOConfig):
            raise TypeError(
                f"args must be a SignCertGRPOConfig (TRL's GRPOConfig with the SignCert fields), got {type(args).__name__}"
            )
        for name in ("reward_funcs", "tools", "environment_factory", "rollout_func"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"SignCertGRPOTrainer does not take {name}: the reward is the reward model's, scored on the "
                    "generated token ids (pass it as reward_model); multi-turn rollouts are not supported"
                )
        if args.reward_weights not in (None, [1.0]):
            raise ValueError(
                f"reward_weights must be None: the reward model is the only reward, got {args.reward_weights}"
            )
        if args.beta > 0 and not isinstance(model, str) and not os.path.isdir(model.config._name_or_path or ""):
            raise ValueError(
                "with beta > 0 TRL rebuilds the reference model from the policy's config._name_or_path "
                f"({model.config._name_or_path!r}), which is not a folder: save the policy and pass its folder"
            )
        if isinstance(reward_model, str):
            require_path(reward_model, "reward_model")
            reward_model = load_reward_model(reward_model, False, None, "reward_model")
        head = getattr(reward_model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise ValueError(
                "reward_model needs a linear head `score` with one output (a *ForSequenceClassification with "
                f"num_labels=1), whose input is the features SignCert-PO certifies; got {head!r}"
            )
        self.rm = reward_model.eval().requires_grad_(False)
        self._prompt_ids, self._features, self._has_eos = [], None, None
        super().__init__(model=model, reward_funcs=[self.proxy_reward], args=args, **kwargs)
        self.rm.to(self.accelerator.device)

    def _generate(self, prompts):
        t0 = time.perf_counter()
        out = super()._generate(prompts)
        self._prompt_ids = out[0]  # this process's prompt token ids, in the order of the completions
        self._generation_time = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def proxy_reward(self, prompts, completions, completion_ids, **kwargs):
        """TRL's reward function: the RM's reward of prompt ids + completion ids (with TRL's EOS), right-padded, read
        at the last real token by ONE forward that also gives the features; the missing-EOS penalty."""
        seqs = [list(p) + list(c) for p, c in zip(self._prompt_ids, completion_ids, strict=True)]
        width, pad, device = max(map(len, seqs)), self.processing_class.pad_token_id, self.accelerator.device
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        reward, self._features = reward_and_features(self.rm, ids, mask)
        self._has_eos = torch.tensor(
            [len(c) > 0 and c[-1] in self.eos_token_ids for c in completion_ids], device=device
        )
        if self.args.missing_eos_penalty is not None:
            reward = torch.where(self._has_eos, reward, self.args.missing_eos_penalty)
        return reward.tolist()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered
        return self._rewards

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )
        self._logps = out[0]  # the last call inside _compute_loss is the policy's own forward of the micro-batch
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.beta != 0.0:  # KL(pi || pi_ref) of the rollouts, per completion, as grpo_signcert.py logs `policy/kl`
            log_ratio = (self._logps.detach() - inputs["ref_per_token_logps"]) * inputs["completion_mask"]
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["policy/kl"].append(self.accelerator.gather(log_ratio.sum(1)).mean().item())
        return loss

    def _generate_and_score_completions(self, inputs):
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        # the phases as grpo_signcert.py times them (scoring: the reward model's and the reference's forwards)
        self._metrics[mode]["time/generation"].append(self._generation_time)
        self._metrics[mode]["time/scoring"].append(time.perf_counter() - t0 - self._generation_time)
        k = self.num_generations if mode == "train" else self.num_generations_eval
        # the global batch, in TRL's order (consecutive groups of k; a group may straddle two processes)
        rewards = self._rewards[:, 0].view(-1, k)
        features = self.accelerator.gather(self._features).view(*rewards.shape, -1)
        has_eos = self.accelerator.gather(self._has_eos).view(rewards.shape)
        certified = has_eos if self.args.missing_eos_penalty is not None else torch.ones_like(has_eos)
        q = self.args.quantile
        adv, radius, eps = signcert_advantages(rewards, features, q, self.args.eps_mode, self.args.clip, certified)
        dr_grpo = rewards - rewards.mean(dim=1, keepdim=True)
        if q > 0:  # q = 0: TRL's advantages as TRL computed them
            if self.scale_rewards == "group":  # the same positive scale as TRL's: it keeps every sign and radius
                adv = adv / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)
            elif self.scale_rewards == "batch":
                adv = adv / (nanstd(rewards) + 1e-4)
            adv = adv.flatten()
            n = out["advantages"].shape[0]
            out["advantages"] = adv[self.accelerator.process_index * n : (self.accelerator.process_index + 1) * n]
            # the completions table shows the advantages trained on: its deque holds one generation batch, so these
            # push out the ones TRL just put there
            self._logs["advantages"].extend(adv.tolist())
        finite = torch.isfinite(radius) & (radius > 0)
        metrics = self._metrics[mode]
        metrics["signcert/eps"].append(eps.item())
        metrics["signcert/frac_reweighted"].append(
            (adv.view(rewards.shape) != dr_grpo).float().mean().item() if q > 0 else 0.0
        )
        metrics["signcert/frac_rho_nonpositive"].append(
            ((1 - eps / radius[finite]) <= 0).float().mean().item() if finite.any() else 0.0
        )
        metrics["completion/no_eos_rate"].append(1.0 - has_eos.float().mean().item())
        metrics["reward/proxy"].append(rewards.mean().item())
        return out


class HeldoutGoldEval(TrainerCallback):
    """grpo_signcert.py's held-out gold evaluation (`heldout_eval`) at step 0, every --eval-every steps and at the
    last, and TRL's logs of every step, into {output_dir}/metrics.jsonl (the file grpo_signcert.py writes)."""

    def __init__(self, trainer, gold, gold_tok, heldout, args):
        self.trainer, self.gold, self.gold_tok, self.heldout, self.args = trainer, gold, gold_tok, heldout, args
        self.reference_gold, self.path = {}, os.path.join(args.output_dir, "metrics.jsonl")
        self.step_start, self.step_time = None, None

    def write(self, row):
        if self.trainer.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate(self, step):
        t, model = time.time(), self.trainer.model
        was_training = model.training
        model.eval()
        m = heldout_eval(
            model, self.trainer.processing_class, self.trainer.rm, self.gold, self.gold_tok, self.heldout,
            self.reference_gold, self.args, self.trainer.accelerator,
        )  # fmt: skip
        model.train(was_training)
        self.write({"step": step, **m, "time/eval": time.time() - t})

    def on_train_begin(self, args, state, control, **kwargs):
        if self.heldout and state.global_step == 0:
            self.evaluate(0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The subclass's metrics under grpo_signcert.py's names (so pipeline.py reads both alike), TRL's under trl/;
        the step's wall time, optimiser step included, and its update share (the step less generation and scoring)."""
        ours = lambda k: k.startswith(("signcert/", "policy/", "reward/", "completion/no_eos_rate", "time/"))
        row = {k if ours(k) else f"trl/{k}": v for k, v in (logs or {}).items()}
        if self.step_time is not None and "time/generation" in row:
            row["time/step"] = self.step_time
            row["time/update"] = self.step_time - row["time/generation"] - row["time/scoring"]
            self.step_time = None
        self.write({"step": state.global_step, **row})

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_time = time.perf_counter() - self.step_start  # before the held-out evaluation, as grpo_signcert.py
        step = state.global_step
        if self.heldout and (step % self.args.eval_every == 0 or step == state.max_steps):
            self.evaluate(step)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not 0.0 <= args.quantile <= 1.0:
        raise ValueError(f"--quantile must lie in [0, 1] (0 is TRL's own Dr.GRPO advantages), got {args.quantile}")
    if args.num_generations < 2:
        raise ValueError(
            f"--num-generations must be >= 2: the group baseline needs at least two completions per prompt (paper: 8), "
            f"got {args.num_generations}"
        )
    for name in ("policy_path", "reward_model_path", "gold_rm_path"):
        require_path(getattr(args, name), f"--{name.replace('_', '-')}")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    num_processes = state.num_processes
    local_prompts = exact_div(args.num_prompts_per_step, num_processes, "--num-prompts-per-step over the processes")
    accumulation = exact_div(
        local_prompts * args.num_generations,
        args.micro_batch_size,
        "completions per process (--num-prompts-per-step x --num-generations / processes) over --micro-batch-size",
    )
    rows, where = load_split(args.dataset, args.dataset_split, args.dataset_config)
    check_reward_config(args.reward_model_path, False, "--reward-model-path")
    tokenizer = AutoTokenizer.from_pretrained(args.policy_path, padding_side="left")
    check_same_tokenizer(tokenizer, args.reward_model_path, False)
    heldout = {}
    if args.eval_every > 0 and args.gold_rm_path:
        for split in dict.fromkeys(args.eval_splits):
            split_rows, split_where = load_split(args.dataset, split, args.dataset_config)
            split_rows = split_rows[: args.eval_num_prompts]
            fmt = detect_format(split_rows, split_where)
            heldout[split] = (
                build_prompts(split_rows, tokenizer, args.max_prompt_length, split_where),
                [to_prompt_response(r, fmt, tokenizer, args.max_prompt_length)[1] for r in split_rows],
            )
    import datasets

    train = datasets.Dataset.from_dict(
        {"prompt": [as_query(tokenizer, p) for p in build_prompts(rows, tokenizer, args.max_prompt_length, where)]}
    )
    if args.resume and args.overwrite:
        raise ValueError("--resume continues a run and --overwrite deletes it: pass one of them")
    default_dir = os.path.join("runs", f"{args.exp_name}__{args.seed}__{int(time.time())}")
    args.output_dir = args.output_dir or broadcast_object_list([default_dir])[0]  # one name on every process
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    ckpt = get_last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    if os.path.exists(metrics_path) and not (args.resume or args.overwrite):
        raise SystemExit(
            f"{args.output_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
            "or another --output-dir"
        )
    if state.is_main_process:
        if ckpt:  # the rows after the checkpoint are written again by the resumed run
            keep_steps_upto(metrics_path, int(ckpt.rsplit("-", 1)[1]))
        elif os.path.isdir(args.output_dir) and (args.resume or args.overwrite):  # nothing to resume: start again
            shutil.rmtree(args.output_dir)
    state.wait_for_everyone()
    config = SignCertGRPOConfig(
        output_dir=args.output_dir,
        quantile=args.quantile,
        eps_mode=args.eps_mode,
        clip=args.clip,
        missing_eos_penalty=args.missing_eos_penalty,
        loss_type=args.loss_type,
        scale_rewards=args.scale_rewards,
        beta=args.kl_coef,
        use_bias_correction_kl=False,  # the plain k3 KL of grpo_signcert.py's loss
        epsilon=0.2,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        num_generations=args.num_generations,
        temperature=args.temperature,
        top_k=0,
        max_completion_length=args.max_new_tokens,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,  # one generation per optimiser step, as grpo_signcert.py
        max_steps=args.total_steps,
        logging_steps=1,
        save_steps=args.save_every,
        save_strategy="steps",
        seed=args.seed,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        report_to="wandb" if args.track else "none",
        run_name=os.path.basename(args.output_dir),
    )
    if args.track:
        os.environ.setdefault("WANDB_PROJECT", args.wandb_project_name)
    trainer = SignCertGRPOTrainer(
        model=args.policy_path,
        reward_model=args.reward_model_path,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
    )
    # the held-out evaluation's sampler (`generate`) stops where TRL's rollouts stop: at `completion_end_ids`
    trainer.model.generation_config.eos_token_id = completion_end_ids(tokenizer, trainer.model.generation_config)
    if trainer.accelerator.is_main_process:
        print(
            f"[{args.exp_name}] trl {TESTED_TRL} (tested), {num_processes} process(es) x {local_prompts} prompts x "
            f"{args.num_generations} completions, {accumulation} micro-batches of {args.micro_batch_size}; "
            f"loss_type={args.loss_type}, scale_rewards={args.scale_rewards}, q={args.quantile}"
        )
        print(json.dumps(asdict(args), indent=1))
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=1)
    gold, gold_tok = None, None  # without held-out prompts the callback still writes TRL's logs to metrics.jsonl
    if heldout:
        gold = load_reward_model(args.gold_rm_path, False, None, "--gold-rm-path").to(trainer.accelerator.device)
        gold_tok = AutoTokenizer.from_pretrained(args.gold_rm_path, padding_side="right")
    trainer.add_callback(HeldoutGoldEval(trainer, gold, gold_tok, heldout, args))
    trainer.train(resume_from_checkpoint=ckpt)
    trainer.save_model(os.path.join(args.output_dir, "model"))
