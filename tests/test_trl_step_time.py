"""benchmarks/trl_step_time.py: both trainers' commands start from the same chain (--chain: its sft/ and rm/, the
world's data and gold from --root) with the same extra flags, which both trainers know."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import trl_step_time  # noqa: E402


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_both_trainers_get_the_chains_models_the_worlds_data_and_the_same_extra_flags():
    import grpo_signcert

    extra = "--num-prompts-per-step 4 --num-generations 4 --micro-batch-size 16 --learning-rate 3e-6"
    args = trl_step_time.Args(root="/w", chain="/w/seed2", extra_args=extra, steps=12)
    cmds = {s: trl_step_time.command(s, 0.5, "/out", args) for s in ("grpo_signcert.py", "grpo_signcert_trl.py")}
    for cmd in cmds.values():
        assert (flag(cmd, "--policy-path"), flag(cmd, "--reward-model-path")) == ("/w/seed2/sft", "/w/seed2/rm")
        assert (flag(cmd, "--dataset"), flag(cmd, "--gold-rm-path")) == ("/w/data", "/w/gold_rm")
        assert cmd[-8:] == extra.split() and flag(cmd, "--total-steps") == "12"
    import grpo_signcert_trl  # both trainers have each extra flag (tyro's --a-b is the field a_b)

    for name in extra.split()[::2]:
        field = name[2:].replace("-", "_")
        assert field in grpo_signcert.Args.__dataclass_fields__ and field in grpo_signcert_trl.Args.__dataclass_fields__
    default = trl_step_time.command("grpo_signcert.py", 0.0, "/out", trl_step_time.Args(root="/r"))
    assert flag(default, "--policy-path") == "/r/sft"  # no --chain: the root's chain seed 1; no extra flags:
    assert default[-2:] == ["--gold-every", "300"]
