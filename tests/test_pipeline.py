"""pipeline.py: the frontier read from a run's metrics (checked on hand-made curves against values worked out by
hand), and the README's main command end to end at very small settings (a `ci` world, every stage, every method,
the knob sweep on validation, two RL runs at once, the tables, the summary and the plot)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import copy_of  # noqa: E402

import pipeline  # noqa: E402


def fake_run(test_gold, val_gold, kls, every=10):
    """metrics.jsonl rows of a run evaluated at steps 0, every, 2*every, ...; the rollouts' KL is `kls[i]` at every
    step of the i-th stretch (so the +-2-step window around an evaluation averages the two stretches it touches)."""
    rows = [
        {"step": 0, "eval/test/gold_reward": test_gold[0], "eval/test/win_rate": 0.1, "eval/test/proxy_reward": 0.0}
    ]
    rows[0] |= {"eval/validation/gold_reward": val_gold[0], "eval/validation/win_rate": 0.1}
    rows[0] |= {"eval/validation/proxy_reward": 0.0}
    for i in range(1, len(test_gold)):
        for s in range((i - 1) * every + 1, i * every + 1):
            rows.append({"step": s, "policy/kl": kls[i]})
        rows[-1] |= {
            f"eval/test/{k}": v for k, v in (("gold_reward", test_gold[i]), ("win_rate", i / 10), ("proxy_reward", i))
        }
        rows[-1] |= {
            f"eval/validation/{k}": v for k, v in (("gold_reward", val_gold[i]), ("win_rate", 0), ("proxy_reward", i))
        }
    return rows


def test_frontier_of_a_run_that_peaks_and_falls():
    # KL per stretch: 1, 2, 4, 8 (constant within a stretch, so the window mean at an evaluation step s = 10 i mixes
    # steps s-2..s (stretch i) and s+1, s+2 (stretch i+1): (3 kl_i + 2 kl_{i+1}) / 5; the last step has no s+1)
    rows = fake_run(test_gold=[0.0, 0.6, 1.0, 0.5, 0.2], val_gold=[0.0, 0.5, 0.8, 0.9, 0.1], kls=[0, 1, 2, 4, 8])
    kl = [0.0, (3 * 1 + 2 * 2) / 5, (3 * 2 + 2 * 4) / 5, (3 * 4 + 2 * 8) / 5, 8.0]
    assert [p[1] for p in pipeline.eval_curve(rows, "test")] == pytest.approx(kl)
    f = pipeline.frontier(rows, [1.0, 2.0, 100.0])
    assert (f["peak_gold"], f["peak_step"], f["peak_kl"]) == (1.0, 20, pytest.approx(kl[2]))
    assert (f["final_gold"], f["final_step"], f["final_kl"]) == (0.2, 40, 8.0)
    assert f["gain_lost"] == pytest.approx((1.0 - 0.2) / (1.0 - 0.0))
    # early stopping: the VALIDATION gold peaks at step 30 (0.9), where the test gold is 0.5 (not the test peak)
    assert (f["stopped_step"], f["stopped_gold"], f["stopped_kl"]) == (30, 0.5, pytest.approx(kl[3]))
    # matched KL: KL 1 lies between step 0 (KL 0, gold 0) and step 10 (KL 1.4, gold 0.6); KL 2 between 1.4 and 2.8
    assert f["gold_at_kl1"] == pytest.approx(0.6 * 1 / kl[1])
    assert f["gold_at_kl2"] == pytest.approx(0.6 + (1.0 - 0.6) * (2 - kl[1]) / (kl[2] - kl[1]))
    assert f["gold_at_kl100"] is None  # never reached


def test_spread_prints_mean_min_max_and_counts_runs_that_never_reached():
    assert pipeline.spread([1.0, 2.0, 6.0]) == "3.000 (1.000 - 6.000)"
    assert pipeline.spread([1.0, None, 3.0]) == "2.000 (1.000 - 3.000) [1 never]"
    assert pipeline.spread([None, math.nan]) == "-"


def test_t_quantiles_and_the_paired_interval_against_scipy():
    from scipy import stats

    for df in list(range(1, 31)) + [31, 40, 60, 120, 1000]:
        assert pipeline.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df
    diffs = [0.3, -0.1, 0.25, 0.4, 0.05, 0.2, -0.02]
    p = pipeline.paired(diffs)
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (p["mean"], p["lo"], p["hi"]) == (
        pytest.approx(np.mean(diffs)),
        pytest.approx(lo, abs=1e-3),
        pytest.approx(hi, abs=1e-3),
    )
    assert (p["ahead"], p["n"]) == (5, 7)
    one = pipeline.paired([0.2])
    assert (one["mean"], one["lo"], one["hi"], one["ahead"], one["n"]) == (0.2, None, None, 1, 1)
    assert pipeline.paired([])["n"] == 0


def test_paired_differences_pair_runs_by_chain_seed_and_skip_missing_values():
    run = lambda label, seed, final, kl1: dict(label=label, seed=seed, final_gold=final, gold_at_kl1=kl1)
    runs = [run("Dr.GRPO", 1, 0.5, 0.9), run("Dr.GRPO", 2, 1.0, 1.2), run("Dr.GRPO", 3, 0.2, None),
            run("M", 3, 0.6, 1.0), run("M", 1, 0.4, 1.0), run("M", 2, 1.3, None)]  # fmt: skip
    out = pipeline.paired_differences(runs, "M", "Dr.GRPO", ["final_gold", "gold_at_kl1"])
    assert out["final_gold"]["diffs"] == pytest.approx([-0.1, 0.3, 0.4])  # seeds 1, 2, 3, each against its own
    assert (out["final_gold"]["ahead"], out["final_gold"]["n"]) == (2, 3)
    assert out["gold_at_kl1"]["diffs"] == pytest.approx([0.1])  # seed 2: M never reached KL 1; seed 3: Dr.GRPO never
    assert pipeline.cell(out["gold_at_kl1"]) == "+0.100 (1/1)"


def test_sweep_choice_follows_the_rule_fixed_in_advance():
    """The highest VALIDATION gold at the last evaluation, averaged over the sweep seeds, whatever the test gold says;
    the activity columns are run means."""
    a = fake_run(test_gold=[0.0, 2.0, 2.0], val_gold=[0.0, 0.9, 0.5], kls=[0, 1, 2])
    b = fake_run(test_gold=[0.0, 0.1, 0.1], val_gold=[0.0, 0.2, 0.6], kls=[0, 1, 2])
    for rows, change in ((a, 0.5), (b, 0.1)):
        for r in rows:
            if "policy/kl" in r:
                r["adv/relative_change"], r["adv/std"] = change, 1.0
    c = pipeline.sweep_choice("drgrpo_kl", [0.01, 0.1], [[a, a], [b, b]])
    assert c["chosen"] == 0.1 and c["validation_gold_at_last_step"] == [0.5, 0.6]
    assert c["adv/relative_change"] == pytest.approx([0.5, 0.1]) and c["final_kl"] == [2.0, 2.0]


def test_pipeline_runs_every_stage_every_method_and_writes_the_tables(tmp_path, ci_world_3_gold_steps):
    root = tmp_path / "tw"
    # the world stage's output, built by the session (the same command as the pipeline's world stage below, so
    # the stage is skipped: tests/test_tiny_world.py tests the world itself)
    copy_of(ci_world_3_gold_steps, root)
    cmd = [
        sys.executable,
        "pipeline.py",
        "--root",
        str(root),
        "--world-preset",
        "ci",
        "--methods",
        "all",
        "signcert_trl",
        "--sweep",
        "--quantile-grid",
        "0.1",
        "0.5",
        "--uwo-lambda-grid",
        "0.1",
        "--advpo-budget-grid",
        "5",
        "--bspo-threshold-grid",
        "1e-4",
        "--kl-coef-grid",
        "0.01",
        "0.1",
        "--rl-steps",
        "2",
        "--eval-every",
        "1",
        "--eval-num-prompts",
        "8",
        "--jobs",
        "2",
        "--extra-world-args=--gold-steps 3",
        "--gold-every",
        "1",
        "--extra-rl-args=--num-prompts-per-step 4 --num-generations 4 --micro-batch-size 16 --max-new-tokens 8",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.load(open(root / "pipeline_summary.json"))
    # the sweep chose each knob by the validation gold at the last evaluation, read back from the runs themselves
    sweep = json.load(open(root / "sweep.json"))
    for q in (0.1, 0.5):
        rows = [json.loads(line) for line in open(root / "rl" / f"signcert_q{q:g}_kl0.01_s1" / "metrics.jsonl")]
        assert (
            sweep["signcert"]["validation_gold_at_last_step"][[0.1, 0.5].index(q)]
            == rows[-1]["eval/validation/gold_reward"]
        )
    scores = sweep["signcert"]["validation_gold_at_last_step"]
    assert summary["chosen"]["signcert"] == [0.1, 0.5][scores.index(max(scores))]
    # the control's beta is chosen by the same rule; next to each value, what shows the knob acting, read back
    scores = sweep["drgrpo_kl"]["validation_gold_at_last_step"]
    beta = summary["chosen"]["drgrpo_kl"]
    assert beta == [0.01, 0.1][scores.index(max(scores))]
    for m, folder, value, key in (("signcert", "signcert_q{:g}_kl0.01_s1", 0.5, "signcert/eps"),
                                  ("uwo", "uwo_l{:g}_kl0.01_s1", 0.1, "uwo/penalty"),
                                  ("drgrpo_kl", "drgrpo_kl{:g}_s1", 0.1, "adv/relative_change")):  # fmt: skip
        rows = [json.loads(line) for line in open(root / "rl" / folder.format(value) / "metrics.jsonl")]
        i = sweep[m]["grid"].index(value)
        assert sweep[m][key][i] == pytest.approx(sum(r[key] for r in rows if key in r) / 2)  # 2 steps
        assert sweep[m]["final_kl"][i] == pipeline.eval_curve(rows, "validation")[-1][1]
    assert sweep["drgrpo_kl"]["adv/relative_change"] == [0.0, 0.0] and sweep["uwo"]["adv/relative_change"][0] > 0
    labels = [r["label"] for r in summary["runs"]]
    q = summary["chosen"]["signcert"]
    assert labels == [
        "Dr.GRPO",
        f"Dr.GRPO beta={beta:g}",
        f"SignCert-PO q={q:g}",
        "UWO lambda=0.1",
        "AdvPO B=5",
        "BSPO threshold=0.0001",
        f"SignCert-PO q={q:g} (TRL)",
    ]
    # each method ran with its own script and knob, against the proxy it needs
    args_of = lambda run: json.load(open(os.path.join(run["folder"], "args.json")))
    a = {r["label"]: args_of(r) for r in summary["runs"]}
    assert a["Dr.GRPO"]["quantile"] == 0 and a["Dr.GRPO"]["kl_coef"] == 0.01
    assert a[f"Dr.GRPO beta={beta:g}"]["quantile"] == 0 and a[f"Dr.GRPO beta={beta:g}"]["kl_coef"] == beta
    assert a["UWO lambda=0.1"]["uwo_penalty"] == "std"  # the SignCert-PO paper's UWO
    assert a[f"SignCert-PO q={q:g}"]["quantile"] == q
    assert [os.path.basename(p) for p in a["UWO lambda=0.1"]["reward_model_paths"]] == ["rm", "rm_2", "rm_3"]
    assert os.path.basename(a["BSPO threshold=0.0001"]["reward_model_path"]) == "rm_bspo"
    assert a["AdvPO B=5"]["budget"] == 5
    assert a[f"SignCert-PO q={q:g} (TRL)"]["quantile"] == q and a[f"SignCert-PO q={q:g} (TRL)"]["kl_coef"] == 0.01
    # the tables are the runs' own held-out numbers
    for r in summary["runs"]:
        rows = [json.loads(line) for line in open(os.path.join(r["folder"], "metrics.jsonl"))]
        test = [x["eval/test/gold_reward"] for x in rows if "eval/test/gold_reward" in x]  # TRL's: rows of their own
        assert (
            len(test) == 3 and r["final_gold"] == test[-1] and r["sft_gold"] == test[0] and r["peak_gold"] == max(test)
        )
        kl = [x["policy/kl"] for x in rows if "policy/kl" in x]  # the KL axis: both trainers log it per step
        assert len(kl) == 2 and r["final_kl"] == pytest.approx(sum(kl) / 2)
    assert "Table 1 in kind" in res.stdout and "The gold-vs-KL frontier" in res.stdout
    assert "| SignCert-PO q=" in res.stdout and "| SFT |" in res.stdout
    assert (root / "frontier.png").stat().st_size > 10_000
    # the main job's numbers of the chain (Dr.GRPO, and SignCert-PO if the sweep chose --quantile's 0.5), and no
    # reference to place them against at these settings
    draw, dr = summary["draws"]["1"], next(r for r in summary["runs"] if r["label"] == "Dr.GRPO")
    assert (draw["drgrpo_final_gold"], draw["drgrpo_gain_lost"]) == (dr["final_gold"], dr["gain_lost"])
    sc = next(r for r in summary["runs"] if r["label"] == f"SignCert-PO q={q:g}")
    assert draw.get("signcert_final_gold") == (sc["final_gold"] if q == 0.5 else None)
    assert "no reference for these settings: the reference's main job differs in world_preset" in res.stdout
    # tools/world_targets.py reads the same chain and run back: the same numbers as the pipeline's summary
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import world_targets

    t = world_targets.targets(str(root), 1, "drgrpo_kl0.01")
    dr = next(r for r in summary["runs"] if r["label"] == "Dr.GRPO")
    assert (t["sft_gold"], t["peak_gold"], t["final_gold"]) == (dr["sft_gold"], dr["peak_gold"], dr["final_gold"])
    assert t["gain"] == pytest.approx(dr["peak_gold"] - dr["sft_gold"])
    assert t["proxy_accuracy"] == summary["calibration"]["1"]["rm"]["eval/accuracy"]
    assert t["proxy_ok"] == (0.65 <= t["proxy_accuracy"] <= 0.80) and t["gain_ok"] == (t["gain"] >= 0.15)
    # a second run skips every stage and every run whose output exists
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        "$ " not in again.stdout and again.stdout.count("[pipeline] skip") == 1 + 7 + 7 + 7
    )  # world; sft, prefs, 4 RMs, eval; 7 sweep runs; 7 runs


def test_a_world_of_another_format_is_refused_with_what_to_do(tmp_path):
    """A stage whose output exists is skipped, so an older runs/tiny_world would be reused silently; the pipeline
    refuses it (no "format" = format 1, the world before coverage counted 3 keys) and says what to do. Its constant
    is tiny_world.py's."""
    import tiny_world

    assert pipeline.WORLD_FORMAT == tiny_world.WORLD_FORMAT
    pipeline.check_world_format({"format": tiny_world.WORLD_FORMAT}, str(tmp_path))
    for old in ({}, {"format": tiny_world.WORLD_FORMAT - 1}):
        with pytest.raises(SystemExit, match="another version of tiny_world.py.*Move"):
            pipeline.check_world_format(old, str(tmp_path))


