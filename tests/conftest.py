"""Every test runs offline (no hub look-ups, no wandb login); subprocesses inherit this environment. Also the
helpers several test files share: a multi-process launch command, the CI tiny world, jsonl logs."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Under pytest-xdist (pyproject.toml runs the suite on the cores with -n auto) every worker and the scripts it
# launches share the cores: each worker's torch gets its share of them instead of all, so that two workers on two
# cores do not run four threads. A test that needs another count sets it itself.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each runs model-training subprocesses of up to ~1 GB)."""
    return max(1, min(4, os.cpu_count() or 1))


def free_port():
    """A port nobody listens on, for `accelerate launch --main_process_port`: concurrent runs (another
    suite, a user's job) would otherwise collide on the default 29500 and abort."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


# several CPU processes: `--multi_gpu` makes accelerate start them with torchrun, and the scripts, seeing no GPU,
# run them on the CPU with gloo (`--cpu --num_processes 2` starts ONE process in accelerate 1.x)
def accelerate_cmd(procs):
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "1",
        "--main_process_port",
        free_port(),
        "--num_processes",
        str(procs),
    ]


def short_run_cmd(script, world, out, *extra, procs=None):
    """A short run of one of the four trainers on the CI world (4 prompts x 4 completions of 8 tokens), on `procs`
    processes (None: plain python), with the held-out evaluation off unless `extra` turns it on. `extra` comes
    last, so it can override any flag here (the last occurrence wins); the reward model(s) go in `extra`."""
    head = accelerate_cmd(procs) if procs else [sys.executable]
    return head + [
        script,
        "--policy-path",
        str(world / "policy"),
        "--gold-rm-path",
        str(world / "gold_rm"),
        "--dataset",
        str(world / "data"),
        "--num-prompts-per-step",
        "4",
        "--num-generations",
        "4",
        "--micro-batch-size",
        "4",
        "--max-new-tokens",
        "8",
        "--output-dir",
        str(out),
        "--eval-every",
        "0",
        *extra,
    ]


def ci_world_with_eos_policy(root: Path) -> Path:
    """The CI tiny world in `root`, plus `root/policy`: a copy of its random-init base policy (which almost never
    ends) whose EOS logit is raised by 3.5 at every position, so that it emits EOS about 1 token in 11 and
    completions with and without EOS (the missing-EOS penalty) both occur in a few steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "tiny_world.py", "--preset", "ci", "--output-dir", str(root), "--base-pretrain-steps", "0"]
    subprocess.run(cmd, check=True, cwd=repo, capture_output=True, timeout=600)  # a random-init base, not pretrained
    policy = AutoModelForCausalLM.from_pretrained(root / "base_policy")
    with torch.no_grad():
        policy.gpt_neox.final_layer_norm.bias[0] = 5.0
        policy.get_output_embeddings().weight[policy.config.eos_token_id, 0] = 0.7
    policy.save_pretrained(root / "policy")
    AutoTokenizer.from_pretrained(root / "base_policy").save_pretrained(root / "policy")
    return root


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_metrics(out: Path) -> list[dict]:
    return read_jsonl(out / "metrics.jsonl")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` run once per test session, by whichever pytest-xdist worker asks first (the others wait on a
    lock and then read the same folder), so that a world or a model several test files need is not built once per
    worker. `name` may be a path below another such folder (a stage's output inside its world). The folder is
    shared: read it, and copy it (`copy_of`) before writing into it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, shared by its workers (each has its own basetemp below it)
    out = base / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / ".built").exists():
            shutil.rmtree(out, ignore_errors=True)  # what a worker that failed mid-build left
            build(out)  # it makes the folder
            (out / ".built").touch()
    return out


def copy_of(folder: Path, dest: Path) -> Path:
    """A private copy of a shared folder of `built_once`, to write into."""
    return Path(shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".built")))


@pytest.fixture(scope="session")
def ci_world_3_gold_steps(tmp_path_factory) -> Path:
    """`tiny_world.py --preset ci --seed 1 --gold-steps 3`, built once for the whole session and shared (read only):
    the world tests/test_tiny_world.py reads, and the one the pipeline's end-to-end test builds as its first stage."""
    return built_once(tmp_path_factory, "ci_world_3_gold_steps", build_ci_world_3_gold_steps)


def build_ci_world_3_gold_steps(out, seed=1, *extra, script=None) -> Path:
    """`tiny_world.py --preset ci --seed SEED --gold-steps 3 ...extra` into `out` (`script`: another copy of
    tiny_world.py, e.g. one beside a shipped gold folder)."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(script or repo / "tiny_world.py"), "--preset", "ci", "--seed", str(seed)]
    cmd += ["--output-dir", str(out), "--gold-steps", "3", *extra]
    subprocess.run(cmd, check=True, cwd=repo, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def ci_world(tmp_path_factory) -> Path:
    """The CI tiny world with its EOS-emitting `policy` (`ci_world_with_eos_policy`), built once for the whole
    session and shared: copy it (`copy_of`) before writing into it."""
    return built_once(tmp_path_factory, "ci_world", ci_world_with_eos_policy)


@pytest.fixture(scope="session")
def ci_world_with_rm(tmp_path_factory, ci_world) -> Path:
    """A copy of the CI world with an untrained proxy RM in `rm/` (the base policy plus a fresh `score` head, saved
    with the policy's tokenizer as train_rm.py saves it); built once per session, read only."""

    def build(root):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        copy_of(ci_world, root)
        torch.manual_seed(0)  # the fresh head: the same whichever tests ran before
        rm = AutoModelForSequenceClassification.from_pretrained(root / "base_policy", num_labels=1)
        rm.save_pretrained(root / "rm")
        AutoTokenizer.from_pretrained(root / "base_policy").save_pretrained(root / "rm")

    return built_once(tmp_path_factory, "trainer_world", build)


# the longest tests (each 30-150 s on a 2-core machine) start first, so that under pytest-xdist the other worker's
# many short tests fill the time beside them instead of one long test ending the run alone
LONGEST_FIRST = (
    "test_pipeline_runs_every_stage_every_method_and_writes_the_tables",
    "test_resume_after_kill_continues_with_no_lost_or_repeated_step",
    "test_run_folders_cannot_be_mixed_up",
    "test_uwo_resume_after_kill_continues_with_no_lost_or_repeated_step",
    "test_update_is_the_same_for_1x4_2x2_and_1x1_and_matches_the_full_batch_gradient",
    "test_the_command_line_raises_the_proxy_reward_evaluates_and_resumes",
    "test_two_processes_with_a_straddling_group_use_the_whole_batch",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname, len(rank)))  # stable: the rest keep their order


def run_checks_in_process(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    """`python script.py ...` (a command as the tests build it) run INSIDE this test process, for the runs that must
    fail in a script's argument and input checks, before any model loads: the same code path as the command line
    (runpy runs the file as __main__ with that argv) without paying the ~5 s of importing torch and transformers in
    a new interpreter for every bad input. Returns what subprocess.run would: returncode (1 for an exception, the
    code of a SystemExit) and stderr ending in the exception's line as the interpreter prints it."""
    import contextlib
    import io
    import runpy
    import traceback

    assert cmd[0] == sys.executable, cmd
    script, err, out, code = os.path.join(str(cwd), cmd[1]), io.StringIO(), io.StringIO(), 0
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    try:
        sys.argv = [script, *cmd[2:]]
        os.chdir(cwd)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if e.code is not None and not isinstance(e.code, int):  # the interpreter prints a message exit's message
            err.write(f"{e.code}\n")
    except Exception as e:  # noqa: BLE001 - what the interpreter would print, and exit 1
        err.write("".join(traceback.format_exception_only(type(e), e)))
        code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())
