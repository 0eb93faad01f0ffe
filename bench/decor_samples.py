""" How many sampled inputs does one R update need? (chooses the default `decor_samples`)

For each sample count n, on real activations (dbp_resnet18, Fashion-MNIST resized to 64 px, after a short DBP
warm-up), measures per layer:
  - error: ||dR_n - dR_all|| / ||dR_all||, where dR_all uses every patch of the batch (capped at --max-ref) and dR_n
    a random n of them (mean over --draws draws), reported as the median and max over the layers that have more
    than n patches (the others use all their patches: no sampling error);
  - cost: wall-clock of sampling plus the update for all layers, median over --repeats, interleaved over n
    (n1 n2 ... n1 n2 ...) so machine noise hits every n alike.
CPU timings with torch.get_num_threads() threads; on CUDA the timer synchronises.

    python bench/decor_samples.py --out docs/bench_decor_samples.json
"""
import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_dbp
from timm_dbp.data import load_fashion_mnist
from timm_dbp.layers import decorrelation_update_

parser = argparse.ArgumentParser()
parser.add_argument('--model', default='dbp_resnet18')
parser.add_argument('--img-size', type=int, default=64)
parser.add_argument('-b', '--batch-size', type=int, default=64)
parser.add_argument('--samples', type=int, nargs='+', default=[128, 256, 512, 1024, 2048, 4096])
parser.add_argument('--max-ref', type=int, default=16384, help='patches per layer for the reference update')
parser.add_argument('--warmup-steps', type=int, default=20)
parser.add_argument('--draws', type=int, default=5)
parser.add_argument('--repeats', type=int, default=5)
parser.add_argument('--out', default=None, help='write results (and this script) as JSON')


def delta_R(R: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The update direction [(1 - kappa) C + kappa diag(v)] R (lr = 1, kappa = 0), guards off, from a sample of
    decorrelated inputs z = R x (as a layer keeps them)."""
    after = R.clone()
    decorrelation_update_(after, z, lr=1.0, kappa=0.0, max_rel_change=float('inf'), decorrelated=True)
    return R - after


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def warmed_up_model(name: str, structure: str, img_size: int, batch_size: int, steps: int, seed: int = 0,
                    device: torch.device = torch.device('cpu'), **opt_kwargs):
    """(model, images, labels): dbp_ model `name` (1 channel, 10 classes, R `structure`) after `steps` dbpsgd steps
    (lr 0.05 and `opt_kwargs`) on Fashion-MNIST resized to img_size, so R and W have moved as in training."""
    images, labels = load_fashion_mnist('train')
    x_all = F.interpolate(images[:, None].float().div(255), size=img_size, mode='bilinear').to(device)
    y_all = labels.to(device)
    torch.manual_seed(seed)
    model = timm.create_model(name, in_chans=1, num_classes=10, dbp_structure=structure).to(device)
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.05, **opt_kwargs)
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), device=device)
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
        opt.zero_grad()
    return model, x_all, y_all


def main():
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model, x_all, _ = warmed_up_model(args.model, 'full', args.img_size, args.batch_size, args.warmup_steps,
                                      device=device, decor_lr=1e-3)  # patch R

    layers = list(timm_dbp.decor_layers(model))
    batch = x_all[:args.batch_size]
    # capture a large reference sample from one batch, then draw subsets from the layer's real inputs
    for _, layer in layers:
        layer.decor_samples = args.max_ref
    model(batch)
    reference = {name: layer.take_decor_inputs() for name, layer in layers}
    errors = {n: [] for n in args.samples}
    for name, layer in layers:
        ref = reference[name]
        full = delta_R(layer.decor_matrix, ref)
        for n in args.samples:
            if n >= ref.shape[0]:
                errors[n].append(None)  # n covers every patch of this layer: no sampling error
                continue
            errs = []
            for _ in range(args.draws):
                sub = ref[torch.randperm(ref.shape[0], device=device)[:n]]
                errs.append((torch.linalg.matrix_norm(delta_R(layer.decor_matrix, sub) - full)
                             / torch.linalg.matrix_norm(full)).item())
            errors[n].append(statistics.mean(errs))

    # cost: armed forward sampling + update of every layer, interleaved over n
    times = {n: [] for n in args.samples}
    saved = {name: layer.decor_matrix.clone() for name, layer in layers}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for n in args.samples:
                for _, layer in layers:
                    layer.decor_samples = n
                sync(device)
                t0 = time.perf_counter()
                model(batch)
                for name, layer in layers:
                    layer.update_decorrelation(layer.take_decor_inputs(), lr=1e-3, kappa=0.0)
                sync(device)
                t1 = time.perf_counter()
                for _, layer in layers:
                    layer.decor_samples = 0
                model(batch)
                sync(device)
                t2 = time.perf_counter()
                if repeat > 0:  # the first round is warm-up
                    times[n].append((t1 - t0) - (t2 - t1))  # minus a plain forward
                for name, layer in layers:
                    layer.decor_matrix.copy_(saved[name])

    rows = []
    print(f'{args.model} {args.img_size}px batch {args.batch_size}, {len(layers)} DBP layers, device {device}, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}')
    print(f'{"n":>6} {"sampled layers":>14} {"median rel. error":>18} {"max rel. error":>15} {"sample+update s":>16}')
    for n in args.samples:
        sampled = [e for e in errors[n] if e is not None]
        row = dict(n=n, sampled_layers=len(sampled), median_error=statistics.median(sampled) if sampled else 0.0,
                   max_error=max(sampled, default=0.0), seconds_median=statistics.median(times[n]),
                   seconds_raw=times[n], errors=errors[n])
        rows.append(row)
        print(f'{n:6d} {len(sampled):14d} {row["median_error"]:18.3f} {row["max_error"]:15.3f} '
              f'{row["seconds_median"]:16.4f}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), device=str(device), threads=torch.get_num_threads(),
                           torch=torch.__version__, rows=rows, code=open(__file__).read()), f, indent=1)


if __name__ == '__main__':
    main()