def test_signcert_clip_is_signcert_with_rho_clipped_in_its_own_folder(tmp_path):
    """The ablation `signcert_clip` runs the same command as `signcert` at the same q plus `--clip`, into its own
    folder and row, so the two never share a run."""
    args = pipeline.Args(root=str(tmp_path))
    label, out, cmd = pipeline.rl_run(args, str(tmp_path), 3, "signcert", 0.5)
    clip_label, clip_out, clip_cmd = pipeline.rl_run(args, str(tmp_path), 3, "signcert_clip", 0.5)
    assert clip_label == "SignCert-PO clip q=0.5" != label
    assert clip_out == os.path.join(str(tmp_path), "rl", "signcert_clip_q0.5_kl0.01_s3") != out
    assert clip_cmd.count("--clip") == 1 and "--clip" not in cmd
    assert [x for x in clip_cmd if x != "--clip"] == [clip_out if x == out else x for x in cmd]


@pytest.mark.parametrize("kind", ["feature", "full"])
def test_signcert_under_another_uncertainty_is_signcert_plus_the_flag_in_its_own_folder(tmp_path, kind):
    """`signcert_feature` / `signcert_full` run signcert's command at the same q plus `--uncertainty <kind>`, in their
    own folder and row, and their q is swept on the same grid as signcert's."""
    args = pipeline.Args(root=str(tmp_path))
    label, out, cmd = pipeline.rl_run(args, str(tmp_path), 3, "signcert", 0.5)
    o_label, o_out, o_cmd = pipeline.rl_run(args, str(tmp_path), 3, f"signcert_{kind}", 0.5)
    assert o_label == f"SignCert-PO {kind} q=0.5" != label
    assert o_out == os.path.join(str(tmp_path), "rl", f"signcert_{kind}_q0.5_kl0.01_s3") != out
    i = o_cmd.index("--uncertainty")
    assert o_cmd[i + 1] == kind and "--uncertainty" not in cmd
    assert o_cmd[:i] + o_cmd[i + 2 :] == [o_out if x == out else x for x in cmd]
    assert pipeline.KNOBS[f"signcert_{kind}"] == pipeline.KNOBS["signcert"]


