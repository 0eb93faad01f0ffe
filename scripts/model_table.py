#!/usr/bin/env python3
""" The README's table of registered dbp_ models: parameters, DBP state (R) with the model's defaults (kron R; blocks of
at most 256 channels for the wide twins, `WIDE_TWIN_ARGS`; layer rules for the basic-block ResNets,
`BASIC_RESNET_TWIN_ARGS`), those of the twin's own defaults that differ from the library's, the state with full R on
the same layers, and the timm pretrained weights each twin loads with R = I (checked offline for every twin by
tests/test_twins.py). tests/test_readme_table.py keeps the README equal to this script's output.

    python scripts/model_table.py          # prints the markdown table
"""
import timm
import torch

import timm_dbp  # noqa: F401
from timm_dbp import decor_layers
from timm_dbp.models import DBP_MODEL_KWARGS, SIZE_LIMIT_ARGS


def full_r_bytes(layer) -> int:
    """Bytes of the layer's R with the full structure: one d x d matrix, d = decor_dim, in the weight's dtype."""
    return layer.decor_dim ** 2 * layer.weight.element_size()


def twin_defaults(model) -> str:
    """The dbp_ model kwargs a twin sets by default (its size limits: block size, layers kept plain, kron only up to
    d), as `name=value` text; '-' for none."""
    named = [f'{DBP_MODEL_KWARGS[name][0]}={model.dbp_args[name]}' for name in SIZE_LIMIT_ARGS
             if model.dbp_args[name] is not None]
    return ', '.join(f'`{text}`' for text in named) or '-'


def model_table() -> str:
    lines = [
        '| model | params (M) | R, default (MiB) | twin defaults | R, full (MiB) | timm weights loaded with R = I |',
        '|---|---:|---:|---|---:|---|']
    for name in timm.list_models('dbp_*'):
        model = timm.create_model(name, device='meta')
        params = sum(p.numel() for p in model.parameters()) / 1e6
        layers = [layer for _, layer in decor_layers(model)]
        default_mib = sum(layer.decor_state_bytes for layer in layers) / 2 ** 20
        full_mib = sum(full_r_bytes(layer) for layer in layers) / 2 ** 20
        tags = ', '.join(f'`{tag.split(".", 1)[1]}`' for tag in timm.list_pretrained(f'{name}.*'))
        row = [f'`{name}`', f'{params:.1f}', f'{default_mib:.1f}', twin_defaults(model), f'{full_mib:.1f}', tags]
        lines.append(f"| {' | '.join(row)} |")
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    torch.set_num_threads(1)
    print(model_table(), end='')
