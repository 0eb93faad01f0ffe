#!/bin/bash
set -x
WT=/work/wt_s41
OUT=/work/main/docs/bench_step_cost_s41
cd $WT
for r in 1 2 3; do
  PYTHONPATH=$WT python bench/step_cost.py --configs convnext_tiny:64:32 --repeats 7 --out $OUT/convnext_tiny_64_b32_def_r$r
  PYTHONPATH=$WT python bench/step_cost.py --configs convnext_tiny:64:32 --repeats 7 --dbp dbp_block_size=256 --out $OUT/convnext_tiny_64_b32_blk256_r$r
done
