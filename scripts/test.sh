#!/usr/bin/env bash
# The whole test suite: set-up, lint, Rust tests, Python tests (pytest + Hypothesis).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null 2>&1 || { echo "scripts/test.sh: the test suite builds and tests the Rust extension" \
  "fastsel and needs a Rust toolchain (cargo, e.g. from https://rustup.rs)" >&2; exit 1; }
bash scripts/setup.sh
. .venv/bin/activate
echo "[test] ruff"; ruff check .
echo "[test] cargo fmt / clippy"; cargo fmt --check && cargo clippy --all-targets -q -- -D warnings
echo "[test] cargo test"; cargo test -q
echo "[test] pytest"; python -m pytest -q "$@"
echo "[test] stubtest"; python -m mypy.stubtest fastsel  # python/fastsel/_fastsel.pyi against the built module
