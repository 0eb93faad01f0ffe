#!/bin/bash
# Stage 1 of section 39: BP-SGD 12-epoch and DBP 6-epoch at 64 px, interleaved by seed
cd /work/wt_s39
export PYTHONPATH=/work/wt_s39
for s in 0 1 2; do
  python bench/time_to_accuracy.py --model resnet18 --methods bp_sgd --lr-mults 4 --seeds $s --epochs 12 \
     --train-flags="--img-size 64" --runs-dir /work/s39/tta64 --out /work/s39/st1_bp12_s$s
  python bench/time_to_accuracy.py --model resnet18 --methods dbp_kron_dlr3e-3_bf16 --lr-mults 8 --seeds $s --epochs 6 \
     --train-flags="--img-size 64" --runs-dir /work/s39/tta64 --out /work/s39/st1_dbp6_s$s
done
echo STAGE1 DONE
