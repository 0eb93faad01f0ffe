# section 47a: torch.profiler of one DBP optimizer step (sampling + R update), dbp_<model> at 64 px batch 64.
# PYTHONPATH=<worktree> python docs/bench_s47/profile_step.py resnet18
import torch, timm, timm_dbp, time, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
torch.manual_seed(0)
m = timm.create_model('dbp_'+__import__('sys').argv[1], num_classes=100)
opt = timm.optim.create_optimizer_v2(m, opt='dbpsgd', lr=0.1)
x = torch.randn(64,3,64,64); y = torch.randint(0,100,(64,))
def step():
    opt.zero_grad(); F.cross_entropy(m(x),y).backward(); opt.step()
for _ in range(3): step()
opt.zero_grad(); F.cross_entropy(m(x),y).backward()
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
    opt.step()
print(p.key_averages().table(sort_by='self_cpu_time_total', row_limit=25))
print(p.key_averages(group_by_input_shape=True).table(sort_by='self_cpu_time_total', row_limit=25))
