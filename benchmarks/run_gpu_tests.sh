#!/usr/bin/env bash
# The test suite on a GPU: the quick tier (`pytest -m gpu_fast`), then everything, each timed. Writes
# gpu_tests_<device>_<date>_{gpu-fast,full}.log and a summary gpu_tests_<device>_<date>.md into $OUT when set,
# else benchmarks/results. More arguments go to both pytest runs. With pytest-xdist installed the runs use 8 workers:
# on a fresh machine most of the quick tier's time is Triton compiling the kernels' variants (CPU-bound, ptxas), which
# the workers share out.
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
workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
for tier in gpu-fast full; do
  marks=(); [ "$tier" = gpu-fast ] && marks=(-m gpu_fast)
  start=$(date +%s)
  python3 -m pytest "${marks[@]}" "${workers[@]}" -q -rfEs --durations=15 "$@" > "${STEM}_$tier.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "- \`pytest ${marks[*]} $*\`: rc $rc, $(( $(date +%s) - start )) s:" \
       "$(tail -n 1 "${STEM}_$tier.log")" >> "$STEM.md"
done
cat "$STEM.md"
exit $status
