#!/usr/bin/env bash
# Set up the environments if needed (setup_env.sh --test: the tool and the test-only packages), then run
# the tests in two environments (extra arguments go to pytest both times):
#   1. in .venv (Python 3.11, every dependency including pyradiomics; no test may be skipped for
#      a missing pyradiomics: MSIS_REQUIRE_RADIOMICS=1);
#   2. in .venv-slicer, pinned like the Python of 3D Slicer 5.10 (scripts/test_slicer_python.sh):
#      the tests of what runs inside Slicer; those that need pyradiomics are skipped there.
# Fails if either run fails; pytest's "no tests collected" (exit code 5) counts as a failure.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

echo "=== [1/2] main test suite (.venv) ===" >&2
main_rc=0
{ bash "$ROOT/scripts/setup_env.sh" --test && MSIS_REQUIRE_RADIOMICS=1 MSIS_REQUIRE_REFERENCES=1 "$ROOT/.venv/bin/python" -m pytest Testing/Python "$@"; } || main_rc=$?

echo "=== [2/2] test suite under Slicer 5.10's Python pins (.venv-slicer) ===" >&2
slicer_rc=0
bash "$ROOT/scripts/test_slicer_python.sh" "$@" || slicer_rc=$?

echo "test.sh: main suite exit code $main_rc, Slicer-5.10-pinned suite exit code $slicer_rc (5 = no tests collected)" >&2
exit $(( main_rc != 0 ? main_rc : slicer_rc ))
