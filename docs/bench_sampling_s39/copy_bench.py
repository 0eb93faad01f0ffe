import torch, time
def t(f, n=50):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
for shape in [(64,64,16,16),(64,128,8,8),(128,64,16,16)]:
    x = torch.randn(shape); B,C,H,W = shape
    out = torch.empty(B*H*W+1, C)
    r = {}
    r['copy_ permute'] = t(lambda: out[:-1].view(B,H,W,C).copy_(x.permute(0,2,3,1)))
    r['contig CL'] = t(lambda: x.contiguous(memory_format=torch.channels_last))
    r['transpose(1,2).contig'] = t(lambda: x.view(B,C,H*W).transpose(1,2).contiguous())
    r['copy_ transposed 3d'] = t(lambda: out[:-1].view(B,H*W,C).copy_(x.view(B,C,H*W).transpose(1,2)))
    r['plain clone'] = t(lambda: x.clone())
    idx = torch.randint(B*H*W, (9216,))
    r['index_select 9216 rows'] = t(lambda: out.index_select(0, idx))
    xs = x.view(B,C,H*W).transpose(1,2)
    bb = torch.randint(B,(9216,)); pp = torch.randint(H*W,(9216,))
    r['strided gather 9216'] = t(lambda: xs[bb,pp])
    print(shape, {k: round(v,3) for k,v in r.items()})
print(torch.get_num_threads())
