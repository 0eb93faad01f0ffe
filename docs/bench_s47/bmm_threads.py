# section 47a: 3 products z^T z (1024 x 512) as one CPU bmm, as a loop of mm, and in bfloat16; and 3 products 512^3.
# python docs/bench_s47/bmm_threads.py
import torch, time
print(torch.get_num_threads(), torch.backends.mkldnn.is_available(), torch.__config__.show().count('MKL'))
def t(fn, reps=20):
    for _ in range(3): fn()
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); fn(); ts.append(time.perf_counter()-t0)
    ts.sort(); return ts[len(ts)//2]*1e3
Z=torch.randn(3,1024,512); A=torch.randn(3,512,512)
ZT=Z.transpose(1,2)
f=3*2*512*1024*512
for name,fn in [('bmm ZT Z (strided)',lambda: torch.bmm(ZT,Z)),('bmm ZTc Z',lambda: torch.bmm(ZT.contiguous(),Z)),
                ('mm loop',lambda: [z.T@z for z in Z]),('bmm bf16',lambda: torch.bmm(ZT.bfloat16(),Z.bfloat16())),
                ('bmm A A', lambda: torch.bmm(A,A))]:
    ms=t(fn); print(name, '%.2f ms'%ms, '%.1f GFLOP/s'%((f if 'A A' not in name else 3*2*512**3)/ms/1e6))
