""" Convert any model to DBP form and back

`decorrelate(model)` swaps Conv2d / Linear layers for their DBP twins (same weight tensors, R = I, so the
function is unchanged); `fold(model)` swaps every DBP layer for a plain one holding W R, so inference
costs exactly what the plain model costs and the state dict matches the plain architecture.
Both walk the model recursively and return it, like `timm.layers.convert_sync_batchnorm`.
"""
import inspect
import re
from fnmatch import fnmatch
from functools import lru_cache, partial
from typing import Dict, FrozenSet, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.layers import Linear as TimmLinear

from .decor_layers import DECOR_LAYERS, DECOR_STRUCTURES, DEFAULT_STRUCTURE, DecorConv2d, DecorLayer, DecorLinear
from .decorrelation import check_block_size, fused_weight, identity_factor
from .sketched_conv import SketchedConv2d, SketchedDecorConv2d, make_sketched

__all__ = ['decorrelate', 'fold', 'fold_state_dict', 'fill_decor_matrices', 'decor_layers', 'exclude_patterns']

_CONVERTIBLE_LINEAR = (nn.Linear, TimmLinear)  # exact types; subclasses may change the maths


def exclude_patterns(exclude: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """`decorrelate(exclude=...)` as a tuple of fnmatch patterns: a sequence of patterns, or one string holding one
    pattern or several joined by commas (as `--model-kwargs dbp_exclude=layer4.*,fc` passes them; module names never
    contain commas). Anything but strings is refused (TypeError)."""
    if isinstance(exclude, str):
        exclude = [pattern.strip() for pattern in exclude.split(',') if pattern.strip()]
    if not all(isinstance(pattern, str) for pattern in exclude):
        raise TypeError(f'dbp_exclude must be fnmatch patterns (str), got {exclude!r}')
    return tuple(exclude)


def decor_layers(model: nn.Module) -> Iterator[Tuple[str, DecorLayer]]:
    """Yield (name, layer) for every DBP layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, DECOR_LAYERS):
            yield name, module


def _decor_dim(module: nn.Module) -> int:
    return module.weight[0].numel()


@lru_cache(maxsize=None)
def _weights_read_directly(cls: type) -> FrozenSet[str]:
    """Names `x` of children whose weight a forward method of `cls` reads itself (`self.x.weight`), bypassing the
    child's forward: e.g. BEiT / EVA attention's `F.linear(x, self.qkv.weight, qkv_bias)`. A DBP child there would
    never apply its R."""
    names = set()
    for name in dir(cls):
        method = getattr(cls, name, None)
        if 'forward' not in name or not inspect.isfunction(method):
            continue
        try:
            names.update(re.findall(r'self\.(\w+)\.weight\b', inspect.getsource(method)))
        except (OSError, TypeError):  # no source (compiled, built on the fly): nothing to read
            continue
    return frozenset(names)


def _to_dbp(
        module: nn.Module, name: str, exclude: Sequence[str], max_dim: Optional[int], conv: bool, linear: bool,
        structure: str, kron_max_dim: Optional[int], block_size: Optional[int],
):
    if kron_max_dim is not None and isinstance(module, nn.Conv2d) and _decor_dim(module) > kron_max_dim:
        structure = 'channel'
    if conv and type(module) is SketchedConv2d:  # keeps its trace-estimated weight gradient
        make = partial(_sketched_decor_conv, decor_structure=structure, decor_block_size=block_size)
    elif conv and type(module) is nn.Conv2d:
        make = partial(DecorConv2d.from_conv, decor_structure=structure, decor_block_size=block_size)
    elif linear and type(module) in _CONVERTIBLE_LINEAR:
        make = partial(DecorLinear.from_linear, decor_block_size=block_size)
    else:
        return None
    if any(fnmatch(name, pattern) for pattern in exclude):
        return None
    if max_dim is not None and _decor_dim(module) > max_dim:
        return None
    return make(module)


def _sketched_decor_conv(conv: SketchedConv2d, decor_structure: str,
                         decor_block_size: Optional[int]) -> SketchedDecorConv2d:
    return make_sketched(DecorConv2d.from_conv(conv, decor_structure, decor_block_size), conv.sketch_probes,
                         conv.sketch_seed)


def decorrelate(
        model: nn.Module,
        exclude: Union[str, Sequence[str]] = (),
        max_dim: Optional[int] = None,
        conv: bool = True,
        linear: bool = True,
        structure: str = DEFAULT_STRUCTURE,
        kron_max_dim: Optional[int] = None,
        block_size: Optional[int] = None,
) -> nn.Module:
    """Convert the Conv2d / Linear layers of `model` to DBP form in place (same function: R = I).

    Which layers: exact nn.Conv2d, nn.Linear and timm.layers.Linear (subclasses such as StdConv2d or Conv2dSame
    change the maths and are left alone; a SketchedConv2d becomes a SketchedDecorConv2d), except a layer whose
    parent's forward reads its weight directly (BEiT / EVA attention's `F.linear(x, self.qkv.weight, ...)`: its R
    would never be applied). Norms, embeddings, tokens and
    every other module are left as they are. Weight and bias tensors are kept, not copied.

    Args:
        model: Any torch module; if it is itself a convertible layer, its DBP twin is returned.
        exclude: fnmatch patterns of module names to leave plain (e.g. ['conv1', 'layer4.*'], or 'conv1,layer4.*').
        max_dim: Leave layers whose input dimension d (C_in / groups * kh * kw, or in_features) exceeds it.
        conv: Convert Conv2d layers.
        linear: Convert Linear layers.
        structure: R of the convs: 'full' (d x d on patches), 'channel' (c x c on pixels) or 'kron'
            (c x c (x) s x s); see `timm_dbp.layers.decorrelation`. Linear layers always get a full R.
        kron_max_dim: With structure 'kron', convs whose input dimension d exceeds it get a channel R instead (no
            spatial factor): the deep convs whose R_c acts on the input, where folding R_s into the large kernel
            twice a step is most of the fusion cost (BENCHMARKS section 37).
        block_size: Every R over channels (channel, kron's R_c, the R of 1x1 convs and linear layers) wider than it
            is block-diagonal, G equal blocks of at most block_size channels (`block_count`): c b numbers and an
            update of n c b + c b^2 flops instead of c^2 and n c^2 + c^3 (BENCHMARKS section 41). None: dense.

    Returns:
        The converted model.
    """
    exclude = exclude_patterns(exclude)
    if max_dim is not None and max_dim < 1:
        raise ValueError(f'max_dim must be >= 1 or None, got {max_dim}')
    if structure not in DECOR_STRUCTURES:
        raise ValueError(f'structure must be one of {DECOR_STRUCTURES}, got {structure!r}')
    if kron_max_dim is not None and (structure != 'kron' or kron_max_dim < 1):
        raise ValueError(f'kron_max_dim must be >= 1 or None and needs structure \'kron\', got {kron_max_dim} with '
                         f'structure {structure!r}')
    check_block_size(block_size)
    converted = _to_dbp(model, '', exclude, max_dim, conv, linear, structure, kron_max_dim, block_size)
    if converted is not None:
        return converted
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f'{name}.{child_name}' if name else child_name
            if child_name in _weights_read_directly(type(module)):
                continue
            converted = _to_dbp(child, full_name, exclude, max_dim, conv, linear, structure, kron_max_dim, block_size)
            if converted is not None:
                setattr(module, child_name, converted)
    return model


@torch.no_grad()
def _plain_twin(layer: DecorLayer) -> nn.Module:
    w = layer.weight
    if isinstance(layer, DecorConv2d):
        plain = nn.Conv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
            padding_mode=layer.padding_mode, device='meta', dtype=w.dtype,
        )
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device='meta', dtype=w.dtype)
    plain.weight = nn.Parameter(layer.decorrelated_weight().detach().clone(), requires_grad=w.requires_grad)
    plain.bias = layer.bias
    plain.train(layer.training)
    return plain


def fold(model: nn.Module) -> nn.Module:
    """Replace every DBP layer by a plain Conv2d / Linear with weight W R, in place; returns the model.

    Outputs are unchanged up to float rounding, no DBP buffer is left, and the state dict keys are those
    of the plain architecture (a folded `dbp_resnet18` loads into timm's `resnet18`).
    """
    if isinstance(model, DECOR_LAYERS):
        return _plain_twin(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, DECOR_LAYERS):
                setattr(module, child_name, _plain_twin(child))
    return model


def fold_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict of the folded model, from a DBP state dict: every `<layer>.weight` becomes W R and every
    `<layer>.decor_matrix` / `.decor_spatial` is dropped, so DBP checkpoints load into the plain architecture.
    R's structure is read from the shapes (a c x c `decor_matrix` with c < d is a channel factor, a G x b x b one is
    block-diagonal)."""
    folded = dict(state_dict)
    for key in [k for k in state_dict if k.endswith('.decor_matrix')]:
        prefix = key[:-len('decor_matrix')]
        spatial = folded.pop(prefix + 'decor_spatial', None)
        folded[prefix + 'weight'] = fused_weight(folded[prefix + 'weight'], folded.pop(key), spatial)
    return folded


def fill_decor_matrices(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Complete a plain (or folded) state dict for DBP `model`: every missing `<layer>.decor_matrix` (and kron
    `.decor_spatial`) becomes I, so plain timm / torchvision weights load into the DBP twin unchanged."""
    state_dict = dict(state_dict)
    for name, layer in decor_layers(model):
        for buffer_name in ('decor_matrix', 'decor_spatial'):
            key = f'{name}.{buffer_name}'
            buffer = getattr(layer, buffer_name)
            if key not in state_dict and buffer.numel():
                state_dict[key] = identity_factor(buffer.shape, dtype=layer.weight.dtype)
    return state_dict
