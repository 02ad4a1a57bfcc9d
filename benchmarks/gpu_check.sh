#!/usr/bin/env bash
# GPU acceptance run (device machine, repo root, $OUT set): build, tests, benchmarks, sanitizers -> $OUT/summary.md.
#
# Usage there:   KDK_COMMIT=<hash> bash benchmarks/gpu_check.sh      (KDK_COMMIT: .git may not travel)
# Knobs (env):   GPU_CHECK_BUDGET_S (480), BENCHES (ops to run, e.g. "topk_kl sinkhorn"; default all),
#                BENCH_ARGS (extra pytest args for every suite, e.g. --kdk-quick),
#                SANITIZE_TESTS (test files for compute-sanitizer, default tests/test_topk_kl.py),
#                MEMCHECK_K / RACECHECK_K (their pytest -k selections), SANITIZE_OTHER_TESTS /
#                SANITIZE_OTHER_K (the other ops' files and selection), SKIP_FULL=1.
# Never stops at the first failure: every step runs under `timeout`, its status is collected, and the
# summary is rewritten after each step, so whatever the run reaches comes back even if it is cut short.
# $OUT gets at most 6 files (the device tool returns 8): summary.md, build.log, tests.log, sanitizer.log,
# bench.log, bench.json. A new op needs no edit here: every benchmarks/test_bench_*.py is run.

set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
T0=$(date +%s)
WORK="$(mktemp -d)"
STEPS="$WORK/steps"        # one line per step: name|status|seconds|detail
DETAILS="$WORK/details"    # markdown sections appended after the steps table
: >"$STEPS"; : >"$DETAILS"
for f in build.log tests.log sanitizer.log bench.log bench.json; do : >"$OUT/$f"; done

elapsed() { echo $(( $(date +%s) - T0 )); }
# Seconds a step may take: its own cap, but never past the budget (minus 10 s to write the summary).
limit() { local cap=$1 left=$(( BUDGET - $(elapsed) - 10 )); (( left < cap )) && cap=$left; echo "$cap"; }

COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo "${KDK_COMMIT:-unknown (no .git here; pass KDK_COMMIT)}")"
export KDK_COMMIT="$COMMIT"   # benchmarks/common.py stamps rows with it when git is unavailable

# Read once: importing torch takes seconds, and the summary is rewritten after every step.
GPU_LINE="$( (command -v nvidia-smi >/dev/null &&
              nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1) ||
            echo 'nvidia-smi unavailable')"
VERSIONS="$($PY -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
                                           "| torch CUDA", torch.version.cuda)' 2>&1 | tail -1)"
NVCC="$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"

write_summary() {
    {
        echo "# kdkernels GPU check"
        echo
        echo "- commit: $COMMIT"
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), elapsed $(elapsed) s of a $BUDGET s budget"
        echo "- GPU: $GPU_LINE"
        echo "- $VERSIONS | nvcc $NVCC"
        echo
        echo "| step | status | seconds | detail |"
        echo "|---|---|---:|---|"
        while IFS='|' read -r n s sec d; do echo "| $n | $s | $sec | $d |"; done <"$STEPS"
        echo
        cat "$DETAILS"
    } >"$OUT/summary.md"
}

# run_step NAME CAP LOG CMD...: runs CMD under timeout (signal $STEP_SIGNAL, default TERM), appends its output to $OUT/LOG, records the status.
run_step() {
    local name=$1 cap=$2 log=$3; shift 3
    local lim; lim=$(limit "$cap")
    if (( lim < 15 )); then
        echo "$name|skipped|0|out of time budget" >>"$STEPS"; write_summary; return 99
    fi
    echo "===== $name: $* (timeout ${lim}s)" >>"$OUT/$log"
    echo ">>> $name (timeout ${lim}s)"
    local s=$(date +%s)
    timeout -s "${STEP_SIGNAL:-TERM}" --kill-after=15 "$lim" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - s ))
    local status="ok"
    (( rc == 124 || rc == 137 )) && status="TIMEOUT" || { (( rc != 0 )) && status="FAILED (rc $rc)"; }
    echo "$name|$status|$dt|${STEP_DETAIL:-}" >>"$STEPS"
    STEP_DETAIL=""
    echo "<<< $name: $status in ${dt}s"
    write_summary
    return $rc
}

# Replace the detail column of the last recorded step (known only once the step has run).
set_detail() {
    [[ -n "$1" ]] || return 0
    local d; d=$(printf '%s' "$1" | tr '|\n' '  ' | sed 's/[&/\]/\\&/g')
    sed -i '$ s/|[^|]*$/|'"$d"'/' "$STEPS"
    write_summary
}

