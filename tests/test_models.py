""" Tests of the registered dbp_ models, decorrelate() on timm models and fold() (timm's own model tests run
separately on the dbp_ models, see scripts/test.sh) """
import argparse
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import load_checkpoint, model_entrypoint
from timm.models._registry import _model_to_module
from timm.utils import ParseKwargs

import timm_dbp
from timm_dbp import DecorConv2d, DecorLinear, decor_layers, fold

DBP_MODELS = timm.list_models('dbp_*')


def _twin(name: str) -> str:
    return name[len('dbp_'):]


def test_names_are_new_and_in_our_module():
    assert len(DBP_MODELS) >= 44
    for name in DBP_MODELS:
        assert _model_to_module[name].startswith('dbp_')
        assert not _model_to_module[_twin(name)].startswith('dbp_')  # the timm twin is still timm's


@pytest.mark.parametrize('name', DBP_MODELS)
def test_every_conv_and_linear_is_dbp_and_cfg_is_complete(name):
    model = timm.create_model(name, num_classes=7, device='meta')
    convs = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    plain = [m for m in convs if not isinstance(m, (DecorConv2d, DecorLinear))]
    max_dim = model.dbp_args['max_dim']  # only layers with an input dimension d = weight[0].numel() above it plain
    assert len(plain) < len(convs) and all(max_dim is not None and m.weight[0].numel() > max_dim for m in plain)
    cfg = model.pretrained_cfg
    for key in ('first_conv', 'classifier'):
        assert f'{cfg[key]}.weight' in model.state_dict()
    assert cfg['hf_hub_id'] == f'timm/{_twin(name)}.{cfg["tag"]}' and cfg['architecture'] == name
    timm_cfg = timm.models.get_pretrained_cfg(f'{_twin(name)}.{cfg["tag"]}').to_dict()
    assert {k: v for k, v in cfg.items() if k not in ('architecture', 'tag')} == \
        {k: v for k, v in timm_cfg.items() if k not in ('architecture', 'tag')}


def test_identity_R_matches_timm_twin_and_loads_plain_weights(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model('test_resnet', num_classes=5).eval()
    path = tmp_path / 'plain.pth'
    torch.save(plain.state_dict(), path)
    dbp = timm.create_model(
        'dbp_test_resnet', pretrained=True, num_classes=5,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(dbp(x), plain(x))
    assert all(torch.equal(layer.decor_matrix, torch.eye(len(layer.decor_matrix))) for _, layer in decor_layers(dbp))


def test_trained_then_folded_loads_into_timm_resnet():
    torch.manual_seed(0)
    model = timm.create_model('dbp_test_resnet', num_classes=3)
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.05, decor_lr=1e-2)
    for step in range(3):
        x = torch.randn(4, 3, 32, 32)
        F.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(layer.decor_matrix, torch.eye(layer.decor_dim)) for _, layer in decor_layers(model))
    model.eval()
    x = torch.randn(2, 3, 48, 48)
    expected = model(x)
    folded = fold(copy.deepcopy(model))
    plain = timm.create_model('test_resnet', num_classes=3).eval()
    plain.load_state_dict(folded.state_dict())  # strict: same keys, no DBP buffers left
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)


def test_dbp_checkpoint_round_trip_keeps_R(tmp_path):
    model = timm.create_model('dbp_test_resnet', num_classes=3)
    for _, layer in decor_layers(model):
        layer.decor_matrix.add_(0.01)
    path = tmp_path / 'dbp.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model('dbp_test_resnet', num_classes=3)
    load_checkpoint(loaded, str(path))
    for (name, a), (_, b) in zip(decor_layers(model), decor_layers(loaded)):
        assert torch.equal(a.decor_matrix, b.decor_matrix), name


@pytest.mark.parametrize('name', ['resnet50', 'convnext_atto', 'efficientnet_b0', 'vit_tiny_patch16_224'])
def test_decorrelate_any_timm_model_keeps_its_function(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3).eval()
    size = 224 if name.startswith('vit') else 64
    x = torch.randn(1, 3, size, size)
    expected = model(x)
    dbp = timm_dbp.decorrelate(model)
    assert len(list(decor_layers(dbp))) > 0
    torch.testing.assert_close(dbp(x), expected, rtol=0, atol=0)


def test_reset_classifier_keeps_dbp_head_and_pooling():
    model = timm.create_model('dbp_test_resnet', num_classes=3, global_pool='max')
    model.reset_classifier(10)
    assert isinstance(model.fc, DecorLinear) and model.fc.out_features == 10
    assert model.global_pool.pool_type == 'max'
    model.reset_classifier(0)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


