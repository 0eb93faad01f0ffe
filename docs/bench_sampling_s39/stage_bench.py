import torch, time, torch.nn.functional as F
from timm_dbp.layers.decor_layers import DecorConv2d, _draw_patches, _pixel_rows
from timm_dbp.layers.decorrelation import kron_vector_positions, rounded_product, operand_dtype, matmul_dtype_named
def t(f, n=40):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    ts.sort(); return ts[n//2]*1e3
for xs, c in [((64,64,16,16),64), ((64,128,8,8),128)]:
    conv = DecorConv2d(c, c, 3, padding=1, bias=False, decor_structure='kron')
    x = torch.randn(xs); R_c = conv.decor_matrix; R_s = conv.decor_spatial
    g = torch.Generator(); 
    def gen():
        g = torch.Generator(); g.manual_seed(5); return g
    r = {}
    r['generator'] = t(gen)
    r['draw'] = t(lambda: _draw_patches(x, conv, 1024, gen()))
    xx, b, _, pixel = _draw_patches(x, conv, 1024, gen()); n, s = pixel.shape
    r['pixel_rows'] = t(lambda: _pixel_rows(xx, b, pixel, torch.float32))
    pixels, rows = _pixel_rows(xx, b, pixel, torch.float32)
    ps, pc = (kron_vector_positions(n, size, 1024, x.device) for size in (s, c))
    r['positions'] = t(lambda: [kron_vector_positions(n, size, 1024, x.device) for size in (s, c)])
    def eb(): return F.embedding_bag(rows.repeat_interleave(ps.shape[1], 0), pixels, per_sample_weights=R_s[ps.reshape(-1)], mode='sum')
    r['embbag'] = t(eb)
    cv = eb()
    md = matmul_dtype_named('auto', x.device)
    r['Rc product'] = t(lambda: rounded_product(cv, R_c.mT, operand_dtype(c, md)))
    r['index_select'] = t(lambda: pixels.index_select(0, rows.reshape(-1)))
    patches = pixels.index_select(0, rows.reshape(-1)).view(n, s, -1)
    r['einsum'] = t(lambda: torch.einsum('nqc,nsc->nqs', R_c[pc], patches))
    sv = torch.einsum('nqc,nsc->nqs', R_c[pc], patches)
    r['Rs product'] = t(lambda: sv.reshape(-1, s) @ R_s.mT)
    conv.decor_samples=1024; conv.decor_seed=5; conv.decor_matmul_dtype='auto'
    r['TOTAL store'] = t(lambda: conv._store_decor_inputs(x, False))
    print(xs, {k: round(v,3) for k,v in r.items()}, 'sum', round(sum(v for k,v in r.items() if k not in ('TOTAL store','draw')),3))
