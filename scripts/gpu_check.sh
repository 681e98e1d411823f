#!/usr/bin/env bash
# Everything afterburner checks on a lent GPU machine, in one call (the machine has torch, Triton and nvcc
# but no vLLM, SGLang or network, and is lent minutes at a time): the Triton kernels against the torch
# specs at realistic sizes (pytest tests/gpu, last) and three benchmarks, each under its own time limit so
# that one hang does not cost the others. Outputs (logs and results JSON) go to $OUT (default /tmp/gpu_check).
#
#   AFTERBURNER_GIT_COMMIT=$(git rev-parse HEAD) [STEPS="pytest lla"] bash scripts/gpu_check.sh
#
# STEPS: which of sparse, lla, verify, pytest to run (default all, in that order); PYTEST_ARGS: extra pytest
# arguments (e.g. -k one_pass).
# The repository is not installed there: `afterburner` is a namespace package whose folders are the
# repository's top-level ones (pyproject.toml), so a folder of links to them on PYTHONPATH imports it.
# The tree may travel without .git: AFTERBURNER_GIT_COMMIT names the commit the results JSON record.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
NS=$(mktemp -d)
mkdir "$NS/afterburner"
for folder in plugins attention_backends spec_decode samplers patches; do
    ln -s "$PWD/$folder" "$NS/afterburner/$folder"
done
export PYTHONPATH="$NS:$PWD/tests" PYTHONUNBUFFERED=1
PY=${PY:-python3}

STEPS=${STEPS:-pytest sparse lla verify}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "== $name: exit $rc"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${AFTERBURNER_GIT_COMMIT:-unknown}"; } > "$OUT/machine.log" 2>&1
cat "$OUT/machine.log"
step sparse 120 "$PY" benchmarks/sparse_attention_gpu.py --quick --out "$OUT/sparse_attention_gpu.json"
step lla 100 "$PY" benchmarks/local_linear_gpu.py --out "$OUT/local_linear_gpu.json"
step verify 120 "$PY" benchmarks/verify_cost_gpu.py --out "$OUT/verify_cost_gpu.json"
# no engines there: tests/conftest.py (which imports the engines' config) is skipped; PYTEST_ARGS narrows
step pytest 170 "$PY" -m pytest -q -p no:cacheprovider --noconftest tests/gpu ${PYTEST_ARGS:-}
ls -l "$OUT"
