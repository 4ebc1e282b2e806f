"""One chain seed's text outputs, out of a pipeline's --root into a folder of the repository: what a session commits
of a chain that took it hours (the models stay behind, and the machine with them), and what
`python pipeline.py --pool` reads back to build the tables over chain seeds run in other sessions.

    python tools/export_chain.py --root $CHAIN --seed 2 --output docs/real_chain/seed2

Copied (the root's absolute path written as `$CHAIN` in every file, so no machine's path is committed):
  the stages' metrics     sft/eval.json -> sft_eval.json, prefs/stats.json -> prefs_stats.json, the proxy's
                          rm/metrics.json (frozen head) or rm/eval.json (train_rm.py) -> rm_metrics.json / rm_eval.json,
                          eval_sft_test/eval.json -> sft_gold_eval.json
  the RL runs             rl/<run>/{metrics.jsonl, samples.jsonl, args.json} -> <run>/
  the pipeline's summary  pipeline_summary.json, narrowed to this chain seed (its calibration and runs)
  the readings, if made   rl/{rl_forms,sign_audit}.{json,txt}: tools/rl_forms.py's and tools/sign_audit.py's outputs
                          written there (docs/RESULTS.md gives the commands)
"""

import json
import os
import shutil
import sys
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pipeline.py, one level up
import pipeline  # noqa: E402  its chain_dir: where chain seed s lives under the root


@dataclass
class Args:
    root: str
    """the pipeline's --root (the chain seed's folder is seed{s}/ under it, chain seed 1 the root itself)"""
    seed: int
    """the chain seed to export"""
    output: str
    """the folder to write (created; files there of the same names are replaced)"""


def anonymised(text, root):
    """`text` with the root's absolute path written as $CHAIN."""
    return text.replace(os.path.abspath(root), "$CHAIN")


def copy_text(src, dst, root):
    text = anonymised(open(src).read(), root)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "w") as f:
        f.write(text)


def narrowed_summary(summary, seed):
    """The pipeline's summary with only this chain seed's calibration and runs (a --seeds 1 2 3 pipeline writes one
    summary for all three; its pairings over seeds are the pooled summary's to make again)."""
    if str(seed) not in summary["calibration"]:
        raise SystemExit(f"pipeline_summary.json has no chain seed {seed} (its seeds: {list(summary['calibration'])})")
    out = {k: v for k, v in summary.items() if k not in ("paired", "draws")}
    out["args"] = summary["args"] | {"seeds": [seed]}
    out["calibration"] = {str(seed): summary["calibration"][str(seed)]}
    out["runs"] = [r for r in summary["runs"] if r["seed"] == seed]
    return out


def main(args):
    c = pipeline.chain_dir(args, args.seed)
    summary_path = os.path.join(args.root, "pipeline_summary.json")
    if not os.path.exists(summary_path):
        raise SystemExit(f"{summary_path} is missing: run the pipeline to its end (its tables) before exporting")
    summary = narrowed_summary(json.load(open(summary_path)), args.seed)
    stages = [("sft/eval.json", "sft_eval.json"), ("prefs/stats.json", "prefs_stats.json"),
              ("rm/metrics.json", "rm_metrics.json"), ("rm/eval.json", "rm_eval.json"),
              ("eval_sft_test/eval.json", "sft_gold_eval.json")]  # fmt: skip
    stages += [(f"rl/{name}.{ext}", f"{name}.{ext}") for name in ("rl_forms", "sign_audit") for ext in ("json", "txt")]
    written = []
    for src, dst in stages:
        if os.path.exists(os.path.join(c, src)):
            copy_text(os.path.join(c, src), os.path.join(args.output, dst), args.root)
            written.append(dst)
    for run in summary["runs"]:
        name = os.path.basename(run["folder"])
        for f in ("metrics.jsonl", "samples.jsonl", "args.json"):
            src = os.path.join(c, "rl", name, f)
            if not os.path.exists(src):
                raise SystemExit(f"{src} is missing: the run {run['label']} has not logged it")
            copy_text(src, os.path.join(args.output, name, f), args.root)
        written.append(name + "/")
    path = os.path.join(args.output, "pipeline_summary.json")
    with open(path + ".tmp", "w") as f:
        f.write(anonymised(json.dumps(summary, indent=1), args.root))
    shutil.move(path + ".tmp", path)
    print(f"wrote {args.output}: pipeline_summary.json " + " ".join(written))


if __name__ == "__main__":
    main(tyro.cli(Args))
