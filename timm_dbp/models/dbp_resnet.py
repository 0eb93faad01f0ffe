""" DBP ResNets: timm's ResNet with decorrelated convolutions and classifier

The architecture is timm's own `ResNet` (timm.models.resnet, itself from torchvision, BSD-3); every Conv2d
and the classifier become DBP layers (`timm_dbp.decorrelate`), so at R = I a model computes exactly
what its timm twin computes, and `timm_dbp.fold(model)` returns weights that load into the twin.

Papers:
    Deep Residual Learning for Image Recognition - https://arxiv.org/abs/1512.03385
    Bag of Tricks (ResNet-D) - https://arxiv.org/abs/1812.01187
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385

Pretrained tags are timm's published BP weights for the twin (e.g. `dbp_resnet18.a1_in1k` loads
`timm/resnet18.a1_in1k`) with R = I: a DBP fine-tuning start, identical outputs to the BP model.
"""
import dataclasses
import os
import traceback
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from timm.models import (
    build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model, resolve_pretrained_cfg)
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from timm_dbp.layers import DecorLinear, decorrelate, fill_decor_matrices, fused_weight

__all__ = ['DBPResNet', 'PretrainedWeightsError']  # model_registry will add each entrypoint fn to this


class DBPResNet(ResNet):
    """timm ResNet whose Conv2d / Linear layers are DBP layers (R starts as the identity).

    Takes every `ResNet` argument, plus:
        dbp_exclude: fnmatch patterns of module names to keep plain (e.g. ['conv1']).
        dbp_max_dim: keep layers with input dimension d above this plain (bounds R's memory and cost).
        dbp_linear: decorrelate the classifier too.
        dbp_structure: R of the convs, 'full', 'channel' or 'kron' (see `timm_dbp.decorrelate`).
    """

    def __init__(
            self,
            *args,
            dbp_exclude: Sequence[str] = (),
            dbp_max_dim: Optional[int] = None,
            dbp_linear: bool = True,
            dbp_structure: str = 'full',
            **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.dbp_args = dict(
            exclude=tuple(dbp_exclude), max_dim=dbp_max_dim, linear=dbp_linear, structure=dbp_structure)
        decorrelate(self, **self.dbp_args)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """As ResNet's, and the new classifier is a DBP layer when the old one was."""
        was_dbp = isinstance(self.fc, DecorLinear)
        super().reset_classifier(num_classes, global_pool)
        if was_dbp and isinstance(self.fc, nn.Linear):
            self.fc = DecorLinear.from_linear(self.fc)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that cannot be read or do not fit the model; the message names the file or the key."""


# weight files timm looks for in a local-dir: / hf-hub: folder, most preferred first
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')


def pretrained_source(cfg: Mapping[str, Any]) -> str:
    """Where timm reads the pretrained weights of `cfg` from, as a person can find it: the file, the weights file of a
    `local-dir:` folder, or the `hf-hub:` id with its file in the local cache (timm's order of sources)."""
    source, hub_id, file = cfg.get('source'), cfg.get('hf_hub_id'), cfg.get('file')
    if source == 'local-dir' and file:
        found = [os.path.join(file, name) for name in _WEIGHT_FILES if os.path.isfile(os.path.join(file, name))]
        return found[0] if found else f'local-dir:{file}'
    if source != 'hf-hub' and cfg.get('state_dict') is not None:
        return 'the state_dict in pretrained_cfg'
    if source != 'hf-hub' and file:
        return str(file)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo_id, _, revision = hub_id.partition('@')
        names = [cfg['hf_hub_filename']] if cfg.get('hf_hub_filename') else _WEIGHT_FILES
        for name in names:
            cached = try_to_load_from_cache(repo_id, name, revision=revision or None)
            if isinstance(cached, str):
                return f'hf-hub:{hub_id} ({cached})'
        return f'hf-hub:{hub_id}'
    return str(cfg.get('url') or 'the pretrained weights')


def _r_structure(state_dict: Mapping[str, torch.Tensor], prefix: str) -> str:
    """The R structure a DBP state dict holds for the layer `prefix` (read from the shapes, as fold_state_dict does)."""
    if prefix + 'decor_spatial' in state_dict:
        return 'kron'
    R, weight = state_dict[prefix + 'decor_matrix'], state_dict.get(prefix + 'weight')
    return 'full' if weight is None or R.shape[0] == weight[0].numel() else 'channel'


def _names(value) -> Sequence[str]:
    return [value] if isinstance(value, str) else list(value or ())


def _fold_adapted_input_convs(
        state_dict: Dict[str, torch.Tensor], model: nn.Module, cfg: Mapping[str, Any],
) -> Dict[str, torch.Tensor]:
    """A DBP input conv whose channels timm is about to adapt (in_chans differs): fold its R into W first (W R is what
    the layer applies), so timm adapts W R and the layer restarts from R = I."""
    for name in _names(cfg.get('first_conv')):
        prefix = name + '.'
        weight = state_dict.get(prefix + 'weight')
        if weight is None or weight.ndim != 4 or prefix + 'decor_matrix' not in state_dict:
            continue
        try:
            in_channels = model.get_submodule(name).weight.shape[1]
        except AttributeError:
            continue
        if weight.shape[1] != in_channels:
            state_dict[prefix + 'weight'] = fused_weight(
                weight, state_dict.pop(prefix + 'decor_matrix'), state_dict.pop(prefix + 'decor_spatial', None))
    return state_dict


def check_pretrained_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, cfg: Mapping[str, Any]) -> None:
    """Raise PretrainedWeightsError, naming the weights file and the first wrong key, unless `state_dict` loads into
    `model` the way timm's load_pretrained loads it (classifier dropped when num_classes differs, input conv
    adapted when in_chans differs)."""
    target = model.state_dict()
    skip = {f'{name}.weight' for name in _names(cfg.get('first_conv'))}
    for name in _names(cfg.get('classifier')):
        if cfg.get('num_classes') is not None and getattr(model, 'num_classes', None) != cfg['num_classes']:
            skip |= {k for k in [*state_dict, *target] if k.startswith(name + '.')}
    where = f'{pretrained_source(cfg)} does not fit {cfg.get("architecture") or type(model).__name__}'
    for key, value in state_dict.items():
        if key in skip or key not in target or value.shape == target[key].shape:
            continue
        hint = ''
        if key.endswith(('.decor_matrix', '.decor_spatial')):
            structure = getattr(model, 'dbp_args', {}).get('structure')
            hint = (f' (the weights have a {_r_structure(state_dict, key.rsplit(".", 1)[0] + ".")} R, the model '
                    f'dbp_structure={structure!r}: build it with the dbp_structure the weights were trained with)')
        raise PretrainedWeightsError(
            f'{where}: {key} is {tuple(value.shape)} in the weights but {tuple(target[key].shape)} in the model{hint}')
    unexpected = [k for k in state_dict if k not in target and k not in skip]
    missing = [k for k in target if k not in state_dict and k not in skip]
    if unexpected or missing:
        parts = [f'{label} key(s) {", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""} ({len(keys)})'
                 for label, keys in (('unexpected', unexpected), ('missing', missing)) if keys]
        raise PretrainedWeightsError(f'{where}: {"; ".join(parts)} (weights of another architecture?)')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Pretrained weights for a DBP model: plain timm / torchvision ResNet weights or folded DBP ones get R = I, DBP
    weights keep their R; weights that do not fit raise PretrainedWeightsError naming the file and the key."""
    state_dict = dict(state_dict.get('state_dict', state_dict))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    state_dict = _fold_adapted_input_convs(state_dict, model, cfg)
    state_dict = fill_decor_matrices(state_dict, model)
    check_pretrained_fits(state_dict, model, cfg)
    return state_dict


def raised_while_loading_pretrained(error: BaseException) -> bool:
    """Whether `error` came out of timm's load_pretrained (reading or loading the weights, not building the model)."""
    return any(frame.f_code.co_name == 'load_pretrained' and frame.f_globals.get('__name__') == 'timm.models._builder'
               for frame, _ in traceback.walk_tb(error.__traceback__))


def _create_dbp_resnet(variant: str, pretrained: bool = False, **kwargs) -> DBPResNet:
    try:
        return build_model_with_cfg(
            DBPResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    except PretrainedWeightsError:
        raise
    except Exception as e:  # a truncated, corrupt or missing weights file: say which file
        if not pretrained or not raised_while_loading_pretrained(e):
            raise
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        message = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        raise PretrainedWeightsError(
            f'cannot load pretrained weights for {variant} from {pretrained_source(cfg.to_dict())}: {message}') from e


def _twin_cfg(timm_name: str, **kwargs) -> Dict[str, Any]:
    """The pretrained cfg of timm's `arch.tag` as data for its DBP twin (same weights, hub id and transforms)."""
    cfg = {k: v for k, v in dataclasses.asdict(get_pretrained_cfg(timm_name)).items() if v is not None}
    for key in ('architecture', 'tag'):
        cfg.pop(key, None)
    return {**cfg, **kwargs}


default_cfgs = generate_default_cfgs({
    # ResNet (timm's A1 / A1h recipe BP weights, R = I)
    'dbp_resnet18.a1_in1k': _twin_cfg('resnet18.a1_in1k'),
    'dbp_resnet34.a1_in1k': _twin_cfg('resnet34.a1_in1k'),
    'dbp_resnet50.a1_in1k': _twin_cfg('resnet50.a1_in1k'),
    'dbp_resnet101.a1h_in1k': _twin_cfg('resnet101.a1h_in1k'),
    'dbp_resnet152.a1h_in1k': _twin_cfg('resnet152.a1h_in1k'),

    # ResNet-D (timm's RA2 recipe BP weights, R = I)
    'dbp_resnet18d.ra2_in1k': _twin_cfg('resnet18d.ra2_in1k'),
    'dbp_resnet34d.ra2_in1k': _twin_cfg('resnet34d.ra2_in1k'),
    'dbp_resnet50d.ra2_in1k': _twin_cfg('resnet50d.ra2_in1k'),
    'dbp_resnet101d.ra2_in1k': _twin_cfg('resnet101d.ra2_in1k'),
    'dbp_resnet152d.ra2_in1k': _twin_cfg('resnet152d.ra2_in1k'),

    # tiny model for tests
    'dbp_test_resnet.r160_in1k': _twin_cfg('test_resnet.r160_in1k'),
})

_RESNET_D = dict(stem_width=32, stem_type='deep', avg_down=True)


@register_model
def dbp_resnet18(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-18."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_dbp_resnet('dbp_resnet18', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet34(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-34."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3))
    return _create_dbp_resnet('dbp_resnet34', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet50(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-50."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_dbp_resnet('dbp_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet101(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-101."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3))
    return _create_dbp_resnet('dbp_resnet101', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet152(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-152."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3))
    return _create_dbp_resnet('dbp_resnet152', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet18d(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-18-D (deep stem, average-pool downsample)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), **_RESNET_D)
    return _create_dbp_resnet('dbp_resnet18d', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet34d(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-34-D (deep stem, average-pool downsample)."""
    model_args = dict(block=BasicBlock, layers=(3, 4, 6, 3), **_RESNET_D)
    return _create_dbp_resnet('dbp_resnet34d', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet50d(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-50-D (deep stem, average-pool downsample)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), **_RESNET_D)
    return _create_dbp_resnet('dbp_resnet50d', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet101d(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-101-D (deep stem, average-pool downsample)."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 23, 3), **_RESNET_D)
    return _create_dbp_resnet('dbp_resnet101d', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_resnet152d(pretrained: bool = False, **kwargs) -> DBPResNet:
    """DBP ResNet-152-D (deep stem, average-pool downsample)."""
    model_args = dict(block=Bottleneck, layers=(3, 8, 36, 3), **_RESNET_D)
    return _create_dbp_resnet('dbp_resnet152d', pretrained, **dict(model_args, **kwargs))


@register_model
def dbp_test_resnet(pretrained: bool = False, **kwargs) -> DBPResNet:
    """Tiny DBP ResNet for tests (the twin of timm's test_resnet)."""
    model_args = dict(
        block=[BasicBlock, BasicBlock, Bottleneck, BasicBlock], layers=(1, 1, 1, 1),
        stem_width=16, stem_type='deep', avg_down=True, channels=(32, 48, 48, 96))
    return _create_dbp_resnet('dbp_test_resnet', pretrained, **dict(model_args, **kwargs))
