""" DBP twins of timm models: timm's own architecture, every Conv2d / Linear a DBP layer, R = I at the start

A twin `dbp_<name>` is built through timm's builder (`build_model_with_cfg`) from timm's own `<name>` entrypoint: the
plain model is built without weights, converted by `timm_dbp.decorrelate` and then, when pretrained, loaded by timm's
`load_pretrained` with the family's filter followed by `dbp_checkpoint_filter`. So plain timm weights load with R = I,
DBP weights keep their R, and features_only / in_chans / num_classes work as they do for the timm model. A family file
holds only data: pretrained cfgs (`twin_cfg`), its timm checkpoint filter and its feature-extraction cfg.
"""
import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from timm.models import get_pretrained_cfg, model_entrypoint

from timm_dbp.layers import DEFAULT_STRUCTURE, decorrelate, fill_decor_matrices

from ._dbp_kwargs import pop_dbp_args
from ._pretrained import build_dbp_model, check_pretrained_fits, fold_adapted_input_convs

__all__ = ['DBPModel', 'WIDE_TWIN_ARGS', 'BASIC_RESNET_TWIN_ARGS', 'twin_kwargs', 'wide_twin_kwargs', 'twin_class',
           'twin_cfg', 'dbp_checkpoint_filter', 'build_dbp_twin']

StateDict = Dict[str, torch.Tensor]

# the defaults of the wide twins (bottleneck ResNets, ConvNeXt-Tiny and larger), whose 1x1 convs / MLPs see 1024+
# channels: R's over more than 256 channels block-diagonal (docs/BENCHMARKS.md sections 41-43: a faster step on all
# eight wide twins measured, e.g. 1.29x instead of 1.65x BP's on resnet50, 1.67x instead of 3.39x on convnext_tiny; as
# or more accurate and sooner to BP-SGD's accuracy on resnet50, convnext_tiny, resnext50_32x4d). dbp_block_size=0: dense
WIDE_TWIN_ARGS: Dict[str, Any] = dict(dbp_block_size=256)

# the defaults of the basic-block ResNets (ResNet-18 / 34 and their -D variants), measured on resnet18 (BENCHMARKS 48):
# layer4's 512 x 512 x 3 x 3 convs kept plain (d = 4608 > 2304) and, with kron R, a channel R in the 3x3 convs fed 256
# channels (d = 2304 > 1152): at 64 px batch 64 the step 1.09x BP's instead of 1.18x, R 2.7 MiB instead of 5.7, as
# accurate as every layer with kron R. dbp_max_dim=0 / dbp_kron_max_dim=0: every layer, kron R at every size
BASIC_RESNET_TWIN_ARGS: Dict[str, Any] = dict(dbp_max_dim=2304, dbp_kron_max_dim=1152)