@pytest.mark.parametrize("threads, caller", [(1, "2"), (2, "1")])
def test_every_stage_and_rl_run_gets_the_pipelines_thread_count(tmp_path, monkeypatch, threads, caller):
    """A chain's floats depend on torch's thread count, so every stage and every RL run gets the pipeline's count
    (`--threads`, or the count a stage is given: the trainings' `--train-threads`), whatever the caller's
    OMP_NUM_THREADS: read back from torch inside the subprocesses."""
    monkeypatch.setenv("OMP_NUM_THREADS", caller)
    args = pipeline.Args(root=str(tmp_path), threads=threads, jobs=2)
    probe = "import sys, torch; open(sys.argv[1], 'w').write(str(torch.get_num_threads()))"
    pipeline.stage(args, "-c", str(tmp_path / "stage.txt"), probe, str(tmp_path / "stage.txt"))
    other = 3 - threads  # torch takes at most the cores there are (2 on the CI machine)
    pipeline.stage(args, "-c", str(tmp_path / "train.txt"), probe, str(tmp_path / "train.txt"), threads=other)
    runs = [(f"run{i}", str(tmp_path / f"run{i}"), [sys.executable, "-c", probe, str(tmp_path / f"run{i}.txt")])
            for i in range(2)]  # fmt: skip
    pipeline.run_all(args, runs)  # two at once (--jobs 2)
    got = [open(tmp_path / f).read() for f in ("stage.txt", "train.txt", "run0.txt", "run1.txt")]
    assert got == [str(threads), str(other), str(threads), str(threads)]


