""" DBP ResNets: timm's ResNet with decorrelated convolutions and classifier

The architecture is timm's own `ResNet` (timm.models.resnet, itself from torchvision, BSD-3), built by timm's
entrypoint of the same name without `dbp_`; every Conv2d and the classifier become DBP layers (see `._twin`), so at
R = I a model computes exactly what its timm twin computes, and `timm_dbp.fold(model)` returns weights that load
into the twin.

Papers:
    Deep Residual Learning for Image Recognition - https://arxiv.org/abs/1512.03385
    Bag of Tricks (ResNet-D) - https://arxiv.org/abs/1812.01187
    Aggregated Residual Transformations (ResNeXt) - https://arxiv.org/abs/1611.05431
    Wide Residual Networks - https://arxiv.org/abs/1605.07146
    Squeeze-and-Excitation Networks - https://arxiv.org/abs/1709.01507
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385

The bottleneck ResNets (ResNet-50 and larger, ResNet-D, ResNeXt, Wide ResNet, SE-ResNet), whose 1x1 convs see up to
2048 channels, hold R's over more than 256 channels as blocks of at most 256 by default (`WIDE_TWIN_ARGS`;
`dbp_block_size=0` gives dense R's). ResNet-18 / 34 keep dense R's, and by default (`BASIC_RESNET_TWIN_ARGS`, measured
on resnet18) keep layer4's 512 x 512 x 3 x 3 convs plain and give the 3x3 convs fed 256 channels a channel R instead
of a kron one (`dbp_max_dim=0 dbp_kron_max_dim=0`: every layer, kron R throughout).

Pretrained tags are timm's published BP weights for the twin (e.g. `dbp_resnet18.a1_in1k` loads
`timm/resnet18.a1_in1k`) with R = I: a DBP fine-tuning start, identical outputs to the BP model.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import ResNet

from ._twin import BASIC_RESNET_TWIN_ARGS, build_dbp_twin, twin_cfg, twin_class, twin_kwargs, wide_twin_kwargs

__all__ = ['DBPResNet']  # model_registry will add each entrypoint fn to this

DBPResNet = twin_class(ResNet)  # the class of every dbp_ model of this family


default_cfgs = generate_default_cfgs({
    # ResNet (timm's A1 / A1h recipe BP weights, R = I)
    'dbp_resnet18.a1_in1k': twin_cfg('resnet18.a1_in1k'),
    'dbp_resnet34.a1_in1k': twin_cfg('resnet34.a1_in1k'),
    'dbp_resnet50.a1_in1k': twin_cfg('resnet50.a1_in1k'),
    'dbp_resnet101.a1h_in1k': twin_cfg('resnet101.a1h_in1k'),
    'dbp_resnet152.a1h_in1k': twin_cfg('resnet152.a1h_in1k'),

    # ResNet-D (timm's RA2 recipe BP weights, R = I)
    'dbp_resnet18d.ra2_in1k': twin_cfg('resnet18d.ra2_in1k'),
    'dbp_resnet34d.ra2_in1k': twin_cfg('resnet34d.ra2_in1k'),
    'dbp_resnet50d.ra2_in1k': twin_cfg('resnet50d.ra2_in1k'),
    'dbp_resnet101d.ra2_in1k': twin_cfg('resnet101d.ra2_in1k'),
    'dbp_resnet152d.ra2_in1k': twin_cfg('resnet152d.ra2_in1k'),

    # ResNeXt, Wide ResNet, SE-ResNet
    'dbp_resnext50_32x4d.a1h_in1k': twin_cfg('resnext50_32x4d.a1h_in1k'),
    'dbp_wide_resnet50_2.racm_in1k': twin_cfg('wide_resnet50_2.racm_in1k'),
    'dbp_seresnet50.a1_in1k': twin_cfg('seresnet50.a1_in1k'),

    # tiny model for tests
    'dbp_test_resnet.r160_in1k': twin_cfg('test_resnet.r160_in1k'),
})


@register_model
def dbp_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-18."""
    return build_dbp_twin('dbp_resnet18', pretrained, **twin_kwargs(BASIC_RESNET_TWIN_ARGS, kwargs))


@register_model
def dbp_resnet34(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-34."""
    return build_dbp_twin('dbp_resnet34', pretrained, **twin_kwargs(BASIC_RESNET_TWIN_ARGS, kwargs))


@register_model
def dbp_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-50."""
    return build_dbp_twin('dbp_resnet50', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_resnet101(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-101."""
    return build_dbp_twin('dbp_resnet101', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_resnet152(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-152."""
    return build_dbp_twin('dbp_resnet152', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_resnet18d(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-18-D (deep stem, average-pool downsample)."""
    return build_dbp_twin('dbp_resnet18d', pretrained, **twin_kwargs(BASIC_RESNET_TWIN_ARGS, kwargs))


@register_model
def dbp_resnet34d(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-34-D (deep stem, average-pool downsample)."""
    return build_dbp_twin('dbp_resnet34d', pretrained, **twin_kwargs(BASIC_RESNET_TWIN_ARGS, kwargs))


@register_model
def dbp_resnet50d(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-50-D (deep stem, average-pool downsample)."""
    return build_dbp_twin('dbp_resnet50d', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_resnet101d(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-101-D (deep stem, average-pool downsample)."""
    return build_dbp_twin('dbp_resnet101d', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_resnet152d(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNet-152-D (deep stem, average-pool downsample)."""
    return build_dbp_twin('dbp_resnet152d', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_resnext50_32x4d(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP ResNeXt50-32x4d (grouped 3x3 convs)."""
    return build_dbp_twin('dbp_resnext50_32x4d', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_wide_resnet50_2(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP Wide ResNet-50-2."""
    return build_dbp_twin('dbp_wide_resnet50_2', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_seresnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP SE-ResNet-50 (squeeze-excitation 1x1 convs)."""
    return build_dbp_twin('dbp_seresnet50', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_test_resnet(pretrained: bool = False, **kwargs) -> ResNet:
    """DBP tiny ResNet for tests (the twin of timm's test_resnet)."""
    return build_dbp_twin('dbp_test_resnet', pretrained, **kwargs)
