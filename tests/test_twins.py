""" Every registered dbp_ twin: computes timm's model at R = I from timm's own weights, trains a step with every DBP
optimizer (in CI: every optimizer on the twins up to EVERY_OPTIMIZER_CI_MAX parameters, dbpmuon up to MUON_CI_MAX, the
larger twins with ROUTE_OPTIMIZERS; `-m large` steps all), and folds exactly to the plain timm model """
import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_dbp
from timm_dbp import decor_layers, fold
from timm_dbp.layers import DecorConv2d

DBP_MODELS = timm.list_models('dbp_*')
LARGE = 25_000_000  # parameters; larger twins are marked `large` (left out of CI for time)
# timm's muon orthogonalises in bfloat16: on CPUs without bf16 matrix units one dbpmuon step of a 9M-parameter twin
# takes minutes, so CI steps it on the twins up to this size and `-m large` on all of them
MUON_CI_MAX = 5_000_000
# stepping a twin with all the optimizers is what makes this file slow; the optimizers' code is the same for every twin,
# so CI steps the twins up to this size (resnet18 included) with all of them and the larger ones with ROUTE_OPTIMIZERS
EVERY_OPTIMIZER_CI_MAX = 12_000_000
ROUTE_OPTIMIZERS = ['dbpsgd', 'dbpadamw']  # a momentum and an adaptive update of the DBP layers and of the rest
FIRST_STEP_ONLY_INITIALISES = {'dbpadopt'}  # ADOPT's first step sets its second moment, the weights stay
DBP_OPTIMIZERS = timm.optim.list_optimizers('dbp*')
BF16_OPTIMIZERS = ['dbpmuon']
REQUIRED = [
    'dbp_resnet18d', 'dbp_resnet50d', 'dbp_resnext50_32x4d', 'dbp_wide_resnet50_2', 'dbp_seresnet50',
    'dbp_convnext_atto', 'dbp_convnext_tiny', 'dbp_efficientnet_b0', 'dbp_efficientnet_b2',
    'dbp_mobilenetv3_small_100', 'dbp_mobilenetv3_large_100', 'dbp_regnety_002', 'dbp_regnety_016',
    'dbp_vit_tiny_patch16_224', 'dbp_vit_small_patch16_224', 'dbp_vit_base_patch16_224',
    'dbp_deit_tiny_patch16_224', 'dbp_deit_small_patch16_224']


@functools.lru_cache(maxsize=None)
def _num_params(name: str) -> int:
    """Parameters of a twin: those of its timm model (R are buffers), built on the meta device once per name."""
    return sum(p.numel() for p in timm.create_model(name[len('dbp_'):], device='meta').parameters())


def _by_size(names, large: int = LARGE):
    """pytest params, the twins over `large` parameters marked `large`."""
    return [pytest.param(n, marks=pytest.mark.large) if _num_params(n) > large else n for n in names]


def _small(name: str) -> dict:
    """Model kwargs and input size for a cheap CPU test: 32 px (ViTs built for it)."""
    fixed = timm.models.get_pretrained_cfg(name).fixed_input_size
    return (dict(img_size=32) if fixed else {}), 32


def test_required_twins_are_registered():
    assert set(REQUIRED) <= set(DBP_MODELS)
    assert len(DBP_OPTIMIZERS) >= 10


