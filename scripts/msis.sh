#!/usr/bin/env bash
# Set up the environment if needed, then run `msis` with the given arguments (e.g. `scripts/msis.sh demo`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/msis" "$@"
