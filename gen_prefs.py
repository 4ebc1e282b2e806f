"""Stage 2 of the gold-model pipeline: preference pairs sampled from the SFT policy, labelled by the gold RM.

For every training prompt (and `--num-test-prompts` held-out prompts of the validation split) the SFT
policy samples `--num-completions` (2) completions at temperature 1.0; the gold reward model scores
each one; the pair is (chosen = highest gold score, rejected = lowest), the argmax with no label noise
(Gao et al. 2023). Ties (equal gold scores, e.g. two identical completions, or two completions that
both miss the EOS and both get the penalty) carry no preference: they are DROPPED and counted in the
tie rate.

EOS handling (the summarize_from_feedback_details tricks): each completion is truncated after its
first EOS; a completion that never emits EOS within `--max-new-tokens` gets the fixed gold score
`--missing-eos-penalty` instead of its gold score (a replacement, not a bonus: pick a value below the
gold's typical scores; -1.0 is low for the tiny-world gold, whose reference summaries score ~+2).
The gold RM reads its reward at the last real token (the EOS), located from the attention mask we
build (pad ids are never searched: pad may equal eos). The gold has its own tokenizer: the policy's text
is decoded and re-tokenised; a gold tokenizer with a chat template (Skywork) gets the chat format
(user = prompt, assistant = response), one without gets the plain `prompt + response` ids + EOS.

Paper setting (appendix F.4): Pythia-1B SFT policy on TL;DR, 2 completions per prompt, temperature
1.0, 53 new tokens, gold Skywork-Reward-Llama-3.1-8B-v0.2, one pair per training prompt (~116K).

Run it:
    python gen_prefs.py                                    # tiny world, after sft.py
    accelerate launch --config_file configs/cpu_2proc.yaml gen_prefs.py
    accelerate launch --config_file configs/ddp_8gpu.yaml gen_prefs.py --preset paper
    python gen_prefs.py --preset paper --use-vllm          # one process; vLLM batches the sampling
Writes `{output_dir}/train.jsonl` and `{output_dir}/test.jsonl`, one pair per line:
    {"id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
(`chosen`/`rejected` are response texts without the EOS; scores are gold scores after the penalty),
plus stats.json and metrics.jsonl: {split}/gold_score_mean, {split}/tie_rate, {split}/eos_rate,
{split}/response_length_mean (tokens, EOS included), {split}/score_margin_mean, {split}/num_pairs.
"""