def test_the_trainings_run_on_train_threads_and_sft_for_sft_epochs(tmp_path, monkeypatch):
    """SFT and the proxy RM(s) train alone, on `--train-threads`; the stages that score batches in threads on the
    spare core (the pairs, the SFT evaluation) on `--threads`; sft.py gets `--sft-epochs`."""
    calls = []
    monkeypatch.setattr(pipeline, "stage", lambda args, script, marker, *a, **kw: calls.append((script, a, kw)))
    args = pipeline.Args(root=str(tmp_path), threads=1, train_threads=5, sft_epochs=4)
    pipeline.build_chain(args, 1, ["drgrpo", "uwo"])
    threads = [(os.path.basename(script), kw.get("threads")) for script, _, kw in calls]
    assert threads == [("sft.py", 5), ("gen_prefs.py", None), *[("train_rm.py", 5)] * 3, ("eval_gold.py", None)]
    sft_args = calls[0][1]
    assert sft_args[sft_args.index("--num-train-epochs") + 1] == "4"


def test_extra_sft_and_prefs_args_reach_their_stage_alone(tmp_path, monkeypatch):
    """`--extra-sft-args` goes to sft.py and to no other stage, `--extra-prefs-args` to gen_prefs.py alone;
    `--extra-stage-args` to all three."""
    calls = []
    monkeypatch.setattr(pipeline, "stage", lambda args, script, marker, *a, **kw: calls.append((script, a)))
    args = pipeline.Args(
        root=str(tmp_path),
        extra_sft_args="--num-train-epochs 3",
        extra_prefs_args="--num-train-prompts 60",
        extra_stage_args="--bf16",
    )
    pipeline.build_chain(args, 1, ["drgrpo"])
    by_script = {os.path.basename(script): a for script, a in calls}
    # after the driver's own --sft-epochs, so the extra flag (tyro: the last occurrence wins) overrides it
    assert by_script["sft.py"][-5:] == ("--num-train-epochs", "6", "--bf16", "--num-train-epochs", "3")
    # the driver's own --pref-prompts comes first, so the extra flag (tyro: the last occurrence wins) overrides it
    assert by_script["gen_prefs.py"][-5:] == ("--num-train-prompts", "6000", "--bf16", "--num-train-prompts", "60")
    for name in ("gen_prefs.py", "train_rm.py"):
        assert "--bf16" in by_script[name] and "--num-train-epochs" not in by_script[name], name
    for name in ("sft.py", "train_rm.py", "eval_gold.py"):
        assert "--num-train-prompts" not in by_script[name], name
    assert "--num-train-epochs" not in by_script["eval_gold.py"]


def reference_of(args, chains):
    return {"settings": {k: getattr(args, k) for k in pipeline.DRAW_SETTINGS}, "chains": chains}


def numbers(**changes):
    base = dict(proxy_accuracy=0.75, sft_win_rate=0.3, sft_gold=0.7, drgrpo_peak_gold=1.36, drgrpo_peak_step=10)
    base |= dict(drgrpo_final_gold=0.7, drgrpo_gain_lost=0.9, drgrpo_proxy_rise=0.1, drgrpo_final_kl=5.0)
    return base | dict(signcert_final_gold=0.8, signcert_gain_lost=0.8, signcert_final_kl=4.0) | changes


