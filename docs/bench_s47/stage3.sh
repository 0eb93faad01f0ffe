#!/bin/bash
# section 47e: the headline 64 px protocol of section 34a on this AVX2 CPU, seed 0 only, at 34a's chosen LRs:
# BP-SGD's 6-epoch schedule (x4 = 0.2) and DBP's complete 4-epoch schedule (x8 = 0.4; the library defaults, which
# multiply in float32 here: dbp_kron_dlr3e-3), one call each on one runs directory
WT=/work/wt_s47new
cd /work/s47
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model resnet18 --methods bp_sgd --fixed-lr-mults bp_sgd=4 \
    --seeds 0 --epochs 6 --train-flags="--img-size 64" --runs-dir /work/s47/tta64 \
    --out /work/main/docs/bench_s47/tta_r18_64px_bp_sgd_e6_s0 >> stage3.log 2>&1
echo "rc $?" >> stage3.log
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model resnet18 --methods dbp_kron_dlr3e-3 \
    --fixed-lr-mults dbp_kron_dlr3e-3=8 --seeds 0 --epochs 4 --train-flags="--img-size 64" --runs-dir /work/s47/tta64 \
    --out /work/main/docs/bench_s47/tta_r18_64px_dbp_e4_s0 >> stage3.log 2>&1
echo "rc $?" >> stage3.log
