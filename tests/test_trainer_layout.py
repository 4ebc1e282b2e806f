"""The four trainers read the same way, and the baselines are grpo_signcert.py with the method swapped (issue 46).

- Outside the method regions (`# --- method: <name> ---` ... `# --- end method ---`) each baseline is
  grpo_signcert.py line for line: tools/sync_trainers.py writes them so, and this test fails on any drift.
- In each trainer the training loop starts within the first 40% of the file, after the method and the loss, and
  every part below it stands under a banner.
    python -m pytest tests/test_trainer_layout.py -q
"""

import difflib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("sync_trainers", ROOT / "tools" / "sync_trainers.py")
sync = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync)

TRAINERS = (sync.TEMPLATE, *sync.BASELINES)
BANNERS = (  # below the loop, in this order
    "arguments and batch sizes",
    "data (as in the stage scripts)",
    "models and scoring",
    "held-out evaluation",
    "run folder and checkpoints",
    "sampling",
    "update",
)


def drift(template: str, text: str, name: str) -> list[str]:
    """The unified diff of `text` against the template outside the method regions (empty: in sync)."""
    a, b = sync.outside_regions(template, sync.TEMPLATE), sync.outside_regions(text, name)
    return list(difflib.unified_diff(a.splitlines(), b.splitlines(), sync.TEMPLATE, name, lineterm="", n=1))


@pytest.mark.parametrize("baseline", sync.BASELINES)
def test_each_baseline_is_grpo_signcert_outside_its_method_regions(baseline):
    template, text = (ROOT / sync.TEMPLATE).read_text(), (ROOT / baseline).read_text()
    assert [n for n, _ in sync.split_regions(text) if n] == [n for n, _ in sync.split_regions(template) if n]
    assert drift(template, text, baseline) == [], "edit grpo_signcert.py, then run `python tools/sync_trainers.py`"
    assert sync.render(template, sync.regions(text, baseline), baseline) == text


def test_a_drifted_baseline_is_caught():
    """One changed line outside a region (a fix made in one trainer only) fails the test, and the tool puts it back."""
    template, text = (ROOT / sync.TEMPLATE).read_text(), (ROOT / "grpo_uwo.py").read_text()
    drifted = text.replace("exact_div(a: int, b: int, what: str)", "exact_div(a: int, b: int, what: str = '')")
    assert drifted != text
    found = drift(template, drifted, "grpo_uwo.py")
    assert any("what: str = ''" in line for line in found)
    assert sync.render(template, sync.regions(drifted, "grpo_uwo.py"), "grpo_uwo.py") == text


def test_the_region_parser_refuses_broken_markers():
    with pytest.raises(ValueError, match="never closed"):
        sync.split_regions("a\n# --- method: x ---\nb\n")
    with pytest.raises(ValueError, match="no region open"):
        sync.split_regions("a\n# --- end method ---\n")
    with pytest.raises(ValueError, match="inside region"):
        sync.split_regions("# --- method: x ---\n# --- method: y ---\n# --- end method ---\n")
    with pytest.raises(ValueError, match="has the regions"):
        sync.render("# --- method: x ---\n# --- end method ---\n", {}, "b.py")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_the_loop_comes_early_after_the_method_and_the_loss_and_the_rest_is_under_banners(trainer):
    lines = (ROOT / trainer).read_text().splitlines()
    at = {line: i for i, line in enumerate(lines) if line}
    loop = next(i for i, line in enumerate(lines) if line.startswith("    for step in bar:"))
    assert loop < 0.4 * len(lines), f"{trainer}: the training loop starts at line {loop + 1} of {len(lines)}"
    method = at["# --- method: method ---"]
    loss, main = next(i for i, line in enumerate(lines) if line.startswith("def dr_grpo_loss(")), at["def main():"]
    assert method < loss < main < loop
    end_of_method = next(i for i in range(method, len(lines)) if lines[i] == "# --- end method ---")
    assert loss - end_of_method < 5, "the loss right after the method"
    banners = [m[1] for line in lines[loop:] if (m := re.match(r"^# -{20,} (.+)$", line))]
    assert banners == list(BANNERS)
    assert lines[-2:] == ['if __name__ == "__main__":', "    main()"]
    # everything below the loop is defined under a banner (no stray function between main and the first banner)
    first_banner = next(i for i in range(loop, len(lines)) if re.match(r"^# -{20,} ", lines[i]))
    assert not [line for line in lines[loop:first_banner] if line.startswith(("def ", "class "))]


def test_the_readme_claim_about_the_diff():
    """README: `diff grpo_signcert.py grpo_uwo.py` shows the method regions and nothing else."""
    readme = (ROOT / "README.md").read_text()
    assert "diff grpo_signcert.py grpo_uwo.py" in readme
    template, text = (ROOT / sync.TEMPLATE).read_text(), (ROOT / "grpo_uwo.py").read_text()
    inside = set()
    number = 0
    for name, content in sync.split_regions(text, "grpo_uwo.py"):
        n = content.count("\n")
        if name:
            inside |= set(range(number, number + n))
        number += n
    changed = set()
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, template.splitlines(), text.splitlines()).get_opcodes():
        if tag != "equal":
            changed |= set(range(j1, j2))
    assert changed and changed <= inside


# ------------------------------------------------------------------ issue 43 (a), (b): in all four trainers
@pytest.mark.parametrize("trainer", TRAINERS)
def test_num_generations_below_2_is_refused_first_with_its_own_message(trainer, tmp_path):
    """K = 1 is refused before any model loads and before the batch arithmetic (which would name divisors)."""
    import sys

    from conftest import run_checks_in_process

    cmd = [sys.executable, trainer, "--num-generations", "1", "--micro-batch-size", "16"]
    res = run_checks_in_process([*cmd, "--output-dir", str(tmp_path / "run")], ROOT)
    assert res.returncode != 0 and "--num-generations must be >= 2: the group baseline" in res.stderr, res.stderr
    assert "divisor" not in res.stderr and not (tmp_path / "run").exists()


def test_a_folder_left_by_a_failed_start_holds_no_run():
    """The rule (open_run_dir): a folder holds a run when it has a checkpoint, a final model, or a metrics row past
    step 0; what a failed start leaves (args.json, the step-0 row, a wandb folder) does not block the next run."""
    import json
    import tempfile

    import grpo_signcert as gs

    with tempfile.TemporaryDirectory() as out:
        path = Path(out)
        (path / "args.json").write_text("{}")
        (path / "wandb").mkdir()
        (path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/test/gold_reward": 0.1}) + "\n")
        assert not gs.holds_a_run(out)
        with open(path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 1}) + "\n")
        assert gs.holds_a_run(out)
        (path / "metrics.jsonl").write_text('{"step": 0}\n{"ste')  # a row cut by a kill: count it as a run
        assert gs.holds_a_run(out)
        (path / "metrics.jsonl").unlink()
        (path / "latest").write_text("checkpoint-2")
        assert gs.holds_a_run(out)
