#!/usr/bin/env bash
# Set up the tool's environment if needed (not the tests' packages: scripts/test.sh adds those), then run `msis`
# with the given arguments (e.g. `scripts/msis.sh demo`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/msis" "$@"
