#!/usr/bin/env bash
# Creates .venv (if missing) and installs scmd into it: with its Rust extension fastsel when a Rust toolchain
# (cargo) is there, else the PyPI packages alone (requirements.txt; scmd_ref.py runs the same run without fastsel).
# Idempotent: a second call only rebuilds fastsel. Needs python3 >= 3.9.
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
if ! command -v cargo >/dev/null 2>&1; then
  if [ ! -f "$stamp.pip-only" ] || [ requirements.txt -nt "$stamp.pip-only" ]; then
    echo "[setup] no Rust toolchain (cargo): installing the PyPI packages only (requirements.txt); scmd_ref.py runs" \
         "without fastsel"
    python -m pip install -q -r requirements.txt "pytest>=7" "hypothesis>=6.100"
    touch "$stamp.pip-only"
  fi
elif [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing dependencies (torch, torchvision, open_clip_torch, ...; first time takes minutes)"
  python -m pip install -q "maturin>=1.7,<2"
  python -m pip install -q -e ".[test]"
  touch "$stamp"
else
  echo "[setup] building fastsel"
  python -m pip install -q --no-deps -e .
fi
