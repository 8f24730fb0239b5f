#!/usr/bin/env bash
# GPU check of the step-time benchmarks: one prepared script for a GPU node with a stock PyTorch (no Rust toolchain,
# perhaps another Python minor version, no network). Runs in under 8 minutes and writes JSON/PNG/logs to OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR                        # run from anywhere; works in the repository root
#   WHEELS=/path/to/wheels PYTHON=python3.12 bash bench/gpu_check.sh OUTDIR
#
# What it runs (each part under its own time limit; a failed part is reported and the others still run):
#   GPU present:  step_breakdown --scale full --device cuda   (ResNet-50 + ViT-B-32-quickgelu, 224 px, 3x32;
#                                                              with the channels_last/bf16/async_select/stale variants)
#                 bench/bench_fastsel.py (selection micro-benchmark; --selection-only if it has that flag,
#                                         else with a small indexing tree), if the file and fastsel are there
#                 step_breakdown --scale tiny --device cuda   (embedded world's models)
#   always:       step_breakdown --scale tiny --device cpu
#                 data_loading (embedded world, 32 px and 224 px) against the step rates above
#   GPU:          the embedded world end to end on CUDA (fp16 autocast + GradScaler), without and with
#                 --teacher-renorm; a SIGTERM-and-resume on CUDA against an uninterrupted CUDA run (max weight
#                 difference); bench/device_agreement.py (kept sample ids of the first steps, CUDA vs CPU)
#   >= 2 GPUs:    one run of 60 steps (ResNet-50 student, random ViT-B-32 teacher, 224 px, the embedded world) on
#                 1 GPU and with torchrun on 2 GPUs; their records' step_time (the mean time per training step)
#   GPU, last:    step_breakdown --scale full --device cuda --configs scmd,scmd+compile     (torch.compile)
# The whole script keeps to GPU_CHECK_BUDGET seconds (default 450): each part's limit is capped by what is left.
# No GPU: says so and runs the CPU parts only.
#
# Install step: SKIPPED when `import open_clip, fastsel, matplotlib, tqdm, safetensors` already works with $PYTHON
# (e.g. the project venv). Otherwise the missing packages are installed from a local folder of wheels,
# WHEELS=${WHEELS:-./wheels}, with `pip install --no-index --find-links "$WHEELS"` (nothing is downloaded).
# fastsel is needed by the scmd_ref.py parts (cuda_run, cuda_resume, device_agreement; they fail without it); the
# step-time parts run without it (torch selector, no bookkeeping). matplotlib is optional (no PNG without it).
#
# Building the wheels folder, on a machine with the Rust toolchain and a network (Python/platform of the GPU node):
#   pip install "maturin>=1.7,<2"
#   maturin build --release --out wheels
#       -> wheels/scmd-0.1.0-cp39-abi3-manylinux_2_34_x86_64.whl: the fastsel extension as ONE abi3 wheel that
#          serves every CPython >= 3.9 (Cargo.toml: pyo3 feature "abi3-py39"; pyproject.toml: maturin, module
#          fastsel._fastsel). It is installed with --no-deps (its torch/torchvision requirements are the node's).
#          The manylinux tag follows the build machine's glibc; for an older node (glibc < 2.34) build with
#          `maturin build --release --compatibility manylinux2014 --zig` or in the manylinux2014 container.
#   pip download -d wheels --no-deps --only-binary=:all: --python-version 3.X --platform manylinux2014_x86_64 \
#       open_clip_torch timm ftfy wcwidth regex safetensors huggingface_hub hf-xet filelock fsspec packaging pyyaml \
#       requests certifi charset-normalizer idna urllib3 typing_extensions tqdm \
#       matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six pillow numpy
#       (3.X = the node's Python minor version: regex, safetensors, pyyaml, hf-xet, charset-normalizer and the
#        matplotlib stack are binary wheels per Python version; the others are pure Python. --no-deps keeps pip
#        from downloading torch/CUDA, which the node already has. Add --platform manylinux_2_28_x86_64 etc. if
#        pip finds no wheel for manylinux2014.)
#   Then copy wheels/ next to the repository (or point WHEELS at it).
set -uo pipefail

OUTDIR=${1:?usage: bash bench/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WHEELS=${WHEELS:-./wheels}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python
  else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY="$OUTDIR/gpu_check_summary.txt"
: > "$SUMMARY"
FAILED=0

say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }

BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for the whole script (the node allows 8 minutes)

# part NAME SECONDS CMD...: runs CMD with a time limit (capped by what is left of BUDGET), its output to
# OUTDIR/NAME.log (and the terminal); skipped when less than 30 s are left
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) - 5 ))
  if [ "$left" -lt 30 ]; then say "skip  $name: only ${left}s of the ${BUDGET}s budget left"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "start $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then say "ok    $name"
  else
    local why="exit $rc"; [ "$rc" -eq 124 ] && why="over its ${limit}s limit"
    if [ "${OPTIONAL:-0}" = 1 ]; then say "FAIL  $name (optional, not counted): $why"
    else say "FAIL  $name: $why"; FAILED=$((FAILED + 1)); fi
  fi
}