def test_draw_numbers_are_the_runs_own_frontier_and_calibration():
    """The numbers placed against the reference, worked out by hand from hand-made curves: the gain lost from the
    test gold's peak, the proxy's rise from the test proxy at the peak to the last evaluation."""
    dr = pipeline.frontier(fake_run(test_gold=[0.5, 1.3, 0.9], val_gold=[0, 0, 0], kls=[0, 1, 3]), [])
    sc = pipeline.frontier(fake_run(test_gold=[0.5, 1.1, 1.0], val_gold=[0, 0, 0], kls=[0, 1, 2]), [])
    calib = {"rm": {"eval/accuracy": 0.7}, "sft": {"eval/win_rate": 0.2, "eval/gold_reward_mean": 0.5}}
    got = pipeline.draw_numbers(calib, {"drgrpo": dr, "signcert": sc})
    assert got["drgrpo_gain_lost"] == pytest.approx((1.3 - 0.9) / (1.3 - 0.5))
    assert got["signcert_gain_lost"] == pytest.approx((1.1 - 1.0) / (1.1 - 0.5))
    assert got["drgrpo_proxy_rise"] == 2 - 1  # fake_run's test proxy is the evaluation's index
    assert (got["drgrpo_peak_gold"], got["drgrpo_peak_step"], got["drgrpo_final_kl"]) == (1.3, 10, 3.0)
    assert (got["proxy_accuracy"], got["sft_win_rate"], got["sft_gold"]) == (0.7, 0.2, 0.5)
    assert set(got) == {key for key, _, _ in pipeline.DRAW_NUMBERS}
    assert pipeline.over_optimised(got) and not pipeline.over_optimised(got | {"drgrpo_proxy_rise": -0.01})


def test_a_draw_is_placed_within_or_outside_the_reference_range():
    args = pipeline.Args()
    ref = reference_of(args, [{"seed": s, "cpu": "A", **numbers(drgrpo_final_gold=g)} for s, g in ((1, 0.6), (2, 0.9))])
    ref["chains"][1]["drgrpo_gain_lost"] = 0.3  # one reference chain without the over-optimisation
    inside = "\n".join(pipeline.place_in_reference({1: numbers(drgrpo_final_gold=0.75)}, ref, args))
    assert "Dr.GRPO final gold: 0.750   (within the range 0.600 - 0.900)" in inside
    assert "OUTSIDE" not in inside and "outside the range:" not in inside
    assert "over-optimisation (Dr.GRPO lost at least half its gain, its held-out proxy rising): yes" in inside
    assert "it showed on 1 of the 2 reference chains" in inside and "on 1 kind(s) of torch kernels: A;" in inside
    # compared at the printed precision: 0.47 printed inside +0.00 - +0.47 is within, whatever the next digits say
    ref["chains"][0]["drgrpo_proxy_rise"], ref["chains"][1]["drgrpo_proxy_rise"] = 0.0, 0.4691
    edge = "\n".join(pipeline.place_in_reference({1: numbers(drgrpo_proxy_rise=0.4712)}, ref, args))
    assert "held-out proxy, last minus at the peak: +0.47   (within the range +0.00 - +0.47)" in edge
    edge = "\n".join(pipeline.place_in_reference({1: numbers(drgrpo_proxy_rise=0.4751)}, ref, args))
    assert "held-out proxy, last minus at the peak: +0.48   (OUTSIDE the range +0.00 - +0.47)" in edge
    out = "\n".join(pipeline.place_in_reference({3: numbers(drgrpo_final_gold=1.2, drgrpo_gain_lost=0.1)}, ref, args))
    assert "chain seed 3:" in out and "Dr.GRPO final gold: 1.200   (OUTSIDE the range 0.600 - 0.900)" in out
    assert "Dr.GRPO share of its gain lost: 10%   (OUTSIDE the range 30% - 90%)" in out
    assert "its held-out proxy rising): NO" in out
    assert "outside the range: Dr.GRPO final gold, Dr.GRPO share of its gain lost." in out
    # a run of other settings has no reference to be placed against, and says why
    other = pipeline.place_in_reference({1: numbers()}, ref, pipeline.Args(rl_steps=150))
    assert other == ["no reference for these settings: the reference's main job differs in rl_steps"]


def test_add_to_reference_keeps_one_entry_per_chain_seed_and_cpu(tmp_path, monkeypatch):
    path = str(tmp_path / "ref.json")
    args = pipeline.Args()
    monkeypatch.setattr(pipeline, "cpu_name", lambda: "cpu A")
    pipeline.add_to_reference(args, {1: numbers(), 2: numbers()}, path)
    pipeline.add_to_reference(args, {2: numbers(sft_gold=0.1)}, path)  # the same chain again: replaced
    monkeypatch.setattr(pipeline, "cpu_name", lambda: "cpu B")
    pipeline.add_to_reference(args, {2: numbers()}, path)  # another CPU: kept beside it
    ref = json.load(open(path))
    assert [(c["seed"], c["cpu"], c["sft_gold"]) for c in ref["chains"]] == [(1, "cpu A", 0.7), (2, "cpu A", 0.1),
                                                                            (2, "cpu B", 0.7)]  # fmt: skip
    assert ref["settings"] == {k: getattr(args, k) for k in pipeline.DRAW_SETTINGS}
    with pytest.raises(SystemExit, match="other settings"):
        pipeline.add_to_reference(pipeline.Args(sft_epochs=3), {1: numbers()}, path)


def test_the_shipped_reference_is_of_the_default_main_job_and_the_readme_states_its_ranges():
    """The default `python pipeline.py` is always placed against the shipped reference (change a default that
    decides the draw and the reference must be measured again), over at least 7 chain seeds, each with every
    number; the README's headline states the ranges the reference holds."""
    ref = json.load(open(pipeline.REFERENCE))
    assert pipeline.place_in_reference({1: numbers()}, ref, pipeline.Args())[0].startswith("your draw against")
    assert len({c["seed"] for c in ref["chains"]}) >= 7
    assert all(set(c) == {"seed", "cpu"} | {k for k, _, _ in pipeline.DRAW_NUMBERS} for c in ref["chains"])
    readme = open(os.path.join(ROOT, "README.md")).read()
    for key in ("drgrpo_final_gold", "signcert_final_gold", "drgrpo_peak_gold"):
        lo, hi = min(c[key] for c in ref["chains"]), max(c[key] for c in ref["chains"])
        assert f"{lo:.2f}-{hi:.2f}" in readme, key


