"""resnet18 vs dbp_resnet18 (dbpsgd, decor_lr 0 = fusion only, and default) compiled with inductor, 64 px batch 64:
built and compiled one after another, then timed interleaved (bp, fusion, dbp per round), medians of 9 rounds."""
import sys, time, torch, statistics, timm, timm_dbp
import torch.nn.functional as F
torch.manual_seed(0)
x = torch.randn(64, 3, 64, 64); y = torch.randint(0, 100, (64,))
variants = {}
for tag, name, opt_name, kw in (('bp', 'resnet18', 'sgd', {}), ('fusion', 'dbp_resnet18', 'dbpsgd', dict(decor_lr=0.0)),
                                ('dbp', 'dbp_resnet18', 'dbpsgd', {})):
    m = timm.create_model(name, num_classes=100)
    opt = timm.optim.create_optimizer_v2(m, opt=opt_name, lr=0.01, momentum=0.9, **kw)
    f = torch.compile(m) if sys.argv[1] == 'compiled' else m
    def step(f=f, opt=opt):
        F.cross_entropy(f(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    t = time.perf_counter(); step(); step(); print(tag, 'warm-up s', round(time.perf_counter() - t, 1), flush=True)
    variants[tag] = step
times = {k: [] for k in variants}
for _ in range(9):
    for k, f in variants.items():
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
med = {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}
print(sys.argv[1:], med, 'fusion/bp', round(med['fusion'] / med['bp'], 3), 'dbp/bp', round(med['dbp'] / med['bp'], 3))
