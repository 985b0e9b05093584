#!/usr/bin/env bash
# Set up (see scripts/setup.sh), then lint and run the whole test suite on the CPU; with no
# arguments, run the CPU-dependent tests (speed flags: bf16, channels-last, compile) a second time
# as on a CPU without AVX-512 (oneDNN and ATen capped at AVX2), where oneDNN's kernels differ.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${SELFKD_VENV:-.venv}"
"$VENV/bin/ruff" check src tests bench scripts
"$VENV/bin/python" -m pytest "$@"
if [ "$#" -eq 0 ] && [ "${SELFKD_AVX2_PASS:-1}" != 0 ]; then
  echo "test.sh: CPU-flag tests again under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
  # the tests that start their own AVX2 subprocesses already ran both settings above
  ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 "$VENV/bin/python" -m pytest \
    tests/test_gpu_paths_on_cpu.py tests/test_bench_smoke.py \
    -k "not guard_covers and not does_not_crash_on_avx2 and not share_no_kernels"
fi
