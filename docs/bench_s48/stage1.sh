#!/bin/bash
# 48a: resnet18 64 px b64 step, default against layer4's 512-wide 3x3 convs plain (dbp_max_dim=2304), alternated
cd /work/wt_s48
export PYTHONPATH=/work/wt_s48
OUT=/work/s48/step
mkdir -p $OUT
for r in 1 2 3; do
  python bench/step_cost.py --configs resnet18:64:64 --repeats 9 --out $OUT/r18_64_b64_def_r$r
  python bench/step_cost.py --configs resnet18:64:64 --repeats 9 --dbp dbp_max_dim=2304 --out $OUT/r18_64_b64_d2304_r$r
  python bench/step_cost.py --configs resnet18:64:64 --repeats 9 --dbp dbp_max_dim=2304 dbp_kron_max_dim=1152 --out $OUT/r18_64_b64_d2304k1152_r$r
done