@pytest.mark.parametrize('name', _by_size(DBP_MODELS))
def test_twin_loads_timm_weights_with_identity_R_and_folds_exactly(name, tmp_path):
    torch.manual_seed(0)
    kwargs, size = _small(name)
    plain = timm.create_model(name[len('dbp_'):], num_classes=5, **kwargs).eval()
    path = tmp_path / 'timm_weights.pth'
    torch.save(plain.state_dict(), path)
    twin = timm.create_model(
        name, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path), num_classes=5), **kwargs)
    twin.eval()
    x = torch.randn(2, 3, size, size)
    assert torch.equal(twin(x), plain(x))
    layers = dict(decor_layers(twin))
    assert layers and all(torch.equal(R, torch.eye(R.shape[-1]).expand_as(R)) for layer in layers.values() for R in
                          (layer.decor_matrix, layer.decor_spatial) if R.numel())  # (also block by block)
    # every Conv2d / Linear is a DBP layer (the rule is "exact nn.Conv2d / nn.Linear / timm Linear") but those with an
    # input dimension d = weight[0].numel() above the twin's dbp_max_dim (the basic-block ResNets' layer4 3x3 convs)
    max_dim = twin.dbp_args['max_dim']
    assert not [n for n, m in twin.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)
                and (max_dim is None or m.weight[0].numel() <= max_dim)]

    # a learnt R (both factors) folds into W: the folded weights load into timm's model and compute the same
    with torch.no_grad():
        for layer in layers.values():
            for R in (layer.decor_matrix, layer.decor_spatial):
                if R.numel():
                    R.add_(0.02 * torch.randn_like(R))
    expected = twin(x)
    plain.load_state_dict(fold(copy.deepcopy(twin)).state_dict())
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-4)


def _train_a_step_with_each(name: str, optimizers) -> None:
    torch.manual_seed(0)
    kwargs, size = _small(name)
    model = timm.create_model(name, num_classes=3, **kwargs).train()
    layers = [layer for _, layer in decor_layers(model)]
    for opt_name in optimizers:
        # a new batch for each optimizer: on one batch the model memorises its 4 images after a few optimizers, and a
        # vanishing gradient then leaves the weights bitwise unchanged (seen with bfloat16 R updates, 5e92945)
        x, y = torch.randn(4, 3, size, size), torch.randint(0, 3, (4,))
        opt = timm.optim.create_optimizer_v2(model, opt=opt_name, lr=1e-3, decor_lr=1e-3)
        before = [layer.decor_updates.item() + layer.decor_skipped.item() for layer in layers]
        weight = model.get_classifier().weight.detach().clone()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss), opt_name
        after = [layer.decor_updates.item() + layer.decor_skipped.item() for layer in layers]
        assert all(b + 1 == a for b, a in zip(before, after)), f'{opt_name}: not every R was updated'
        if opt_name not in FIRST_STEP_ONLY_INITIALISES:
            assert not torch.equal(model.get_classifier().weight, weight), opt_name
    assert sum(layer.decor_updates.item() for layer in layers) > 0


@pytest.mark.parametrize('name', _by_size(DBP_MODELS, EVERY_OPTIMIZER_CI_MAX))
def test_twin_trains_a_step_with_every_dbp_optimizer(name):
    """Every DBP optimizer but the bfloat16 ones (below) steps every twin: weights and every R updated."""
    assert set(BF16_OPTIMIZERS) <= set(DBP_OPTIMIZERS)
    _train_a_step_with_each(name, [o for o in DBP_OPTIMIZERS if o not in BF16_OPTIMIZERS])


@pytest.mark.parametrize('name', [n for n in DBP_MODELS if EVERY_OPTIMIZER_CI_MAX < _num_params(n) <= LARGE])
def test_larger_twin_trains_a_step_with_the_route_optimizers(name):
    """The twins that CI does not step with every optimizer (previous test) and does not leave out (over LARGE) are
    stepped with ROUTE_OPTIMIZERS."""
    assert set(ROUTE_OPTIMIZERS) <= set(DBP_OPTIMIZERS)
    _train_a_step_with_each(name, ROUTE_OPTIMIZERS)


@pytest.mark.parametrize('name', _by_size(DBP_MODELS, MUON_CI_MAX))
def test_twin_trains_a_step_with_bf16_optimizers(name):
    _train_a_step_with_each(name, BF16_OPTIMIZERS)


