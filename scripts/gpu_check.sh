#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU (docs/PERFORMANCE.md, "Checking a GPU machine"):
#   bash scripts/gpu_check.sh                      # --device cuda: the GPU figures, under 8 minutes on an H100/H200
#   bash scripts/gpu_check.sh --device cpu --out DIR   # tiny sizes on the CPU: proves the script (a test runs it)
# It sets up .venv (scripts/setup_env.sh; at once when it is up to date, so it works offline then), then
# scripts/gpu_check.py runs the worker's GPU report, the CUDA tests, benchmarks/saliency_speed.py for the
# paper U-Net and the demo model, and a 4-case `msis cohort`, and writes each step's figures with the
# command that made them as docs/benchmarks/gpu_check_<device>_<step>.json (or under --out), plus a
# summary gpu_check_<device>.json. A failing step is reported and the others still run; the exit code
# is 1 when any failed.
# Other options go to scripts/gpu_check.py (--tiny, --budget-s); --python PY runs with that Python
# instead of .venv's (one whose torch sees the GPU and that has the project's dependencies).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

device=cuda
python=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="${2:-}"; args+=("$1" "${2:-}"); shift 2 || shift ;;
    --device=*) device="${1#--device=}"; args+=("$1"); shift ;;
    --python) python="${2:-}"; shift 2 || shift ;;
    --python=*) python="${1#--python=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ "$device" != cuda ] && [ "$device" != cpu ]; then
  echo "gpu_check: error: --device is cuda or cpu, not '$device'" >&2
  exit 2
fi

if [ -z "$python" ]; then
  bash "$ROOT/scripts/setup_env.sh" || { echo "gpu_check: error: scripts/setup_env.sh failed (offline? it needs the network once)" >&2; exit 2; }
  python="$ROOT/.venv/bin/python"
fi
if ! "$python" -c "import torch" 2>/dev/null; then
  echo "gpu_check: error: '$python' cannot import torch; run bash scripts/setup_env.sh or pass --python a Python that has the project's dependencies" >&2
  exit 2
fi
if [ "$device" = cuda ] && ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  # Refuse at once rather than run every step into the same failure.
  echo "gpu_check: error: torch $("$python" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, end=")")') in $python sees no GPU:" \
    "install a CUDA build of that torch into .venv (e.g. pip install --force-reinstall torch==<version> --index-url https://download.pytorch.org/whl/cu128)," \
    "check nvidia-smi, or pass --python a Python whose torch sees the GPU; --device cpu checks the script without one" >&2
  exit 2
fi
exec "$python" "$ROOT/scripts/gpu_check.py" "${args[@]}"
