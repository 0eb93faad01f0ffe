bash /work/s40/one.sh dbp_kron_dlr3e-3_bf16_de2 1 8 8
bash /work/s40/one.sh dbp_kron_dlr3e-3_bf16_de2 2 8 8
