#!/bin/bash
# 48b continued (stage2.sh's queue after its first run, with a pause between runs: touch /work/s48/pause)
cd /work/wt_s48b
export PYTHONPATH=/work/wt_s48b
R=/work/s48/tta64
O=/work/s48/tta
while kill -0 22340 2>/dev/null; do sleep 5; done   # stage2.sh's first run
run() {  # method mult epochs seed
  while [ -e /work/s48/pause ]; do sleep 10; done
  echo "=== $1 x$2 e$3 s$4 start $(date -u +%H:%M:%S)"
  python bench/time_to_accuracy.py --model resnet18 --methods $1 --fixed-lr-mults $1=$2 --seeds $4 --epochs $3 \
    --train-flags="--img-size 64" --runs-dir $R --out $O/tta_r18_64px_${1}_e$3_s$4
  echo "=== $1 x$2 e$3 s$4 end $(date -u +%H:%M:%S) rc $?"
}
run bp_sgd 4 6 0
run dbp_kron_dlr3e-3 8 4 0
run dbp_kron_dlr3e-3_d2304_k1152 8 4 1
run dbp_kron_dlr3e-3 8 4 1
run dbp_kron_dlr3e-3_d2304_k1152 8 4 2
run dbp_kron_dlr3e-3 8 4 2
