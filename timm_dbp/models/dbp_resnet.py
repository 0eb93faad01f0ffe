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
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from timm_dbp.layers import DEFAULT_STRUCTURE, DecorLinear, decorrelate, fill_decor_matrices

from ._pretrained import PretrainedWeightsError, build_dbp_model, check_pretrained_fits, fold_adapted_input_convs

__all__ = ['DBPResNet']  # model_registry will add each entrypoint fn to this


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
            dbp_structure: str = DEFAULT_STRUCTURE,
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


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Pretrained weights for a DBP model: plain timm / torchvision ResNet weights or folded DBP ones get R = I, DBP
    weights keep their R; weights that do not fit raise PretrainedWeightsError naming the file and the key."""
    state_dict = dict(state_dict.get('state_dict', state_dict))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    state_dict = fold_adapted_input_convs(state_dict, model, cfg)
    state_dict = fill_decor_matrices(state_dict, model)
    check_pretrained_fits(state_dict, model, cfg)
    return state_dict


def _create_dbp_resnet(variant: str, pretrained: bool = False, **kwargs) -> DBPResNet:
    return build_dbp_model(DBPResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


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
