""" DBP Vision Transformer and DeiT: timm's VisionTransformer, every Conv2d / Linear a DBP layer (see `._twin`), so at
R = I a model computes exactly what its timm twin computes.

What gets an R: the patch embedding (a 16x16 stride-16 conv: kron R = channel 3 x 3 (x) spatial 256 x 256 by default),
and every Linear on tokens (B, N, C): attention qkv and proj, the MLP's fc1 and fc2 (full C x C or 4C x 4C R), and the
classifier. Left as they are (not Conv2d / Linear): norms, the class token, position embeddings.
Pretrained tags are timm's BP weights with R = I.

Papers:
    An Image is Worth 16x16 Words - https://arxiv.org/abs/2010.11929
    Training data-efficient image transformers (DeiT) - https://arxiv.org/abs/2012.12877
    Efficient Deep Learning with Decorrelated Backpropagation - https://arxiv.org/abs/2405.02385
"""
from functools import partial

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ._twin import build_dbp_twin, twin_cfg, twin_class

__all__ = ['DBPVisionTransformer']  # model_registry will add each entrypoint fn to this

DBPVisionTransformer = twin_class(VisionTransformer)  # the class of every dbp_ model of this family

_FEATURES = dict(out_indices=3, feature_cls='getter')


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    return build_dbp_twin(variant, pretrained, timm_filter_fn=checkpoint_filter_fn, feature_cfg=_FEATURES, **kwargs)


def _create_deit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    return build_dbp_twin(
        variant, pretrained, timm_filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True),
        feature_cfg=_FEATURES, **kwargs)


default_cfgs = generate_default_cfgs({
    'dbp_vit_tiny_patch16_224.augreg_in21k_ft_in1k': twin_cfg('vit_tiny_patch16_224.augreg_in21k_ft_in1k'),
    'dbp_vit_small_patch16_224.augreg_in21k_ft_in1k': twin_cfg('vit_small_patch16_224.augreg_in21k_ft_in1k'),
    'dbp_vit_small_patch16_224.augreg_in1k': twin_cfg('vit_small_patch16_224.augreg_in1k'),
    'dbp_vit_base_patch16_224.augreg2_in21k_ft_in1k': twin_cfg('vit_base_patch16_224.augreg2_in21k_ft_in1k'),
    'dbp_vit_base_patch16_224.augreg_in1k': twin_cfg('vit_base_patch16_224.augreg_in1k'),
    'dbp_deit_tiny_patch16_224.fb_in1k': twin_cfg('deit_tiny_patch16_224.fb_in1k'),
    'dbp_deit_small_patch16_224.fb_in1k': twin_cfg('deit_small_patch16_224.fb_in1k'),
    'dbp_deit_base_patch16_224.fb_in1k': twin_cfg('deit_base_patch16_224.fb_in1k'),
    'dbp_test_vit.r160_in1k': twin_cfg('test_vit.r160_in1k'),
})


@register_model
def dbp_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DBP ViT-Tiny/16."""
    return _create('dbp_vit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def dbp_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DBP ViT-Small/16."""
    return _create('dbp_vit_small_patch16_224', pretrained, **kwargs)


@register_model
def dbp_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DBP ViT-Base/16."""
    return _create('dbp_vit_base_patch16_224', pretrained, **kwargs)


@register_model
def dbp_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DBP DeiT-Tiny/16."""
    return _create_deit('dbp_deit_tiny_patch16_224', pretrained, **kwargs)


@register_model
def dbp_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DBP DeiT-Small/16."""
    return _create_deit('dbp_deit_small_patch16_224', pretrained, **kwargs)


@register_model
def dbp_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """DBP DeiT-Base/16."""
    return _create_deit('dbp_deit_base_patch16_224', pretrained, **kwargs)


@register_model
def dbp_test_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny DBP ViT for tests (the twin of timm's test_vit)."""
    return _create('dbp_test_vit', pretrained, **kwargs)