def test_options_and_unknown_kwargs():
    model = timm.create_model('dbp_resnet18', dbp_exclude=['conv1', 'fc'], dbp_max_dim=1152, device='meta')
    assert type(model.conv1) is torch.nn.Conv2d and type(model.fc) is torch.nn.Linear
    assert type(model.layer4[0].conv2) is torch.nn.Conv2d  # d = 512 * 9 > 1152
    assert isinstance(model.layer2[0].conv1, DecorConv2d)  # d = 64 * 9
    with pytest.raises(TypeError):
        timm.create_model('dbp_test_resnet', not_an_arg=1)


def test_dbp_kron_max_dim_from_model_kwargs():
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    kwargs = parser.parse_args(['--model-kwargs', 'dbp_kron_max_dim=2304', 'dbp_max_dim=0']).model_kwargs
    model = timm.create_model('dbp_resnet18', device='meta', **kwargs)
    structure = {n: m.decor_structure for n, m in decor_layers(model)}
    assert structure['layer3.0.conv2'] == structure['layer4.0.conv1'] == 'kron'  # d = 256 * 9
    assert structure['layer4.0.conv2'] == structure['layer4.1.conv2'] == 'channel'  # d = 512 * 9
    assert structure['layer4.0.downsample.0'] == 'full'  # a 1x1 conv: R_c is its full R
    assert model.dbp_args['kron_max_dim'] == 2304 and model.dbp_args['max_dim'] is None
    model.reset_classifier(3)
    assert model.fc.decor_structure == 'full'
    with pytest.raises(ValueError, match='kron_max_dim'):
        timm.create_model('dbp_resnet18', device='meta', dbp_structure='channel', dbp_kron_max_dim=1152)


def test_dbp_exclude_as_a_string_is_one_pattern_or_a_comma_list():
    # --model-kwargs dbp_exclude=layer4.* passes a str: it must not become the patterns 'l', 'a', ..., '*' (all layers)
    parser = argparse.ArgumentParser()
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    kwargs = parser.parse_args(['--model-kwargs', 'dbp_exclude=layer4.*']).model_kwargs
    names = [n for n, _ in decor_layers(timm.create_model('dbp_resnet18', device='meta', **kwargs))]
    assert len(names) == 16 and not any(n.startswith('layer4') for n in names) and 'fc' in names
    names = [n for n, _ in decor_layers(timm.create_model('dbp_resnet18', device='meta', dbp_exclude='layer4.*, fc'))]
    assert len(names) == 15 and 'fc' not in names
    with pytest.raises(TypeError, match='dbp_exclude'):
        timm.create_model('dbp_resnet18', device='meta', dbp_exclude=[4])


@pytest.mark.parametrize('kwargs', [
    {}, dict(dbp_structure='full'), dict(dbp_exclude='layer4.*, fc', dbp_max_dim=1152, dbp_linear=False),
    dict(dbp_kron_max_dim=1152, dbp_block_size=128)])
def test_dbp_model_kwargs_build_the_same_model_again(kwargs):
    """dbp_model_kwargs(model.dbp_args) (what the Hub config pins) is the inverse of pop_dbp_args, and names every
    argument, defaults included."""
    model = timm.create_model('dbp_resnet18', device='meta', **kwargs)
    pinned = timm_dbp.dbp_model_kwargs(model.dbp_args)
    assert pinned['dbp_structure'] == kwargs.get('dbp_structure', 'kron')
    assert set(pinned) == {'dbp_exclude', 'dbp_max_dim', 'dbp_linear', 'dbp_structure', 'dbp_kron_max_dim',
                           'dbp_block_size'}
    again = timm.create_model('dbp_resnet18', device='meta', **pinned)
    assert again.dbp_args == model.dbp_args
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name, blocks', [
    ('dbp_resnet18', None), ('dbp_resnet34', None), ('dbp_resnet50', 256), ('dbp_resnet101d', 256),
    ('dbp_wide_resnet50_2', 256), ('dbp_resnext50_32x4d', 256), ('dbp_seresnet50', 256), ('dbp_convnext_atto', None),
    ('dbp_convnext_tiny', 256), ('dbp_convnext_base', 256), ('dbp_efficientnet_b0', None)])
def test_wide_twins_default_to_blocks_of_256_and_0_gives_dense_r(name, blocks):
    model = timm.create_model(name, device='meta')
    assert model.dbp_args['block_size'] == blocks
    widest = max(layer.decor_blocks for _, layer in decor_layers(model))
    assert (widest > 1) == (blocks is not None)
    dense = timm.create_model(name, device='meta', dbp_block_size=0)  # None would be dropped by timm.create_model
    assert dense.dbp_args['block_size'] is None
    assert all(layer.decor_blocks == 1 for _, layer in decor_layers(dense))
    assert timm.create_model(name, device='meta', dbp_block_size=128).dbp_args['block_size'] == 128


