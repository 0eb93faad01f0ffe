#!/bin/bash
# 48b: the both-options DBP on seeds 1 and 2 (the default's and BP-SGD's seeds 1-2 not run here: time)
cd /work/wt_s48b
export PYTHONPATH=/work/wt_s48b
R=/work/s48/tta64
O=/work/s48/tta
for s in 1 2; do
  echo "=== s$s start $(date -u +%H:%M:%S)"
  python bench/time_to_accuracy.py --model resnet18 --methods dbp_kron_dlr3e-3_d2304_k1152 \
    --fixed-lr-mults dbp_kron_dlr3e-3_d2304_k1152=8 --seeds $s --epochs 4 --train-flags="--img-size 64" --runs-dir $R \
    --out $O/tta_r18_64px_dbp_kron_dlr3e-3_d2304_k1152_e4_s$s
  echo "=== s$s end $(date -u +%H:%M:%S) rc $?"
done
