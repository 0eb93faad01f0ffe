"""One model per process, 64 px batch 64 (as one_model.py), each step timed by phase: forward with the loss, backward,
optimizer step (DBP: its R update and, with the new code, its sampling); medians of 21 steps after 3 warm-up steps,
printed as JSON. Args: model (resnet18 / dbp_resnet18), mode (eager / compiled), and optionally decor_lr (0: fusion
only, no sampling or R update)."""
import json, statistics, sys, time
import timm, torch, torch.nn.functional as F
import timm_dbp  # noqa: F401
name, mode = sys.argv[1], sys.argv[2]
kwargs = dict(decor_lr=float(sys.argv[3])) if len(sys.argv) > 3 else {}
torch.manual_seed(0)
x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 100, (64,))
model = timm.create_model(name, num_classes=100)
opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd' if name.startswith('dbp_') else 'sgd', lr=0.01, momentum=0.9,
                                     **kwargs)
forward = torch.compile(model) if mode == 'compiled' else model
def step():
    t0 = time.perf_counter()
    loss = F.cross_entropy(forward(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step(); opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2
for _ in range(3):
    step()
times = [step() for _ in range(21)]
phases = {k: statistics.median(t[i] for t in times) * 1e3 for i, k in enumerate(('forward', 'backward', 'step'))}
print(json.dumps(dict(model=name, mode=mode, code=timm_dbp.__file__, opt_kwargs=kwargs,
                      total_ms=statistics.median(sum(t) for t in times) * 1e3, **{f'{k}_ms': v for k, v in phases.items()})))
