"""Stage 5 of the gold-model pipeline: evaluate a policy with the gold reward model.

Generates one response per held-out prompt at low temperature (sampling at `--temperature 0.01`, the
summarize_from_feedback_details evaluation), scores the policy responses and the reference responses
with the gold RM (and with the proxy RM when `--reward-model-path` is given), and reports:

    eval/win_rate                 fraction of prompts with gold(policy) > gold(reference), strict
    eval/gold_reward_mean         mean gold score of the policy responses
    eval/reference_gold_reward_mean
    eval/proxy_reward_mean        mean proxy score of the policy responses (score(h) - reward_offset)
    eval/reference_proxy_reward_mean   (about 0 by construction of the offset)
    eval/eos_rate                 fraction of policy responses that end with EOS
    eval/response_length_mean     tokens per policy response (EOS included)

EOS handling as in gen_prefs.py: responses are cut after their first EOS; one with no EOS gets the
fixed score `--missing-eos-penalty` (gold and proxy) instead of its score, so it usually loses;
rewards are read at the last real token found from the attention mask (pad may equal eos). The gold has
its own tokenizer (decode, re-tokenise; chat format iff its tokenizer has a chat template); the proxy
reads prompt ids + response ids + EOS in its own tokenizer, as in train_rm.py.

Paper setting (section 4, appendix F.3.4): win rate of the policy against the TL;DR reference
summaries judged by Skywork-Reward-Llama-3.1-8B-v0.2; Pythia-1B policies, 53 new tokens. The number
of evaluation prompts is not in the paper: 1000 test prompts at paper scale (our choice).

Run it:
    python eval_gold.py                                    # evaluates runs/tiny_world/sft
    python eval_gold.py --policy-path runs/<rl run>/policy --reward-model-path runs/tiny_world/rm
    accelerate launch --config_file configs/cpu_2proc.yaml eval_gold.py
    python eval_gold.py --preset paper --policy-path runs/paper/sft --use-vllm
Writes to `--output-dir` (default runs/{run_name}/): samples.jsonl, one line per prompt
    {"id", "prompt", "response", "reference", "has_eos", "length", "gold_score", "reference_gold_score"
     [, "proxy_score", "reference_proxy_score"]}
(scores after the EOS penalty; proxy scores after the offset), eval.json (the metrics) and metrics.jsonl.
"""

import argparse
import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (sampling uses seed + process index)"""
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
    """the policy to evaluate (a causal LM folder or hub id)"""
    gold_rm_path: str = "runs/tiny_world/gold_rm"
    """the gold reward model: a *ForSequenceClassification checkpoint with one output, head `score`"""
    reward_model_path: Optional[str] = None
    """also score with this proxy RM (output of train_rm.py; its config.reward_offset is subtracted)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dataset: str = "runs/tiny_world/data"
    """hub id or local path of the prompts + reference responses (TL;DR or AlpacaFarm format)"""
    dataset_config: Optional[str] = None
    """hub dataset config (e.g. `alpaca_instructions` for tatsu-lab/alpaca_farm)"""
    split: str = "test"
    """held-out split (AlpacaFarm: `val`)"""
    num_prompts: int = 256
    """evaluate on the first N prompts of --split"""
    output_dir: Optional[str] = None
    """where samples.jsonl, eval.json and metrics.jsonl are written (atomically); default runs/{run_name}"""
    max_prompt_length: int = 128
    """prompts longer than this (tokens) are shortened (TL;DR: the POST is cut at a whitespace)"""
    temperature: float = 0.01
    """sampling temperature (0.01: near-greedy, the reference pipeline's evaluation)"""
    max_new_tokens: int = 24
    """response length budget; a response without EOS within it gets --missing-eos-penalty"""
    missing_eos_penalty: float = -1.0
    """score given (instead of the RM's) to a response with no EOS, gold and proxy alike"""
    generation_batch_size: int = 128
    """prompts per generate call per process"""
    gold_batch_size: int = 64
    """sequences per gold/proxy forward pass per process"""
    gold_max_length: int = 256
    """gold input tokens (longer inputs lose their beginning)"""
    proxy_max_length: int = 256
    """proxy input tokens, as train_rm.py's --max-length"""
    bf16: bool = False
    """hold the policy and the reward models in bf16 (GPU; else float32)"""
    use_vllm: bool = False
    """sample with vLLM (one process) instead of HF generate; run the script in vLLM's own environment
    (`bash tools/install_vllm.sh VENV`, then VENV/bin/python; requirements-vllm.txt, CPU or GPU)"""
    vllm_gpu_memory_utilization: float = 0.5
    """fraction of the GPU vLLM may take (the reward models are loaded next to it); on a CPU, of the machine's RAM for its
    KV cache (VLLM_CPU_KVCACHE_SPACE=N, in GiB, sets the size instead)"""

    # to be filled in runtime
    num_processes: Annotated[int, tyro.conf.Suppress] = 0
    """number of processes"""
    run_name: Annotated[str, tyro.conf.Suppress] = ""
    """f"{exp_name}__{seed}__{time}", the same on every process"""


PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        policy_path="runs/paper/sft",
        gold_rm_path="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        num_prompts=1000,
        max_prompt_length=512,
        max_new_tokens=53,
        generation_batch_size=256,
        gold_batch_size=16,
        gold_max_length=1024,
        proxy_max_length=512,
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


# ---------------------------------------------------------------- models
def load_tokenizer(path: str, trust_remote_code: bool):
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {path} has no eos_token: completions are cut at EOS, pick a tokenizer with one"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # Pythia convention; padding is always masked
    return tokenizer


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


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """A completion that never ended gets a fixed score (summarize_from_feedback_details' penalty_reward_value)."""
    return torch.where(has_eos.to(scores.device), scores, torch.full_like(scores, penalty))


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], n: int, args, accelerator) -> tuple[list[list[int]], list[bool]]:
    """n samples per prompt -> token ids cut after the first EOS (EOS kept), has_eos. An EOS is any id of
    `completion_end_ids`, as in the trainer."""
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    ends = completion_end_ids(tokenizer, model.generation_config)
    config = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=ends,
    )
    flat = [p for p in prompts for _ in range(n)]
    responses, has_eos = [], []
    bs = args.generation_batch_size
    for i in tqdm(range(0, len(flat), bs), desc="generate", disable=not accelerator.is_main_process):
        enc = tokenizer(
            [as_query(tokenizer, p) for p in flat[i : i + bs]],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        ).to(accelerator.device)
        out = model.generate(**enc, generation_config=config)[:, enc.input_ids.shape[1] :]
        out, mask, eos = truncate_after_eos(out, ends, tokenizer.pad_token_id)
        responses += [row[:n] for row, n in zip(out.tolist(), mask.sum(1).tolist())]
        has_eos += eos.tolist()
    return responses, has_eos


def generation_config_of(path: str, trust_remote_code: bool) -> GenerationConfig:
    """The generation config that `from_pretrained` gives the model at `path` (its generation_config.json, else one
    made from its config), read without loading the weights."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def generate_vllm(path: str, tokenizer, prompts: list[str], n: int, args) -> tuple[list[list[int]], list[bool]]:
    """n samples per prompt with vLLM, drawn as generate_hf draws them: from the ids of as_query(prompt) (the chat
    template where there is one; no special tokens added), at the same temperature (top_k off, top_p 1.0) and length
    budget, stopped at the same ids (`completion_end_ids`: the tokenizer's EOS and the generation config's), cut after
    the first of them (kept). One engine seed and no per-request seed: vLLM gives every request with the same seed
    the same random stream (a prompt that occurs twice got the same completions twice), and its CPU build fails on
    a seeded request whose prefill is split ('CPU Generator does not use offset'). tests/test_vllm.py checks all of
    it against generate_hf."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(
            "--use-vllm needs vLLM, which is not installed here: it lives in a virtual environment of its own "
            "(`bash tools/install_vllm.sh VENV`, requirements-vllm.txt; CPU or GPU): run this script with "
            "VENV/bin/python, or drop --use-vllm"
        ) from e
    queries = [
        {"prompt_token_ids": tokenizer(as_query(tokenizer, p), add_special_tokens=False).input_ids} for p in prompts
    ]
    ends = completion_end_ids(tokenizer, generation_config_of(path, args.trust_remote_code))
    llm = LLM(
        model=path,
        seed=args.seed,
        dtype="bfloat16" if args.bf16 else "float32",
        trust_remote_code=args.trust_remote_code,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
    )
    params = SamplingParams(
        n=n,
        temperature=args.temperature,
        top_p=1.0,
        max_tokens=args.max_new_tokens,
        ignore_eos=True,  # vLLM's own EOS set (the tokenizer's and the generation config's) is replaced by ...
        stop_token_ids=ends,  # ... generate_hf's, the same ids spelt out
    )
    responses, has_eos = [], []
    for request in llm.generate(queries, params):
        for o in request.outputs:
            t, mask, e = truncate_after_eos(
                torch.tensor([list(o.token_ids)], dtype=torch.long), ends, tokenizer.pad_token_id
            )
            responses.append(t[0, : int(mask.sum())].tolist())
            has_eos.append(bool(e[0]))
    del llm
    return responses, has_eos


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