# --- environment ----------------------------------------------------------------------------------------------
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  say "FATAL: $PYTHON cannot import torch; set PYTHON to the interpreter of the node's PyTorch"
  exit 2
fi
say "python: $("$PYTHON" -c 'import sys, torch; print(sys.executable, sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | tee -a "$SUMMARY"

# --- install what is missing, from local wheels only -------------------------------------------------------------
# module:distribution pairs; one interpreter start lists the distributions whose module does not import
read -r -a missing <<<"$("$PYTHON" - <<'PY' 2>/dev/null
import importlib
pairs = {"open_clip": "open_clip_torch", "fastsel": "scmd", "matplotlib": "matplotlib", "tqdm": "tqdm",
         "safetensors": "safetensors", "torchvision": "torchvision"}
out = []
for mod, dist in pairs.items():
    try:
        importlib.import_module(mod)
    except Exception:
        out.append(dist)
print(" ".join(out))
PY
)"
if [ ${#missing[@]} -eq 0 ]; then
  say "install: skipped (every import works already)"
elif [ ! -d "$WHEELS" ]; then
  say "install: missing ${missing[*]} and no wheels folder $WHEELS (see the top of this script); continuing"
else
  say "install: ${missing[*]} from $WHEELS (pip --no-index)"
  pipi() { "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$@" \
           || "$PYTHON" -m pip install -q --user --no-index --find-links "$WHEELS" "$@"; }
  deps=()
  for pkg in "${missing[@]}"; do
    if [ "$pkg" = scmd ]; then pipi --no-deps scmd || say "install: fastsel wheel failed (the scmd_ref.py parts will fail)"
    else deps+=("$pkg"); fi
  done
  [ ${#deps[@]} -gt 0 ] && { pipi "${deps[@]}" || say "install: pip failed for ${deps[*]}"; }
fi
"$PYTHON" -c "import open_clip" 2>/dev/null || { say "FATAL: open_clip is not importable"; exit 2; }
"$PYTHON" -c "import fastsel, sys; sys.exit(0 if hasattr(fastsel, 'topk_desc') else 1)" 2>/dev/null \
  || say "note: fastsel is not importable: step times use the torch selector without bookkeeping; the scmd_ref.py parts fail"

# --- GPU parts, then CPU parts (in order of importance; the budget caps the last ones) --------------------------
GPU=0
if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1
  say "GPU: $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')"
  part breakdown_full_cuda 180 "$PYTHON" bench/step_breakdown.py --scale full --device cuda --steps 100 \
    --warmup 10 --out "$OUTDIR/step_breakdown_full_cuda.json"
  # selection micro-benchmark (CPU-side fastsel vs torch); only the flags its --help lists are passed:
  # --selection-only if it has it, else a small indexing tree (--index-files/--index-classes) so that the
  # selection sizes stay the full ones but the 600k-file tree is not built
  if [ ! -f bench/bench_fastsel.py ]; then
    say "skip  bench_fastsel: bench/bench_fastsel.py is not in this checkout"
  elif ! "$PYTHON" -c "import fastsel; fastsel.topk_desc" 2>/dev/null; then
    say "skip  bench_fastsel: fastsel is not importable here (install its wheel, see the top of this script)"
  else
    help=$("$PYTHON" bench/bench_fastsel.py --help 2>&1 || true)
    fs_args=()
    if grep -q -- "--selection-only" <<<"$help"; then fs_args+=(--selection-only)
    elif grep -q -- "--index-files" <<<"$help"; then
      fs_args+=(--index-files 20000)
      grep -q -- "--index-classes" <<<"$help" && fs_args+=(--index-classes 20)
    fi
    if grep -q -- "--out" <<<"$help"; then fs_args+=(--out "$OUTDIR/bench_fastsel.json")
    elif grep -q -- "--json" <<<"$help"; then fs_args+=(--json "$OUTDIR/bench_fastsel.json"); fi
    part bench_fastsel 90 "$PYTHON" bench/bench_fastsel.py ${fs_args[@]+"${fs_args[@]}"}
  fi
  part breakdown_tiny_cuda 60 "$PYTHON" bench/step_breakdown.py --scale tiny --device cuda --steps 100 \
    --warmup 10 --out "$OUTDIR/step_breakdown_tiny_cuda.json"
else
  say "NO GPU: torch.cuda.is_available() is False on this node; CUDA parts skipped, CPU parts run"
fi

DATA_DIR=./data NPC=()
if [ ! -f ./data/embedded_world/WORLD_COMPLETE ]; then DATA_DIR="$OUTDIR/data" NPC=(--n-per-class 40); fi
if [ "$GPU" = 1 ]; then  # the run itself on CUDA: end to end, --teacher-renorm, stop-and-resume, selection vs CPU
  RUN=("$PYTHON" scmd_ref.py --device cuda --data-dir "$DATA_DIR" --world-per-class 40 --no-progress)
  part cuda_run 120 "${RUN[@]}" --steps 301 --checkpoint-freq 100 --output-dir "$OUTDIR/cuda_run"
  part cuda_run_renorm 120 "${RUN[@]}" --steps 301 --checkpoint-freq 100 --teacher-renorm \
    --output-dir "$OUTDIR/cuda_run_renorm"
  part cuda_resume 240 bash bench/cuda_resume_check.sh "$PYTHON" "$DATA_DIR" "$OUTDIR"
  part device_agreement 120 "$PYTHON" bench/device_agreement.py --device cuda --steps 20 --data-dir "$DATA_DIR" \
    --out "$OUTDIR/device_agreement.json"
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if [ "$NGPU" -ge 2 ]; then  # one run on 1 GPU, then on 2 with torchrun: the step time of each
    FULL=(scmd_ref.py --device cuda --data-dir "$DATA_DIR" --world-per-class 40 --no-progress --steps 60
          --checkpoint-freq 59 --student resnet50 --student-weights none --teacher ViT-B-32-quickgelu
          --teacher-weights none --image-size 224)
    part step_1gpu 150 "$PYTHON" "${FULL[@]}" --output-dir "$OUTDIR/step_1gpu"
    part step_2gpu 150 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 "${FULL[@]}" \
      --output-dir "$OUTDIR/step_2gpu"
    for n in 1 2; do
      rec="$OUTDIR/step_${n}gpu/results.jsonl"
      [ -f "$rec" ] && say "step time on $n GPU(s): $("$PYTHON" -c "import json, sys
print('%.1f ms' % (1000 * json.loads(open(sys.argv[1]).read().splitlines()[-1])['step_time']))" "$rec")"
    done
  else
    say "skip  step_1gpu/step_2gpu: $NGPU GPU on this node (the torchrun step time needs 2)"
  fi
fi

# CPU_THREADS: torch threads of the CPU breakdown (default: 1 on machines with < 4 CPUs, which are usually shared
# and where two OpenMP threads stall each other; torch's default otherwise)
CPU_THREADS=${CPU_THREADS:-$( [ "$(nproc)" -lt 4 ] && echo 1 )}
part breakdown_tiny_cpu 150 "$PYTHON" bench/step_breakdown.py --scale tiny --device cpu --steps 5 --warmup 1 \
  ${CPU_THREADS:+--threads "$CPU_THREADS"} --out "$OUTDIR/step_breakdown_tiny_cpu.json"
STEP_TINY="$OUTDIR/step_breakdown_tiny_cpu.json"
[ -f "$OUTDIR/step_breakdown_tiny_cuda.json" ] && STEP_TINY="$OUTDIR/step_breakdown_tiny_cuda.json"
cmp_tiny=(); [ -f "$STEP_TINY" ] && cmp_tiny=(--step-json "$STEP_TINY")
part data_loading_64 90 "$PYTHON" bench/data_loading.py --data-dir "$DATA_DIR" ${NPC[@]+"${NPC[@]}"} --steps 10 \
  ${cmp_tiny[@]+"${cmp_tiny[@]}"} --out "$OUTDIR/data_loading_64.json"
cmp_full=()
[ -f "$OUTDIR/step_breakdown_full_cuda.json" ] && cmp_full=(--step-json "$OUTDIR/step_breakdown_full_cuda.json")
part data_loading_224 120 "$PYTHON" bench/data_loading.py --data-dir "$DATA_DIR" ${NPC[@]+"${NPC[@]}"} \
  --image-size 224 --steps 5 --warmup 1 ${cmp_full[@]+"${cmp_full[@]}"} --out "$OUTDIR/data_loading_224.json"
if [ "$GPU" = 1 ]; then  # last: optional (needs a working inductor/triton toolchain), compiles for a minute or two
  OPTIONAL=1 part breakdown_full_cuda_compile 150 "$PYTHON" bench/step_breakdown.py --scale full --device cuda \
    --configs scmd,scmd+compile --steps 50 --warmup 5 --out "$OUTDIR/step_breakdown_full_cuda_compile.json"
fi

[ "$DATA_DIR" = ./data ] || rm -rf "$DATA_DIR"  # the partial world is not a result
say "done in $(( $(date +%s) - T0 ))s: $FAILED part(s) failed; results in $OUTDIR"
[ "$FAILED" -eq 0 ]
