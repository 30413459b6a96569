#!/usr/bin/env bash
# The one prepared GPU script: from a bare H100/H200 machine (python3 with torch 2.11 + CUDA 13.0,
# triton 3.6, Python 3.12, nvcc, compute-sanitizer; no internet) to correctness of both kernel backends and
# the benchmark rows, inside BUDGET_S seconds (default 465: a device call with timeout_s 480, i.e. 8 minutes,
# ends with the script's own summary rather than a kill). Run from the repository root:
#
#     RRD_GIT_COMMIT=<sha of the tree you sent> bash bench/gpu_run.sh
#
# Stages, in order, each under its own time limit (clamped to what the budget has left, so the script as a
# whole never overruns; a stage that times out is recorded and the next one starts):
#   env        versions of the GPU, driver, torch, triton, nvcc, compute-sanitizer
#   predict    in the background from here on (CPU only, niced): python -m bench.predict, the static cost
#              model (tools/cost_model.py, and tools/cuda_cost.py with nvcc for the CUDA backend) for each
#              benchmarked Triton and CUDA row on this GPU (its arch, sm_90 on
#              an H100/H200; the model's H100/H200/A100 figures, else the H200's with a note), in a Triton
#              cache of its own so the bench's first-call compile times stay real; ~30 s, done before
#              the bench starts. The summary prints every triton and cuda row's measured ms beside predicted_ms,
#              calibrated_ms and measured/predicted (the data that calibrates the model)
#   install    pip install --no-build-isolation --no-deps --no-index -e . (builds the CUDA extension with
#              nvcc, sm_90 only unless RRD_CUDA_ARCHS says otherwise); if the extension then does not import
#              from the tree, `setup.py build_ext --inplace`; the package always runs from the tree
#   tests      pytest tests/test_gpu.py -m gpu_quick: both backends, fp32 / TF32 / bf16 / fp16, few Triton
#              compilations (--durations shows each test's time, the first of a dtype includes its compile)
#   selfcheck  python csrc/gpu_selfcheck.py (cuda backend: accuracy grid, torch.compile, a timing)
#   memcheck   compute-sanitizer memcheck on bench/gpu_small_case.py (one small case per backend)
#   bench      python -m bench: B 64 / K 16384 / D 128 fp32 and B 4096 / K 262144 / D 128 bf16, for eager,
#              torch.compile, triton and cuda, floor measured in the same run; "first call" lines give the
#              build + compile time of every provider
#   racecheck  compute-sanitizer racecheck on the same small case, with what is left
# Files under $OUT (at most 8 come back from a device call), each written as its stage runs, so a run cut
# short keeps what finished: gpu_run.log (stage lines, versions), install.log, tests.log, selfcheck.log,
# sanitizer.log, bench.log, bench-results.tar.gz (the bench folders: CSV, JSON, MD; predictions.json and
# predict.log), summary.txt (rewritten after every stage: each stage's verdict, the benchmark table, the
# cost model's predictions beside the measured triton and cuda rows).
#
# Knobs (environment): BUDGET_S, PYTHON (default python3), OUT (default bench/results/gpu-run-<time>),
# SKIP_INSTALL=1, RRD_CUDA_ARCHS (default 90), BENCH_ARGS (extra arguments for both bench runs),
# PREDICT_ARGS (extra arguments for bench.predict, e.g. --device-name H200 --capability 90 without a GPU).
set -u