import argparse
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
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
    """the SFT policy that samples the completions (output of sft.py)"""
    gold_rm_path: str = "runs/tiny_world/gold_rm"
    """the gold reward model: a *ForSequenceClassification checkpoint with one output, head `score`"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dataset: str = "runs/tiny_world/data"
    """hub id or local path of the prompts (TL;DR or AlpacaFarm format)"""
    dataset_config: Optional[str] = None
    """hub dataset config (e.g. `alpaca_instructions` for tatsu-lab/alpaca_farm)"""
    train_split: str = "train"
    """prompts of the training pairs (AlpacaFarm: `preference`)"""
    test_split: str = "validation"
    """prompts of the held-out pairs (AlpacaFarm: `val`)"""
    num_train_prompts: Optional[int] = None
    """use only the first N training prompts (default: all)"""
    num_test_prompts: int = 256
    """held-out prompts (the first N of --test-split) for the test pairs"""
    output_dir: str = "runs/tiny_world/prefs"
    """where train.jsonl, test.jsonl, stats.json and metrics.jsonl are written (atomically)"""
    max_prompt_length: int = 128
    """prompts longer than this (tokens) are shortened (TL;DR: the POST is cut at a whitespace)"""
    num_completions: int = 2
    """completions per prompt; the pair is the best and the worst by gold score"""
    temperature: float = 1.0
    """sampling temperature (top_k off, top_p 1.0)"""
    max_new_tokens: int = 24
    """completion length budget; a completion without EOS within it gets --missing-eos-penalty"""
    missing_eos_penalty: float = -1.0
    """gold score given (instead of the gold's) to a completion with no EOS"""
    generation_batch_size: int = 128
    """sequences per generate call per process (prompts x completions)"""
    gold_batch_size: int = 64
    """sequences per gold forward pass per process"""
    gold_max_length: int = 256
    """gold input tokens (longer inputs lose their beginning: the reward is read at the end)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights dtype of the policy and the gold"""
    use_vllm: bool = False
    """sample with vLLM (one process; `pip install -r requirements-vllm.txt`) instead of HF generate"""
    vllm_gpu_memory_utilization: float = 0.5
    """fraction of the GPU vLLM may take (the gold RM is loaded next to it)"""

    # to be filled in runtime
    world_size: int = 0
    """number of processes"""
    num_prompts: int = 0
    """train + test prompts"""
    run_name: str = ""
    """f"{exp_name}__{seed}__{time}", the same on every process"""


PRESETS = {
    "tiny": Args(),
    "paper": Args(
        preset="paper",
        policy_path="runs/paper/sft",
        gold_rm_path="Skywork/Skywork-Reward-Llama-3.1-8B-v0.2",
        dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered",
        num_test_prompts=1000,
        output_dir="runs/paper/prefs",
        max_prompt_length=512,
        max_new_tokens=53,
        generation_batch_size=256,
        gold_batch_size=16,
        gold_max_length=1024,
        dtype="bfloat16",
    ),
}


def parse_args() -> Args:
    # `--preset` picks the defaults; every other flag still overrides them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="tiny", choices=PRESETS)
    return tyro.cli(Args, default=PRESETS[pre.parse_known_args()[0].preset])


def require_path(path: str, flag: str) -> None:
    """A local-looking path that does not exist is an error now, not a confusing hub lookup later."""
    if (path.startswith((".", "/", "~")) or path.count("/") != 1) and not Path(path).exists():
        raise FileNotFoundError(
            f"{flag} {path} does not exist (run the previous stage, `python tiny_world.py` for the tiny world, or pass {flag})"
        )


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
    if path.suffix in (".jsonl", ".json"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(path)).to_list()
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .parquet")


def load_split(dataset: str, split: str, config: Optional[str] = None) -> list[dict]:
    """Rows of one split from a hub id or a local path (folder of {split}.jsonl/.parquet, one file, or save_to_disk)."""
    path = Path(dataset)
    if path.is_file():
        return read_rows(path)
    if path.is_dir():
        for name in (f"{split}.jsonl", f"{split}.parquet", f"{split}.json"):
            if (path / name).is_file():
                return read_rows(path / name)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(f"{dataset} has splits {list(data)}, not {split!r}: pass one of them")
                data = data[split]
            return data.to_list()
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{dataset} has no {split}.jsonl, {split}.parquet or save_to_disk data (found: {found})"
        )
    # a path-looking string that does not exist is a mistake, not a hub id
    if dataset.startswith((".", "/", "~")) or dataset.count("/") != 1 or path.suffix in (".jsonl", ".parquet", ".json"):
        raise FileNotFoundError(
            f"dataset {dataset!r} does not exist (run `python tiny_world.py` for the tiny world, or pass --dataset)"
        )
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split).to_list()
    except Exception as e:
        raise RuntimeError(f"could not load {dataset!r} (config {config}, split {split}) from the hub: {e}") from e


def detect_format(rows: list[dict], where: str) -> str:
    columns = set(rows[0]) if rows else set()
    if set(TLDR_COLUMNS) <= columns:
        return "tldr"
    if set(ALPACA_COLUMNS) <= columns:
        return "alpaca"
    raise ValueError(
        f"{where} has columns {sorted(columns)}; need the TL;DR columns {list(TLDR_COLUMNS)} or the AlpacaFarm columns {list(ALPACA_COLUMNS)}"
    )


