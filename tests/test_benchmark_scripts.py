"""The benchmark and experiment scripts' own logic, without their long runs: benchmarks/trl_step_time.py's commands
(both trainers from the same chain with the same extra flags) and benchmarks/vllm_curves.py's windows and verdict
(checked on hand-made curves)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import trl_step_time  # noqa: E402
import vllm_curves  # noqa: E402


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


def test_vllm_curves_windows_are_means_over_their_steps_and_within_means_inside_every_other_range():
    rows = [{"step": s, "x": float(s)} for s in range(1, 7)] + [{"step": 4, "y": 1.0}]
    assert vllm_curves.window_means(rows, "x", 3, 6) == [2.0, 5.0]  # (1+2+3)/3, (4+5+6)/3
    assert vllm_curves.window_means(rows, "y", 3, 6) == [None, 1.0]  # logged in the second window only
    stats, within = vllm_curves.compare({"hf": [1.0, 2.0, 3.0], "vllm": [1.5, 2.5]})
    assert within and stats["hf"]["mean"] == 2.0 and (stats["vllm"]["lo"], stats["vllm"]["hi"]) == (1.5, 2.5)
    assert not vllm_curves.compare({"hf": [1.0, 2.0, 3.0], "vllm": [2.5, 3.0, 3.5]})[1]  # hf's 2 below vllm's 2.5
    assert not vllm_curves.compare({"hf": [1.9, 2.0, 2.1], "vllm": [0.0, 2.0, 7.0]})[1]  # vllm's 3 above hf's 2.1


def test_vllm_curves_reuses_a_finished_run_of_the_same_command_only(tmp_path, monkeypatch):
    """A run is not started again when its folder holds a finished run of the same command (the experiment resumes),
    and is when the settings changed (a stale run of other settings is never read as this one)."""
    started = []

    def fake_run(cmd, **kwargs):
        started.append(cmd)
        out = cmd[cmd.index("--output-dir") + 1]
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write('{"step": 1, "reward/proxy": 0.5}\n')

    monkeypatch.setattr(vllm_curves.subprocess, "run", fake_run)
    args = vllm_curves.Args(output_dir=str(tmp_path), steps=1)
    assert vllm_curves.run(args, "hf", 1) == [{"step": 1, "reward/proxy": 0.5}] and len(started) == 1
    vllm_curves.run(args, "hf", 1)
    assert len(started) == 1  # the same command: read back, not run
    vllm_curves.run(vllm_curves.Args(output_dir=str(tmp_path), steps=1, quantile=0.3), "hf", 1)
    assert len(started) == 2 and flag(started[1], "--quantile") == "0.3"
    os.remove(tmp_path / "hf_s1" / "command.json")  # a run killed before its end wrote none: run again
    vllm_curves.run(vllm_curves.Args(output_dir=str(tmp_path), steps=1, quantile=0.3), "hf", 1)
    assert len(started) == 3
