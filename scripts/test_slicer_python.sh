#!/usr/bin/env bash
# Run the test suite under a Python pinned like 3D Slicer 5.10's (Python 3.12, numpy 2.0.2,
# scipy 1.13.1, ...; scripts/slicer-python-constraints.txt), in .venv-slicer, set up if needed
# by scripts/setup_slicer_env.sh. Extra arguments go to pytest. pyradiomics cannot be installed
# there, so the tests that need it are skipped (needs_radiomics in Testing/Python/conftest.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_slicer_env.sh"
cd "$ROOT"
echo "=== tests under Slicer-5.10-pinned Python ($("$ROOT/.venv-slicer/bin/python" -c 'import platform, numpy, scipy; print("python", platform.python_version(), "numpy", numpy.__version__, "scipy", scipy.__version__)'); .venv-slicer) ===" >&2
exec "$ROOT/.venv-slicer/bin/python" -m pytest Testing/Python "$@"
