#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), lint, then run the whole test suite on real vLLM engines.
#   bash scripts/test.sh [--unit] [pytest args...]
#     --unit   only tests/unit/ (no engine, no subprocess; well under two minutes)
# Other arguments go to pytest as they are (e.g. -k NAME, -x, a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${THAW_VENV:-.venv}"
args=()
for arg in "$@"; do
  if [ "$arg" = "--unit" ]; then
    args+=(tests/unit)
  else
    args+=("$arg")
  fi
done
bash scripts/setup.sh
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest -q -rs ${args[@]+"${args[@]}"}
