#!/usr/bin/env bash
# The GPU check, made to fit a borrowed GPU's time (about 15 minutes in all, its start and every try included):
#   bash scripts/gpu-check.sh            # default: about 3 minutes on an H100/H200 (expected), 5 at most
#   bash scripts/gpu-check.sh --full     # + the compiled rows, a compiled server and a 6L/384 GPT: about 10
#   bash scripts/gpu-check.sh --dry-run  # any machine, a CPU included: the same steps, each with its expected
#                                        # time on a GPU, the CUDA tests listed (not run), the benchmark's rows
#                                        # run with tiny models on the CPU into a temporary folder (seconds here)
# Steps, most telling first (`python -m benchmarks.gpu --plan` prints them with their expected times, which are
# estimates: no run on a GPU yet): 1. setup: the wheels, then torch's and CUDA's versions, the GPU, its compute
# capability and the dtype QUILL_DTYPE=auto picks there; 2. the CUDA tests (those marked `cuda`), 120 s at most;
# 3. `python -m benchmarks.gpu`: the engine at batch 1 and 32 in bfloat16 and float32 on the bundled GPT and a
# GPT of GPT-2 small's shape, one eager server over HTTP with 1 and 32 streams, the val loss in both precisions,
# within a budget of 130 s (--full: 420), past which rows are skipped, saying so. Results: docs/benchmarks-gpu.md
# and docs/bench-gpu.json (into $OUT instead when OUT is set, with this script's log and the server's).
#
# On the device machine (an H100 or H200; python3 with torch there, maybe not torch 2.13, no network), as ONE
# call of the device tool:
#   1. here, once:  bash scripts/gpu-wheels.sh    # .whl/: the wheels the GPU image lacks (fastapi, pydantic,
#                                                 # uvicorn, ...) and a copy of Tiny Shakespeare for the val loss
#   2. run:  command "bash scripts/gpu-check.sh", carry [".whl"], timeout_s 330
#      (.whl is about 10 MB of the 64 MiB that may travel). That leaves time for a second try. --full wants
#      timeout_s 600 and a fresh machine's whole 15 minutes: only as the session's one call.
#   3. copy benchmarks-gpu.md and bench-gpu.json from the call's files_at into docs/ and commit them
#      (gpu-check.log and quill-bench-gpu-server.log come back beside them).
# Anywhere else with a GPU: make gpu-check, or PYTHON=.venv/bin/python bash scripts/gpu-check.sh [--full].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

full=() dry=0 budget_s=130 tests_limit_s=120
for arg in "$@"; do
  case $arg in
    --full) full=(--full) budget_s=420 ;;
    --dry-run) dry=1 ;;
    *) echo "gpu-check: unknown option $arg (--full, --dry-run)" >&2; exit 2 ;;
  esac
done
device=cuda
if [ "$dry" = 1 ]; then
  device=cpu
elif ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu-check: $PY's torch sees no CUDA GPU (or $PY has no torch); run this on a machine with one (--dry-run: its steps here)" >&2
  exit 1
fi

RESULTS=docs
[ "$dry" = 1 ] && RESULTS=$(mktemp -d)  # a dry run's tables are no results: never into docs/
if [ -n "${OUT:-}" ]; then
  RESULTS=$OUT  # written there as it goes: a run cut short still returns what it measured
  exec > >(tee -a "$OUT/gpu-check.log") 2>&1
  trap 'cp -f "${TMPDIR:-/tmp}/quill-bench-gpu-server.log" "$OUT/" 2>/dev/null || true' EXIT
fi
start=$SECONDS
step() { echo "gpu-check: [$((SECONDS - start)) s] $*"; }

step "1. setup"
# The packages the image lacks, carried as wheels (scripts/gpu-wheels.sh); pip cannot reach an index there.
if compgen -G '.whl/*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
"$PY" -m benchmarks.gpu --plan --device "$device" --budget-s "$budget_s" "${full[@]}" || status=$?
[ "$dry" = 1 ] && echo "gpu-check: --dry-run: the steps on this machine's CPU; the times above are a GPU's"

# this file's tests last: they hold the longest, the compiled decode step's
mapfile -t cuda_tests < <(grep -rlE 'pytest\.mark\.cuda\b' tests --include='*.py' | sort | grep -vx tests/test_gpu_check.py
  grep -lE 'pytest\.mark\.cuda\b' tests/test_gpu_check.py)
step "2. CUDA tests in ${#cuda_tests[@]} files (at most $tests_limit_s s)"
if [ "$dry" = 1 ]; then
  "$PY" -m pytest -q --collect-only -m cuda -p no:cacheprovider "${cuda_tests[@]}" | grep '::' || status=$?
elif [ "${#cuda_tests[@]}" -gt 0 ]; then
  # -v: a test is named as it ends, so a run stopped by the limit still says which passed
  timeout "$tests_limit_s" "$PY" -m pytest -v -rs --durations=5 -m cuda -p no:cacheprovider "${cuda_tests[@]}" || status=$?
else
  echo "gpu-check: no test carries the cuda marker"
fi

step "3. benchmark (budget $budget_s s)"
corpus=()
[ -f .whl/tinyshakespeare.txt ] && corpus=(--corpus .whl/tinyshakespeare.txt)
quick=()
[ "$dry" = 1 ] && quick=(--quick)
timeout $((budget_s + 30)) "$PY" -m benchmarks.gpu --device "$device" --budget-s "$budget_s" "${full[@]}" "${quick[@]}" \
  --out-dir "$RESULTS" "${corpus[@]}" || status=$?
step "done: results in $RESULTS/benchmarks-gpu.md; exit $status (non-zero: a test or the benchmark failed)"
exit "$status"
