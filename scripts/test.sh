#!/usr/bin/env bash
# The whole test suite: set-up, lint, Rust tests, Python tests (pytest + Hypothesis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "[test] ruff"; ruff check .
echo "[test] cargo fmt / clippy"; cargo fmt --check && cargo clippy --all-targets -q -- -D warnings
echo "[test] cargo test"; cargo test -q
echo "[test] pytest"; python -m pytest -q "$@"