def test_chain_seed_1_copies_the_shipped_sft_and_proxy_at_the_default_settings_only(tmp_path, monkeypatch):
    """At the default settings chain seed 1's SFT policy and proxy RM are the shipped ones (copied, no SFT, no pairs,
    no proxy training); pairs only for a method that needs them; every other case trains them."""
    calls = []
    monkeypatch.setattr(
        pipeline, "stage", lambda args, script, marker, *a, **kw: calls.append(os.path.basename(script))
    )

    def build(seed, methods, **kw):
        calls.clear()
        args = pipeline.Args(root=str(tmp_path / f"r{len(os.listdir(tmp_path))}"), **kw)
        pipeline.build_chain(args, seed, methods)
        return args, list(calls)

    args, got = build(1, ["drgrpo", "signcert"])
    assert got == ["eval_gold.py"]
    for name in ("sft", "rm"):
        for f in ("model.safetensors", "config.json", "eval.json"):
            shipped = open(os.path.join(pipeline.SHIPPED_CHAIN, name, f), "rb").read()
            assert open(os.path.join(args.root, name, f), "rb").read() == shipped, (name, f)
    assert pipeline.on_shipped_chain(args)  # and a proxy trained there before is not the shipped one
    open(os.path.join(args.root, "rm", "model.safetensors"), "ab").write(b"\0")
    assert not pipeline.on_shipped_chain(args)
    assert build(1, ["drgrpo", "uwo"])[1] == ["gen_prefs.py", "train_rm.py", "train_rm.py", "eval_gold.py"]  # rm_2, 3
    trained = ["sft.py", "gen_prefs.py", "train_rm.py", "eval_gold.py"]
    assert build(1, ["drgrpo"], chain_weights="train")[1] == trained
    assert build(2, ["drgrpo"])[1] == trained
    assert build(1, ["drgrpo"], sft_epochs=3)[1] == trained  # not the settings the shipped ones were trained with
    assert build(1, ["drgrpo"], extra_prefs_args="--num-train-prompts 60")[1] == trained


def test_the_shipped_chain_is_of_the_default_settings_and_loads_as_safetensors():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    manifest = json.load(open(os.path.join(pipeline.SHIPPED_CHAIN, "manifest.json")))
    args = pipeline.Args()
    assert manifest["world_format"] == pipeline.WORLD_FORMAT
    assert manifest["settings"] == {k: getattr(args, k) for k in pipeline.CHAIN_SETTINGS}
    assert set(manifest["main_job"]) == {k for k, _, _ in pipeline.DRAW_NUMBERS}
    rm_eval = json.load(open(os.path.join(pipeline.SHIPPED_CHAIN, "rm", "eval.json")))
    assert rm_eval["eval/accuracy"] == manifest["main_job"]["proxy_accuracy"]
    for name in ("sft", "rm"):
        assert sorted(f for f in os.listdir(os.path.join(pipeline.SHIPPED_CHAIN, name)) if "model" in f) == [
            "model.safetensors"
        ]
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(pipeline.SHIPPED_CHAIN, "sft"))
    rm = AutoModelForSequenceClassification.from_pretrained(os.path.join(pipeline.SHIPPED_CHAIN, "rm"))
    assert policy.config.pad_token_id == rm.config.pad_token_id != policy.config.eos_token_id
    assert rm.config.num_labels == 1


def test_shipped_expectation_says_whether_the_run_repeats_the_recorded_numbers():
    manifest = {"trained_on": "cpu A", "main_job": numbers()}
    same = pipeline.shipped_expectation(numbers(drgrpo_final_gold=0.70004), manifest)
    assert "as recorded on cpu A: the same to the digits printed" in same[0] and "difference" not in "\n".join(same)
    other = "\n".join(pipeline.shipped_expectation(numbers(drgrpo_final_gold=0.9), manifest))
    assert "not all the same" in other and "Dr.GRPO final gold: 0.900   (recorded 0.700, a difference of +0.2)" in other
    assert other.count("a difference of") == 1


def test_policy_smollm2_takes_its_own_defaults_and_the_tiny_path_keeps_args_own(monkeypatch):
    """`--policy smollm2` reads SMOLLM2's defaults, an explicit flag over them; without it every default is Args'
    own (the main job's), and the SmolLM2 chain never copies the tiny world's shipped SFT policy and proxy."""
    monkeypatch.setattr(sys, "argv", ["pipeline.py"])
    assert pipeline.args_of_policy() == pipeline.Args()
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--policy", "smollm2", "--rl-steps", "7"])
    args = pipeline.args_of_policy()
    assert args == pipeline.Args(**(pipeline.SMOLLM2 | {"rl_steps": 7}))
    assert (args.proxy, args.methods, args.jobs) == ("frozen", ["drgrpo", "signcert", "drgrpo_kl"], 3)
    assert (args.threads, args.rl_threads) == (2, 1)
    assert "--learning-rate 3e-6" in args.extra_rl_args and "--learning-rate 3e-5" in args.extra_sft_args
    same_settings = pipeline.Args(**{k: getattr(pipeline.Args(), k) for k in pipeline.CHAIN_SETTINGS}, policy="smollm2")
    assert pipeline.uses_shipped_chain(pipeline.Args(), 1) and not pipeline.uses_shipped_chain(same_settings, 1)


