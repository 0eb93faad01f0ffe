#!/bin/bash
# section 45b: the step by phase (forward, backward, optimizer step), one model per process, new code, 2 rounds
NEW=/work/wt_s45new
cd /work/main/docs/bench_s45
for r in 1 2; do
  for mode in eager compiled; do
    PYTHONPATH=$NEW python phases.py resnet18 $mode >> phases.jsonl 2>> stage2.err
    PYTHONPATH=$NEW python phases.py dbp_resnet18 $mode 0 >> phases.jsonl 2>> stage2.err
    PYTHONPATH=$NEW python phases.py dbp_resnet18 $mode >> phases.jsonl 2>> stage2.err
  done
done
echo "rc $?" >> stage2.err
