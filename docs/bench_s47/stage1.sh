#!/bin/bash
# section 47a: the step, old (69a6ab8) against new (batch_matmul), whole runs alternated
cd /work/s47
for r in 1 2 3; do
  for v in old new; do
    WT=/work/wt_s47; [ $v = new ] && WT=/work/wt_s47new
    PYTHONPATH=$WT python $WT/bench/step_cost.py --configs resnet18:64:64 --repeats 9 \
        --out /work/main/docs/bench_s47/step_r18_64_b64_${v}_r$r >> stage1.log 2>&1
  done
done
echo "rc $?" >> stage1.log
