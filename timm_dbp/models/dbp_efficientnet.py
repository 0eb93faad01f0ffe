""" DBP EfficientNet: timm's EfficientNet, every Conv2d / Linear a DBP layer (see `._twin`), so at R = I
a model computes exactly what its timm twin computes.

Depthwise convs get one R shared by all channels (d = k * k); the pointwise convs and the squeeze-excitation 1x1
convs (on pooled features) a full C x C R. Pretrained tags are timm's BP weights with R = I.

Papers:
    EfficientNet: Rethinking Model Scaling for CNNs - https://arxiv.org/abs/1905.11946
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.efficientnet import EfficientNet

from ._twin import build_dbp_twin, twin_cfg, twin_class

__all__ = ['DBPEfficientNet']  # model_registry will add each entrypoint fn to this

DBPEfficientNet = twin_class(EfficientNet)  # the class of every dbp_ model of this family


def _create(variant: str, pretrained: bool = False, **kwargs) -> EfficientNet:
    return build_dbp_twin(variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    'dbp_efficientnet_b0.ra_in1k': twin_cfg('efficientnet_b0.ra_in1k'),
    'dbp_efficientnet_b1.ft_in1k': twin_cfg('efficientnet_b1.ft_in1k'),
    'dbp_efficientnet_b2.ra_in1k': twin_cfg('efficientnet_b2.ra_in1k'),
    'dbp_efficientnet_b3.ra2_in1k': twin_cfg('efficientnet_b3.ra2_in1k'),
    'dbp_test_efficientnet.r160_in1k': twin_cfg('test_efficientnet.r160_in1k'),
})


@register_model
def dbp_efficientnet_b0(pretrained: bool = False, **kwargs) -> EfficientNet:
    """DBP EfficientNet-B0."""
    return _create('dbp_efficientnet_b0', pretrained, **kwargs)


@register_model
def dbp_efficientnet_b1(pretrained: bool = False, **kwargs) -> EfficientNet:
    """DBP EfficientNet-B1."""
    return _create('dbp_efficientnet_b1', pretrained, **kwargs)


@register_model
def dbp_efficientnet_b2(pretrained: bool = False, **kwargs) -> EfficientNet:
    """DBP EfficientNet-B2."""
    return _create('dbp_efficientnet_b2', pretrained, **kwargs)


@register_model
def dbp_efficientnet_b3(pretrained: bool = False, **kwargs) -> EfficientNet:
    """DBP EfficientNet-B3."""
    return _create('dbp_efficientnet_b3', pretrained, **kwargs)


@register_model
def dbp_test_efficientnet(pretrained: bool = False, **kwargs) -> EfficientNet:
    """DBP tiny EfficientNet for tests (the twin of timm's test_efficientnet)."""
    return _create('dbp_test_efficientnet', pretrained, **kwargs)
