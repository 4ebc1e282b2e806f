#!/usr/bin/env bash
# The one command a session with one GPU runs for issue 10 (at most 9 minutes: the three runs are capped at 240 + 150 + 150 s):
#     bash benchmarks/gpu_session.sh                 # results under $OUT (default runs/gpu_session)
# 1. installs TRL from a wheel under .whl/ (git-ignored; carry it to the machine), without dependencies so
#    that torch and transformers stay as they are; without the wheel the TRL comparison is skipped;
# 2. runs benchmarks/gpu_step.py at Pythia-1B's shape in bf16: our compiled static-cache decoding with the
#    CUDA checks and TRL's GRPOTrainer side by side in one process, then ours with `generate` and with the
#    uncompiled static loop. Each run has its own time limit, so one that hangs leaves the others' results.
#    GPU_STEP_EXTRA adds flags to every run (a CPU smoke test: GPU_STEP_EXTRA="--shape tiny --num-prompts 2 ...").
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  if ls .whl/trl-*.whl >/dev/null 2>&1; then
    pip install --no-deps --quiet .whl/trl-*.whl && python -c "import trl; print('trl', trl.__version__)" \
      || echo "trl does not import here (a missing dependency?): the TRL comparison will be skipped"
  else
    echo "no .whl/trl-*.whl: the TRL comparison will be skipped"
  fi
} 2>&1 | tee "$OUT/env.txt"

run() {  # run NAME LIMIT_SECONDS ARGS...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: python benchmarks/gpu_step.py $*" | tee "$OUT/$name.log"
  timeout "$limit" python benchmarks/gpu_step.py "$@" ${GPU_STEP_EXTRA:-} --output "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}
run compiled_checks_trl 240 --generation-backend compiled --checks --steps 3 --warmup-steps 1
run hf 150 --generation-backend hf --no-trl --steps 3 --warmup-steps 1
run static 150 --generation-backend static --no-trl --steps 3 --warmup-steps 1
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$OUT/env.txt" || true
