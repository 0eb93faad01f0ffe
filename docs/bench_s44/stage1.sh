#!/bin/bash
# section 44a: seresnet50, 43c's protocol (32 px, 4 epochs, 3 seeds, one LR x4 for every method):
# BP-SGD, DBP with the default blocks of 256, DBP dense
cd /work/s44
touch RUNNING
WT=/work/wt_s44
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model seresnet50 \
    --methods bp_sgd dbp_kron_dlr3e-3_bf16_b256 dbp_kron_dlr3e-3_bf16_dense \
    --fixed-lr-mults bp_sgd=4 dbp_kron_dlr3e-3_bf16_b256=4 dbp_kron_dlr3e-3_bf16_dense=4 \
    --seeds 0 1 2 --epochs 4 --runs-dir /work/s44/ttase50 --out /work/s44/tta_se50_32px_e4 > tta.log 2>&1
echo "rc $?" >> tta.log
rm -f RUNNING