T0=$(date +%s)
BUDGET_S=${BUDGET_S:-465}
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-run-$(date -u +%Y-%m-%dT%H%M)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/rrd-gpu.XXXXXX)
LOG="$OUT/gpu_run.log"
SUMMARY="$OUT/summary.txt"
RESERVE=10  # seconds kept back for packing and the summary
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
export RRD_GIT_COMMIT=${RRD_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export RRD_CUDA_ARCHS=${RRD_CUDA_ARCHS:-90}
# A fresh Triton cache: every kernel this run needs is compiled in it (so compile times are real), and the
# later stages reuse what the earlier ones compiled.
export TRITON_CACHE_DIR="$WORK/triton-cache"
unset TRITON_INTERPRET

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
say() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# step NAME MAX_SECONDS LOGFILE CMD...: run CMD with output appended to LOGFILE, killed after
# min(MAX_SECONDS, budget left - RESERVE) seconds. Returns CMD's status (124: timed out, 99: not started).
step() {
    local name=$1 max=$2 log=$3 lim t rc
    shift 3
    lim=$(( $(left) - RESERVE ))
    [ "$lim" -gt "$max" ] && lim=$max
    if [ "$lim" -lt 15 ]; then
        say "$name: skipped, budget spent"
        return 99
    fi
    say "$name: start (limit ${lim}s): $*"
    echo "==== $name: $*" >>"$log"
    t=$(date +%s)
    timeout -s TERM -k 5 "$lim" "$@" >>"$log" 2>&1
    rc=$?
    say "$name: rc=$rc after $(( $(date +%s) - t ))s$([ "$rc" = 124 ] && echo ' (TIMED OUT)')"
    return $rc
}

# summary.txt: what every stage concluded so far (rewritten after each stage).
summarize() {
    {
        echo "gpu_run summary, commit $RRD_GIT_COMMIT, +$(( $(date +%s) - T0 ))s of ${BUDGET_S}s"
        grep -E ': (rc=|skipped)' "$LOG"
        [ -f "$OUT/install.log" ] && grep -E '^cuda extension:|^triton:' "$OUT/install.log" | tail -n 2
        [ -f "$OUT/tests.log" ] && grep -E '^(PASSED|FAILED|SKIPPED|ERROR)|[0-9]+ (passed|failed|skipped|error)' \
            "$OUT/tests.log"
        [ -f "$OUT/selfcheck.log" ] && grep -E '^(FAIL|ALL PASSED|FAILED|time |cuda backend unusable)' \
            "$OUT/selfcheck.log"
        [ -f "$OUT/sanitizer.log" ] && grep -E '^====|ERROR SUMMARY|RACECHECK SUMMARY|^small case:' "$OUT/sanitizer.log"
        [ -f "$OUT/bench.log" ] && grep -E '^first call' "$OUT/bench.log"
        [ -f "$PRED_LOG" ] && grep -E '^(cost model for|  B |bench.predict:|Traceback|[A-Za-z]*Error)' "$PRED_LOG"
        local dirs="" pred=""
        for d in paper big; do [ -f "$WORK/$d/results.json" ] && dirs="$dirs $WORK/$d"; done
        [ -s "$PRED" ] && pred="--predictions $PRED"
        [ -n "$dirs" ] && $PY -m bench.summary $dirs --limit 40 $pred 2>&1
    } >"$SUMMARY" 2>&1
}

say "commit $RRD_GIT_COMMIT, budget ${BUDGET_S}s, out $OUT, work $WORK"
{
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    timeout 60 $PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    (command -v nvcc && nvcc --version | tail -n 2) || echo "nvcc: not on PATH"
    (command -v compute-sanitizer && compute-sanitizer --version | tail -n 1) || echo "compute-sanitizer: not on PATH"
} >>"$LOG" 2>&1

# 0. the cost model's predictions for the benchmarked Triton and CUDA rows (the same B, K, D, dtype as the two bench
#    runs below), on the CPU in the background while the GPU stages run; waited for before the last summary
PRED="$WORK/predictions.json"
PRED_LOG="$WORK/predict.log"
step predict 240 "$PRED_LOG" nice -n 10 $PY -m bench.predict --out "$PRED" --jobs 2 \
    --row 64 16384 128 float32 --row 4096 262144 128 bfloat16 ${PREDICT_ARGS:-} &
PREDICT_PID=$!

# 1. install: the build needs setuptools, pybind11 (and uses ninja when present); --no-index: no network
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    step install 150 "$OUT/install.log" $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    if ! PYTHONPATH="$PWD" $PY -c "import rrd_kernels._rrd_cuda" >>"$OUT/install.log" 2>&1; then
        say "install: the extension does not import from the tree; building it in place"
        step build-inplace 150 "$OUT/install.log" $PY setup.py build_ext --inplace
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 60 $PY - >>"$OUT/install.log" 2>&1 <<'EOF'
import torch
from rrd_kernels import cuda_backend
from rrd_kernels.backends import unusable_reason
dev = torch.device("cuda")
print("cuda extension:", cuda_backend.build_info(), "|", unusable_reason("cuda", dev, torch.float32, torch.float32, 64, 16384, 128) or "usable")
print("triton:", unusable_reason("triton", dev, torch.float32, torch.float32, 64, 16384, 128) or "usable")
EOF
summarize

# 2. the quick GPU tests (both backends; -rA lists every test's outcome, --durations its time)
step tests 150 "$OUT/tests.log" $PY -m pytest tests/test_gpu.py -m gpu_quick -q -rA --durations=0 --no-header \
    -p no:cacheprovider
summarize

# 3. the cuda backend's self-check
step selfcheck 90 "$OUT/selfcheck.log" $PY csrc/gpu_selfcheck.py
summarize

# 4. memcheck, one small case per backend; PyTorch's caching allocator off so each tensor is its own
#    allocation (an out-of-bounds access then leaves it)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -n 1)
sanitize() {
    step "$1" "$2" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$1" \
        --target-processes application-only --error-exitcode 3 $PY bench/gpu_small_case.py cuda triton
}
if [ -n "$SAN" ]; then sanitize memcheck 75; else say "memcheck: skipped, compute-sanitizer not found"; fi
summarize

# 5. the benchmark rows, each its own run with its own floor; the bench turns SIGTERM into "interrupted" rows
#    and still writes its files
pack() { tar -C "$WORK" --exclude=./triton-cache -czf "$OUT/bench-results.tar.gz" . 2>>"$LOG"; }
step bench-fp32 110 "$OUT/bench.log" $PY -m bench --preset paper --B 64 --K 16384 --D 128 --dtypes float32 \
    --out "$WORK/paper" --no-progress --no-plots ${BENCH_ARGS:-}
pack; summarize
step bench-bf16 130 "$OUT/bench.log" $PY -m bench --preset paper --B 4096 --K 262144 --D 128 --dtypes bfloat16 \
    --warmup 3 --target-ms 100 --min-reps 10 --out "$WORK/big" --no-progress --no-plots ${BENCH_ARGS:-}
pack; summarize

# 6. racecheck with what is left
if [ -n "$SAN" ]; then sanitize racecheck 75; else say "racecheck: skipped, compute-sanitizer not found"; fi
wait "$PREDICT_PID"  # long done; its own limit is clamped to the budget
pack; summarize

say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
cat "$SUMMARY"