# pytest's closing line ("3 failed, 120 passed, 2 skipped in 9.1s") and its FAILED/ERROR lines.
pytest_digest() {  # $1 = log file of that run only
    local last; last=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$1" | tail -1 | sed 's/=//g')
    echo "${last:-no pytest summary line (crashed or cut short)}"
}
pytest_failures() {  # $1 = log file; at most 40 lines
    grep -E '^(FAILED|ERROR) ' "$1" | head -40
}

STEP_DETAIL=""
write_summary

# 1. Carried wheels (peer libraries such as liger-kernel): nothing can be fetched on that machine.
shopt -s nullglob
WHEELS=(wheels/*.whl .whl/*.whl)
shopt -u nullglob
if (( ${#WHEELS[@]} )); then
    # --target + PYTHONPATH (not the system site-packages): a carried wheel shadows, never replaces,
    # what the image ships, so nothing of the machine's own environment is rewritten.
    STEP_DETAIL="${#WHEELS[@]} wheel(s): $(basename -a "${WHEELS[@]}" | tr '\n' ' ')"
    run_step "install carried wheels" 60 build.log \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kdk_site "${WHEELS[@]}"
    export PYTHONPATH="/tmp/kdk_site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "install carried wheels|none|0|no wheels/ or .whl/ folder" >>"$STEPS"
fi

# 2. Build. torch is preinstalled there; --no-index/--no-deps so pip never reaches for a registry.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" KDKERNELS_FORCE_CUDA=1
run_step "build (pip install -e .)" 300 build.log \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
BUILD_RC=$?

# 3. What was built, and what this process sees.
STEP_DETAIL=""
run_step "python -m kdkernels info" 60 build.log "$PY" -m kdkernels info
INFO_RC=$?
{ echo "## kdkernels info"; echo; echo '```'; grep -A30 '===== python -m kdkernels info' "$OUT/build.log" | tail -n +2 | head -20; echo '```'; echo; } >>"$DETAILS"
if (( BUILD_RC != 0 || INFO_RC != 0 )); then
    { echo "## build failed"; echo; echo '```'; grep -iE 'error|fatal' "$OUT/build.log" | head -30; echo '```'; echo; } >>"$DETAILS"
fi

# 4. CUDA tests first (the point of this machine), then benchmarks, sanitizers, and the full suite last.
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
T_CUDA="$WORK/tests_cuda.log"
run_step "pytest tests -m needs_cuda" 150 tests.log bash -c '"$@" 2>&1 | tee "'"$T_CUDA"'"; exit ${PIPESTATUS[0]}' _ \
    "${PYTEST[@]}" tests -m needs_cuda
set_detail "$(pytest_digest "$T_CUDA")"
{ echo "## CUDA tests: $(pytest_digest "$T_CUDA")"; echo; pytest_failures "$T_CUDA" | sed 's/^/    /'; echo; } >>"$DETAILS"
write_summary

# 5. Benchmarks, before the sanitizers (the bars are what only this machine can measure): every
#    benchmarks/test_bench_*.py under pytest-benchmark, so a new op's suite is picked up by its name; each op's
#    JSON goes to $WORK, and benchmarks/report.py merges them into $OUT/bench.json and renders the table.
if [[ -n "${BENCHES:-}" ]]; then
    BENCH_FILES=(); for stem in $BENCHES; do BENCH_FILES+=("benchmarks/test_bench_${stem#bench_}.py"); done
else
    BENCH_FILES=(benchmarks/test_bench_*.py)
fi
SANITIZER_RESERVE=200   # seconds kept for the sanitizer runs after the benchmarks
n_left=${#BENCH_FILES[@]}
BENCH_JSONS=()
for b in "${BENCH_FILES[@]}"; do
    stem=$(basename "$b" .py)
    js="$WORK/$stem.json"
    # Each suite gets an even share of what is left before the sanitizers' reserve, within [30, 240] s (a suite cut
    # short keeps the rows it timed).
    share=$(( (BUDGET - $(elapsed) - 10 - SANITIZER_RESERVE) / n_left ))
    (( share < 30 )) && share=30
    (( share > 240 )) && share=240
    n_left=$(( n_left - 1 ))
    # shellcheck disable=SC2086  # BENCH_ARGS is a word list on purpose
    # SIGINT on timeout: pytest still finishes its session, so pytest-benchmark writes the rows it has.
    STEP_SIGNAL=INT run_step "$stem" "$share" bench.log "${PYTEST[@]}" "$b" --benchmark-only --benchmark-group-by=group \
        --benchmark-json="$js" --kdk-device cuda ${BENCH_ARGS:-}
    [[ -s "$js" ]] && BENCH_JSONS+=("$js")
    [[ -s "$js" ]] && set_detail "$("$PY" benchmarks/report.py "$js" | tail -1)"
done
if (( ${#BENCH_JSONS[@]} )); then
    { echo "## benchmarks"; echo; "$PY" benchmarks/report.py "${BENCH_JSONS[@]}" --merged "$OUT/bench.json"; echo; } >>"$DETAILS"
fi
write_summary

# 6. compute-sanitizer: the caching allocator is switched off so each tensor is its own allocation and an
# out-of-bounds access is caught at its tensor's edge, not somewhere inside a pooled block.
SAN="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)"
MEMCHECK_K="${MEMCHECK_K:-cuda and (awkward_shapes or neg_inf or out_of_range or all_masked or empty_batch or (matches_reference and float32))}"
RACECHECK_K="${RACECHECK_K:-cuda and matches_reference and float32 and (renorm or tail or dense)}"
# The other ops' kernels: float32 CUDA tests of each, memcheck and racecheck (first failure stops a run).
OTHER_TESTS="${SANITIZE_OTHER_TESTS:-tests/test_sinkhorn.py tests/test_token_relation.py tests/test_attention.py tests/test_shared_group.py tests/test_tile_mma.py}"
OTHER_K="${SANITIZE_OTHER_K:-cuda and (float32 or tensor_core or mma or ldmatrix)}"
if [[ -n "$SAN" ]]; then
    for run in "memcheck|${SANITIZE_TESTS:-tests/test_topk_kl.py}|$MEMCHECK_K" \
               "racecheck|${SANITIZE_TESTS:-tests/test_topk_kl.py}|$RACECHECK_K" \
               "memcheck|$OTHER_TESTS|$OTHER_K" "racecheck|$OTHER_TESTS|$OTHER_K"; do
        IFS='|' read -r tool files sel <<<"$run"
        slog="$WORK/san_${tool}_$RANDOM.log"
        # shellcheck disable=SC2086  # $files is a list of paths
        run_step "compute-sanitizer $tool ($files)" 70 sanitizer.log bash -c '"$@" 2>&1 | tee "'"$slog"'"; exit ${PIPESTATUS[0]}' _ \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 20 \
            "${PYTEST[@]}" $files -x -k "$sel"
        set_detail "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$slog" | tail -1 | sed 's/=//g'); $(pytest_digest "$slog")"
        san_errors=$(grep -cE '^========= (Invalid|Race|Error)' "$slog" 2>/dev/null)
        { echo "## compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$slog" | tail -1 | sed 's/=//g') ; $(pytest_digest "$slog")"
          echo; echo "selection: \`-k \"$sel\"\`, ${san_errors:-0} reported hazard line(s)"; echo
          grep -E '^========= (Invalid|Race|Error|    at )' "$slog" | head -20 | sed 's/^/    /'; echo; } >>"$DETAILS"
    done
else
    echo "compute-sanitizer|not found|0|not on PATH nor in /usr/local/cuda/bin" >>"$STEPS"
fi
write_summary

# 7. The whole suite (CPU tests too), if time is left: slower, and CI runs the CPU part anyway.
if [[ "${SKIP_FULL:-0}" != 1 ]]; then
    T_ALL="$WORK/tests_all.log"
    run_step "pytest tests (full)" 240 tests.log bash -c '"$@" 2>&1 | tee "'"$T_ALL"'"; exit ${PIPESTATUS[0]}' _ \
        "${PYTEST[@]}" tests --maxfail=20 && true
    [[ -s "$T_ALL" ]] && set_detail "$(pytest_digest "$T_ALL")"
    [[ -s "$T_ALL" ]] && { echo "## full test suite: $(pytest_digest "$T_ALL")"; echo; pytest_failures "$T_ALL" | sed 's/^/    /'; echo; } >>"$DETAILS"
fi

write_summary
echo "summary: $OUT/summary.md ($(elapsed) s)"
cat "$OUT/summary.md"
# Exit non-zero when any step failed, so a caller can tell at a glance.
! grep -qE '\|(FAILED|TIMEOUT)' "$STEPS"
