#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine that has torch but may lack MLflow, Optuna and
# Dask and reaches no package registry. Each step has its own time cap and log; a summary comes last.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        # logs to OUTDIR (default: $OUT, else ./gpu-check)
#
# Where MLflow, Optuna or Dask are missing, their wheels are installed from .gpu/wheels without a
# registry. Make that folder on a machine with one, for the GPU machine's Python (3.12 here):
#   pip download mlflow optuna 'dask[distributed]' --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .gpu/wheels
# (leaving out the wheels of packages the GPU machine already has keeps it small enough to carry).
# The steps: the msa and GPU tests; bf16 against fp32 per epoch; `ablations --quick` on the GPU through
# MLflow; the full default suite with 8 runs sharing the GPU; the pipeline tests (pytest-xdist's -n).
# About 9 minutes in all on an H200, inside a 15-minute device budget.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MSA_PROGRESS=0
summary=()

step() {  # step NAME CAP_SECONDS COMMAND...: run it with a time cap, its output in $out/NAME.log
    local name=$1 cap=$2; shift 2
    local t0=$SECONDS
    timeout -k 5 "$cap" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$(printf '%-15s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$out/$name.log")")")
}

{
    nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    nproc; grep -m1 "model name" /proc/cpuinfo
} >"$out/env.log" 2>&1

if ! python3 -c "import mlflow, optuna, distributed" 2>/dev/null && [ -d .gpu/wheels ]; then
    # A resolved install first; where the machine's own packages break a pin (pyarrow, say), the
    # wheels as they are, without resolving.
    step install 90 bash -c "python3 -m pip install -q --no-index --find-links .gpu/wheels mlflow optuna \
        'dask[distributed]' || python3 -m pip install -q --no-index --no-deps .gpu/wheels/*.whl"
fi

step msa_tests 100 python3 -m pytest -q tests/msa tests/test_architecture.py
step precision 60 python3 benchmarks/precision.py --device cuda --epochs 3 --rounds 1 \
    --only baseline transformer text_only improved
step quick 70 bash -c 'cd "$(mktemp -d)" && python3 -m pipelines.run ablations --quick --device cuda'
step suite 240 python3 benchmarks/gpu_suite.py --slots 8   # 195 s on an H200 (2026-11-30)
step pipeline_tests 200 python3 -m pytest -q -m "not cluster" tests/pipelines -n 8 --timeout 90

printf '%s\n' "${summary[@]}" | tee "$out/summary.log"
