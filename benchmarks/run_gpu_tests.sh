#!/usr/bin/env bash
# The test suite on a GPU: the quick tier (`pytest -m gpu_fast`), then the rest (`-m "not gpu_fast"`), each timed.
# Writes gpu_tests_<device>_<date>_{gpu-fast,rest}.log and a summary gpu_tests_<device>_<date>.md into $OUT when set,
# else benchmarks/results. More arguments go to both pytest runs. With pytest-xdist installed the runs use workers
# (8 for the quick tier: on a fresh machine most of its time is Triton compiling the kernels' variants, CPU-bound,
# which the workers share out; for the rest, two fewer than the cores with one thread each: its CPU-tensor model
# tests dominate, and workers that each take torch's default thread count oversubscribe the cores). One H200 node
# with 16 cores, 2026-12-04: quick tier 97 s cold, the rest 299 s.
#
#   OUT=/tmp/logs bash benchmarks/run_gpu_tests.sh [-x]
set -uo pipefail
cd "$(dirname "$0")/.."
STEM=$(python3 benchmarks/harness.py gpu_tests --out "${OUT:-benchmarks/results}") || exit 1
mkdir -p "$(dirname "$STEM")"
{ echo "# GPU test runs: $(date -Iseconds)"; echo
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sed 's/^/- GPU: /'
  python3 -c "import torch, triton, timm
print(f'- torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}')"
  echo; } > "$STEM.md"
status=0
xdist=0; python3 -c "import xdist" 2>/dev/null && xdist=1
cores=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
for tier in gpu-fast rest; do
  marks=(-m "not gpu_fast"); [ "$tier" = gpu-fast ] && marks=(-m gpu_fast)
  workers=(); threads=${OMP_NUM_THREADS:-}
  if [ $xdist = 1 ]; then
    if [ "$tier" = gpu-fast ]; then workers=(-n 8); threads=2
    else workers=(-n $(( cores > 3 ? cores - 2 : 1 ))); threads=1; fi
  fi
  start=$(date +%s)
  OMP_NUM_THREADS=${threads:-$cores} python3 -m pytest "${marks[@]}" "${workers[@]}" -q -rfEs --durations=15 "$@" \
    > "${STEM}_$tier.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "- \`pytest ${marks[*]} $*\`: rc $rc, $(( $(date +%s) - start )) s:" \
       "$(tail -n 1 "${STEM}_$tier.log")" >> "$STEM.md"
done
cat "$STEM.md"
exit $status
