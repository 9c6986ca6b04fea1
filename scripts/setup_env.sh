#!/usr/bin/env bash
# Create or update the project's Python environment in .venv at the repository root.
# Idempotent: when nothing that shapes the environment changed, it returns at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.msis-setup"
WANT="$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"

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
"${PIP[@]}" -e "$ROOT[test]"
"$VENV/bin/python" -c "import torch, monai, radiomics, SimpleITK, sklearn, nilearn; print('environment ready: torch', torch.__version__, 'monai', monai.__version__)" >&2
echo "$WANT" > "$STAMP"
