#!/bin/bash
# section 43e follow-up: wide_resnet50_2, seed 0 only, default (blocks of 256) against dbp_kron_max_dim=1152
cd /work/s43
touch RUNNING4
PYTHONPATH=/work/wt_s43 python /work/wt_s43/bench/time_to_accuracy.py --model wide_resnet50_2 \
    --methods dbp_kron_dlr3e-3_bf16_b256 dbp_kron_dlr3e-3_bf16_k1152 \
    --fixed-lr-mults dbp_kron_dlr3e-3_bf16_b256=4 dbp_kron_dlr3e-3_bf16_k1152=4 \
    --seeds 0 --epochs 4 --runs-dir /work/s43/ttawide --out /work/main/docs/bench_s43/tta_wide_32px_e4_s0 > tta4.log 2>&1
echo "rc $?" >> tta4.log
rm -f RUNNING4
