cd /work/wt40/bench
for r in 2 3; do
for c in 128 64; do
PYTHONPATH=/work/wt40 python step_cost.py --configs resnet18:64:$c --repeats 21 --out /work/s40/sc/r18_64_b${c}_r$r > /work/s40/sc/r18_64_b${c}_r$r.log 2>&1
echo "$(date -u +%H:%M:%S) sc b$c r$r done" >> /work/s40/progress.txt
done; done
