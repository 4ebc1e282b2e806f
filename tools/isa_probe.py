"""Which torch op first rounds differently on another CPU: one SFT-like step of the tiny world's base policy, run
twice in subprocesses, on this CPU's own kernels and with torch's kernels capped at another instruction set (what a
CPU without AVX-512 runs), and compared op by op, module by module and gradient by gradient:

    python tiny_world.py                     # the world (its base policy), if not built yet
    python tools/isa_probe.py                # AVX-512 (this CPU, if it has it) against AVX2

The cap: ATEN_CPU_CAPABILITY (torch's own vectorised kernels), MKL_ENABLE_INSTRUCTIONS (MKL's GEMMs) and
ONEDNN_MAX_CPU_ISA (oneDNN's kernels). A module's output that differs has every later one differing too; the first
is where the two CPUs part (docs/TINY_WORLD.md, "Determinism and other CPUs").
"""

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro


@dataclass
class Args:
    policy_path: str = "runs/tiny_world/base_policy"
    """the policy whose step is compared"""
    isa: str = "avx2"
    """the instruction set the second run's kernels are capped at (ATEN_CPU_CAPABILITY's value: avx2, default)"""
    batch_size: int = 64
    seq_len: int = 70
    """a batch of random token ids, the shape of an SFT batch (64 x about 70 tokens on the tiny world)"""
    keep: str = ""
    """a folder to keep the two runs' tensors in (own.pt and {isa}.pt, what the report compares); default: not kept"""


def one_step(policy_path, batch_size, seq_len, out):
    """Every module's output and every parameter's gradient of one next-token step, and a few single ops."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(policy_path)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    outs = []

    def hook(name):
        def save(module, inputs, output):
            o = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(o):
                outs.append((name or "(model)", type(module).__name__, o.detach().clone()))

        return save

    for name, module in model.named_modules():
        module.register_forward_hook(hook(name))
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    loss.backward()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch_size * seq_len, model.config.hidden_size, generator=g)
    ops = {
        "matmul (GEMM)": x @ torch.randn(x.shape[1], vocab, generator=g),
        "layer_norm": torch.nn.functional.layer_norm(x, (x.shape[1],)),
        "gelu": torch.nn.functional.gelu(x),
        "softmax": torch.softmax(x, -1),
        "log_softmax": torch.log_softmax(x, -1),
        "exp": torch.exp(x),
        "sum": x.sum(),
    }
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save({"outs": outs, "grads": grads, "loss": loss.detach(), "ops": ops}, out)


def compare(a, b):
    import torch

    diff = lambda x, y: "identical" if torch.equal(x, y) else f"differs (max |diff| {(x - y).abs().max().item():.1e})"
    print("single ops on the same random inputs:")
    for k in a["ops"]:
        print(f"  {k}: {diff(a['ops'][k], b['ops'][k])}")
    print("the forward, module by module in execution order, up to the first that differs:")
    for (name, kind, x), (_, _, y) in zip(a["outs"], b["outs"]):
        share = "" if torch.equal(x, y) else f", {(x != y).float().mean().item():.0%} of its entries"
        print(f"  {name} [{kind}]: {diff(x, y)}{share}")
        if share:
            break
    print(f"the loss: {a['loss'].item():.9g} / {b['loss'].item():.9g}")
    differing = [n for n in a["grads"] if not torch.equal(a["grads"][n], b["grads"][n])]
    print(f"gradients that differ: {len(differing)} of {len(a['grads'])}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--one-step":  # the subprocess
        one_step(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        sys.exit(0)
    args = tyro.cli(Args)
    if not os.path.exists(os.path.join(args.policy_path, "config.json")):
        raise SystemExit(f"--policy-path {args.policy_path}: no model there (build the world: python tiny_world.py)")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        os.makedirs(tmp, exist_ok=True)
        runs = {"own": {}, args.isa: {"ATEN_CPU_CAPABILITY": args.isa, "MKL_ENABLE_INSTRUCTIONS": args.isa.upper(),
                                      "ONEDNN_MAX_CPU_ISA": args.isa.upper()}}  # fmt: skip
        for name, env in runs.items():
            out = os.path.join(tmp, f"{name}.pt")
            cmd = [sys.executable, __file__, "--one-step", args.policy_path, str(args.batch_size), str(args.seq_len)]
            subprocess.run(cmd + [out], check=True, env=dict(os.environ, OMP_NUM_THREADS="1", **env))
        print(f"this CPU's torch kernels: {torch.backends.cpu.get_cpu_capability()}; against: {args.isa}")
        compare(*(torch.load(os.path.join(tmp, f"{n}.pt")) for n in runs))
