while pgrep -f "ci40b" > /dev/null || ! grep -q "^rc=" /work/s40/cmd1.log 2>/dev/null; do sleep 5; done
cd /work/wt40 && git checkout -q --detach 05f1a3d
bash /work/s40/one.sh dbp_kron_dlr3e-3_bf16_de6 0 12 8
