#!/bin/bash
# section 44c: resnet18 64 px batch 64 after the compiled spatial product change: eager / compiled / compiled with
# inductor's layout optimization off, whole runs alternated
WT=/work/wt_s44b
OUT=/work/main/docs/bench_s44
for r in 5 6; do
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 --repeats 9 \
      --out $OUT/step_r18_64_b64_eager_r$r >> step4.log 2>&1
  PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 --repeats 9 --compile \
      --out $OUT/step_r18_64_b64_compiled_mm_r$r >> step4.log 2>&1
  TORCHINDUCTOR_LAYOUT_OPTIMIZATION=0 PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 \
      --repeats 9 --compile --out $OUT/step_r18_64_b64_compiled_mm_nolayout_r$r >> step4.log 2>&1
done
echo "rc $?" >> step4.log
