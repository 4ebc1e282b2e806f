"""The README's Python, executed as written: every ```python block and the code column of the equation table, so
that a snippet cannot drift from the code again (issue 43: the TRL snippet failed on a CPU, the table's
`rewards.mean(1)` was wrong for B != K). What a snippet leaves to the reader (its inputs) is made here; the only
changes to its text are the tiny world's paths and, for the TRL run, one step instead of a hundred.

    python -m pytest tests/test_readme.py -q
"""

import os
import re
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
TABLE_CODE = dict(re.findall(r"^\| (eq\. \([\d)(-]+\)) \|[^|]*\| `([^`|]*)` \|$", README, re.M))

import grpo_signcert  # noqa: E402


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def test_every_python_block_is_executed_here():
    """A new snippet in the README gets its test: each block is one of the two this file runs."""
    assert len(BLOCKS) == 2
    assert {"signcert_advantages(" in b for b in BLOCKS} == {True, False}
    assert sum("SignCertGRPOTrainer(" in b for b in BLOCKS) == 1


def group_batch(B=3, K=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, generator=g), torch.randn(B, K, d, generator=g)


def test_the_equation_tables_code_is_the_dr_grpo_advantage():
    """eq. (4)'s cell, run on B != K (3 prompts x 5 completions): each row centred on its own group mean."""
    rewards, features = group_batch()
    namespace = {"rewards": rewards}
    exec(TABLE_CODE["eq. (4)"], namespace)
    expected = torch.stack([rewards[i] - rewards[i].mean() for i in range(3)])
    assert torch.allclose(namespace["adv"], expected, atol=1e-6)
    plain, _, _ = grpo_signcert.signcert_advantages(rewards, features, quantile=0.0)
    assert torch.allclose(namespace["adv"], plain, atol=1e-6)  # q = 0: the function's own advantage


def test_the_method_snippet_runs_and_gives_the_worst_case():
    rewards, features = group_batch(B=4, K=6, d=8, seed=1)
    has_eos = torch.ones(4, 6, dtype=torch.bool)
    has_eos[0, 2] = False
    accelerator = types.SimpleNamespace(gather=lambda t: t)  # one process
    namespace = {"rewards": rewards, "features": features, "has_eos": has_eos, "accelerator": accelerator}
    exec(block("signcert_advantages("), namespace)
    adv, radius, eps = namespace["adv"], namespace["radius"], namespace["eps"]
    A = rewards - rewards.mean(1, keepdim=True)
    h = features * has_eos.unsqueeze(-1)  # a fixed reward does not move with the head: its features count as 0
    dev = (h - h.mean(1, keepdim=True)).norm(dim=-1)
    assert torch.allclose(radius[has_eos], (A.abs() / dev)[has_eos], rtol=1e-5)
    assert eps > 0 and torch.allclose(adv[has_eos], (A - eps * A.sign() * dev)[has_eos], atol=1e-5)
    assert adv[0, 2] == A[0, 2]  # no EOS: not certified, its Dr.GRPO advantage kept


def test_the_trl_snippet_trains_on_a_cpu_as_written(ci_world_with_rm, tmp_path, monkeypatch):
    """The TRL snippet on the CI world's policy and untrained proxy, one step: it trains, and the step's SignCert
    metrics reach TRL's log."""
    world = ci_world_with_rm
    code = block("SignCertGRPOTrainer(")
    for old, new in {
        '"runs/tiny_world/sft"': repr(str(world / "policy")),
        '"runs/tiny_world/rm"': repr(str(world / "rm")),
        '"runs/tiny_world/data"': repr(str(world / "data")),
        '"runs/trl"': repr(str(tmp_path / "trl")),
        "max_steps=100": "max_steps=1",
    }.items():
        assert code.count(old) >= 1, f"the README's TRL snippet no longer has {old}: update this test"
        code = code.replace(old, new)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    namespace = {}
    exec(compile(code, "README.md (TRL snippet)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1
    logged = {k for row in trainer.state.log_history for k in row}
    assert "signcert/eps" in logged, sorted(logged)


@pytest.mark.parametrize("line", ["accelerate launch grpo_signcert.py --quantile 0.3 --kl-coef 0.01"])
def test_the_readme_names_the_users_command(line):
    assert line in README