@pytest.mark.parametrize("rl_threads, expected", [(None, "2"), (1, "1")])
def test_rl_runs_get_rl_threads_and_the_other_stages_threads(monkeypatch, tmp_path, rl_threads, expected):
    """Each RL run starts with OMP_NUM_THREADS = --rl-threads when given, else --threads (seen failing with the RL
    runs on --threads always)."""
    seen = []

    class Done:
        returncode = 0

        def __init__(self, cmd, env, **kwargs):
            seen.append(env["OMP_NUM_THREADS"])

        def poll(self):
            return 0

    monkeypatch.setattr(pipeline.subprocess, "Popen", Done)
    args = pipeline.Args(threads=2, rl_threads=rl_threads, jobs=2)
    pipeline.run_all(args, [(f"run{i}", str(tmp_path / f"rl{i}"), ["true"]) for i in range(2)])
    assert seen == [expected, expected]


def committed_chain(folder, seed, curves, args=None):
    """A folder as a chain's committed outputs look (docs/real_chain/seed*): pipeline_summary.json (the settings,
    the calibration, the runs with the folders they ran in elsewhere) and each run's metrics.jsonl beside it, named
    by the folder's last part. curves {label: (test gold per evaluation, validation gold, KL per stretch)}."""
    args = args or pipeline.Args(**pipeline.SMOLLM2)
    os.makedirs(folder)
    runs = []
    for label, curve in curves.items():
        name = f"{label.split()[0].replace('.', '')}_{len(runs)}_s{seed}"
        os.makedirs(os.path.join(folder, name))
        with open(os.path.join(folder, name, "metrics.jsonl"), "w") as f:
            rows = fake_run(*curve)
            for r in rows[1:]:  # the rollouts' rewards and the proxy's on-policy accuracy, which the plot draws
                r |= {"reward/proxy": r["policy/kl"], "reward/gold": 0.5, "rm/proxy_accuracy": 0.6}
            f.writelines(json.dumps(r) + "\n" for r in rows)
        runs.append(dict(label=label, seed=seed, folder=f"/elsewhere/rl/{name}", final_gold=123.0))
    sft = {"eval/win_rate": 0.25, "eval/gold_reward_mean": 0.5, "eval/reference_gold_reward_mean": 1.0}
    calibration = {str(seed): {"rm": {"eval/accuracy": 0.8}, "sft": sft | {"eval/proxy_reward_mean": 0.0}}}
    summary = dict(args=pipeline.asdict(args), chosen={}, calibration=calibration, runs=runs)
    with open(os.path.join(folder, "pipeline_summary.json"), "w") as f:
        json.dump(summary, f)


