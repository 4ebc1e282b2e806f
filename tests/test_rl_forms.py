"""tools/rl_forms.py: the forms an RL run's logged completions take, read with the world's quality, on a hand-made
world of two posts whose every answer is known."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"id": "a", "subreddit": "pets", "title": "what do i do about the dog",
     "post": "my girlfriend forgot the dog and hamster today.", "summary": "my dog and hamster are a mess"},
    {"id": "b", "subreddit": "travel", "title": "problem with the flight",
     "post": "tonight i ruined the flight , train and beach because of my friend.", "summary": "x"},
]  # fmt: skip
FACTS = [
    {"id": "a", "keys": ["dog", "hamster"], "person": "girlfriend", "verbs": ["forgot"]},
    {"id": "b", "keys": ["flight", "train", "beach"], "person": "friend", "verbs": ["ruined"]},
]


def prompt(row):
    return f"SUBREDDIT: r/{row['subreddit']}\n\nTITLE: {row['title']}\n\nPOST: {row['post']}\n\nTL;DR:"


def sample(step, row, response, has_eos=True, proxy=0.0):
    return {"step": step, "prompt": prompt(row), "response": response, "has_eos": has_eos,
            "length": len(response.split()) + has_eos, "proxy": proxy}  # fmt: skip


@pytest.fixture
def world(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (data / "train_facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    run = tmp_path / "rl" / "run"
    run.mkdir(parents=True)
    samples = [
        sample(5, ROWS[0], " my dog and hamster are a mess", proxy=1.0),  # quality 2, list template
        sample(5, ROWS[1], " my friend ruined my flight , train and beach", proxy=3.0),  # 3
        sample(10, ROWS[0], " what do i do about the dog", proxy=-1.0),  # title copied: 1 key - 1 repeated ('do'): 0
        sample(10, ROWS[1], " my friend and my zebra", has_eos=False, proxy=-3.0),  # template, zebra invented: -1
        sample(15, ROWS[0], " hamster", proxy=5.0),  # a key alone: 1, dropped by --upto 10
    ]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return data, run


def test_forms_and_quality_of_each_window(world, tmp_path):
    """Early (step 5) and late (step 10, --upto 10 drops step 15): the world's quality and its terms, the form flags
    and the templates are those worked out by hand above. Seen failing with the title check made `==` on the raw text
    (the leading space) and with the step-15 sample kept."""
    data, run = world
    out = tmp_path / "forms.json"
    subprocess.run([sys.executable, ROOT / "tools" / "rl_forms.py", "--data", data, "--runs", run, "--window", "1",
                    "--upto", "10", "--output", out], check=True, capture_output=True)  # fmt: skip
    early, late = (json.loads(out.read_text())[str(run)][w] for w in ("early", "late"))
    assert early["steps"] == [5] and late["steps"] == [10]
    assert early["quality"] == pytest.approx((2 + 3) / 2) and early["coverage"] == pytest.approx(2.5)
    assert early["list template"] == 0.5 and early["title copied"] == 0 and early["proxy"] == pytest.approx(2.0)
    assert (
        late["quality"] == pytest.approx((0 - 1) / 2)
        and late["invented"] == pytest.approx(0.5)
        and late["repeated"] == 0.5
    )
    assert late["title copied"] == 0.5 and late["my P and my X"] == 0.5 and late["no EOS"] == 0.5
    assert late["a key alone"] == 0
    assert dict(map(tuple, early["templates"])) == {"my K and K are a mess": 1, "my P V my K K and K": 1}
    assert dict(map(tuple, late["templates"])) == {"what do i do about the K": 1, "my P and my W": 1}
