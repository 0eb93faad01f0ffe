#!/bin/bash
# resnet50, Fashion-MNIST 10k, 32 px (train.py's default for the bench), 4 epochs, LR x4 for all, 3 seeds, interleaved
set -x
while [ ! -f /work/s41/go ]; do sleep 5; done
WT=/work/wt_s41b
cd $WT
PYTHONPATH=$WT python bench/time_to_accuracy.py --model resnet50 \
  --methods bp_sgd dbp_kron_dlr3e-3_bf16 dbp_kron_dlr3e-3_bf16_b256 \
  --fixed-lr-mults bp_sgd=4 dbp_kron_dlr3e-3_bf16=4 dbp_kron_dlr3e-3_bf16_b256=4 \
  --seeds 0 1 2 --epochs 4 --runs-dir /work/s41/tta50 --out /work/s41/tta_r50_32px_e4
