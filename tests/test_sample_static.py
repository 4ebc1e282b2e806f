"""grpo_signcert.py's `sample_static`, the sampling loop over a static KV cache: on a tiny random model it
samples exactly the tokens of transformers' `generate` (the `hf` backend) from the same seed, left-padded
prompts, EOS and the padding after it included, and its first tokens follow softmax(logits / T)."""

import os
import sys
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chisquare
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from grpo_signcert import position_ids_of, sample, sample_static, truncate_after_eos

PAD, EOS, VOCAB = 0, 3, 8  # a small vocabulary, so that rows end (EOS) at different steps


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rotary_pct=1.0,  # every dimension rotated and a large init: positions matter to the samples
        initializer_range=0.5,
        eos_token_id=EOS,
        bos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = GPTNeoXForCausalLM(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = EOS, PAD
    return model


def left_padded_prompts(n=8, width=10):
    g = torch.Generator().manual_seed(1)
    query = torch.randint(4, VOCAB, (n, width), generator=g)
    mask = torch.ones_like(query)
    for i in range(n // 2):  # half the rows padded on the left, by different amounts
        query[i, : i + 1], mask[i, : i + 1] = PAD, 0
    return query, mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_static_loop_samples_the_tokens_of_hf_generate(temperature):
    policy, (query, mask) = tiny_policy(), left_padded_prompts()
    args = SimpleNamespace(temperature=temperature, max_new_tokens=12, generation_backend="static")
    ended_early = 0
    for seed in range(8):
        torch.manual_seed(seed)
        hf = sample(policy, query, mask, args, PAD)
        torch.manual_seed(seed)
        ours = sample_static(policy, query, mask, args, PAD)
        assert ours.shape == hf.shape == (query.shape[0], args.max_new_tokens)
        assert torch.equal(ours, hf), f"seed {seed}: static loop {ours.tolist()} != generate {hf.tolist()}"
        _, kept, has_eos = truncate_after_eos(ours, EOS, PAD)
        assert (ours[kept == 0] == PAD).all()  # after the EOS: only padding, as `sample`
        ended_early += int((has_eos & (kept.sum(1) < args.max_new_tokens)).sum())
    assert ended_early > 0  # the comparison covered rows that stop before the others


def test_static_loop_stops_when_every_row_has_ended():
    """Every row ends at its first token: the loop stops, and the rest is padding (as `generate` pads it)."""
    policy, (query, mask) = tiny_policy(), left_padded_prompts()
    with torch.no_grad():  # the last hidden state is the layer norm's bias b; the head gives EOS the logit 100
        policy.gpt_neox.final_layer_norm.weight.zero_()
        bias = policy.gpt_neox.final_layer_norm.bias.copy_(torch.randn(32))
        head = policy.get_output_embeddings().weight
        head.zero_()
        head[EOS] = 100 * bias / bias.norm() ** 2
    args = SimpleNamespace(temperature=1.0, max_new_tokens=6, generation_backend="static")
    torch.manual_seed(0)
    out = sample_static(policy, query, mask, args, PAD)
    assert (out[:, 0] == EOS).all() and (out[:, 1:] == PAD).all()


def test_first_tokens_follow_softmax_of_the_logits_over_temperature():
    # a correct sampler fails a test at level 1e-6 once in a million draws (another CPU rounds the probabilities
    # differently and so draws another sample), and 10000 draws still tell T = 0.7 from T = 1 by far
    policy, temperature, n = tiny_policy(), 0.7, 10000
    query, mask = left_padded_prompts(n=2)
    query, mask = query[:1].repeat(n, 1), mask[:1].repeat(n, 1)  # one left-padded prompt, n times
    args = SimpleNamespace(temperature=temperature, max_new_tokens=1, generation_backend="static")
    torch.manual_seed(0)
    first = sample_static(policy, query, mask, args, PAD)[:, 0]
    with torch.no_grad():  # the next-token distribution from one full forward, no cache
        logits = policy(input_ids=query[:1], attention_mask=mask[:1], position_ids=position_ids_of(mask[:1])).logits
    p = torch.softmax(logits[0, -1].double() / temperature, -1)
    observed = torch.bincount(first, minlength=VOCAB).double()
    assert chisquare(observed.numpy(), (n * p).numpy()).pvalue > 1e-6
    # and not the distribution at temperature 1 (the check can tell them apart)
    p1 = torch.softmax(logits[0, -1].double(), -1)
    assert chisquare(observed.numpy(), (n * p1).numpy()).pvalue < 1e-6


def test_compiled_loop_samples_the_same_tokens():
    """`--generation-backend compiled` on a CPU: torch.compile(fullgraph=True) of the decoding step (no CUDA graphs
    here) must trace the model whole and sample the same tokens; a second call reuses the compiled step."""
    policy, (query, mask) = tiny_policy(), left_padded_prompts()
    args = SimpleNamespace(temperature=1.0, max_new_tokens=8, generation_backend="compiled")
    for seed in range(2):
        torch.manual_seed(seed)
        hf = sample(policy, query, mask, args, PAD)
        torch.manual_seed(seed)
        assert torch.equal(sample_static(policy, query, mask, args, PAD), hf)


def test_temperature_zero_is_refused():
    policy, (query, mask) = tiny_policy(), left_padded_prompts()
    args = SimpleNamespace(temperature=0.0, max_new_tokens=4, generation_backend="static")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample_static(policy, query, mask, args, PAD)


def test_compiled_loop_with_gradient_checkpointing_as_the_trainers_enable_it():
    """Gradient checkpointing (the paper preset) registers transformers' input-require-grads hook on the embeddings,
    whose `requires_grad_` call torch.compile(fullgraph=True) of torch 2.11 refuses (seen on an H100: the compiled
    backend failed at its first step; torch 2.13, used here, traces it, so the failure does not reproduce on this
    CPU). The trainers remove the hook right after enabling checkpointing (the embeddings are trained, so it is not
    needed): checked in their source; and with it removed the compiled loop samples what `generate` samples."""
    policy, (query, mask) = tiny_policy(), left_padded_prompts()
    args = SimpleNamespace(temperature=1.0, max_new_tokens=6, generation_backend="compiled")
    policy.gradient_checkpointing_enable()
    policy.disable_input_require_grads()
    torch.manual_seed(0)
    hf = sample(policy, query, mask, args, PAD)
    torch.manual_seed(0)
    assert torch.equal(sample_static(policy, query, mask, args, PAD), hf)
    for script in ("grpo_signcert.py", "grpo_uwo.py", "grpo_advpo.py", "grpo_bspo.py"):
        src = open(os.path.join(ROOT, script)).read()
        assert "policy.gradient_checkpointing_enable()\n        policy.disable_input_require_grads()" in src, script
