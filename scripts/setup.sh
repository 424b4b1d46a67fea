#!/usr/bin/env bash
# Installs ilora into the current Python environment.
# On a machine without an NVIDIA GPU and without torch, install the CPU build of torch first
# (an unpinned `torch` would pull a multi-GB CUDA build). Users with a torch of their own, or
# with a GPU, keep what pip resolves for them; ILORA_TORCH overrides the spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${ILORA_TORCH:-}" ]; then
    "$PY" -m pip install "$ILORA_TORCH"
  elif ! command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -e ".[dev]"
