#!/bin/bash
# section 44b: resnet18 64 px batch 64, eager against torch.compile (inductor), whole runs alternated
WT=/work/wt_s44b
OUT=/work/main/docs/bench_s44
for r in 1 2; do
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 --repeats 9 \
      --out $OUT/step_r18_64_b64_eager_r$r >> step2.log 2>&1
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 --repeats 9 --compile \
      --out $OUT/step_r18_64_b64_compiled_r$r >> step2.log 2>&1
done
echo "rc $?" >> step2.log
