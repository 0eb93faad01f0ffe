import sys, time, torch, statistics, timm, timm_dbp
import torch.nn.functional as F
torch.manual_seed(0)
def bench(f, n=9):
    for _ in range(2): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
x = torch.randn(64, 3, 64, 64); y = torch.randint(0, 100, (64,))
res = {}
for name, opt_name, kw in (('resnet18', 'sgd', {}), ('dbp_resnet18', 'sgd', {}), ('dbp_resnet18', 'dbpsgd', dict(decor_lr=0.0))):
    m = timm.create_model(name, num_classes=100)
    opt = timm.optim.create_optimizer_v2(m, opt=opt_name, lr=0.01, momentum=0.9, **kw)
    for tag, f in (('eager', m), ('compiled', torch.compile(m))):
        def step():
            F.cross_entropy(f(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
        res[f'{name}_{opt_name}_{tag}'] = round(bench(step), 1)
print(res, flush=True)
