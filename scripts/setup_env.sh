#!/usr/bin/env bash
# Create or update the project's Python environment in .venv at the repository root.
#   setup_env.sh          what the tool needs (scripts/msis.sh runs this)
#   setup_env.sh --test   that, plus what only the tests need (scripts/test.sh runs this): pytest, slicer-core,
#                         captum and the reference implementations the tests compare with (nnunetv2, lst-ai)
# Idempotent: each part has its stamp (a hash of the inputs below); when nothing changed, it returns at once and
# prints nothing. Otherwise it prints one line per step; pip's own output goes to .venv/setup.log, and when a step
# fails its last lines and the log's path are printed and the script exits non-zero.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOG="$VENV/setup.log"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
CONSTRAINTS="$ROOT/scripts/reference-constraints.txt"
TOOL_STAMP="$VENV/.msis-setup"
TEST_STAMP="$VENV/.msis-setup-test"
WANT="$(cat "$ROOT/scripts/setup_env.sh" "$ROOT/scripts/setup_steps.sh" "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)"

case "${1:-}" in
  "") WITH_TESTS=0 ;;
  --test) WITH_TESTS=1 ;;
  *) echo "setup_env.sh: unknown argument '$1' (usage: setup_env.sh [--test])" >&2; exit 2 ;;
esac

stamp_current() { [ -x "$VENV/bin/python" ] && [ -f "$1" ] && [ "$(cat "$1")" = "$WANT" ]; }

if stamp_current "$TOOL_STAMP" && { [ "$WITH_TESTS" = 0 ] || stamp_current "$TEST_STAMP"; }; then
  exit 0
fi
source "$ROOT/scripts/setup_steps.sh"

# --no-compile: compiling every module of torch, scipy, ... to bytecode is two thirds of pip's time; Python compiles
# what is imported, once, on first use
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile "$@"; }

# pyradiomics 3.x builds only against the numpy already installed.
install_pyradiomics() { pip_install numpy versioneer && pip_install --no-build-isolation pyradiomics==3.0.1; }

# nnU-Net's networks (needed to run nnU-Net models). --no-deps: its timm requirement pulls a CUDA build of
# torchvision, which nothing here uses (timm serves architectures nnU-Net's default plans do not name).
# einops first: installing a requirement of it afterwards would have pip report the timm left out on purpose.
install_nnunet_networks() {
  pip_install -c "$CONSTRAINTS" einops==0.8.2 && pip_install --no-deps dynamic-network-architectures==0.4.4
}

check_imports() {
  "$VENV/bin/python" -c "import $1; import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)"
}

install_tool() {
  rm -f "$TOOL_STAMP" "$TEST_STAMP"
  if [ ! -x "$VENV/bin/python" ]; then
    step "Python environment .venv ($("$PYTHON" -c 'import platform; print("Python", platform.python_version())' 2>/dev/null || echo "$PYTHON"))" \
      "$PYTHON" -m venv "$VENV"
  fi
  # setuptools >= 77 reads pyproject.toml's SPDX license and license-files
  step "pip, setuptools, wheel" pip_install --upgrade pip "setuptools>=77" wheel
  # A pinned CPU build of torch; an unpinned torch would pull GBs of CUDA packages.
  step "torch 2.13.0 (CPU)" pip_install torch==2.13.0
  step "pyradiomics 3.0.1" install_pyradiomics
  step "MSInstanceSaliencyLib (editable) and its dependencies, with msis view's trame-slicer" pip_install -c "$CONSTRAINTS" -e "$ROOT[cohort,web]"
  step "nnU-Net networks (dynamic-network-architectures 0.4.4)" install_nnunet_networks
  step "check imports" check_imports "radiomics, distributed, pyarrow, SimpleITK, sklearn, nilearn, dynamic_network_architectures, trame_slicer, MSInstanceSaliencyLib.cli"
  echo "$WANT" > "$TOOL_STAMP"
}

# The reference implementations the tests compare with (not needed to use the tool): nnunetv2's predictor and
# lst_ai's inference, --no-deps for the same reason as above, after what their code paths used in the tests import.
# They come last: every pip install after them would report lst-ai's requirements that are left out on purpose.
install_reference_dependencies() {
  pip_install -c "$CONSTRAINTS" acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
    scikit-image==0.26.0 pandas graphviz tifffile requests seaborn imagecodecs yacs blosc2 tqdm
}

# The browser tests drive the system's Chromium (Playwright's own browser download is not reachable everywhere).
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "setup_env.sh: the browser tests need Chromium: install it (Debian/Ubuntu: sudo apt-get install chromium) and run again"
    return 1
  fi
}

install_test_extras() {
  rm -f "$TEST_STAMP"
  step "test tools (pytest, pytest-xdist, slicer-core, captum, playwright)" pip_install -c "$CONSTRAINTS" -e "$ROOT[test,cohort,web]"
  step "Chromium for the browser tests" ensure_chromium
  step "test references' dependencies (acvl-utils, batchgenerators, scikit-image, ...)" install_reference_dependencies
  step "test references (nnunetv2 2.8.1, lst-ai 2.0.0rc1)" pip_install --no-deps nnunetv2==2.8.1 lst-ai==2.0.0rc1
  step "check test imports" check_imports "pytest, slicer, captum, nnunetv2, lst_ai.model, playwright.sync_api"
  echo "$WANT" > "$TEST_STAMP"
}

mkdir -p "$VENV"
: > "$LOG"
if ! stamp_current "$TOOL_STAMP"; then
  echo "setup: installing into $VENV (a few minutes the first time; pip's output: $LOG)" >&2
  install_tool
fi
if [ "$WITH_TESTS" = 1 ] && ! stamp_current "$TEST_STAMP"; then
  install_test_extras
fi
