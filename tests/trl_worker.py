"""One process of a short SignCertGRPOTrainer run (tests/test_trl.py): builds the trainer from the arguments, runs
`--steps` optimiser steps, and writes what every `_generate_and_score_completions` returned on this process, before
TRL's shuffle (prompt and completion ids with their masks, the advantages trained on, TRL's own advantages and the
gathered rewards), to {out}/batches_{rank}.pt; TRL's logged metrics to {out}/log_{rank}.json.

    python tests/trl_worker.py OUT WORLD QUANTILE SCALE_REWARDS PROMPTS_PER_STEP [STEPS]
(under `accelerate launch` for several processes)."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_signcert_trl as trl_script  # noqa: E402


def with_trl_advantages(call):
    """(what `call()` returns, TRL's own advantages): `call` runs the subclass's _generate_and_score_completions, and
    GRPOTrainer's, which it calls first, is wrapped meanwhile to keep its advantages before the subclass replaces them."""
    kept, original = {}, trl_script.GRPOTrainer._generate_and_score_completions

    def trl_only(this, inputs):
        out = original(this, inputs)
        kept["advantages"] = out["advantages"].clone()
        return out

    trl_script.GRPOTrainer._generate_and_score_completions = trl_only
    try:
        return call(), kept["advantages"]
    finally:
        trl_script.GRPOTrainer._generate_and_score_completions = original


class Recording(trl_script.SignCertGRPOTrainer):
    """The trainer under test, recording each batch as the loss will see it (and TRL's advantages beside it)."""

    batches = []

    def _generate_and_score_completions(self, inputs):
        out, trl_advantages = with_trl_advantages(
            lambda: super(Recording, self)._generate_and_score_completions(inputs)
        )
        keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "ref_per_token_logps")
        row = {k: out[k].detach().cpu().clone() for k in keep if k in out}
        row["trl_advantages"] = trl_advantages.cpu()
        row["rewards"] = self._rewards[:, 0].cpu().clone()  # gathered: the whole batch
        self.batches.append(row)
        return out


if __name__ == "__main__":
    out, world, q, scale, prompts = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    steps = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoTokenizer

    procs = PartialState(cpu=True).num_processes
    tok = AutoTokenizer.from_pretrained(os.path.join(world, "policy"), padding_side="left")
    rows, where = trl_script.load_split(os.path.join(world, "data"), "train")
    train = Dataset.from_dict({"prompt": trl_script.build_prompts(rows[:64], tok, 128, where)})
    local = prompts * 4 // procs  # 4 completions per prompt; with 3 prompts on 2 processes a group straddles them
    config = trl_script.SignCertGRPOConfig(
        output_dir=out,
        quantile=q,
        scale_rewards=scale,
        missing_eos_penalty=None,  # every completion scored by the RM and certified: the whole batch's features count
        loss_type="dr_grpo",
        beta=0.01,
        use_bias_correction_kl=False,
        num_generations=4,
        max_completion_length=8,
        per_device_train_batch_size=local,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=1,
        top_k=0,
    )
    trainer = Recording(
        model=os.path.join(world, "policy"),
        reward_model=os.path.join(world, "rm"),
        args=config,
        train_dataset=train,
        processing_class=tok,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(Recording.batches, os.path.join(out, f"batches_{rank}.pt"))
    with open(os.path.join(out, f"log_{rank}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
    accel = trainer.accelerator
    accel.wait_for_everyone()  # every process has written its files
    if accel.num_processes > 1 and not accel.is_main_process:
        # as in the stage scripts: all is written, and a gloo worker of torch 2.13 can abort in its C++ teardown at
        # interpreter exit ("terminate called without an active exception", exit -6; seen here in a suite run)
        print(end="", flush=True)
        os._exit(0)