@pytest.mark.parametrize('name', ['dbp_resnet50', 'dbp_convnext_tiny', 'dbp_resnet18'])
@pytest.mark.parametrize('kwarg', ['dbp_block_size', 'dbp_max_dim', 'dbp_kron_max_dim'])
def test_size_kwarg_none_means_the_default_through_timm_and_the_entrypoint(name, kwarg):
    via_timm = timm.create_model(name, device='meta', **{kwarg: None})  # timm drops None kwargs
    direct = model_entrypoint(name)(device='meta', **{kwarg: None})
    default = timm.create_model(name, device='meta')
    assert via_timm.dbp_args == direct.dbp_args == default.dbp_args


@pytest.mark.parametrize('name', ['dbp_resnet18', 'dbp_resnet34', 'dbp_resnet18d', 'dbp_resnet34d'])
def test_basic_resnet_twins_keep_layer4_3x3_convs_plain_and_0_gives_every_layer_kron(name):
    model = timm.create_model(name, device='meta')
    assert model.dbp_args['max_dim'] == 2304 and model.dbp_args['kron_max_dim'] == 1152
    structure = {n: m.decor_structure for n, m in decor_layers(model)}
    last = len(model.layer4) - 1
    assert type(model.layer4[0].conv2) is torch.nn.Conv2d and type(model.layer4[last].conv2) is torch.nn.Conv2d
    assert not any(n.startswith('layer4') and n.endswith('conv2') for n in structure)  # d = 512 * 9 > 2304
    assert structure['layer3.0.conv1'] == 'kron'  # d = 128 * 9
    assert structure['layer3.0.conv2'] == structure['layer4.0.conv1'] == 'channel'  # d = 256 * 9
    assert {structure[n] for n in structure if 'downsample' in n} == {'full'}  # 1x1 convs
    assert structure['fc'] == 'full'
    every = timm.create_model(name, device='meta', dbp_max_dim=0, dbp_kron_max_dim=0)
    assert every.dbp_args['max_dim'] is None and every.dbp_args['kron_max_dim'] is None
    convs = [m for m in every.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(isinstance(m, DecorConv2d) for m in convs)
    assert {m.decor_structure for m in convs if m.kernel_size != (1, 1)} == {'kron'}
    # another structure keeps the layer rule, without the kron-only one
    full = timm.create_model(name, device='meta', dbp_structure='full')
    assert full.dbp_args['max_dim'] == 2304 and full.dbp_args['kron_max_dim'] is None
    assert type(full.layer4[0].conv2) is torch.nn.Conv2d
    assert full.layer3[0].conv2.decor_structure == 'full'


def test_features_only_and_forward_head():
    model = timm.create_model('dbp_test_resnet', features_only=True, out_indices=(1, 3))
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert any(isinstance(m, DecorConv2d) for m in model.modules())
    full = timm.create_model('dbp_test_resnet', num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(full.forward_head(full.forward_features(x)), full(x))
    assert full.forward_head(full.forward_features(x), pre_logits=True).shape == (1, full.num_features)


def test_torchscript_inference():
    model = timm.create_model('dbp_test_resnet', num_classes=3)
    timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.01)  # arms the layers
    for _, layer in decor_layers(model):
        layer.decor_matrix.add_(0.01)
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    scripted(x)  # an armed training forward runs (sampling is an ignored Python call)
    model.eval()
    scripted.eval()
    torch.testing.assert_close(scripted(x), model(x))


def test_weights_with_r_on_every_layer_name_the_options_that_load_them(tmp_path):
    """dbp_resnet18 weights with kron R on every layer (its default before BENCHMARKS 48) into today's default, which
    keeps layer4's 3x3 convs plain and gives layer3's a channel R: the error names the options; with them they load."""
    every = dict(dbp_max_dim=0, dbp_kron_max_dim=0)
    trained = timm.create_model('dbp_resnet18', num_classes=3, **every)
    for _, layer in decor_layers(trained):
        layer.decor_matrix.mul_(0.5)
    path = tmp_path / 'every_layer.pth'
    torch.save(trained.state_dict(), path)
    overlay = dict(file=str(path), num_classes=3)
    with pytest.raises(timm_dbp.models.PretrainedWeightsError,
                       match=r'R in 3 layer\(s\) the model keeps plain, e\.g\. layer4\.0\.conv2; .*dbp_max_dim=2304'):
        timm.create_model('dbp_resnet18', pretrained=True, num_classes=3, pretrained_cfg_overlay=overlay)
    # no layer plain: the kron R's of layer3's convs against the model's channel R's, named by dbp_kron_max_dim
    with pytest.raises(timm_dbp.models.PretrainedWeightsError,
                       match=r'layer3\.0\.conv2\.decor_spatial.*a kron R, .*dbp_kron_max_dim=1152'):
        timm.create_model('dbp_resnet18', pretrained=True, num_classes=3, pretrained_cfg_overlay=overlay,
                          dbp_max_dim=0)
    loaded = timm.create_model('dbp_resnet18', pretrained=True, num_classes=3, pretrained_cfg_overlay=overlay, **every)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x))
