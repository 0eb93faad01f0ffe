""" DBP ConvNeXt: timm's ConvNeXt, every Conv2d / Linear a DBP layer (see `._twin`), so at R = I
a model computes exactly what its timm twin computes.

Depthwise 7x7 convs get one R shared by all channels (d = 49: the channel factor is 1 x 1, the spatial one 49 x 49);
the MLPs' Linear layers (channels-last tokens, (B, H, W, C)) or 1x1 convs (conv_mlp) get a full C x C R, block-diagonal
(blocks of at most 256 channels, `WIDE_TWIN_ARGS`) by default in ConvNeXt-Tiny and larger, whose MLPs see 3072+
channels; `dbp_block_size=0` gives them dense R's.
Pretrained tags are timm's BP weights with R = I.

Papers:
    A ConvNet for the 2020s - https://arxiv.org/abs/2201.03545
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from ._twin import build_dbp_twin, twin_cfg, twin_class, wide_twin_kwargs

__all__ = ['DBPConvNeXt']  # model_registry will add each entrypoint fn to this

DBPConvNeXt = twin_class(ConvNeXt)  # the class of every dbp_ model of this family


def _create(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXt:
    return build_dbp_twin(
        variant, pretrained, timm_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True), **kwargs)


default_cfgs = generate_default_cfgs({
    'dbp_convnext_atto.d2_in1k': twin_cfg('convnext_atto.d2_in1k'),
    'dbp_convnext_femto.d1_in1k': twin_cfg('convnext_femto.d1_in1k'),
    'dbp_convnext_pico.d1_in1k': twin_cfg('convnext_pico.d1_in1k'),
    'dbp_convnext_nano.in12k_ft_in1k': twin_cfg('convnext_nano.in12k_ft_in1k'),
    'dbp_convnext_tiny.in12k_ft_in1k': twin_cfg('convnext_tiny.in12k_ft_in1k'),
    'dbp_convnext_tiny.fb_in1k': twin_cfg('convnext_tiny.fb_in1k'),
    'dbp_convnext_small.in12k_ft_in1k': twin_cfg('convnext_small.in12k_ft_in1k'),
    'dbp_convnext_base.fb_in22k_ft_in1k': twin_cfg('convnext_base.fb_in22k_ft_in1k'),
    'dbp_test_convnext.r160_in1k': twin_cfg('test_convnext.r160_in1k'),
})


@register_model
def dbp_convnext_atto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Atto."""
    return _create('dbp_convnext_atto', pretrained, **kwargs)


@register_model
def dbp_convnext_femto(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Femto."""
    return _create('dbp_convnext_femto', pretrained, **kwargs)


@register_model
def dbp_convnext_pico(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Pico."""
    return _create('dbp_convnext_pico', pretrained, **kwargs)


@register_model
def dbp_convnext_nano(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Nano."""
    return _create('dbp_convnext_nano', pretrained, **kwargs)


@register_model
def dbp_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Tiny."""
    return _create('dbp_convnext_tiny', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_convnext_small(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Small."""
    return _create('dbp_convnext_small', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_convnext_base(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP ConvNeXt-Base."""
    return _create('dbp_convnext_base', pretrained, **wide_twin_kwargs(kwargs))


@register_model
def dbp_test_convnext(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """DBP tiny ConvNeXt for tests (the twin of timm's test_convnext)."""
    return _create('dbp_test_convnext', pretrained, **kwargs)
