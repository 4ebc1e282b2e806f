"""vLLM's sampling paths (`gen_prefs.py --use-vllm`, `eval_gold.py --use-vllm`) against Hugging Face's `generate_hf`.

The engine runs for real: both scripts run from their command line (tests/vllm_worker.py, one process, recording
what vLLM was asked and answered) on the 2-layer cut of SmolLM2-135M-Instruct (`tools/real_model.py --num-layers 2`:
the real tokenizer, chat template and Llama architecture; its EOS logit raised so that completions of a few tokens
end, as in tests/test_real_model.py), and each is compared with the same script's HF path:
  - the engine reads the query the policy reads everywhere else (as_query: the chat template), token for token;
  - at temperature 0.01 (eval_gold.py's) vLLM's completions are HF's, token for token, with the same endings;
  - completions end at the first end token (kept) or at the length budget, and only there: the end tokens are the
    tokenizer's EOS and every EOS id of the model's generation config (`completion_end_ids`), in every path;
  - at temperature 1 (gen_prefs.py's) the engine's log-probability of every sampled token is HF's under the
    templated query (not under the plain prompt: the chat-template bug), and vLLM's samples have the distribution of
    HF's (a two-sample test that rejects HF's samples of the plain prompt);
  - a prompt that occurs twice gets two independent sets of completions.
And the trainer's rollouts (`grpo_signcert.py --generation-backend vllm`, 3 steps): each step's engine samples from
the policy as the last update left it (its log-probs are HF's under the checkpoint), and the update trains on what
the engine sampled; under `accelerate launch` with 2 processes (gloo on the CPU, as on 2 GPUs) each process's own
engine does so for its own share of the prompts.

They need vLLM, which pins transformers below the main environment's, so they run in a virtual environment of their
own (`bash tools/install_vllm.sh VENV`, requirements-vllm.txt) and skip, saying so, where vLLM is not installed
(.ci/run builds it and runs them there):
    VENV/bin/python -m pytest tests/test_vllm.py -q
The first test (a stand-in `vllm` module) runs in every environment.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import accelerate_cmd, built_once, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason="vLLM is not installed in this environment: these tests run in the vLLM venv "
    "(`bash tools/install_vllm.sh VENV`, then `VENV/bin/python -m pytest tests/test_vllm.py`; .ci/run does both)",
)
# the engine's KV cache: 1 GiB (else vLLM's CPU backend reserves --vllm-gpu-memory-utilization of the machine's RAM)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "VLLM_CPU_KVCACHE_SPACE": "1"}
WORDS = "my dog cat rent car job boss friend mom dad sister house plan trip money school exam party game phone".split()
TRAIN_PROMPTS, NUM_SAMPLES, SAMPLE_TOKENS = 4, 32, 12  # gen_prefs.py: 4 train prompts (+ one repeated), temperature 1
EVAL_PROMPTS, EVAL_TOKENS = 8, 5  # eval_gold.py: temperature 0.01 (its near-greedy completions end after 5 to 9)
# ' "': listed as an end token by the test policy's generation config, not the tokenizer's EOS; in about 1 in 5 of
# gen_prefs.py's completions at temperature 1, never on eval_gold.py's near-greedy paths (which then still end both
# ways, at EOS and at the budget; ' ', in all of them, ended every one at its second token)
SECOND_END = 476
END_IDS = [2, SECOND_END]  # the ids every path ends a completion at: the tokenizer's EOS (2) and the second
# the two fields of an Accelerator that generate_hf reads
CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=False)


def run(*cmd, timeout=900):
    out = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def tldr_row(i: int) -> dict:
    """A TL;DR row whose post has 6 to 155 words (the longer ones are cut to --max-prompt-length, template included)."""
    words = [WORDS[(i * 7 + 3 * j + j * j) % len(WORDS)] for j in range(6 + (i * 37) % 150)]
    return {"id": f"p{i}", "subreddit": "relationships", "title": f"my {WORDS[i % len(WORDS)]} and me",
            "post": " ".join(words) + " .", "summary": f"my {WORDS[(i + 5) % len(WORDS)]} is a mess"}  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_cut(tmp_path_factory) -> Path:
    """tools/real_model.py --num-layers 2, built once per session (the same folder as tests/test_real_model.py's)."""
    return built_once(tmp_path_factory, "smollm2_cut", lambda out: run("tools/real_model.py", "--num-layers", "2",
                                                                        "--output-dir", out, timeout=600))  # fmt: skip


@pytest.fixture(scope="session")
def vllm_world(tmp_path_factory, smollm2_cut) -> Path:
    """policy/: the cut with its EOS raised (ends ~1 token in 10) and a generation config that lists a second end
    token, as Llama-3-Instruct's and Qwen2.5-Instruct's do (' "', id 476: every path ends a completion there too);
    data/: TL;DR rows, the first training row twice."""
    from test_real_model import eos_boosted

    def build(out):
        out.mkdir(parents=True)
        eos_boosted(smollm2_cut / "policy", out / "policy")
        config = json.loads((out / "policy" / "generation_config.json").read_text())
        assert config["eos_token_id"] == 2
        config["eos_token_id"] = [2, SECOND_END]
        (out / "policy" / "generation_config.json").write_text(json.dumps(config))
        splits = {
            "train": [tldr_row(i) for i in range(TRAIN_PROMPTS)] + [tldr_row(0)],
            "validation": [tldr_row(10)],
            "test": [tldr_row(20 + i) for i in range(EVAL_PROMPTS)],
        }
        (out / "data").mkdir()
        for split, rows in splits.items():
            (out / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return built_once(tmp_path_factory, "vllm_world", build)


@pytest.fixture(scope="session")
def vllm_runs(tmp_path_factory, vllm_world, smollm2_cut) -> Path:
    """gen_prefs.py and eval_gold.py with --use-vllm, recorded by tests/vllm_worker.py (record.json)."""

    def build(out):
        out.mkdir(parents=True)
        common = ["--policy-path", vllm_world / "policy", "--gold-rm-path", smollm2_cut / "rm",
                  "--dataset", vllm_world / "data", "--seed", 1]  # fmt: skip
        prefs = ["gen_prefs.py", "--use-vllm", *common, "--output-dir", out / "prefs_vllm", "--num-completions",
                 NUM_SAMPLES, "--max-new-tokens", SAMPLE_TOKENS, "--num-test-prompts", 1]  # fmt: skip
        evaluate = ["eval_gold.py", *common, "--num-prompts", EVAL_PROMPTS, "--max-new-tokens", EVAL_TOKENS]
        run("tests/vllm_worker.py", out / "record.json", *prefs, "--", *evaluate, "--use-vllm",
            "--output-dir", out / "eval_vllm")  # fmt: skip

    return built_once(tmp_path_factory, "vllm_runs", build)


def recorded(runs: Path, script: str) -> tuple[dict, dict]:
    """(the LLM's constructor arguments, the one generate call's record) of `script`'s run."""
    (entry,) = [r for r in json.loads((runs / "record.json").read_text()) if r["script"] == script]
    llm, call = entry["record"]  # one engine, one generate call
    return llm["llm"], call


def tokenizer_of(path):
    import gen_prefs

    return gen_prefs.load_tokenizer(str(path), False)


def script_prompts(world: Path, split: str, n: int) -> list[str]:
    """The prompts a script builds from the first n rows of a split (max_prompt_length 128: both scripts' default)."""
    import gen_prefs

    tok = tokenizer_of(world / "policy")
    rows = read_jsonl(world / "data" / f"{split}.jsonl")[:n]
    return [gen_prefs.to_prompt_response(r, "tldr", tok, 128)[0] for r in rows]


def query_ids(tok, prompt: str) -> list[int]:
    """The ids the policy reads for `prompt` (generate_hf's, without its left padding)."""
    import gen_prefs

    return tok(gen_prefs.as_query(tok, prompt), add_special_tokens=False).input_ids


def cut_after_end(ids: list[int]) -> list[int]:
    """ids up to and including the first of END_IDS (all of them if none)."""
    ends = [i for i, t in enumerate(ids) if t in END_IDS]
    return ids[: ends[0] + 1] if ends else ids


def fake_vllm(eos: int) -> ModuleType:
    """A stand-in `vllm` module: LLM records the prompts given to generate and answers every request with one
    completion that ends ([5, EOS]) and one that does not ([5, 6, 7])."""
    module = ModuleType("vllm")

    class LLM:
        prompts = None

        def __init__(self, **kwargs):
            pass

        def generate(self, prompts, params, **kwargs):
            LLM.prompts = list(prompts)
            ended = SimpleNamespace(token_ids=[5, eos], finish_reason="stop", stop_reason=None)
            running = SimpleNamespace(token_ids=[5, 6, 7], finish_reason="length", stop_reason=None)
            return [SimpleNamespace(outputs=[ended, running], prompt=p) for p in prompts]

    module.LLM, module.SamplingParams = LLM, lambda **kwargs: SimpleNamespace(**kwargs)
    return module


@pytest.mark.parametrize("script", ["gen_prefs", "eval_gold"])
def test_generate_vllm_gives_the_engine_the_templated_query_ids(script, smollm2_cut, monkeypatch):
    """With a stand-in engine (no vLLM needed): generate_vllm hands vLLM the token ids of as_query(prompt), the chat
    template's user turn with the assistant's opened, exactly as generate_hf tokenises them; not the plain prompt."""
    module = __import__(script)
    tok = tokenizer_of(smollm2_cut / "policy")
    fake = fake_vllm(tok.eos_token_id)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    prompts = ["SUBREDDIT: r/pets\n\nTITLE: my dog\n\nPOST: my dog ate the cake.\n\nTL;DR:", "hello"]
    args = SimpleNamespace(seed=1, bf16=False, trust_remote_code=False, vllm_gpu_memory_utilization=0.5,
                           temperature=1.0, max_new_tokens=3)  # fmt: skip
    responses, has_eos = module.generate_vllm(str(smollm2_cut / "policy"), tok, prompts, 2, args)
    given = [p["prompt_token_ids"] if isinstance(p, dict) else p for p in fake.LLM.prompts]
    assert given == [query_ids(tok, p) for p in prompts]
    opened = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    assert given[0][-len(opened) :] == opened  # the chat template's assistant turn, opened
    assert responses == [[5, tok.eos_token_id], [5, 6, 7]] * 2 and has_eos == [True, False] * 2


@needs_vllm
def test_the_engine_reads_the_query_the_policy_reads(vllm_runs, vllm_world):
    """Both scripts: vLLM's own record of the prompt ids it read is the templated query of each prompt, in order,
    fitted to --max-prompt-length template included; the plain prompt's ids are not what it read. The engine is the
    policy's, in float32, seeded with --seed."""
    tok = tokenizer_of(vllm_world / "policy")
    for script, split, n in (("gen_prefs.py", "train", TRAIN_PROMPTS + 1), ("eval_gold.py", "test", EVAL_PROMPTS)):
        prompts = script_prompts(vllm_world, split, n)
        if script == "gen_prefs.py":
            prompts += script_prompts(vllm_world, "validation", 1)
        llm, call = recorded(vllm_runs, script)
        assert (llm["model"], llm["seed"], llm["dtype"]) == (str(vllm_world / "policy"), 1, "float32")
        read = [r["prompt_token_ids"] for r in call["requests"]]
        assert read == [query_ids(tok, p) for p in prompts], script
        assert all(r != tok(p, add_special_tokens=False).input_ids for r, p in zip(read, prompts)), script
        assert max(map(len, read)) <= 128
    rows = read_jsonl(vllm_world / "data" / "test.jsonl")
    assert sum(r["post"] not in p for r, p in zip(rows, script_prompts(vllm_world, "test", EVAL_PROMPTS))) >= 2  # cut


@needs_vllm
def test_eval_gold_samples_hf_completions_at_temperature_0_01(vllm_runs, vllm_world):
    """eval_gold.py --use-vllm writes, prompt by prompt, the completion eval_gold's generate_hf samples from the same
    prompt at its temperature 0.01, token for token, with the same ending; some end at EOS, some at the budget."""
    from transformers import AutoModelForCausalLM

    import eval_gold

    samples = read_jsonl(vllm_runs / "eval_vllm" / "samples.jsonl")
    assert [s["prompt"] for s in samples] == script_prompts(vllm_world, "test", EVAL_PROMPTS)
    tok = tokenizer_of(vllm_world / "policy")
    policy = AutoModelForCausalLM.from_pretrained(vllm_world / "policy").eval()
    args = SimpleNamespace(temperature=0.01, max_new_tokens=EVAL_TOKENS, generation_batch_size=128)
    torch.manual_seed(1)
    hf_ids, hf_eos = eval_gold.generate_hf(policy, tok, [s["prompt"] for s in samples], 1, args, CPU)
    assert [s["response"] for s in samples] == [tok.decode(r, skip_special_tokens=True) for r in hf_ids]
    assert [(s["has_eos"], s["length"]) for s in samples] == [(e, len(r)) for e, r in zip(hf_eos, hf_ids)]
    assert 0 < sum(hf_eos) < len(hf_eos)  # both kinds of ending occur
    _, call = recorded(vllm_runs, "eval_gold.py")
    assert [cut_after_end(r["outputs"][0]["token_ids"]) for r in call["requests"]] == hf_ids
    assert call["params"]["temperature"] == 0.01 and call["params"]["n"] == 1


@needs_vllm
@pytest.mark.parametrize("script", ["gen_prefs.py", "eval_gold.py"])
def test_completions_end_at_the_first_eos_or_at_the_length_budget(script, vllm_runs, vllm_world):
    """Every completion the engine returned stops at its first end token (kept), the tokenizer's EOS or the second
    end id of the model's generation config (as generate_hf stops), or has exactly the token budget without one;
    both end tokens do end some; the script records each as the engine's ids up to its end, with has_eos and the
    length. Seen failing with the engine stopped at the tokenizer's EOS only (the second end id then sampled
    mid-completion)."""
    tok = tokenizer_of(vllm_world / "policy")
    _, call = recorded(vllm_runs, script)
    assert sorted(call["params"]["stop_token_ids"]) == END_IDS
    budget = call["params"]["max_tokens"]
    assert budget == (SAMPLE_TOKENS if script == "gen_prefs.py" else EVAL_TOKENS)
    completions = [o for r in call["requests"] for o in r["outputs"]]
    for o in completions:
        ids = o["token_ids"]
        if o["finish_reason"] == "stop":
            assert ids[-1] in END_IDS and not set(ids[:-1]) & set(END_IDS), o
        else:
            assert o["finish_reason"] == "length" and len(ids) == budget and not set(ids) & set(END_IDS), o
    ended = [o["finish_reason"] == "stop" for o in completions]
    assert 0 < sum(ended) < len(ended)
    last = [o["token_ids"][-1] for o, e in zip(completions, ended) if e]
    if script == "gen_prefs.py":  # temperature 1: both end tokens end some completions
        assert {2, SECOND_END} <= set(last), last
    if script == "gen_prefs.py":  # each pair written is two of the engine's completions of its prompt
        decoded = {}  # prompt ids -> the decoded completions of its requests (the repeated prompt has two)
        for r in call["requests"]:
            texts = {tok.decode(o["token_ids"], skip_special_tokens=True) for o in r["outputs"]}
            decoded.setdefault(tuple(r["prompt_token_ids"]), set()).update(texts)
        pairs = [row for split in ("train", "test") for row in read_jsonl(vllm_runs / "prefs_vllm" / f"{split}.jsonl")]
        assert pairs and all({p["chosen"], p["rejected"]} <= decoded[tuple(query_ids(tok, p["prompt"]))] for p in pairs)
        return
    samples = read_jsonl(vllm_runs / "eval_vllm" / "samples.jsonl")
    assert [s["has_eos"] for s in samples] == ended
    assert [s["length"] for s in samples] == [len(o["token_ids"]) for o in completions]
    assert [s["response"] for s in samples] == [
        tok.decode(o["token_ids"], skip_special_tokens=True) for o in completions
    ]


def hf_log_probs(policy, prompt_ids: list[int], completions: list[list[int]]) -> list[torch.Tensor]:
    """log p(token | query, earlier tokens) of every completion token under the HF model (float32): the completions
    of one prompt in one right-padded batch, the LM head applied at the completion positions only."""
    width = max(map(len, completions))
    x = torch.tensor([prompt_ids + ids + [0] * (width - len(ids)) for ids in completions])
    mask = torch.tensor([[1] * (len(prompt_ids) + len(ids)) + [0] * (width - len(ids)) for ids in completions])
    with torch.no_grad():
        logits = policy(input_ids=x, attention_mask=mask, logits_to_keep=width + 1).logits[:, :-1].float()
    logp = logits.log_softmax(-1).gather(2, x[:, len(prompt_ids) :, None])[..., 0]
    return [row[: len(ids)] for row, ids in zip(logp, completions)]


@pytest.fixture(scope="module")
def prefs_samples(vllm_runs, vllm_world):
    """gen_prefs.py's prompts, the engine's completions of each (NUM_SAMPLES per prompt), and the HF policy."""
    from transformers import AutoModelForCausalLM

    prompts = script_prompts(vllm_world, "train", TRAIN_PROMPTS + 1) + script_prompts(vllm_world, "validation", 1)
    _, call = recorded(vllm_runs, "gen_prefs.py")
    policy = AutoModelForCausalLM.from_pretrained(vllm_world / "policy").eval()
    return prompts, call, policy


@needs_vllm
def test_vllm_log_probs_are_hf_log_probs_of_the_templated_query(prefs_samples, vllm_world):
    """At temperature 1, every token vLLM sampled has, under HF's model reading the templated query, the log-probability
    the engine reported for it (float32 both; the engine's are of the untempered model, as HF's here); under the plain
    prompt they differ: the check sees a prompt mismatch."""
    prompts, call, policy = prefs_samples
    tok = tokenizer_of(vllm_world / "policy")
    assert call["params"]["temperature"] == 1.0 and call["params"]["n"] == NUM_SAMPLES
    worst, worst_plain = 0.0, []
    for prompt, request in zip(prompts, call["requests"]):
        ids = [o["token_ids"] for o in request["outputs"]]
        engine = torch.tensor([lp for o in request["outputs"] for lp in o["logprobs"]])
        hf = torch.cat(hf_log_probs(policy, query_ids(tok, prompt), ids))
        worst = max(worst, (hf - engine).abs().max().item())
        plain = torch.cat(hf_log_probs(policy, tok(prompt, add_special_tokens=False).input_ids, ids))
        worst_plain.append((plain - engine).abs().max().item())
    assert worst < 2e-3, worst
    assert min(worst_plain) > 0.1, worst_plain


@needs_vllm
def test_vllm_samples_have_the_distribution_of_hf_samples_at_temperature_1(prefs_samples, vllm_world, monkeypatch):
    """Two-sample Kolmogorov-Smirnov test at level 0.001 on each completion's HF log-probability under the templated
    query: vLLM's samples against gen_prefs.generate_hf's of the same prompts are not rejected, and, as a check of
    the test's power, HF's samples of the plain prompts (the chat-template bug) against the templated ones are."""
    alpha = 1e-3
    from scipy.stats import ks_2samp

    import gen_prefs

    prompts, call, policy = prefs_samples
    tok = tokenizer_of(vllm_world / "policy")
    args = SimpleNamespace(temperature=1.0, max_new_tokens=SAMPLE_TOKENS, generation_batch_size=128)

    def scores(per_prompt: list[list[list[int]]]) -> list[float]:
        return [lp.sum().item() for p, ids in zip(prompts, per_prompt) for lp in hf_log_probs(policy, query_ids(tok, p), ids)]  # fmt: skip

    def hf_samples() -> list[list[list[int]]]:
        torch.manual_seed(0)
        flat, _ = gen_prefs.generate_hf(policy, tok, prompts, NUM_SAMPLES, args, CPU)
        return [flat[i * NUM_SAMPLES : (i + 1) * NUM_SAMPLES] for i in range(len(prompts))]

    engine = scores([[cut_after_end(o["token_ids"]) for o in r["outputs"]] for r in call["requests"]])
    hf = scores(hf_samples())
    monkeypatch.setattr(gen_prefs, "as_query", lambda tokenizer, prompt: prompt)  # the old bug: the plain prompt
    plain = scores(hf_samples())
    assert len(engine) == len(hf) == len(plain) == len(prompts) * NUM_SAMPLES
    same, mismatch = ks_2samp(engine, hf).pvalue, ks_2samp(plain, hf).pvalue
    assert same > alpha > mismatch, (same, mismatch)


@needs_vllm
def test_a_repeated_prompt_gets_independent_completions(prefs_samples):
    """The training split holds its first row twice: its two requests are sampled independently (a per-request seed
    gives every request the same random stream, so the same prompt got the same completions twice)."""
    prompts, call, _ = prefs_samples
    assert prompts[0] == prompts[TRAIN_PROMPTS]
    first, again = ([o["token_ids"] for o in call["requests"][i]["outputs"]] for i in (0, TRAIN_PROMPTS))
    assert sorted(first) != sorted(again)
    assert sum(a == b for a, b in zip(first, again)) < NUM_SAMPLES // 4  # not the same streams
    assert call["params"]["seed"] is None


# ------------------------------------------------------------------ the trainer's rollouts (--generation-backend vllm)
RL_STEPS, RL_TOKENS = 3, 8


@pytest.fixture(scope="session")
def trainer_run(tmp_path_factory, vllm_world, smollm2_cut) -> Path:
    """grpo_signcert.py --generation-backend vllm on the EOS-raised cut, 3 steps of 2 prompts x 4 completions at a
    learning rate that moves it (1e-3), a checkpoint after every step (the last one kept: the policy after update 2,
    the one that sampled step 3), recorded by tests/vllm_worker.py (the engine's log-probability of every token)."""
    return built_once(tmp_path_factory, "trainer_run", lambda out: run_trainer(out, vllm_world, smollm2_cut, 1))


def run_trainer(out: Path, vllm_world: Path, smollm2_cut: Path, processes: int) -> None:
    """The trainer fixtures' run into `out`: 3 steps of 2 prompts x 4 completions (all 8 in one micro-batch per
    process), recorded by tests/vllm_worker.py; on `processes` > 1 under `accelerate launch`."""
    out.mkdir(parents=True)
    launch = accelerate_cmd(processes)[1:] if processes > 1 else []  # `run` puts sys.executable in front
    run(*launch, "tests/vllm_worker.py", out / "record.json", "grpo_signcert.py", "--generation-backend", "vllm",
        "--policy-path", vllm_world / "policy", "--reward-model-path", smollm2_cut / "rm",
        "--dataset", vllm_world / "data", "--gold-rm-path", smollm2_cut / "rm", "--seed", 1,
        "--total-steps", RL_STEPS, "--save-every", 1, "--num-prompts-per-step", 2, "--num-generations", 4,
        "--max-new-tokens", RL_TOKENS, "--micro-batch-size", 8 // processes, "--eval-every", 0,
        "--log-samples-every", 1, "--learning-rate", 1e-3, "--output-dir", out / "run")  # fmt: skip


def engine_vs_hf(call: dict, policy) -> float:
    """The largest |engine log-prob - HF log-prob| over every token the engine sampled in one generate call, HF's
    reading the prompt ids the engine read."""
    worst = 0.0
    for request in call["requests"]:
        ids = [o["token_ids"] for o in request["outputs"]]
        engine = torch.tensor([lp for o in request["outputs"] for lp in o["logprobs"]])
        hf = torch.cat(hf_log_probs(policy, request["prompt_token_ids"], ids))
        worst = max(worst, (hf - engine).abs().max().item())
    return worst


@needs_vllm
def test_the_trainers_engine_samples_from_the_policy_after_each_update(trainer_run, vllm_world):
    """Each step's completions come from the policy as the last update left it: the engine's log-probability of every
    token it sampled at step 3 is the HF log-probability under the checkpoint of step 2 (float32 both), and at step 1
    under the initial policy; the initial policy gives step 3's tokens other log-probabilities (the updates moved it:
    the check has power). Seen failing with the weights pushed once only, and without the LM head's repacking (the
    update moves the tied embedding: the engine's head stayed the old one)."""
    from transformers import AutoModelForCausalLM

    (entry,) = json.loads((trainer_run / "record.json").read_text())
    llm, *calls = entry["record"]
    assert len(calls) == RL_STEPS
    assert llm["llm"]["distributed_executor_backend"] == "external_launcher" and llm["llm"]["dtype"] == "float32"
    initial = AutoModelForCausalLM.from_pretrained(vllm_world / "policy").eval()
    after_2 = AutoModelForCausalLM.from_pretrained(trainer_run / "run" / "checkpoint-2" / "model").eval()
    assert engine_vs_hf(calls[0], initial) < 2e-3
    assert engine_vs_hf(calls[2], after_2) < 2e-3
    assert engine_vs_hf(calls[2], initial) > 0.05


@needs_vllm
def test_the_trainer_trains_on_what_the_engine_sampled(trainer_run, vllm_world):
    """The rollouts the update used (samples.jsonl, every step) are the engine's completions: per step, the same
    multiset of lengths and endings, each completion cut after its first end token, the tokenizer's EOS or the
    second end id (seen failing when the trainer cut at the tokenizer's EOS only: a completion stopped by the second
    end id then counted as unended, padded to the budget); the engine read the templated queries of the step's
    prompts (as_query), one request per completion, at temperature 1 with both end ids as its stops."""
    tok = tokenizer_of(vllm_world / "policy")
    (entry,) = json.loads((trainer_run / "record.json").read_text())
    calls = entry["record"][1:]
    samples = read_jsonl(trainer_run / "run" / "samples.jsonl")
    for step, call in enumerate(calls, start=1):
        rows = [s for s in samples if s["step"] == step]
        outputs = [r["outputs"][0]["token_ids"] for r in call["requests"]]
        assert call["params"]["temperature"] == 1.0 and call["params"]["n"] == 1 and call["params"]["ignore_eos"]
        assert sorted(call["params"]["stop_token_ids"]) == [2, SECOND_END]
        ends = [len(cut_after_end(o)) if set(o) & set(END_IDS) else None for o in outputs]
        assert sorted(e or RL_TOKENS for e in ends) == sorted(r["length"] for r in rows)
        assert sorted(e is not None for e in ends) == sorted(r["has_eos"] for r in rows)
        queries = sorted(query_ids(tok, r["prompt"]) for r in rows)
        assert sorted(r["prompt_token_ids"] for r in call["requests"]) == queries


@pytest.fixture(scope="session")
def trainer_run_2_processes(tmp_path_factory, vllm_world, smollm2_cut) -> Path:
    """trainer_run's run under `accelerate launch` with 2 processes, each with its own engine (one prompt x 4
    completions each per step), recorded by tests/vllm_worker.py per process (record.json.rank0, .rank1)."""

    return built_once(
        tmp_path_factory, "trainer_run_2_processes", lambda out: run_trainer(out, vllm_world, smollm2_cut, 2)
    )


@needs_vllm
def test_two_processes_each_sample_their_share_from_the_policy_after_each_update(trainer_run_2_processes, vllm_world):
    """Under `accelerate launch` with 2 processes: each process made its own engine (in-process, seeded seed + rank)
    and, at every step, sampled its own prompt's 4 completions (the two processes' queries are the step's two
    groups' prompts in samples.jsonl); at step 3 each engine's log-probability of every token it sampled is the
    HF log-probability under the checkpoint of step 2 (to 2e-3; under the initial policy off by more than 0.05): both
    engines got the weights of the update the two processes made together."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer_of(vllm_world / "policy")
    runs = trainer_run_2_processes
    initial = AutoModelForCausalLM.from_pretrained(vllm_world / "policy").eval()
    after_2 = AutoModelForCausalLM.from_pretrained(runs / "run" / "checkpoint-2" / "model").eval()
    records = [json.loads((runs / f"record.json.rank{rank}").read_text()) for rank in (0, 1)]
    samples = read_jsonl(runs / "run" / "samples.jsonl")
    calls = []
    for rank, record in enumerate(records):
        (entry,) = record
        llm, *per_step = entry["record"]
        assert llm["llm"]["distributed_executor_backend"] == "external_launcher" and llm["llm"]["seed"] == 1 + rank
        assert len(per_step) == RL_STEPS and all(len(c["requests"]) == 4 for c in per_step)
        assert engine_vs_hf(per_step[2], after_2) < 2e-3 and engine_vs_hf(per_step[2], initial) > 0.05
        calls.append(per_step)
    for step in range(1, RL_STEPS + 1):
        mine = [{tuple(r["prompt_token_ids"]) for r in calls[rank][step - 1]["requests"]} for rank in (0, 1)]
        assert len(mine[0]) == len(mine[1]) == 1  # each process: its one prompt, 4 times
        groups = {s["group"]: tuple(query_ids(tok, s["prompt"])) for s in samples if s["step"] == step}
        assert sorted(groups) == [0, 1] and sorted(groups.values()) == sorted([*mine[0], *mine[1]])