def score_texts(
    model,
    tokenizer,
    prompts: list[str],
    responses: list[str],
    chat: bool,
    batch_size: int,
    max_length: int,
    accelerator,
    desc: str,
):
    """Reward and feature of every (prompt, response), right-padded batches (see rm_input_ids for `chat`).
    On a CPU with cores to spare (torch on fewer threads than there are cores, e.g. OMP_NUM_THREADS=1 as pipeline.py
    runs every stage), several batches are scored at once in threads: each on torch's threads, with the same kernels
    on the same batches as one at a time, so the same scores to the bit, sooner."""
    device, pad = accelerator.device, tokenizer.pad_token_id
    workers = 1
    if device.type == "cpu":
        workers = max(1, (os.cpu_count() or 1) // (torch.get_num_threads() * accelerator.num_processes))

    def encode(i):  # in the calling thread: a fast tokenizer must not be called from two threads at once
        pairs = zip(prompts[i : i + batch_size], responses[i : i + batch_size])
        ids = [rm_input_ids(tokenizer, p, r, max_length, chat) for p, r in pairs]
        n = max(len(x) for x in ids)
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        return torch.tensor([x + [pad] * (n - len(x)) for x in ids]), mask

    def score(batch):
        with torch.no_grad():  # grad mode is per thread
            r, h = reward_and_features(model, batch[0].to(device), batch[1].to(device))
        return r.float().cpu(), h.float().cpu()

    starts = range(0, len(prompts), batch_size)
    out, bar = [], tqdm(total=len(starts), desc=desc, disable=not accelerator.is_main_process)
    with ThreadPoolExecutor(workers) as pool:
        for w in range(0, len(starts), workers):
            window = [encode(i) for i in starts[w : w + workers]]
            out += pool.map(score, window) if workers > 1 else map(score, window)  # map keeps the order
            bar.update(len(window))
    bar.close()
    if not out:
        return torch.zeros(0), torch.zeros(0, model.config.hidden_size)
    return torch.cat([r for r, _ in out]), torch.cat([h for _, h in out])


# ---------------------------------------------------------------- outputs
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
    # no GPU: the processes that `accelerate launch --multi_gpu` starts run on the CPU (gloo)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    args.num_processes = accelerator.num_processes
    run_name = [f"{args.exp_name}__{args.seed}__{int(time.time())}"]
    broadcast_object_list(run_name)  # rank 0's clock, so all ranks agree
    args.run_name = run_name[0]
    args.output_dir = args.output_dir or f"runs/{args.run_name}"
    if args.use_vllm and args.num_processes > 1:
        raise ValueError(
            "--use-vllm runs in one process (vLLM manages the GPUs itself): use `python eval_gold.py --use-vllm`"
        )
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + accelerator.process_index)  # different samples on each rank
    torch.backends.cudnn.deterministic = args.torch_deterministic
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    # inputs first: a bad path or a bad dataset fails before any model is loaded
    require_path(args.policy_path, "--policy-path")
    require_path(args.gold_rm_path, "--gold-rm-path")
    check_reward_config(args.gold_rm_path, args.trust_remote_code, "--gold-rm-path")
    if args.reward_model_path is not None:
        require_path(args.reward_model_path, "--reward-model-path")
        check_reward_config(args.reward_model_path, args.trust_remote_code, "--reward-model-path")
    tokenizer = load_tokenizer(args.policy_path, args.trust_remote_code)
    rows, where = load_split(args.dataset, args.split, args.dataset_config)
    rows = rows[: args.num_prompts]
    fmt = detect_format(rows, where)
    examples = [
        (str(r.get("id", i)), *to_prompt_response(r, fmt, tokenizer, args.max_prompt_length))
        for i, r in enumerate(rows)
    ]
    if accelerator.is_main_process:
        print(f"{args.run_name}: {len(examples)} prompts ({fmt} format)")
        for k, v in asdict(args).items():
            print(f"  {k}: {v}")

    with accelerator.split_between_processes(examples) as mine:
        prompts, references = [e[1] for e in mine], [e[2] for e in mine]
        # 1. one response per prompt from the policy
        if args.use_vllm:
            responses, has_eos = generate_vllm(args.policy_path, tokenizer, prompts, 1, args)
        else:
            policy = (
                AutoModelForCausalLM.from_pretrained(
                    args.policy_path, dtype=dtype, trust_remote_code=args.trust_remote_code
                )
                .to(accelerator.device)
                .eval()
            )
            responses, has_eos = generate_hf(policy, tokenizer, prompts, 1, args, accelerator)
            del policy
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        eos = torch.tensor(has_eos, dtype=torch.bool)
        # 2. gold scores of the policy's and the reference responses (references always end with EOS)
        gold = load_reward_model(args.gold_rm_path, args.trust_remote_code, dtype, "--gold-rm-path").to(
            accelerator.device
        )
        gold_tokenizer = load_tokenizer(args.gold_rm_path, args.trust_remote_code)
        chat = bool(getattr(gold_tokenizer, "chat_template", None))  # Skywork reads the chat format
        gold_scores = apply_missing_eos_penalty(
            score_texts(
                gold,
                gold_tokenizer,
                prompts,
                texts,
                chat,
                args.gold_batch_size,
                args.gold_max_length,
                accelerator,
                "gold",
            )[0],
            eos,
            args.missing_eos_penalty,
        )
        reference_gold = score_texts(
            gold,
            gold_tokenizer,
            prompts,
            references,
            chat,
            args.gold_batch_size,
            args.gold_max_length,
            accelerator,
            "gold (reference)",
        )[0]
        del gold
        records = [
            {
                "id": e[0],
                "prompt": p,
                "response": t,
                "reference": ref,
                "has_eos": h,
                "length": len(r),
                "gold_score": g,
                "reference_gold_score": rg,
            }
            for e, p, t, ref, h, r, g, rg in zip(
                mine, prompts, texts, references, has_eos, responses, gold_scores.tolist(), reference_gold.tolist()
            )
        ]
        # 3. the proxy, in its own tokenizer and the plain format of train_rm.py, minus its offset
        if args.reward_model_path is not None:
            proxy = load_reward_model(args.reward_model_path, args.trust_remote_code, dtype, "--reward-model-path")
            proxy, proxy_tokenizer = (
                proxy.to(accelerator.device),
                load_tokenizer(args.reward_model_path, args.trust_remote_code),
            )
            if getattr(proxy.config, "reward_offset", None) is None and accelerator.is_main_process:
                print(
                    f"warning: {args.reward_model_path} has no config.reward_offset (not normalised by train_rm.py); "
                    "using 0"
                )
            proxy_scores = score_texts(
                proxy,
                proxy_tokenizer,
                [as_query(proxy_tokenizer, p) for p in prompts],  # it reads what the policy read
                texts,
                False,
                args.gold_batch_size,
                args.proxy_max_length,
                accelerator,
                "proxy",
            )[0]
            proxy_scores = apply_missing_eos_penalty(proxy_scores, eos, args.missing_eos_penalty)
            reference_proxy = score_texts(
                proxy,
                proxy_tokenizer,
                [as_query(proxy_tokenizer, p) for p in prompts],  # it reads what the policy read
                references,
                False,
                args.gold_batch_size,
                args.proxy_max_length,
                accelerator,
                "proxy (reference)",
            )[0]
            for rec, s, rs in zip(records, proxy_scores.tolist(), reference_proxy.tolist()):
                rec["proxy_score"], rec["reference_proxy_score"] = s, rs
    records = gather_object(records)  # in rank order = the original prompt order

    if accelerator.is_main_process:
        mean = lambda key: float(np.mean([r[key] for r in records])) if records else float("nan")
        metrics = {
            "eval/win_rate": float(np.mean([r["gold_score"] > r["reference_gold_score"] for r in records]))
            if records
            else float("nan"),
            "eval/gold_reward_mean": mean("gold_score"),
            "eval/reference_gold_reward_mean": mean("reference_gold_score"),
            "eval/eos_rate": mean("has_eos"),
            "eval/response_length_mean": mean("length"),
            "eval/num_prompts": len(records),
        }
        if args.reward_model_path is not None:
            metrics.update(
                {
                    "eval/proxy_reward_mean": mean("proxy_score"),
                    "eval/reference_proxy_reward_mean": mean("reference_proxy_score"),
                }
            )
        out = staging_dir(args.output_dir, args.run_name)
        MetricsLogger(out / "metrics.jsonl", args, True).log(metrics, 0)
        with open(out / "samples.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        (out / "eval.json").write_text(
            json.dumps(
                {
                    **metrics,
                    "policy_path": args.policy_path,
                    "run_name": args.run_name,
                    "num_processes": args.num_processes,
                },
                indent=1,
            )
        )
        commit_dir(out, args.output_dir)
        for r in records[:2]:
            print(
                f"--- {r['prompt'][-150:]!r}\n>>> policy    {r['gold_score']:+.3f} {r['response']!r}\n>>> reference {r['reference_gold_score']:+.3f} {r['reference']!r}"
            )
        print(f"wrote {args.output_dir}: " + json.dumps(metrics))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # stops the trackers, destroys the process group
    if accelerator.num_processes > 1 and not accelerator.is_main_process and accelerator.device.type == "cpu":
        # all is written; a gloo worker of torch 2.13 can still abort in its C++ teardown at interpreter exit
        # ("terminate called without an active exception", exit -6, seen twice in CI runs): leave without it
        print(end="", flush=True)
        os._exit(0)
