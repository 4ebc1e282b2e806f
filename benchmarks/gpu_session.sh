#!/usr/bin/env bash
# The one command a session with one GPU runs (about 9 minutes, every part capped by its own time limit):
#     run(command='bash benchmarks/gpu_session.sh', carry=['.whl', 'runs/tiny_world/data', 'runs/tiny_world/tokenizer',
#         'runs/tiny_world/sft', 'runs/tiny_world/rm', 'runs/tiny_world/gold_rm',
#         'runs/tiny_world/base_policy'], timeout_s=600)
# 1. installs every wheel under .whl/ (git-ignored; carry it) into a temporary folder without dependencies: tyro and its
#    needs, transformers (the version CI uses), TRL with datasets. Build it here:
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform any \
#        --platform manylinux_2_17_x86_64 -d .whl trl==1.16.0 datasets dill multiprocess tyro docstring_parser \
#        typeguard transformers
# 2. benchmarks/gpu_step.py at Pythia-1B's shape in bf16, each framework in its own process (ours, TRL, ours again):
#    a. BEST against BEST (ours: micro-batch auto, compiled static-cache decoding; TRL: the largest micro-batch that
#       runs), no checkpointing, with the CUDA checks and 8 profiled micro-batches (on a copy of the weights);  240 s
#    b. MATCHED (both at micro-batch 2 with gradient checkpointing, transformers' generate on both), Dr.GRPO only;  200 s
# 3. grpo_signcert.py on CUDA on the tiny world (carried, built on a CPU) in bf16 with compiled decoding, 20 steps. 60 s
# GPU_STEP_EXTRA adds flags to every gpu_step.py run (a CPU smoke test: GPU_STEP_EXTRA="--shape tiny --device cpu ...").
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SITE="$(mktemp -d)"  # the carried wheels, installed here
R="$(mktemp -d)"     # the real scripts' runs
if ls .whl/*.whl >/dev/null 2>&1; then  # here, not inside the logged block below: that runs in a subshell
  { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && echo "installed: $(ls .whl)"; } >"$OUT/env.txt" 2>&1
  export PYTHONPATH="$SITE"
else
  echo "no .whl/: nothing installed (TRL and DeepSpeed parts are skipped when they do not import)" >"$OUT/env.txt"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import trl; print('trl', trl.__version__)" || echo "trl does not import: the TRL comparison is skipped"
} 2>&1 | tee -a "$OUT/env.txt"

step() {  # step NAME LIMIT_SECONDS ARGS...: one gpu_step.py run, its log and JSON under $OUT
  local name=$1 limit=$2
  shift 2
  echo "=== $name: python benchmarks/gpu_step.py $*" | tee "$OUT/$name.log"
  timeout "$limit" python3 benchmarks/gpu_step.py "$@" ${GPU_STEP_EXTRA:-} --output "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
script() {  # script LIMIT_SECONDS COMMAND...: one real script on the tiny world, appended to scripts.log
  local limit=$1
  shift
  echo "=== $*" | tee -a "$OUT/scripts.log"
  timeout "$limit" "$@" 2>&1 | grep -v "it/s\]$" | tee -a "$OUT/scripts.log"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$OUT/scripts.log"
}

step best 240 --best --no-matched --generation-backend compiled --checks --profile 8
step matched 200 --no-signcert --generation-backend hf

if [ -d runs/tiny_world/sft ] && [ -d runs/tiny_world/rm ]; then
  script 60 python3 grpo_signcert.py --bf16 --generation-backend compiled --total-steps 20 --gold-every 5 \
    --output-dir $R/signcert_bf16 --overwrite
  cp $R/signcert_bf16/metrics.jsonl "$OUT/signcert_bf16_metrics.jsonl" 2>/dev/null
else
  echo "no runs/tiny_world/{sft,rm}: the real scripts were not run (carry them)" | tee -a "$OUT/scripts.log"
fi
nvidia-smi --query-gpu=name,memory.used --format=csv >>"$OUT/env.txt" 2>&1 || true
