""" How many tensor operations a training step runs, BP against DBP, by phase (forward, backward, optimizer step)

On a small model (test_resnet, the time-to-accuracy model) the DBP overhead is bound by the number of small tensor
operations, not by flops (BENCHMARKS sections 22 and 30f). This script counts them with torch.profiler for one step
of the plain timm model with SGD and of its DBP twin with dbpsgd (default settings, an updating step: the forward
is armed), after --warmup steps, and lists the most called operators of each phase. The profiler counts nested
operators too (a copying `to` is to + _to_copy + empty_strided + copy_); `dispatch_ops` counts the operators that
reach the dispatcher from Python (TorchDispatchMode, the same step run again), closer to the number of kernels.
Writes JSON.

    python bench/op_counts.py --config test_resnet:32:128 --out docs/bench_op_counts_s30/test_resnet
"""
import argparse
import json

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import timm_dbp  # noqa: F401  registers dbp_ models and optimizers

from _cli import model_config  # bench/_cli.py

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--config', default='test_resnet:32:128', help='model:img_size:batch_size (DBP twin: dbp_<model>)')
parser.add_argument('--warmup', type=int, default=3)
parser.add_argument('--top', type=int, default=8, help='most called operators listed per phase')
parser.add_argument('--out', default=None, help='output prefix: writes <out>.json')


class DispatchCount(TorchDispatchMode):
    """Counts the operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def phase_counts(prof, top):
    events = prof.key_averages()
    most = sorted(events, key=lambda e: -e.count)[:top]
    return dict(ops=sum(e.count for e in events), self_cpu_s=sum(e.self_cpu_time_total for e in events) / 1e6,
                most_called={e.key: e.count for e in most})


def main():
    args = parser.parse_args()
    name, img, batch = model_config(parser, '--config', args.config)
    results = {}
    for method in ('bp', 'dbp'):
        torch.manual_seed(0)
        model = timm.create_model(name if method == 'bp' else f'dbp_{name}', num_classes=10)
        opt = timm.optim.create_optimizer_v2(model, opt='sgd' if method == 'bp' else 'dbpsgd', lr=0.01, momentum=0.9)
        x, y = torch.randn(batch, 3, img, img), torch.randint(0, 10, (batch,))
        for _ in range(args.warmup):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.zero_grad()
        with profile(activities=[ProfilerActivity.CPU]) as forward:
            out = model(x)
        with profile(activities=[ProfilerActivity.CPU]) as backward:
            F.cross_entropy(out, y).backward()
        with profile(activities=[ProfilerActivity.CPU]) as step:
            opt.step()
        results[method] = {phase: phase_counts(prof, args.top)
                           for phase, prof in (('forward', forward), ('backward', backward), ('step', step))}
        opt.zero_grad()
        counts = [DispatchCount() for _ in range(3)]
        with counts[0]:
            out = model(x)
        loss = F.cross_entropy(out, y)
        with counts[1]:
            loss.backward()
        with counts[2]:
            opt.step()
        for phase, count in zip(('forward', 'backward', 'step'), counts):
            results[method][phase]['dispatch_ops'] = count.ops
        for phase, r in results[method].items():
            print(f'{method:3s} {phase:8s} {r["dispatch_ops"]:5d} dispatched, {r["ops"]:5d} profiled ops, self CPU '
                  f'{r["self_cpu_s"] * 1e3:6.1f} ms (under the profiler) | ' + ', '.join(
                      f'{k.replace("aten::", "")} {v}' for k, v in r['most_called'].items()), flush=True)
    if args.out:
        with open(args.out + '.json', 'w') as f:
            json.dump(dict(config=args.config, torch=torch.__version__, threads=torch.get_num_threads(),
                           results=results, script=open(__file__).read()), f, indent=1)
        print(f'wrote {args.out}.json')


if __name__ == '__main__':
    main()
