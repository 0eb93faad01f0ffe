bash /work/s40/one.sh dbp_kron_dlr3e-3_bf16 0 8 8
bash /work/s40/one.sh dbp_kron_dlr3e-3_bf16_de2 0 8 8
bash /work/s40/one.sh dbp_kron_dlr3e-3_bf16_de4 0 8 8
