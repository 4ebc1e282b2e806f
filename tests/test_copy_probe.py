"""tools/copy_probe.py: the probability it reports is the policy's, at the token after " my X and", of the post's
second key: an oracle that copies the word after "X and" from the title scores 1, one that repeats X scores 0."""

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import copy_probe  # noqa: E402

import tiny_world as tw  # noqa: E402


class Oracle(torch.nn.Module):
    """Puts all its mass on the token after the previous occurrence of the last two tokens (an induction head), or,
    with `repeat`, on the token two back (X in "X and")."""

    def __init__(self, vocab, repeat=False):
        super().__init__()
        self.vocab, self.repeat = vocab, repeat

    def forward(self, input_ids):
        ids = input_ids[0].tolist()
        target = ids[-2]
        if not self.repeat:
            target = next(ids[i + 2] for i in range(len(ids) - 3, -1, -1) if ids[i : i + 2] == ids[-2:])
        logits = torch.full((1, len(ids), self.vocab), float("-inf"))
        logits[0, -1, target] = 0.0
        return SimpleNamespace(logits=logits)


def test_the_probe_reads_the_second_key_after_x_and(ci_world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ci_world / "tokenizer")
    rng = random.Random(0)
    posts = [tw.make_post(rng, title_keys=2) for _ in range(30)]
    posts += [tw.make_post(rng, num_keys_probs=(1, 0, 0)) for _ in range(3)]  # one key: no second to copy, skipped
    rows, facts = [p[0] for p in posts], [p[1] for p in posts]
    vocab = len(tokenizer)
    assert copy_probe.second_key_probability(Oracle(vocab), tokenizer, rows, facts) == (1.0, 1.0)
    assert copy_probe.second_key_probability(Oracle(vocab, repeat=True), tokenizer, rows, facts) == (0.0, 0.0)
