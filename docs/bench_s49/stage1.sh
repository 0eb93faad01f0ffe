#!/bin/bash
# 49a: seeds 1-2 of BP-SGD, every-layer DBP and both options at 64 px (48b's protocol), one runs directory
cd /work/wt_s49
export PYTHONPATH=/work/wt_s49
R=/work/s48/tta64
O=/work/s49/tta
run() {  # method mult epochs seed
  while [ -e /work/s49/pause ]; do sleep 10; done
  if [ -e /work/s49/stop ]; then echo "=== stopped before $1 s$4"; exit 0; fi
  echo "=== $1 x$2 e$3 s$4 start $(date -u +%H:%M:%S)"
  python bench/time_to_accuracy.py --model resnet18 --methods $1 --fixed-lr-mults $1=$2 --seeds $4 --epochs $3 \
    --train-flags="--img-size 64" --runs-dir $R --out $O/tta_r18_64px_${1}_e$3_s$4
  echo "=== $1 x$2 e$3 s$4 end $(date -u +%H:%M:%S) rc $?"
}
run bp_sgd 4 6 1
run dbp_kron_dlr3e-3 8 4 1
run dbp_kron_dlr3e-3_d2304_k1152 8 4 2
run bp_sgd 4 6 2
run dbp_kron_dlr3e-3 8 4 2
run dbp_kron_dlr3e-3_d2304_k1152 8 4 1
