#!/bin/bash
# 50a: BP-SGD (6 epochs, x4) against the DBP default (4 epochs, x8), epoch by epoch in step, one call per seed
cd /work/wt_s50
while ! grep -q '^rc ' /work/s50/ci_c0322ed.log 2>/dev/null; do sleep 20; done
D=dbp_kron_dlr3e-3_d2304_k1152
for S in 0 1 2; do
  while [ -e /work/s50/pause ]; do sleep 20; done
  [ -e /work/s50/stop ] && exit 0
  echo "seed $S start $(date -u +%H:%M:%S)"
  PYTHONPATH=/work/wt_s50 python bench/time_to_accuracy.py --model resnet18 --methods bp_sgd $D \
    --fixed-lr-mults bp_sgd=4 $D=8 --epochs 6 --method-epochs $D=4 --interleave-epochs --seeds $S \
    --train-flags="--img-size 64" --runs-dir /work/s50/tta64il --out /work/s50/tta/il_s$S
  echo "seed $S end $(date -u +%H:%M:%S) rc $?"
done
