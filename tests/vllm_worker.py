"""Runs stage scripts with `--use-vllm` as their command line would (tests/test_vllm.py), recording what vLLM was
asked and what it answered: every `vllm.LLM(...)`'s arguments, and for every `LLM.generate` call the sampling
parameters the script chose, the prompt token ids the engine read (vLLM's own `RequestOutput.prompt_token_ids`) and
every completion's token ids, finish reason and the engine's log-probability of each sampled token (logprobs=0 is
added to a copy of the parameters: it asks for the sampled token's log-probability and changes nothing else).

    python tests/vllm_worker.py OUT.json SCRIPT ARG... [-- SCRIPT ARG...]...

Every script runs as `__main__` in this process (runpy), one after the other. vLLM's engine runs in processes it
starts itself, so this file's body is under `if __name__ == "__main__":` (a spawned process imports it again).
Under `accelerate launch` (WORLD_SIZE > 1) each process writes its own record, OUT.json.rank{RANK}."""

import json
import os
import runpy
import sys


def recording(vllm, record: list) -> None:
    """Wrap vllm.LLM's constructor and generate so that each call appends to `record` what it was given and gave
    back (once per process: `record` is emptied between scripts, not replaced)."""
    init, generate = vllm.LLM.__init__, vllm.LLM.generate

    def recorded_init(self, *args, **kwargs):
        record.append({"llm": {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}})
        init(self, *args, **kwargs)

    def recorded_generate(self, prompts, sampling_params=None, *args, **kwargs):
        params = sampling_params.clone()
        asked = {k: getattr(params, k) for k in ("n", "temperature", "top_p", "top_k", "max_tokens", "seed")}
        asked.update(stop_token_ids=list(params.stop_token_ids or []), ignore_eos=params.ignore_eos)
        params.logprobs = 0
        outputs = generate(self, prompts, params, *args, **kwargs)
        requests = []
        for request in outputs:
            completions = [
                {
                    "token_ids": list(o.token_ids),
                    "finish_reason": o.finish_reason,
                    "stop_reason": o.stop_reason,
                    "logprobs": [step[token].logprob for step, token in zip(o.logprobs, o.token_ids)],
                }
                for o in request.outputs
            ]
            requests.append({"prompt_token_ids": list(request.prompt_token_ids), "outputs": completions})
        record.append(
            {"params": asked, "prompt_types": sorted({type(p).__name__ for p in prompts}), "requests": requests}
        )
        return outputs

    vllm.LLM.__init__, vllm.LLM.generate = recorded_init, recorded_generate


if __name__ == "__main__":
    import vllm

    out, rest = sys.argv[1], sys.argv[2:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        out = f"{out}.rank{os.environ['RANK']}"
    runs = []
    while rest:
        cut = rest.index("--") if "--" in rest else len(rest)
        runs.append(rest[:cut])
        rest = rest[cut + 1 :]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results, record = [], []
    recording(vllm, record)

    def write(current=()):
        with open(out, "w") as f:
            json.dump(results + list(current), f)

    exit_now = os._exit  # the trainers' non-main CPU processes leave by os._exit (see `finish`): write first

    for script, *argv in runs:
        entry = {"script": script, "argv": argv, "record": record}
        os._exit = lambda code, entry=entry: (write([entry]), exit_now(code))
        sys.argv = [os.path.join(root, script), *argv]
        runpy.run_path(sys.argv[0], run_name="__main__")
        results.append({**entry, "record": list(record)})
        record.clear()
    write()
