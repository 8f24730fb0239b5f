#!/usr/bin/env bash
# Exact resume on CUDA: an embedded-world run stopped by SIGTERM between two checkpoints and resumed, against an
# uninterrupted run of the same command. Part of bench/gpu_check.sh.
#   bash bench/cuda_resume_check.sh PYTHON DATA_DIR OUTDIR        (DEVICE=cpu STEPS=40: a quick check without a GPU)
set -uo pipefail
PYTHON=$1 DATA_DIR=$2 OUTDIR=$3 DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-400}
RUN=("$PYTHON" scmd_ref.py --device "$DEVICE" --data-dir "$DATA_DIR" --world-per-class 40 --no-progress
     --steps "$STEPS" --checkpoint-freq $((STEPS / 4)) --save-every 100000)
ref="$OUTDIR/cuda_ref" cut="$OUTDIR/cuda_cut"
"${RUN[@]}" --output-dir "$ref" || exit 1
"${RUN[@]}" --output-dir "$cut" &
pid=$!
until [ "$( { wc -l < "$cut/results.jsonl"; } 2>/dev/null || echo 0)" -ge 2 ] || ! kill -0 "$pid" 2>/dev/null; do
  sleep 0.2
done
kill -TERM "$pid"
wait "$pid"
rc=$?
echo "first part exited $rc (143: stopped by SIGTERM after a step, with a checkpoint)"
"${RUN[@]}" --output-dir "$cut" || exit 1
"$PYTHON" - "$ref" "$cut" <<'PY'
import sys, torch
a, b = (torch.load(f"{d}/checkpoint_last.pt", weights_only=True)["trainer"] for d in sys.argv[1:])
diff = max(float((a[p][k].float() - b[p][k].float()).abs().max()) for p in ("student", "sma") for k in a[p]
           if a[p][k].is_floating_point())
print(f"resumed vs uninterrupted run: max |weight difference| {diff:.3g} (0: exact resume)")
PY
[ "$rc" -eq 143 ]
