#!/bin/bash
# section 44b: resnet18 64 px batch 64 compiled with inductor's layout optimization off, alternated with eager
WT=/work/wt_s44b
OUT=/work/main/docs/bench_s44
for r in 1 2; do
  TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 \
      --repeats 9 --compile --out $OUT/step_r18_64_b64_compiled_nolayout_r$r >> step3.log 2>&1
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 --repeats 9 \
      --out $OUT/step_r18_64_b64_eager_r$((r + 2)) >> step3.log 2>&1
done
echo "rc $?" >> step3.log
