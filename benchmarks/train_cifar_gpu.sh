#!/usr/bin/env bash
# CIFAR-10 on GPU: vlonghorn_tiny and deit_tiny_patch16_224 trained with the same recipe (configs/cifar10.yaml:
# 32 px, patch 4, same epochs), a synthetic throughput probe of each, a 2-process `accelerate launch` run when two
# GPUs are present, and the report (cifar10_<device>_<date>.{md,csv,json,png}, the runs' logs and env.txt next to
# it) in $RESULTS.
#
#   EPOCHS=30 RESULTS=benchmarks/results bash benchmarks/train_cifar_gpu.sh
#
# Expects data/cifar10-jpeg.tar.gz (or data/cifar10/{train,test}) in the repo. On a machine without internet,
# albumentations and its pure-Python/binary needs can come as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-30}
RESULTS=${RESULTS:-benchmarks/results}
RUNS=${RUNS:-output/cifar_bench}
DDP_EPOCHS=${DDP_EPOCHS:-2}
DATA=${DATA:-data/cifar10}
EXTRA=${EXTRA:-}   # more train.py arguments for every run (e.g. for a CPU dry run: --cpu --model-kwargs depth=2)
mkdir -p "$RESULTS" "$RUNS"
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ -d .whl ] && ! python3 -c "import albumentations" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -m pip show -q vlonghorn 2>/dev/null; then
  # run from the checkout without installing: what `pip install -e .` maps (kernels/ -> vlonghorn.kernels)
  [ -e vlonghorn/kernels ] || ln -s ../kernels vlonghorn/kernels
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -d "$DATA/train" ]; then
  mkdir -p "$DATA" && tar -xzf data/cifar10-jpeg.tar.gz -C "$DATA" || exit 1
fi

NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
NCPU=$(python3 -c "import os; print(len(os.sched_getaffinity(0)))")
STEM=$(python3 benchmarks/harness.py cifar10 --out "$RESULTS" --gpus "$NGPU") || exit 1
{ nvidia-smi -L; echo "cpus $NCPU"; python3 -c "
import torch, timm, accelerate, albumentations
print('torch', torch.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__,
      'albumentations', albumentations.__version__)
import vlonghorn.kernels; print('vlonghorn Triton kernels import')"; } 2>&1 | tee "${STEM}_env.txt"

run() {  # run NAME GPU_LIST NPROC -- train.py args...
  local name=$1 gpus=$2 nproc=$3; shift 3
  local start end launcher=(python3)
  [ "$nproc" -gt 1 ] && launcher=(accelerate launch --multi_gpu --num_processes "$nproc" --num_machines 1
                                  --mixed_precision bf16 --dynamo_backend no)
  start=$(date +%s.%N)
  CUDA_VISIBLE_DEVICES=$gpus "${launcher[@]}" train.py --config configs/cifar10.yaml --data-dir "$DATA" \
    --output "$RUNS" --experiment "$name" --no-progress "$@" $EXTRA > "${STEM}_$name.log" 2>&1
  local rc=$?
  end=$(date +%s.%N)
  python3 -c "import json,sys; json.dump({'wall_clock_s': $end - $start, 'processes': $nproc, 'rc': $rc,
              'gpus': '$gpus'}, open('$RUNS/$name/wall_clock.json', 'w'))" 2>/dev/null
  echo "$name: rc=$rc, $(python3 -c "print(round($end - $start))") s"
}

if [ "$NGPU" -ge 2 ]; then
  W=$(( NCPU / 2 > 3 ? NCPU / 2 - 2 : 1 ))
  run cifar10-vlonghorn_tiny 0 1 --model vlonghorn_tiny --epochs "$EPOCHS" --workers "$W" &
  run cifar10-deit_tiny 1 1 --model deit_tiny_patch16_224 --epochs "$EPOCHS" --workers "$W" &
  wait
else
  W=$(( NCPU > 3 ? NCPU - 2 : 1 ))
  run cifar10-vlonghorn_tiny 0 1 --model vlonghorn_tiny --epochs "$EPOCHS" --workers "$W"
  run cifar10-deit_tiny 0 1 --model deit_tiny_patch16_224 --epochs "$EPOCHS" --workers "$W"
fi

for m in vlonghorn_tiny deit_tiny_patch16_224; do
  [ "$NGPU" -ge 1 ] && CUDA_VISIBLE_DEVICES=0 python3 benchmarks/cifar_report.py throughput --model $m --steps 30 --warmup 5 \
    --out "$RUNS/throughput_$m.json" 2>&1 | tail -1
done

RUN_DIRS=("$RUNS/cifar10-vlonghorn_tiny" "$RUNS/cifar10-deit_tiny")
if [ "$NGPU" -ge 2 ]; then
  run cifar10-ddp2-vlonghorn_tiny 0,1 2 --model vlonghorn_tiny --epochs "$DDP_EPOCHS" --workers $(( NCPU / 2 - 2 ))
  grep -E "processes|epoch [0-9]+:" "${STEM}_cifar10-ddp2-vlonghorn_tiny.log" | cut -c 25-
  RUN_DIRS+=("$RUNS/cifar10-ddp2-vlonghorn_tiny")
else
  echo "one GPU only: the 2-process accelerate launch run needs nvidia-h200-x2 (skipped)"
fi
python3 benchmarks/cifar_report.py report "${RUN_DIRS[@]}" --throughput "$RUNS"/throughput_*.json \
  --out-dir "$RESULTS"
