"""The spatial-factor product A_o R_s (times_small_matrix) forward + backward: eager vs compiled, conv path vs A @ M."""
import time, statistics, torch
from timm_dbp.layers import decorrelation as D
def bench(f, n=20):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 2)
for c in (256, 512):
    W = torch.randn(c, c, 3, 3, requires_grad=True); Rs = torch.eye(9) + 0.01 * torch.randn(9, 9)
    g = torch.randn(c, c, 3, 3)
    def conv_path(): D.fused_weight(W, None, Rs).backward(g)
    def mm_path(): (W.reshape(c, c, 9) @ Rs).reshape(W.shape).backward(g)
    res = {'conv_eager': bench(conv_path), 'mm_eager': bench(mm_path),
           'conv_compiled': bench(torch.compile(conv_path)), 'mm_compiled': bench(torch.compile(mm_path))}
    print(c, res, flush=True)
