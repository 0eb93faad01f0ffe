#!/bin/bash
# section 46b: seresnet50 time to accuracy with an equal LR sweep (x0.5 .. x8 on seed 0, widened once beyond an edge
# where a best lies), BP-SGD against DBP (library defaults for this twin: blocks of 256, pinned), best on seeds 1 and 2
WT=/work/wt_s46
cd /work/s46
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model seresnet50 \
    --methods bp_sgd dbp_kron_dlr3e-3_bf16_b256 --lr-mults 0.5 1 2 4 8 --extend-edges 1 --seeds 0 1 2 --epochs 4 \
    --runs-dir /work/s46/ttase50 --out /work/main/docs/bench_s46/tta_se50_32px_e4_sweep >> stage2.log 2>&1
echo "rc $?" >> stage2.log
