#!/bin/bash
cd /work/wt_s50
D=dbp_kron_dlr3e-3_d2304_k1152
S=2
echo "seed $S start $(date -u +%H:%M:%S)"
PYTHONPATH=/work/wt_s50 python bench/time_to_accuracy.py --model resnet18 --methods bp_sgd $D \
  --fixed-lr-mults bp_sgd=4 $D=8 --epochs 6 --method-epochs $D=4 --interleave-epochs --seeds $S \
  --train-flags="--img-size 64" --runs-dir /work/s50/tta64il --out /work/s50/tta/il_s$S
echo "seed $S end $(date -u +%H:%M:%S) rc $?"
