#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the whole test suite on real vLLM engines.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${THAW_VENV:-.venv}/bin/python" -m pytest -q -rs "$@"