def twin_kwargs(defaults: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A twin entrypoint's kwargs over its family's `defaults` (dbp_kron_max_dim only where the structure is kron).
    None-valued kwargs are dropped, as timm.create_model drops them, so `dbp_block_size=None` means the model's default
    whether the entrypoint is called directly or through timm (no limit: 0, e.g. dense R's `dbp_block_size=0`)."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if kwargs.get('dbp_structure', DEFAULT_STRUCTURE) != 'kron':
        defaults = {k: v for k, v in defaults.items() if k != 'dbp_kron_max_dim'}
    return {**defaults, **kwargs}


def wide_twin_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A wide twin entrypoint's kwargs over WIDE_TWIN_ARGS (see `twin_kwargs`)."""
    return twin_kwargs(WIDE_TWIN_ARGS, kwargs)


class DBPModel:
    """What every dbp_ model adds to its timm class (a mixin): `dbp_args`, the `decorrelate()` arguments it was
    built with, and a `reset_classifier` whose new classifier is converted by the same rule.

    `DBP<Class>(*args, dbp_exclude=..., dbp_max_dim=..., dbp_linear=..., dbp_structure=..., dbp_kron_max_dim=...,
    dbp_block_size=..., **kwargs)` builds the timm class with its own arguments and converts it; the registered dbp_
    entrypoints build through timm instead."""
    dbp_args: Dict[str, Any]

    def __init__(self, *args, **kwargs):
        dbp_args = pop_dbp_args(kwargs)
        super().__init__(*args, **kwargs)
        self.dbp_args = dbp_args
        decorrelate(self, **dbp_args)

    def reset_classifier(self, *args, **kwargs) -> None:
        super().reset_classifier(*args, **kwargs)
        decorrelate(self, **self.dbp_args)  # converts only the new layers: the others are DBP or kept plain by rule


_TWIN_CLASSES: Dict[type, type] = {}


def twin_class(cls: type) -> type:
    """`DBP<cls>`: the timm model class with DBPModel mixed in, made once per class and kept in this module's
    namespace (so a pickled model finds its class again once the family's module has made it at import)."""
    if cls not in _TWIN_CLASSES:
        name = f'DBP{cls.__name__}'
        if name in globals():
            name = f'DBP{cls.__module__.rsplit(".", 1)[-1]}_{cls.__name__}'
        twin = type(name, (DBPModel, cls), {'__module__': __name__, '__qualname__': name})
        _TWIN_CLASSES[cls] = globals()[name] = twin
    return _TWIN_CLASSES[cls]


def twin_cfg(timm_name: str, **kwargs) -> Dict[str, Any]:
    """The pretrained cfg of timm's `arch.tag` as data for its DBP twin (same weights, hub id and transforms)."""
    cfg = {k: v for k, v in dataclasses.asdict(get_pretrained_cfg(timm_name)).items() if v is not None}
    for key in ('architecture', 'tag'):
        cfg.pop(key, None)
    return {**cfg, **kwargs}


def dbp_checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Pretrained weights for a DBP model: plain timm / torchvision weights or folded DBP ones get R = I, DBP weights
    keep their R; weights that do not fit raise PretrainedWeightsError naming the file and the key."""
    state_dict = dict(state_dict.get('state_dict', state_dict))
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    state_dict = fold_adapted_input_convs(state_dict, model, cfg)
    state_dict = fill_decor_matrices(state_dict, model)
    check_pretrained_fits(state_dict, model, cfg)
    return state_dict


def _then_dbp_filter(family_filter: Optional[Callable]) -> Callable:
    if family_filter is None:
        return dbp_checkpoint_filter
    takes_model = len(inspect.signature(family_filter).parameters) > 1  # timm's filters take (state_dict[, model])

    def _filter(state_dict: StateDict, model: nn.Module) -> StateDict:
        state_dict = family_filter(state_dict, model) if takes_model else family_filter(state_dict)
        return dbp_checkpoint_filter(state_dict, model)
    return _filter


def build_dbp_twin(
        variant: str,
        pretrained: bool = False,
        timm_filter_fn: Optional[Callable] = None,
        feature_cfg: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> nn.Module:
    """Build `dbp_<name>` (the `variant`) as the DBP twin of timm's `<name>`.

    Args:
        variant: The dbp_ model name; its pretrained cfgs are this package's, its architecture timm's `<name>`.
        pretrained: Load the weights of the pretrained cfg (timm's BP weights get R = I).
        timm_filter_fn: The timm family's checkpoint filter (run before `dbp_checkpoint_filter`).
        feature_cfg: The timm family's feature-extraction cfg (for features_only).
        **kwargs: timm's model arguments plus dbp_exclude, dbp_max_dim, dbp_linear, dbp_structure, dbp_kron_max_dim,
            dbp_block_size.
    """
    if not variant.startswith('dbp_'):
        raise ValueError(f'a DBP twin is named dbp_<timm model>, got {variant!r}')
    timm_entrypoint = model_entrypoint(variant[len('dbp_'):])
    dbp_args = pop_dbp_args(kwargs)

    def make_twin(**model_kwargs) -> nn.Module:
        model = timm_entrypoint(pretrained=False, **model_kwargs)
        model.__class__ = twin_class(type(model))  # not re-initialised: converted below
        model.dbp_args = dbp_args
        return decorrelate(model, **dbp_args)

    return build_dbp_model(
        make_twin, variant, pretrained, pretrained_filter_fn=_then_dbp_filter(timm_filter_fn),
        feature_cfg=dict(feature_cfg or {}), **kwargs)