@pytest.mark.parametrize('name', ['dbp_convnext_atto', 'dbp_efficientnet_b0', 'dbp_regnety_002', 'dbp_test_vit'])
def test_reset_classifier_and_features_only(name):
    kwargs, size = _small(name)
    model = timm.create_model(name, num_classes=3, **kwargs)
    model.reset_classifier(7)
    head = model.get_classifier()
    assert isinstance(head, timm_dbp.DecorLinear) and head.out_features == 7
    features = timm.create_model(name, features_only=True, **kwargs).eval()
    out = features(torch.randn(1, 3, size, size))
    assert [o.shape[1] for o in out] == features.feature_info.channels()
    assert any(isinstance(m, (DecorConv2d, timm_dbp.DecorLinear)) for m in features.modules())


def test_dbp_options_reach_the_twin():
    model = timm.create_model('dbp_convnext_atto', dbp_exclude=['stem.*', 'head.*'], dbp_structure='full',
                              device='meta')
    assert type(model.stem[0]) is torch.nn.Conv2d and type(model.head.fc) is torch.nn.Linear
    dw = model.stages[0].blocks[0].conv_dw  # depthwise 7x7: one R shared by the channels, d = 49
    assert isinstance(dw, DecorConv2d) and dw.groups == dw.in_channels and dw.decor_matrix.shape == (49, 49)
    assert model.dbp_args['structure'] == 'full'
    with pytest.raises(TypeError):
        timm.create_model('dbp_convnext_atto', not_an_arg=1)
    with pytest.raises(ValueError, match='structure'):
        timm.create_model('dbp_vit_tiny_patch16_224', dbp_structure='diagonal', device='meta')


@pytest.mark.parametrize('name', ['dbp_test_vit', 'dbp_test_convnext', 'dbp_test_efficientnet'])
def test_dbp_trained_twin_round_trips_through_the_hub_layout_with_its_R(name, tmp_path, monkeypatch):
    """A twin with learnt R, saved in Hub form (config.json + safetensors), loads back offline via `hf-hub:` with
    the same R and outputs (the family's timm filter runs first, then the DBP one)."""
    from huggingface_hub import constants
    from timm.models._hub import save_for_hf

    from hub.cache import place_in_hf_cache
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    with torch.no_grad():
        for _, layer in decor_layers(model):
            for R in (layer.decor_matrix, layer.decor_spatial):
                if R.numel():
                    R.add_(0.02 * torch.randn_like(R))
    folder = tmp_path / 'folder'
    save_for_hf(model, str(folder), safe_serialization=True)
    place_in_hf_cache(folder, 'timm-dbp-test/twin', cache_dir=tmp_path / 'hub')
    loaded = timm.create_model('hf-hub:timm-dbp-test/twin', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64) if 'vit' not in name else torch.randn(2, 3, *model.pretrained_cfg['input_size'][1:])
    assert type(loaded) is type(model)
    for (key, a), (_, b) in zip(decor_layers(loaded), decor_layers(model)):
        assert torch.equal(a.decor_matrix, b.decor_matrix) and torch.equal(a.decor_spatial, b.decor_spatial), key
    assert torch.equal(loaded(x), model(x))


def test_family_class_builds_directly_and_a_pickled_twin_loads_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    from timm.models.resnet import BasicBlock
    model = timm_dbp.models.DBPResNet(block=BasicBlock, layers=(1, 1, 1, 1), num_classes=3, dbp_structure='full')
    assert isinstance(model.conv1, DecorConv2d) and model.conv1.decor_structure == 'full'
    assert model.dbp_args['structure'] == 'full'
    twin = timm.create_model('dbp_test_vit', num_classes=3).eval()
    path = tmp_path / 'whole_model.pt'
    torch.save(twin, path)
    code = ('import sys, torch, timm_dbp; m = torch.load(sys.argv[1], weights_only=False); '
            'print(type(m).__module__, type(m).__name__, len(list(timm_dbp.decor_layers(m))))')
    out = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.split() == ['timm_dbp.models._twin', 'DBPVisionTransformer', str(len(list(decor_layers(twin))))]
