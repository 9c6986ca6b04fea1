#!/usr/bin/env bash
# Create or update the project's Python environment in .venv at the repository root.
# Idempotent: when nothing that shapes the environment changed, it returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.msis-setup"
WANT="$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml" "$ROOT/scripts/reference-constraints.txt" | sha256sum | cut -c1-16)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "setting up $VENV (one time; a few minutes) ..." >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" numpy versioneer
# A pinned CPU build of torch; an unpinned torch would pull GBs of CUDA packages.
"${PIP[@]}" torch==2.13.0
# pyradiomics 3.x builds only against the numpy already installed.
"${PIP[@]}" --no-build-isolation pyradiomics==3.0.1
# nnU-Net's networks (needed to run nnU-Net models). --no-deps: its timm requirement pulls a CUDA build of
# torchvision, which nothing here uses (timm serves architectures nnU-Net's default plans do not name).
"${PIP[@]}" --no-deps dynamic-network-architectures==0.4.4
"${PIP[@]}" -c "$ROOT/scripts/reference-constraints.txt" einops==0.8.2
"${PIP[@]}" -e "$ROOT[test,cohort]"
# Reference implementations the tests compare with (not needed to use the tool): nnunetv2's predictor and
# lst_ai's inference. --no-deps for the same reason, then what their code paths used in the tests import.
"${PIP[@]}" --no-deps nnunetv2==2.8.1 lst-ai==2.0.0rc1
"${PIP[@]}" -c "$ROOT/scripts/reference-constraints.txt" acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
  scikit-image==0.26.0 pandas graphviz tifffile requests seaborn imagecodecs yacs blosc2 tqdm
"$VENV/bin/python" -c "import torch, monai, radiomics, distributed, pyarrow, SimpleITK, sklearn, nilearn, dynamic_network_architectures, nnunetv2, lst_ai.model; print('environment ready: torch', torch.__version__, 'monai', monai.__version__)" >&2
echo "$WANT" > "$STAMP"
