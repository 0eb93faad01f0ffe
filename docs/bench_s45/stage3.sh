#!/bin/bash
# section 45c: peak training memory, old (sampling in the forward) against new (input kept, sampled in the step)
cd /work/main/docs/bench_s45
for v in old new; do
  PYTHONPATH=/work/wt_s45$v python /work/wt_s45$v/bench/memory.py --models resnet18 --out mem_r18_$v >> stage3.log 2>&1
done
for v in old new; do
  PYTHONPATH=/work/wt_s45$v python /work/wt_s45$v/bench/memory.py --models resnet50 --out mem_r50_$v >> stage3.log 2>&1
done
echo "rc $?" >> stage3.log
