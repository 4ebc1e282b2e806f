"""Worker for test_trainer.py: one `policy_update` of grpo_signcert.py on a FIXED batch of 16
completions, split over however many processes `accelerate launch` starts, with the accumulation that
`--micro-batch-size` implies. Rank 0 saves the updated parameters to the path given."""

import os
import sys
from types import SimpleNamespace

import torch
from accelerate import Accelerator, PartialState
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo_signcert import policy_update  # noqa: E402

N, P, T, V = 16, 5, 6, 50  # completions, prompt length, max new tokens, vocabulary


def model_and_batch():
    """The policy and the fixed batch (test_trainer.py rebuilds them for its independent computation)."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    policy = GPTNeoXForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    query = torch.randint(1, V, (N, P), generator=g)
    query_mask = torch.ones(N, P, dtype=torch.long)
    query_mask[::3, :2] = 0  # some left padding
    response = torch.randint(1, V, (N, T), generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    response_mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
    batch = dict(
        query=query,
        query_mask=query_mask,
        response=response,
        response_mask=response_mask,
        ref_logprobs=-3.0 - torch.rand(N, T, generator=g),
        advantages=torch.randn(N, generator=g),
    )
    return policy, batch


if __name__ == "__main__":
    micro_batch_size, expected_processes, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    policy, batch = model_and_batch()
    cpu = not torch.cuda.is_available()
    num_processes = PartialState(cpu=cpu).num_processes
    assert num_processes == expected_processes, f"launched {num_processes} processes, expected {expected_processes}"
    local = N // num_processes
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=local // micro_batch_size)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)  # the update IS the gradient
    policy, optimizer = accelerator.prepare(policy, optimizer)
    r = accelerator.process_index
    mine = {k: v[r * local : (r + 1) * local] for k, v in batch.items()}
    args = SimpleNamespace(
        micro_batch_size=micro_batch_size,
        num_ppo_epochs=1,
        temperature=1.0,
        clip_range=0.2,
        kl_coef=0.1,
        max_new_tokens=T,
        max_grad_norm=1e9,
    )
    before = {k: v.detach().clone() for k, v in accelerator.unwrap_model(policy).state_dict().items()}
    policy_update(accelerator, policy, optimizer, mine, args)
    if accelerator.is_main_process:
        after = accelerator.unwrap_model(policy).state_dict()
        torch.save({k: before[k] - after[k] for k in before}, out_path)  # = lr x gradient