def test_pool_pairs_committed_chains_by_seed_from_their_metrics_and_runs_nothing(tmp_path):
    """`--pool A B`: the tables of chains run in other sessions, from their committed outputs alone: each run's
    frontier computed again from its metrics.jsonl (not the summary's copy, here a wrong 123), the methods paired by
    chain seed across the folders (SignCert-PO minus Dr.GRPO: +0.2 on seed 1, -0.1 on seed 2, worked out by hand from
    the curves), plots and the pooled summary in --root; nothing is trained or sampled."""
    kls = [0.0, 0.5, 1.0, 1.5]
    committed_chain(tmp_path / "a", 1, {"Dr.GRPO": ([0.5, 0.8, 1.0, 1.1], [0.5, 0.7, 0.9, 1.0], kls),
                                        "SignCert-PO q=0.5": ([0.5, 0.9, 1.2, 1.3], [0.5, 0.8, 1.0, 0.9], kls)})  # fmt: skip
    committed_chain(tmp_path / "b", 2, {"Dr.GRPO": ([0.5, 0.6, 0.7, 0.9], [0.5, 0.6, 0.7, 0.8], kls),
                                        "SignCert-PO q=0.5": ([0.5, 0.6, 0.8, 0.8], [0.5, 0.6, 0.7, 0.6], kls)})  # fmt: skip
    out = tmp_path / "pooled"
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), "--policy", "smollm2", "--root", str(out)]
    proc = subprocess.run(cmd + ["--pool", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[pipeline] $" not in proc.stdout  # no stage, no RL run started
    summary = json.load(open(out / "pipeline_summary.json"))
    assert summary["args"]["seeds"] == [1, 2] and (out / "frontier.png").exists()
    finals = {(r["label"], r["seed"]): r["final_gold"] for r in summary["runs"]}
    assert finals == {("Dr.GRPO", 1): 1.1, ("SignCert-PO q=0.5", 1): 1.3, ("Dr.GRPO", 2): 0.9,
                      ("SignCert-PO q=0.5", 2): 0.8}  # fmt: skip
    final = summary["paired"]["Dr.GRPO"]["SignCert-PO q=0.5"]["final_gold"]
    assert np.allclose(final["diffs"], [0.2, -0.1]) and (final["n"], final["ahead"]) == (2, 1)
    # t(0.975, 1 df), to the table's 3 decimals, x the standard error: the sd of (0.2, -0.1) is 0.15 sqrt(2)
    half = 12.7062 * 0.15
    assert math.isclose(final["mean"], 0.05) and math.isclose(final["hi"] - final["mean"], half, rel_tol=1e-4)
    stopped = summary["paired"]["Dr.GRPO"]["SignCert-PO q=0.5"]["stopped_gold"]  # the test gold at the step where
    assert np.allclose(stopped["diffs"], [1.2 - 1.1, 0.8 - 0.9])  # validation peaks: 20 (SignCert-PO), 30 (Dr.GRPO)


def test_pool_refuses_chains_of_other_settings_a_seed_twice_and_a_folder_without_a_summary(tmp_path):
    curves = {"Dr.GRPO": ([0.5, 0.8], [0.5, 0.7], [0.0, 0.5])}
    committed_chain(tmp_path / "a", 1, curves)
    committed_chain(tmp_path / "b", 1, curves)
    committed_chain(tmp_path / "c", 2, curves, pipeline.Args(**pipeline.SMOLLM2 | {"rl_steps": 150}))
    committed_chain(tmp_path / "d", 3, curves, pipeline.Args(**pipeline.SMOLLM2 | {"jobs": 1, "threads": 1}))
    pool = lambda *names: pipeline.pooled(pipeline.Args(root=str(tmp_path / "out"), pool=[str(tmp_path / n) for n in names]))  # fmt: skip
    with pytest.raises(SystemExit, match="chain seed 1 twice"):
        pool("a", "b")
    with pytest.raises(SystemExit, match="rl_steps"):
        pool("a", "c")
    with pytest.raises(SystemExit, match="no pipeline_summary.json"):
        pool("a", "e")
    args, calib, runs, main_job_runs, _ = pool("a", "d")  # where and how many threads: another draw, the same chain
    assert args.seeds == [1, 3] and args.rl_steps == 70 and sorted(calib) == [1, 3]
    assert main_job_runs == {(1, "drgrpo"): "Dr.GRPO", (3, "drgrpo"): "Dr.GRPO"}
    assert [os.path.dirname(f) for _, _, f in runs] == [str(tmp_path / "a"), str(tmp_path / "d")]


def test_the_committed_real_chain_pools_to_its_own_summary(tmp_path):
    """docs/real_chain/seed*: each committed chain, pooled alone, gives back the numbers its pipeline printed (the
    committed metrics are enough for the tables; a run's frontier is the same computed here or there)."""
    chains = sorted(d for d in os.listdir(os.path.join(ROOT, "docs", "real_chain")) if d.startswith("seed"))
    assert chains
    for d in chains:
        folder = os.path.join(ROOT, "docs", "real_chain", d)
        args, calib, runs, _, _ = pipeline.pooled(pipeline.Args(root=str(tmp_path / d), pool=[folder]))
        committed = json.load(open(os.path.join(folder, "pipeline_summary.json")))["runs"]
        for (label, seed, run), r in zip(runs, committed):
            assert (label, seed) == (r["label"], r["seed"])
            again = pipeline.frontier(pipeline.read_metrics(os.path.join(run, "metrics.jsonl")), args.matched_kl)
            assert again == {k: r[k] for k in again}


def test_export_chain_writes_what_pool_reads_back_without_the_machines_paths(tmp_path):
    """tools/export_chain.py on a pipeline's root of chain seeds 1 and 2: chain seed 2's stage metrics, its runs'
    logs and its part of the summary land in the export, every path to the root written as $CHAIN; `--pool` on the
    export gives the run's frontier from the copied metrics."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import export_chain

    root = tmp_path / "chain"
    runs = []
    for seed in (1, 2):
        c = root if seed == 1 else root / f"seed{seed}"
        for stage, f in (("sft", "eval.json"), ("prefs", "stats.json"), ("rm", "metrics.json"),
                         ("eval_sft_test", "eval.json")):  # fmt: skip
            os.makedirs(c / stage, exist_ok=True)
            (c / stage / f).write_text(json.dumps({"eval/accuracy": 0.8, "where": str(c / stage)}))
        run = c / "rl" / f"drgrpo_kl0.01_s{seed}"
        os.makedirs(run)
        rows = fake_run([0.5, 0.9], [0.5, 0.8], [0.0, 0.7])
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "samples.jsonl").write_text(json.dumps({"step": 5, "completion": "my map is a mess"}) + "\n")
        (run / "args.json").write_text(json.dumps({"output_dir": str(run), "policy_path": str(c / "sft")}))
        runs.append(dict(label="Dr.GRPO", seed=seed, folder=str(run), final_gold=0.9))
    (root / "seed2" / "rl" / "rl_forms.txt").write_text(f"{root}/seed2/rl/drgrpo_kl0.01_s2\nquality 2.0\n")
    sft = {"eval/win_rate": 0.25, "eval/gold_reward_mean": 0.5, "eval/reference_gold_reward_mean": 1.0}
    calib = {str(s): {"rm": {"eval/accuracy": 0.8}, "sft": sft} for s in (1, 2)}
    args = pipeline.asdict(pipeline.Args(**pipeline.SMOLLM2 | {"root": str(root), "seeds": [1, 2]}))
    summary = {"root": str(root), "args": args, "chosen": {}, "calibration": calib, "runs": runs, "paired": {}}
    (root / "pipeline_summary.json").write_text(json.dumps(summary))

    out = tmp_path / "docs" / "seed2"
    export_chain.main(export_chain.Args(root=str(root), seed=2, output=str(out)))
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["drgrpo_kl0.01_s2/args.json", "drgrpo_kl0.01_s2/metrics.jsonl", "drgrpo_kl0.01_s2/samples.jsonl",
                     "pipeline_summary.json", "prefs_stats.json", "rl_forms.txt", "rm_metrics.json",
                     "sft_eval.json", "sft_gold_eval.json"]  # fmt: skip
    for p in out.rglob("*"):
        assert p.is_dir() or str(tmp_path) not in p.read_text(), p
    assert json.loads((out / "sft_eval.json").read_text())["where"] == "$CHAIN/seed2/sft"
    exported = json.loads((out / "pipeline_summary.json").read_text())
    assert list(exported["calibration"]) == ["2"] and [r["seed"] for r in exported["runs"]] == [2]
    assert exported["args"]["seeds"] == [2] and exported["root"] == "$CHAIN" and "paired" not in exported
    pooled_args, _, pooled_runs, _, _ = pipeline.pooled(pipeline.Args(root=str(tmp_path / "p"), pool=[str(out)]))
    assert pooled_args.seeds == [2] and pooled_runs == [("Dr.GRPO", 2, str(out / "drgrpo_kl0.01_s2"))]
    with pytest.raises(SystemExit, match="no chain seed 3"):
        export_chain.main(export_chain.Args(root=str(root), seed=3, output=str(tmp_path / "x")))
