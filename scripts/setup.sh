#!/usr/bin/env bash
# Creates .venv (if missing) and installs scmd with its Rust extension fastsel into it.
# Idempotent: a second call only rebuilds fastsel. Needs python3 >= 3.9 and a Rust toolchain (cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY -V)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
stamp=.venv/.scmd-deps-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing dependencies (torch, torchvision, open_clip_torch, ...; first time takes minutes)"
  python -m pip install -q "maturin>=1.7,<2"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
else
  echo "[setup] building fastsel"
  python -m pip install -q --no-deps -e .
fi
