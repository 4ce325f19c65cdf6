#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, the CUDA tests (those marked `cuda`), then
# `python -m benchmarks.gpu --device cuda`: the engine in process and a real server over HTTP, in float32,
# bfloat16 and bfloat16 with the compiled decode step, into docs/benchmarks-gpu.md and docs/bench-gpu.json
# (into $OUT instead when OUT is set, with this script's log and the server's). Under 8 minutes on an H200.
#
# On the device machine (an H200; python3 with torch there, no network), as ONE call of the device tool:
#   1. here, once:  bash scripts/gpu-wheels.sh    # .whl/: the wheels the GPU image lacks (fastapi, pydantic,
#                                                 # uvicorn, ...) and a copy of Tiny Shakespeare for the val loss
#   2. run:  command "bash scripts/gpu-check.sh", carry [".whl"], timeout_s 540
#      (.whl is about 8 MB of the 64 MiB that may travel; the tests get 2 minutes at most, the benchmark
#      345 s, and its --budget-s 310 skips what it could not finish in time, saying so in the table)
#   3. copy benchmarks-gpu.md and bench-gpu.json from the call's files_at into docs/ and commit them
#      (gpu-check.log and quill-bench-gpu-server.log come back beside them).
# Anywhere else with a GPU: make gpu-check, or PYTHON=.venv/bin/python bash scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu-check: $PY's torch sees no CUDA GPU (or $PY has no torch); run this on a machine with one" >&2
  exit 1
fi

RESULTS=docs
if [ -n "${OUT:-}" ]; then
  RESULTS=$OUT  # written there as it goes: a run cut short still returns what it measured
  exec > >(tee -a "$OUT/gpu-check.log") 2>&1
  trap 'cp -f "${TMPDIR:-/tmp}/quill-bench-gpu-server.log" "$OUT/" 2>/dev/null || true' EXIT
fi

# The packages the image lacks, carried as wheels (scripts/gpu-wheels.sh); pip cannot reach an index there.
if compgen -G '.whl/*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(), "torch", torch.__version__)'

status=0
mapfile -t cuda_tests < <(grep -rlE 'pytest\.mark\.cuda\b' tests --include='*.py' | sort)
if [ "${#cuda_tests[@]}" -gt 0 ]; then
  timeout 120 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider "${cuda_tests[@]}" || status=$?
else
  echo "gpu-check: no test carries the cuda marker"
fi

corpus=()
[ -f .whl/tinyshakespeare.txt ] && corpus=(--corpus .whl/tinyshakespeare.txt)
timeout 345 "$PY" -m benchmarks.gpu --device cuda --budget-s 310 --out-dir "$RESULTS" "${corpus[@]}" || status=$?
echo "gpu-check: results in $RESULTS/benchmarks-gpu.md; exit $status (non-zero: a test or the benchmark failed)"
exit "$status"
