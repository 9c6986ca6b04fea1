#!/usr/bin/env bash
# Create or update .venv-slicer at the repository root: a Python 3.12 environment pinned like the
# Python of 3D Slicer 5.10 (scripts/slicer-python-constraints.txt), to run the tests of the core
# library and the MRML adapter against the package versions Slicer users have.
# Idempotent: when nothing that shapes the environment changed, it returns at once and prints nothing.
# Otherwise it prints one line per step; pip's output goes to .venv-slicer/setup.log (scripts/setup_steps.sh).
#
# pyradiomics is NOT installed: it has no wheel for Python 3.12 and neither sdist builds there;
# inside Slicer it comes from the SlicerRadiomics extension. Tests that need it are skipped
# (the needs_radiomics marker in Testing/Python/conftest.py).
#
# The Python 3.12 interpreter: $SLICER_PYTHON if set, else the newest pyenv 3.12, else python3.12
# on PATH. (Slicer 5.10 ships 3.12.10; any 3.12.x will do.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-slicer"
CONSTRAINTS="$ROOT/scripts/slicer-python-constraints.txt"
STAMP="$VENV/.msis-slicer-setup"
LOG="$VENV/setup.log"
WANT="$(cat "$ROOT/scripts/setup_slicer_env.sh" "$ROOT/scripts/setup_steps.sh" "$CONSTRAINTS" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"

is_py312() { [ -n "${1:-}" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && is_py312 "$VENV/bin/python"; then
  exit 0
fi

find_python312() {
  local c
  if [ -n "${SLICER_PYTHON:-}" ]; then
    is_py312 "$SLICER_PYTHON" && { echo "$SLICER_PYTHON"; return 0; }
    echo "setup_slicer_env.sh: SLICER_PYTHON=$SLICER_PYTHON is not a Python 3.12 interpreter" >&2
    return 1
  fi
  if command -v pyenv >/dev/null 2>&1; then
    # newest 3.12.x first (sort -V); a pyenv shim alone is not enough, it may not be activated
    for c in $(ls -d "$(pyenv root)"/versions/3.12* 2>/dev/null | sort -rV); do
      is_py312 "$c/bin/python3.12" && { echo "$c/bin/python3.12"; return 0; }
    done
  fi
  for c in python3.12 python3; do
    c="$(command -v "$c" 2>/dev/null)" || continue
    is_py312 "$c" && { echo "$c"; return 0; }
  done
  echo "setup_slicer_env.sh: no Python 3.12 found (Slicer 5.10 uses 3.12). Install one" \
       "(e.g. 'pyenv install 3.12') or set SLICER_PYTHON=/path/to/python3.12." >&2
  return 1
}

source "$ROOT/scripts/setup_steps.sh"
echo "setup: installing into $VENV (Slicer 5.10 pins; one time; about 2 minutes, about 7 GB; pip's output: $LOG)" >&2
if [ -e "$VENV" ] && ! is_py312 "$VENV/bin/python"; then
  echo "setup: $VENV is not a Python 3.12 environment; recreating it" >&2
  rm -rf "$VENV"
fi
rm -f "$STAMP"
mkdir -p "$VENV"
: > "$LOG"
if [ ! -x "$VENV/bin/python" ]; then
  PY312="$(find_python312)"
  step "Python 3.12 environment .venv-slicer ($PY312)" "$PY312" -m venv "$VENV"
fi

# Every install runs under Slicer's pins: nothing may upgrade or downgrade them.
# --no-compile: as in setup_env.sh, bytecode is compiled on first import instead of for every module at install
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile -c "$CONSTRAINTS")
# pip, setuptools and wheel as Slicer ships them (pinned by the constraints file).
step "pip, setuptools, wheel (Slicer's versions)" "${PIP[@]}" pip setuptools wheel
# What Slicer's Python always has (versions from the constraints file).
step "numpy, scipy, SimpleITK, requests, packaging" "${PIP[@]}" numpy scipy SimpleITK requests packaging
# torch: only the CUDA build exists for cp312 here (about 5.5 GB with its nvidia-* wheels); it runs
# on CPU. Pinned like setup_env.sh pins its CPU build, so a new release cannot change the run.
# nilearn: 0.14.x needs packaging>=26 and requests>=2.33, newer than Slicer's 25.0 and 2.32.3,
# so the last release that fits the pins is pinned.
# captum: 0.9.0 installs under the pins (matplotlib, numpy, packaging, torch, tqdm).
# slicer-core: the PyPI wheel of Slicer's MRML libraries (cp312; needs only its own vtk), the version msis view's
# trame-slicer pins (pyproject.toml), so both environments test the MRML adapter on one Slicer core.
step "torch 2.15.0, monai, scikit-learn, nilearn, ..., captum, slicer-core, pytest, pytest-xdist" \
  "${PIP[@]}" torch==2.15.0 monai scikit-learn "nilearn==0.13.1" nibabel matplotlib captum slicer-core==5.11.0.6 pytest pytest-xdist
# The project itself, without letting pip resolve pyproject.toml's dependencies (they are all
# above, except pyradiomics); no build isolation, so Slicer's setuptools and wheel build it.
step "MSInstanceSaliencyLib (editable)" "$VENV/bin/python" -m pip install --disable-pip-version-check --no-compile --no-deps --no-build-isolation -e "$ROOT"

# triton (a torch dependency on Linux) compiles GPU kernels; it is of no use on CPU, and the CPU
# build of torch (setup_env.sh, Slicer's PyTorch extension on a machine without a GPU) has none.
# Here it crashes the tests: importing it (torch.optim and torch._dynamo do) after Mesa's software
# OpenGL (llvmpipe, used by the offscreen EGL render windows of test_rendering.py) loaded the system
# libLLVM segfaults, as its own bundled LLVM clashes with it. Without it torch runs as its CPU build.
step "remove triton" "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -y triton

# Check: every pinned package that is installed has exactly its pinned version, and pip's view of
# the environment is consistent.
check_pins() {
"$VENV/bin/python" - "$CONSTRAINTS" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = re.split(r"\s*==\s*", line)
    try:
        have = version(name)
    except PackageNotFoundError:
        continue
    if have != want:
        bad.append(f"{name} {have} (Slicer 5.10 has {want})")
if bad:
    sys.exit("setup_slicer_env.sh: versions differ from Slicer 5.10's: " + ", ".join(bad))
EOF
}
# pip check, except for the triton removed on purpose above
pip_check_but_triton() {
  local check rest
  check="$("$VENV/bin/python" -m pip check --disable-pip-version-check 2>&1 || true)"
  rest="$(printf '%s\n' "$check" | grep -v -e '^No broken requirements found' -e '^torch [^ ]* requires triton, which is not installed\.$' || true)"
  [ -z "$rest" ] || { printf 'setup_slicer_env.sh: pip check:\n%s\n' "$rest"; return 1; }
}
step "check versions against Slicer 5.10's" check_pins
step "pip check (all but the triton removed)" pip_check_but_triton
"$VENV/bin/python" - >&2 <<'EOF'
import platform
from importlib.metadata import version
names = ["pip", "setuptools", "numpy", "scipy", "SimpleITK", "torch", "monai", "scikit-learn", "nilearn", "nibabel", "matplotlib", "captum", "slicer-core", "pytest", "pytest-xdist"]
print("setup: slicer-5.10-pinned environment ready: python", platform.python_version(), " ".join(f"{n} {version(n)}" for n in names), "(no pyradiomics, no triton)")
EOF
echo "$WANT" > "$STAMP"
