"""learning_rate_warning: a real pretrained model at the tiny world's default learning rate is warned about (issue 43:
the SmolLM2 SFT policy at the RL trainer's 2e-4 reached KL 9.2 in 2 steps), naming the flag; the tiny world's own
models, and any rate the user chose, are not. End to end on the SmolLM2 cut: tests/test_real_model.py.

    python -m pytest tests/test_learning_rate_warning.py -q
"""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPTS = ["sft", "train_rm", "grpo_signcert", "grpo_uwo", "grpo_advpo", "grpo_bspo"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_large_model_at_the_tiny_default_is_warned_about(script):
    mod = __import__(script)
    tiny = mod.PRESETS["tiny"].learning_rate
    large = torch.nn.Linear(3200, 3200)  # 10.2M parameters: over the line
    small = torch.nn.Linear(3000, 3000)  # 9.0M: a tiny world's size
    warning = mod.learning_rate_warning(large, tiny, tiny)
    assert warning and f"--learning-rate {tiny:g} is the tiny world's default" in warning and "10M" in warning
    assert mod.learning_rate_warning(small, tiny, tiny) is None
    assert mod.learning_rate_warning(large, tiny / 10, tiny) is None  # the user's own rate
