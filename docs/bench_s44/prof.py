import sys, torch, timm, timm_dbp, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
x = torch.randn(64, 3, 64, 64); y = torch.randint(0, 100, (64,))
name = sys.argv[1]
m = timm.create_model(name, num_classes=100)
opt = timm.optim.create_optimizer_v2(m, opt='dbpsgd' if name.startswith('dbp') else 'sgd', lr=0.01, momentum=0.9, **({'decor_lr': 0.0} if name.startswith('dbp') else {}))
f = torch.compile(m)
def step():
    F.cross_entropy(f(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3): step()
print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=14))
