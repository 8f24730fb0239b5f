#!/usr/bin/env bash
# The main job: set up (first time only), then run scmd_ref.py with the given arguments
# (no arguments: SCMD on the embedded offline world).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python scmd_ref.py "$@"
