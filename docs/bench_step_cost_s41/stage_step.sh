#!/bin/bash
# A B C alternation of step_cost runs: default, dbp_block_size=256, dbp_block_size=128
set -x
WT=/work/wt_s41
OUT=/work/main/docs/bench_step_cost_s41
mkdir -p $OUT
cd $WT
for r in 1 2 3; do
  for model in resnet50 resnet18; do
    PYTHONPATH=$WT python bench/step_cost.py --configs $model:64:64 --repeats 11 --out $OUT/${model}_64_b64_def_r$r
    PYTHONPATH=$WT python bench/step_cost.py --configs $model:64:64 --repeats 11 --dbp dbp_block_size=256 --out $OUT/${model}_64_b64_blk256_r$r
    PYTHONPATH=$WT python bench/step_cost.py --configs $model:64:64 --repeats 11 --dbp dbp_block_size=128 --out $OUT/${model}_64_b64_blk128_r$r
  done
done
