#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch, then edgetool (editable) and its test extras.
# On an x86 CPU machine torch is pinned to the 2.13.0 CPU build *before* edgetool is installed, so
# pyproject's torch range (kept wide for a Jetson's NVIDIA wheel) never pulls a multi-GB CUDA build.
# On a Jetson, install NVIDIA's torch wheel first (JetPack); this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
"$VPY" -m pip install -q --disable-pip-version-check -e ".[test]"
