""" DBP RegNet: timm's RegNet, every Conv2d / Linear a DBP layer (see `._twin`), so at R = I
a model computes exactly what its timm twin computes.

Grouped 3x3 convs get one R per group size, shared by the groups (d = group width * 9).
Pretrained tags are timm's BP weights with R = I.

Papers:
    Designing Network Design Spaces - https://arxiv.org/abs/2003.13678
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.regnet import RegNet, _filter_fn

from ._twin import build_dbp_twin, twin_cfg, twin_class

__all__ = ['DBPRegNet']  # model_registry will add each entrypoint fn to this

DBPRegNet = twin_class(RegNet)  # the class of every dbp_ model of this family


def _create(variant: str, pretrained: bool = False, **kwargs) -> RegNet:
    return build_dbp_twin(variant, pretrained, timm_filter_fn=_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    'dbp_regnetx_002.pycls_in1k': twin_cfg('regnetx_002.pycls_in1k'),
    'dbp_regnety_002.pycls_in1k': twin_cfg('regnety_002.pycls_in1k'),
    'dbp_regnety_004.tv2_in1k': twin_cfg('regnety_004.tv2_in1k'),
    'dbp_regnety_008.pycls_in1k': twin_cfg('regnety_008.pycls_in1k'),
    'dbp_regnety_016.tv2_in1k': twin_cfg('regnety_016.tv2_in1k'),
    'dbp_regnety_032.ra_in1k': twin_cfg('regnety_032.ra_in1k'),
})


@register_model
def dbp_regnetx_002(pretrained: bool = False, **kwargs) -> RegNet:
    """DBP RegNetX-200MF."""
    return _create('dbp_regnetx_002', pretrained, **kwargs)


@register_model
def dbp_regnety_002(pretrained: bool = False, **kwargs) -> RegNet:
    """DBP RegNetY-200MF."""
    return _create('dbp_regnety_002', pretrained, **kwargs)


@register_model
def dbp_regnety_004(pretrained: bool = False, **kwargs) -> RegNet:
    """DBP RegNetY-400MF."""
    return _create('dbp_regnety_004', pretrained, **kwargs)


@register_model
def dbp_regnety_008(pretrained: bool = False, **kwargs) -> RegNet:
    """DBP RegNetY-800MF."""
    return _create('dbp_regnety_008', pretrained, **kwargs)


@register_model
def dbp_regnety_016(pretrained: bool = False, **kwargs) -> RegNet:
    """DBP RegNetY-1.6GF."""
    return _create('dbp_regnety_016', pretrained, **kwargs)


@register_model
def dbp_regnety_032(pretrained: bool = False, **kwargs) -> RegNet:
    """DBP RegNetY-3.2GF."""
    return _create('dbp_regnety_032', pretrained, **kwargs)
