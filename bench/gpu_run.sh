#!/usr/bin/env bash
# The one prepared device script of the benchmark suite: install, GPU tests, the paper preset, and the sweep
# under a time budget, then a short summary table printed last. Written for a lent H100/H200 of this
# workplace (python3 with torch 2.11, triton 3.6, Python 3.12; no internet), run from the repository root:
#
#     RRD_GIT_COMMIT=<sha of the tree you sent> bash bench/gpu_run.sh
#
# (the device gets a copy of the working tree, possibly without .git, so pass the commit in). The whole
# script keeps to BUDGET_S seconds (default 480); the sweep gets what the earlier steps leave and records the
# configurations it does not reach as skipped. Everything is written under $OUT (default
# bench/results/gpu-run-<date>/ when OUT is unset), as at most 8 files, because that is what comes back from
# a device call: results.tar.gz (all run folders: CSV, JSON, MD, PNG, errors.log), paper-results.md,
# sweep-results.md, summary.txt and gpu_run.log.
#
# Knobs (environment): BUDGET_S (seconds for everything), PYTHON (default python3), OUT, SKIP_INSTALL=1,
# BENCH_ARGS (extra arguments for both bench runs, e.g. "--providers eager triton" or "--B 4096").
set -u

T0=$(date +%s)
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-run-$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/rrd-bench.XXXXXX)
LOG="$OUT/gpu_run.log"
export PYTHONUNBUFFERED=1
export RRD_GIT_COMMIT=${RRD_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
say() { echo "[gpu_run +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
# step NAME MAX_SECONDS CMD...: run with a hard limit of min(MAX_SECONDS, what is left - RESERVE)
RESERVE=20
step() {
    local name=$1 max=$2; shift 2
    local lim; lim=$(left); lim=$(( lim - RESERVE )); [ "$lim" -gt "$max" ] && lim=$max
    if [ "$lim" -lt 10 ]; then say "$name: skipped, budget spent"; return 99; fi
    say "$name: start (limit ${lim}s)"
    timeout -s TERM -k 10 "$lim" "$@" >>"$LOG" 2>&1
    local rc=$?
    say "$name: rc=$rc"
    return $rc
}

say "commit $RRD_GIT_COMMIT, budget ${BUDGET_S}s, out $OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
} >>"$LOG" 2>&1

# 1. install (builds the CUDA extension where setup.py finds nvcc); the package also runs from the tree
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    step install 200 $PY -m pip install --no-build-isolation --no-deps -e . \
        || say "install failed or timed out: running from the source tree (the cuda backend may be unavailable)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 2. the GPU tests (all of the project's tests marked gpu)
step gpu-tests 100 $PY -m pytest tests -m gpu -q -x --no-header -p no:cacheprovider

# 3. the paper preset (B 64, K 16384, D 128, fp32), all providers, both timing kinds
step paper 150 $PY -m bench --preset paper --out "$WORK/paper" --no-progress ${BENCH_ARGS:-}

# 4. the sweep with what is left: --max-seconds stops starting new cases; timeout is the hard stop (the
#    suite turns SIGTERM into "interrupted" and still writes its files)
SWEEP_S=$(( $(left) - RESERVE - 45 ))
if [ "$SWEEP_S" -gt 20 ]; then
    step sweep $(( SWEEP_S + 40 )) $PY -m bench --preset sweep --max-seconds "$SWEEP_S" --out "$WORK/sweep" \
        --no-progress --summary-rows 20 ${BENCH_ARGS:-}
else
    say "sweep: skipped, budget spent"
fi

# 5. pack: at most 8 files come back from a device call
[ -f "$WORK/paper/results.md" ] && cp "$WORK/paper/results.md" "$OUT/paper-results.md"
[ -f "$WORK/sweep/results.md" ] && cp "$WORK/sweep/results.md" "$OUT/sweep-results.md"
tar -C "$WORK" -czf "$OUT/results.tar.gz" . 2>>"$LOG"
$PY -m bench.summary "$WORK/paper" "$WORK/sweep" --limit 30 >"$OUT/summary.txt" 2>&1
say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
echo
grep -E ': (rc=|skipped)|failed or timed out' "$LOG"
grep -E '^[0-9]+ (passed|failed|skipped|deselected)|no tests ran|[0-9]+ (passed|failed)' "$LOG" | tail -n 1
cat "$OUT/summary.txt"
