#!/usr/bin/env bash
# Set up the environments if needed, then run the tests in two environments (extra arguments go to pytest both times):
#   1. in .venv (Python 3.11, every dependency including pyradiomics; set up by setup_env.sh --test: the tool and the
#      test-only packages; no test may be skipped for a missing pyradiomics: MSIS_REQUIRE_RADIOMICS=1);
#   2. in .venv-slicer, pinned like the Python of 3D Slicer 5.10 (setup_slicer_env.sh, scripts/test_slicer_python.sh):
#      the tests of what runs inside Slicer; those that need pyradiomics are skipped there.
# The two setups run at the same time (the second one's lines are shown when it ends). Each run spreads its test
# files over MSIS_TEST_WORKERS processes (pytest-xdist; default 2, 0 = one process): a file's tests stay in one
# process, so the fixtures a file shares are built once.
# Fails if either run fails; pytest's "no tests collected" (exit code 5) counts as a failure.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The setups install without compiling bytecode (pip --no-compile: two thirds of pip's time); the tests' first imports
# compile what they use, once, if Python may write its caches.
unset PYTHONDONTWRITEBYTECODE

WORKERS="${MSIS_TEST_WORKERS:-2}"
case "$WORKERS" in
  ''|*[!0-9]*) echo "test.sh: MSIS_TEST_WORKERS must be a number of processes (0 = no pytest-xdist), got '$WORKERS'" >&2; exit 2 ;;
esac
PARALLEL=()
[ "$WORKERS" -gt 0 ] && PARALLEL=(-n "$WORKERS" --dist loadfile)

slicer_setup_log="$(mktemp)"
trap 'rm -f "$slicer_setup_log"' EXIT
bash "$ROOT/scripts/setup_slicer_env.sh" > "$slicer_setup_log" 2>&1 &
slicer_setup=$!

echo "=== [1/2] main test suite (.venv) ===" >&2
main_rc=0
if bash "$ROOT/scripts/setup_env.sh" --test; then
  wait "$slicer_setup"; slicer_setup_rc=$?  # before the tests: both would compete for the 2 cores
  MSIS_REQUIRE_RADIOMICS=1 MSIS_REQUIRE_REFERENCES=1 "$ROOT/.venv/bin/python" -m pytest Testing/Python "${PARALLEL[@]}" "$@" || main_rc=$?
else
  main_rc=$?
  wait "$slicer_setup"; slicer_setup_rc=$?
fi

echo "=== [2/2] test suite under Slicer 5.10's Python pins (.venv-slicer) ===" >&2
cat "$slicer_setup_log" >&2
slicer_rc=$slicer_setup_rc
[ "$slicer_setup_rc" = 0 ] && { bash "$ROOT/scripts/test_slicer_python.sh" "${PARALLEL[@]}" "$@" || slicer_rc=$?; }

echo "test.sh: main suite exit code $main_rc, Slicer-5.10-pinned suite exit code $slicer_rc (5 = no tests collected)" >&2
exit $(( main_rc != 0 ? main_rc : slicer_rc ))
