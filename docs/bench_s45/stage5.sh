#!/bin/bash
# section 45f: resnet50 time to accuracy with an equal LR sweep (x0.5 x1 x2 x4 x8 on seed 0, the best on seeds 1 and 2):
# BP-SGD against DBP (library defaults: blocks of 256 on resnet50, pinned)
WT=/work/wt_s45new
cd /work/s45
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model resnet50 \
    --methods bp_sgd dbp_kron_dlr3e-3_bf16_b256 --lr-mults 0.5 1 2 4 8 --seeds 0 1 2 --epochs 4 \
    --runs-dir /work/s45/tta50 --out /work/main/docs/bench_s45/tta_r50_32px_e4_sweep >> stage5.log 2>&1
echo "rc $?" >> stage5.log
