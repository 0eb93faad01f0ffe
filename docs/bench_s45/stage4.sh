#!/bin/bash
# section 45d: bench/step_cost.py (bp / fusion / sample / dbp interleaved), old and new code alternated, eager
cd /work/main/docs/bench_s45
for r in 1 2; do
  for v in old new; do
    PYTHONPATH=/work/wt_s45$v python /work/wt_s45$v/bench/step_cost.py --configs resnet18:64:64 --repeats 9 \
        --out step_r18_64_b64_${v}_r$r >> stage4.log 2>&1
  done
done
echo "rc $?" >> stage4.log
