#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main demo: a LangGraph PR-review graph
# whose reviewers fork one shared prefix, on the embedded model.
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${THAW_VENV:-.venv}/bin/python" demos/pr_review.py "$@"
