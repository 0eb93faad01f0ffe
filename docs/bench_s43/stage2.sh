#!/bin/bash
# section 43, after stage1: smoke tests of the bench changes (untimed), wide_resnet50_2's step twice more (dense /
# default alternated), then per-layer costs of wide_resnet50_2 at 64 px batch 32, dense and default
while [ -e /work/s43/RUNNING ]; do sleep 20; done
touch /work/s43/RUNNING2
cd /work/main
python -m pytest -q tests/test_bench_smoke.py -k "layer_costs or step_cost or memory" > /work/s43/smoke.log 2>&1
echo "rc $?" >> /work/s43/smoke.log
WT=/work/wt_s43
OUT=/work/main/docs/bench_s43
for r in 2 3; do
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs wide_resnet50_2:64:32 --repeats 7 --dbp dbp_block_size=0 \
      --out $OUT/step_wide_resnet50_2_64_b32_dense_r$r >> /work/s43/step2.log 2>&1
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs wide_resnet50_2:64:32 --repeats 7 \
      --out $OUT/step_wide_resnet50_2_64_b32_default_r$r >> /work/s43/step2.log 2>&1
done
PYTHONPATH=/work/main python bench/layer_costs.py --config wide_resnet50_2:64:32 --dbp dbp_block_size=0 \
    --out $OUT/layers_wide_resnet50_2_64_b32_dense > /work/s43/layers_dense.log 2>&1
PYTHONPATH=/work/main python bench/layer_costs.py --config wide_resnet50_2:64:32 \
    --out $OUT/layers_wide_resnet50_2_64_b32_default > /work/s43/layers_default.log 2>&1
rm -f /work/s43/RUNNING2
