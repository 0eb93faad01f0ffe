"""One model per process (as train.py runs): resnet18 + SGD or dbp_resnet18 + dbpsgd (defaults), 64 px batch 64,
eager or torch.compile (inductor); 3 warm-up steps (compiling), then the median of 21 timed steps, printed as JSON
with the graphs and graph breaks dynamo made. Section 44d's script, plus those counts and 21 steps instead of 15."""
import json, statistics, sys, time
import timm, torch, torch.nn.functional as F
from torch._dynamo.utils import counters
import timm_dbp  # noqa: F401
name, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 100, (64,))
model = timm.create_model(name, num_classes=100)
opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd' if name.startswith('dbp_') else 'sgd', lr=0.01, momentum=0.9)
forward = torch.compile(model) if mode == 'compiled' else model
def step():
    t = time.perf_counter()
    F.cross_entropy(forward(x), y).backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t
warm = sum(step() for _ in range(3))
times = [step() for _ in range(21)]
print(json.dumps(dict(model=name, mode=mode, code=timm_dbp.__file__, warmup_s=warm,
                      graphs=counters['stats'].get('unique_graphs', 0),
                      graph_breaks=sum(counters['graph_break'].values()),
                      median_ms=statistics.median(times) * 1e3, raw_ms=[t * 1e3 for t in times])))
