#!/bin/bash
set -x
WT=/work/wt_s41b
cd $WT
for spec in "dbp_kron_dlr3e-3_bf16_b256 0" "dbp_kron_dlr3e-3_bf16 0" "dbp_kron_dlr3e-3_bf16_b256 1" "dbp_kron_dlr3e-3_bf16_b256 2"; do
  set -- $spec
  PYTHONPATH=$WT python bench/time_to_accuracy.py --model resnet18 --methods $1 --fixed-lr-mults $1=8 --seeds $2 \
    --epochs 4 --train-flags="--img-size 64" --runs-dir /work/s41/tta18 --out /work/s41/tta18_$1_s$2
done
