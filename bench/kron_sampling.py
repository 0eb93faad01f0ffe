""" How informative are several vectors per sampled patch for a kron factor? (chooses KRON_VECTORS_PER_PATCH)

A kron R = R_c (x) R_s learns each factor from vectors of sampled conv patches P (c x s): R_c from columns of
P R_s^T, R_s from rows of R_c P (timm_dbp.layers.decorrelation.kron_factor_inputs). The same number of vectors can
come from many patches (one vector each) or from fewer patches (q vectors each), and gathering patches is the costly
part of sampling. On real activations (dbp_<model> with kron R, Fashion-MNIST resized, after a short DBP warm-up),
for every kron layer and both factors, this measures the relative error of the factor's update direction
||dR_(n, q) - dR_ref|| / ||dR_ref|| when --vectors vectors come from n = vectors / q patches, for each q of
--per-patch, against a reference that uses every column / row of up to --max-ref patches of the batch (mean over
--draws draws). Reports the median and max over layers, per factor. Errors only: the time saved is measured by
bench/step_cost.py.

    python bench/kron_sampling.py --out docs/bench_kron_sampling.json
"""
import argparse
import json
import statistics

import torch

import timm_dbp
from timm_dbp.layers import DecorConv2d, kron_factor_inputs, sample_conv_patches

from decor_samples import delta_R, warmed_up_model  # bench/decor_samples.py

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--model', default='dbp_resnet18')
parser.add_argument('--img-size', type=int, default=64)
parser.add_argument('-b', '--batch-size', type=int, default=64)
parser.add_argument('--vectors', type=int, default=1024, help='vectors each factor learns from (decor_samples)')
parser.add_argument('--per-patch', type=int, nargs='+', default=[1, 2, 4, 8], help='vectors per sampled patch, q')
parser.add_argument('--max-ref', type=int, default=4096, help='patches per layer for the reference update')
parser.add_argument('--warmup-steps', type=int, default=20)
parser.add_argument('--draws', type=int, default=5)
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--out', default=None, help='write results (and this script) as JSON')


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(estimate - reference) / torch.linalg.matrix_norm(reference)).item()


def main():
    args = parser.parse_args()
    model, x_all, _ = warmed_up_model(args.model, 'kron', args.img_size, args.batch_size, args.warmup_steps,
                                      seed=args.seed, momentum=0.9)

    layers = [(n, m) for n, m in timm_dbp.decor_layers(model)
              if isinstance(m, DecorConv2d) and m.decor_spatial.numel() > 0]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach())) for n, m in layers]
    with torch.no_grad():
        model(x_all[:args.batch_size])
    for h in hooks:
        h.remove()

    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for name, layer in layers:
        R_c, R_s = layer.decor_matrix, layer.decor_spatial
        c, s = R_c.shape[0], R_s.shape[0]
        ref_patches = sample_conv_patches(inputs[name], layer, args.max_ref, generator, flat=False)
        n_ref = ref_patches.shape[0]
        ref = [delta_R(R, v) for R, v in zip(
            (R_c, R_s), kron_factor_inputs(R_c, R_s, ref_patches, num_vectors=n_ref * max(c, s)))]
        row = dict(layer=name, c=c, s=s, patches=n_ref, channel={}, spatial={})
        for q in args.per_patch:
            n = -(-args.vectors // q)
            if n > n_ref:  # not enough patches in the batch to draw n distinct ones
                continue
            errors = [[], []]
            for _ in range(args.draws):
                patches = sample_conv_patches(inputs[name], layer, n, generator, flat=False)
                for k, (R, v) in enumerate(zip((R_c, R_s), kron_factor_inputs(R_c, R_s, patches, args.vectors))):
                    errors[k].append(relative_error(delta_R(R, v), ref[k]))
            row['channel'][q], row['spatial'][q] = (statistics.mean(e) for e in errors)
        rows.append(row)

    # layers with enough patches for every q; a 1 x 1 factor (a 1-channel input) has nothing to decorrelate
    complete = [r for r in rows if len(r['channel']) == len(args.per_patch)]
    print(f'{args.model} {args.img_size}px batch {args.batch_size}: {len(rows)} kron layers, {args.vectors} vectors per '
          f'factor, reference from up to {args.max_ref} patches (every column / row); summary over the '
          f'{len(complete)} layers with at least {args.vectors} patches')
    print(f'{"q (vectors per patch)":>22} {"patches":>8} {"R_c error: median / max":>24} {"R_s error: median / max":>24}'
          f' {"R_c layers":>10}')
    summary = []
    for q in args.per_patch:
        channel = [r['channel'][q] for r in complete if r['c'] > 1]
        spatial = [r['spatial'][q] for r in complete if r['s'] > 1]
        if not channel:
            continue
        entry = dict(per_patch=q, patches=-(-args.vectors // q), layers=len(channel),
                     channel_median=statistics.median(channel), channel_max=max(channel),
                     spatial_median=statistics.median(spatial), spatial_max=max(spatial))
        summary.append(entry)
        print(f'{q:22d} {entry["patches"]:8d} {entry["channel_median"]:11.3f} / {entry["channel_max"]:10.3f} '
              f'{entry["spatial_median"]:11.3f} / {entry["spatial_max"]:10.3f} {len(channel):10d}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), torch=torch.__version__, summary=summary, rows=rows,
                           code=open(__file__).read()), f, indent=1)


if __name__ == '__main__':
    main()
