#!/bin/bash
# section 43: the wide twins, dense R against the default blocks of 256
# a) DBP state (meta device); b) step cost at section 14's config (64 px, batch 32), dense / default alternated;
# c) time to accuracy on resnext50_32x4d (32 px, 4 epochs, 3 seeds, one LR x4 for every method, as 41c)
# /work/wt_s43: a git worktree of 2b81b44
WT=/work/wt_s43
OUT=/work/main/docs/bench_s43
mkdir -p $OUT
cd /work/s43
touch RUNNING
set -x
PYTHONPATH=$WT python $WT/bench/memory.py --models resnet50 resnet50d resnet101 resnet101d resnet152 resnet152d \
    resnext50_32x4d wide_resnet50_2 seresnet50 convnext_tiny convnext_small convnext_base --block-sizes 256 128 \
    --state-only --out $OUT/state > state.log 2>&1
for model in resnet50d resnext50_32x4d wide_resnet50_2 seresnet50 resnet101 convnext_small; do
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs $model:64:32 --repeats 7 --dbp dbp_block_size=0 \
      --out $OUT/step_${model}_64_b32_dense_r1 >> step.log 2>&1
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs $model:64:32 --repeats 7 \
      --out $OUT/step_${model}_64_b32_default_r1 >> step.log 2>&1
done
PYTHONPATH=$WT python $WT/bench/time_to_accuracy.py --model resnext50_32x4d \
    --methods bp_sgd dbp_kron_dlr3e-3_bf16_b256 dbp_kron_dlr3e-3_bf16_dense \
    --fixed-lr-mults bp_sgd=4 dbp_kron_dlr3e-3_bf16_b256=4 dbp_kron_dlr3e-3_bf16_dense=4 \
    --seeds 0 1 2 --epochs 4 --runs-dir /work/s43/ttax50 --out $OUT/tta_x50_32px_e4 > tta.log 2>&1
echo "rc $?" >> tta.log
rm -f RUNNING
