""" DBP MobileNet-V3: timm's MobileNetV3, every Conv2d / Linear a DBP layer (see `._twin`), so at R = I
a model computes exactly what its timm twin computes.

Depthwise convs get one R shared by all channels (d = k * k); pointwise, squeeze-excitation and the 1x1 head conv
(on pooled features) a full C x C R. Pretrained tags are timm's BP weights with R = I.

Papers:
    Searching for MobileNetV3 - https://arxiv.org/abs/1905.02244
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.mobilenetv3 import MobileNetV3

from ._twin import build_dbp_twin, twin_cfg, twin_class

__all__ = ['DBPMobileNetV3']  # model_registry will add each entrypoint fn to this

DBPMobileNetV3 = twin_class(MobileNetV3)  # the class of every dbp_ model of this family


def _create(variant: str, pretrained: bool = False, **kwargs) -> MobileNetV3:
    return build_dbp_twin(variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    'dbp_mobilenetv3_small_050.lamb_in1k': twin_cfg('mobilenetv3_small_050.lamb_in1k'),
    'dbp_mobilenetv3_small_075.lamb_in1k': twin_cfg('mobilenetv3_small_075.lamb_in1k'),
    'dbp_mobilenetv3_small_100.lamb_in1k': twin_cfg('mobilenetv3_small_100.lamb_in1k'),
    'dbp_mobilenetv3_large_100.ra_in1k': twin_cfg('mobilenetv3_large_100.ra_in1k'),
})


@register_model
def dbp_mobilenetv3_small_050(pretrained: bool = False, **kwargs) -> MobileNetV3:
    """DBP MobileNet-V3 Small 0.5."""
    return _create('dbp_mobilenetv3_small_050', pretrained, **kwargs)


@register_model
def dbp_mobilenetv3_small_075(pretrained: bool = False, **kwargs) -> MobileNetV3:
    """DBP MobileNet-V3 Small 0.75."""
    return _create('dbp_mobilenetv3_small_075', pretrained, **kwargs)


@register_model
def dbp_mobilenetv3_small_100(pretrained: bool = False, **kwargs) -> MobileNetV3:
    """DBP MobileNet-V3 Small 1.0."""
    return _create('dbp_mobilenetv3_small_100', pretrained, **kwargs)


@register_model
def dbp_mobilenetv3_large_100(pretrained: bool = False, **kwargs) -> MobileNetV3:
    """DBP MobileNet-V3 Large 1.0."""
    return _create('dbp_mobilenetv3_large_100', pretrained, **kwargs)
