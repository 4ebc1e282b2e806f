"""Every test runs offline (no hub look-ups, no wandb login); subprocesses inherit this environment."""

import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def free_port():
    """A port nobody listens on, for `accelerate launch --main_process_port`: concurrent runs (another
    suite, a user's job) would otherwise collide on the default 29500 and abort."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