def fit_prompt(build, text: str, tokenizer, max_len: int) -> str:
    """build(text) -> prompt; cut `text` at a whitespace boundary until the prompt has <= max_len tokens."""
    while True:
        prompt = build(text)
        n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        if n <= max_len:
            return prompt
        if not text:
            raise ValueError(
                f"prompt is {n} tokens even with an empty post/input; raise --max-prompt-length (now {max_len})"
            )
        # jump close to the budget in one step, then back off to the previous whitespace
        cut = min(len(text) - 1, int(len(text) * max_len / n))
        space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
        text = text[: max(space, 0)].rstrip()


def to_prompt_response(row: dict, fmt: str, tokenizer, max_prompt_length: int) -> tuple[str, str]:
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
    """Refuse a checkpoint that is not a one-output sequence classifier BEFORE loading it: transformers
    would silently put a random `score` head on a causal LM."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise ValueError(
            f"{flag} {path} is not a reward model: its architectures are {archs} with num_labels={config.num_labels}; "
            "a reward model is a *ForSequenceClassification checkpoint with num_labels=1 and a linear `score` head "
            "(e.g. the output of train_rm.py or runs/tiny_world/gold_rm)"
        )


def load_reward_model(path: str, trust_remote_code: bool, dtype, device):
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"{path}: expected a linear `score` head with one output, found {head!r}")
    return model.to(device).eval(), load_tokenizer(path, trust_remote_code)


def truncate_after_eos(responses: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """(B, T) sampled tokens -> (tokens after the first EOS set to pad, lengths with the EOS, has_eos)."""
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(1)
    # argmax returns the FIRST maximal index, i.e. the first EOS
    lengths = torch.where(has_eos, is_eos.int().argmax(1) + 1, responses.shape[1])
    keep = torch.arange(responses.shape[1], device=responses.device)[None] < lengths[:, None]
    return responses.masked_fill(~keep, pad_token_id), lengths, has_eos


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """A completion that never ended gets a fixed score (summarize_from_feedback_details' penalty_reward_value)."""
    return torch.where(has_eos.to(scores.device), scores, torch.full_like(scores, penalty))


@torch.no_grad()
def generate_hf(model, tokenizer, prompts: list[str], n: int, args, accelerator) -> tuple[list[list[int]], list[bool]]:
    """n samples per prompt -> token ids cut after the first EOS (EOS kept), has_eos."""
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    config = GenerationConfig(
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    flat = [p for p in prompts for _ in range(n)]
    responses, has_eos = [], []
    bs = args.generation_batch_size
    for i in tqdm(range(0, len(flat), bs), desc="generate", disable=not accelerator.is_main_process):
        enc = tokenizer(flat[i : i + bs], return_tensors="pt", padding=True, add_special_tokens=False).to(
            accelerator.device
        )
        out = model.generate(**enc, generation_config=config)[:, enc.input_ids.shape[1] :]
        out, lengths, eos = truncate_after_eos(out, tokenizer.eos_token_id, tokenizer.pad_token_id)
        responses += [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]
        has_eos += eos.tolist()
    return responses, has_eos


def generate_vllm(path: str, tokenizer, prompts: list[str], n: int, args) -> tuple[list[list[int]], list[bool]]:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError(
            "--use-vllm needs vLLM, which is not installed: `pip install -r requirements-vllm.txt` (GPU only), or drop --use-vllm"
        ) from e
    llm = LLM(
        model=path,
        seed=args.seed,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
    )
    params = SamplingParams(
        n=n, temperature=args.temperature, top_p=1.0, max_tokens=args.max_new_tokens, seed=args.seed
    )
    responses, has_eos = [], []
    for request in llm.generate(prompts, params):
        for o in request.outputs:
            ids = list(o.token_ids)
            ended = o.finish_reason == "stop"  # stopped by EOS (not by the length budget)
            if ended and (not ids or ids[-1] != tokenizer.eos_token_id):
                ids.append(tokenizer.eos_token_id)
            t, n, e = truncate_after_eos(torch.tensor([ids]), tokenizer.eos_token_id, tokenizer.pad_token_id)
            responses.append(t[0, : n[0]].tolist())
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


def reward_at_last_token(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One backbone forward -> (reward (B,), feature h (B, H)) at the last real token of every row.

    The last real token comes from the attention mask (with a pad == eos tokenizer, searching pad ids would
    read the wrong token); position ids count real tokens only, so left padding changes nothing.
    `reward = score(h)`, the `score` head applied to h (r = w^T h, docs/METHOD.md section 1).
    """
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask * positions).argmax(1)  # the largest position whose mask is 1
    feature = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return model.score(feature).squeeze(-1), feature


@torch.no_grad()
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
    """Reward and feature of every (prompt, response), right-padded batches (see rm_input_ids for `chat`)."""
    rewards, features = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not accelerator.is_main_process):
        ids = [
            rm_input_ids(tokenizer, p, r, max_length, chat)
            for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])
        ]
        n = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (n - len(x)) for x in ids], device=accelerator.device)
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=accelerator.device)
        r, h = reward_at_last_token(model, input_ids, mask)
        rewards.append(r.float().cpu())
        features.append(h.float().cpu())
    if not rewards:
        return torch.zeros(0), torch.zeros(0, model.config.hidden_size)
    return torch.cat(rewards), torch.cat(features)


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
    args.world_size = accelerator.num_processes
    run_name = [f"{args.exp_name}__{args.seed}__{int(time.time())}"]
    broadcast_object_list(run_name)  # rank 0's clock, so all ranks agree
    args.run_name = run_name[0]
    if args.use_vllm and args.world_size > 1:
        raise ValueError(
            "--use-vllm runs in one process (vLLM manages the GPUs itself): use `python gen_prefs.py --use-vllm`"
        )
    if args.num_completions < 2:
        raise ValueError(f"--num-completions must be >= 2 to make a pair (got {args.num_completions})")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed + accelerator.process_index)  # different samples on each rank
    torch.backends.cudnn.deterministic = args.torch_deterministic
    dtype = getattr(torch, args.dtype)

    # inputs first: a bad path or a bad dataset fails before any model is loaded
    require_path(args.policy_path, "--policy-path")
    require_path(args.gold_rm_path, "--gold-rm-path")
    check_reward_config(args.gold_rm_path, args.trust_remote_code, "--gold-rm-path")
    tokenizer = load_tokenizer(args.policy_path, args.trust_remote_code)
    prompts = []
    for split, n in (("train", args.num_train_prompts), ("test", args.num_test_prompts)):
        rows = load_split(args.dataset, args.train_split if split == "train" else args.test_split, args.dataset_config)[
            :n
        ]
        fmt = detect_format(rows, f"{args.dataset} [{split}]")
        prompts += [
            (split, str(r.get("id", i)), to_prompt_response(r, fmt, tokenizer, args.max_prompt_length)[0])
            for i, r in enumerate(rows)
        ]
    args.num_prompts = len(prompts)
    if accelerator.is_main_process:
        print(f"{args.run_name}: {args.num_prompts} prompts x {args.num_completions} completions ({fmt} format)")
        for k, v in asdict(args).items():
            print(f"  {k}: {v}")

    # 1. sample: each process takes a contiguous share of the prompts
    with accelerator.split_between_processes(prompts) as my_prompts:
        texts = [p[2] for p in my_prompts]
        if args.use_vllm:
            responses, has_eos = generate_vllm(args.policy_path, tokenizer, texts, args.num_completions, args)
        else:
            policy = (
                AutoModelForCausalLM.from_pretrained(
                    args.policy_path, dtype=dtype, trust_remote_code=args.trust_remote_code
                )
                .to(accelerator.device)
                .eval()
            )
            responses, has_eos = generate_hf(policy, tokenizer, texts, args.num_completions, args, accelerator)
            del policy  # make room for the gold
        # 2. label with the gold (its own tokenizer: decode the policy's tokens, re-tokenise)
        gold, gold_tokenizer = load_reward_model(args.gold_rm_path, args.trust_remote_code, dtype, accelerator.device)
        response_texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        flat_prompts = [t for t in texts for _ in range(args.num_completions)]
        # a gold whose tokenizer has a chat template (Skywork) reads the chat format
        chat = bool(getattr(gold_tokenizer, "chat_template", None))
        scores, _ = score_texts(
            gold,
            gold_tokenizer,
            flat_prompts,
            response_texts,
            chat,
            args.gold_batch_size,
            args.gold_max_length,
            accelerator,
            "gold",
        )
        scores = apply_missing_eos_penalty(
            scores, torch.tensor(has_eos, dtype=torch.bool), args.missing_eos_penalty
        ).tolist()
        k = args.num_completions
        records = [
            {
                "split": split,
                "id": pid,
                "prompt": prompt,
                "responses": response_texts[i * k : (i + 1) * k],
                "scores": scores[i * k : (i + 1) * k],
                "has_eos": has_eos[i * k : (i + 1) * k],
                "lengths": [len(r) for r in responses[i * k : (i + 1) * k]],
            }
            for i, (split, pid, prompt) in enumerate(my_prompts)
        ]
    records = gather_object(records)  # in rank order = the original prompt order

    # 3. pairs and statistics, written by the main process only
    if accelerator.is_main_process:
        out = staging_dir(args.output_dir, args.run_name)
        logger = MetricsLogger(out / "metrics.jsonl", args, True)
        stats = {}
        for split in ("train", "test"):
            rows, ties, split_records = [], 0, [r for r in records if r["split"] == split]
            for r in split_records:
                best, worst = int(np.argmax(r["scores"])), int(np.argmin(r["scores"]))
                if r["scores"][best] == r["scores"][worst]:
                    ties += 1  # no preference to learn from: dropped
                    continue
                rows.append(
                    {
                        "id": r["id"],
                        "prompt": r["prompt"],
                        "chosen": r["responses"][best],
                        "rejected": r["responses"][worst],
                        "chosen_score": r["scores"][best],
                        "rejected_score": r["scores"][worst],
                    }
                )
            with open(out / f"{split}.jsonl", "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            all_scores = [s for r in split_records for s in r["scores"]]
            stats.update(
                {
                    f"{split}/num_prompts": len(split_records),
                    f"{split}/num_pairs": len(rows),
                    f"{split}/tie_rate": ties / max(len(split_records), 1),
                    f"{split}/gold_score_mean": float(np.mean(all_scores)) if all_scores else float("nan"),
                    f"{split}/eos_rate": float(np.mean([e for r in split_records for e in r["has_eos"]]))
                    if split_records
                    else float("nan"),
                    f"{split}/response_length_mean": float(np.mean([n for r in split_records for n in r["lengths"]]))
                    if split_records
                    else float("nan"),
                    f"{split}/score_margin_mean": float(
                        np.mean([x["chosen_score"] - x["rejected_score"] for x in rows])
                    )
                    if rows
                    else float("nan"),
                }
            )
        stats["run_name"] = args.run_name
        logger.log({k: v for k, v in stats.items() if k != "run_name"}, 0)
        (out / "stats.json").write_text(json.dumps(stats, indent=1))
        commit_dir(out, args.output_dir)
        for r in records[:2]:
            print(
                f"--- {r['prompt'][-150:]!r}\n"
                + "\n".join(f">>> {s:+.3f} {t!r}" for s, t in zip(r["scores"], r["responses"]))
            )
        print(f"wrote {args.output_dir}: " + json.dumps(stats))
    accelerator.wait_for_everyone()
