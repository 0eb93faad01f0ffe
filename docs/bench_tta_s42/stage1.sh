#!/bin/bash
# section 42a: convnext_tiny, Fashion-MNIST 10k / 10k test, 32 px, 4 epochs, 3 seeds, one LR (x1) per method
# /work/wt_s42: a git worktree of 56a9a05 (bench/time_to_accuracy.py with the dbp_adamw_b256 method)
cd /work/s42
touch RUNNING
PYTHONPATH=/work/wt_s42 python /work/wt_s42/bench/time_to_accuracy.py --model convnext_tiny \
    --methods bp_sgd bp_adamw dbp_adamw dbp_adamw_b256 --lr-mults 1 --seeds 0 1 2 --epochs 4 \
    --runs-dir /work/s42/ttacnx --out /work/s42/tta_cnx_32px_e4 > stage1.log 2>&1
echo "rc $?" >> stage1.log
rm -f RUNNING
