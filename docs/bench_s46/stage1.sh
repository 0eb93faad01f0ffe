#!/bin/bash
# section 46a: 45f's resnet50 sweep had DBP's best at its upper edge (x8): the same sweep extended to x16 for both
# methods (finished runs of 45f are read, not re-run), the best on seeds 1 and 2
WT=/work/wt_s45new
cd /work/s46
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model resnet50 \
    --methods bp_sgd dbp_kron_dlr3e-3_bf16_b256 --lr-mults 0.5 1 2 4 8 16 --seeds 0 1 2 --epochs 4 \
    --runs-dir /work/s45/tta50 --out /work/main/docs/bench_s46/tta_r50_32px_e4_x16 >> stage1.log 2>&1
echo "rc $?" >> stage1.log
