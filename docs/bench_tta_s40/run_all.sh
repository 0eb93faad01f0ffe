echo "$(date -u +%H:%M:%S) start" >> /work/s40/progress.txt
bash docs/bench_tta_s40/stage1.sh
bash docs/bench_tta_s40/stage2.sh
bash docs/bench_tta_s40/stage3.sh 2>/dev/null
echo "$(date -u +%H:%M:%S) all done" >> /work/s40/progress.txt
