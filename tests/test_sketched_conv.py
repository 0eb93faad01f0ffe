""" Trace-estimated conv weight gradients (XConv, timm_dbp.layers.sketched_conv): exact forward and input gradient,
unbiased weight gradient whose error falls like 1/sqrt(samples), DBP combination, conversion of timm models """
import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_dbp
from timm_dbp.layers import DecorConv2d, decorrelate
from timm_dbp.layers.sketched_conv import (
    MaskedReLU, SketchedConv2d, SketchedDecorConv2d, sketch_convs, sketched_conv2d, sketched_layers)

CONV_CONFIGS = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=1, dilation=1, groups=2),
    dict(stride=1, padding='same', dilation=2, groups=1),  # asymmetric 'same' (even kernel) below
    dict(stride=2, padding=0, dilation=1, groups=4),
]


def _problem(config, kernel=3, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 4 // config['groups'], kernel, kernel, dtype=dtype, requires_grad=True)
    b = torch.randn(8, dtype=dtype, requires_grad=True)
    y = F.conv2d(x, w, b, **config)
    g = torch.randn_like(y)
    return x, w, b, g, torch.autograd.grad(y, (x, w, b), g)


def _estimates(config, seeds, probes=4, kernel=3):
    x, w, b, g, exact = _problem(config, kernel)
    grads = []
    for seed in seeds:
        y = sketched_conv2d(x, w, b, probes=probes, seed=seed, **config)
        grads.append(torch.autograd.grad(y, (x, w, b), g))
    return exact, grads


@pytest.mark.parametrize('config', CONV_CONFIGS, ids=str)
@pytest.mark.parametrize('kernel', [3, 2])
def test_forward_input_and_bias_gradients_are_exact(config, kernel):
    if kernel == 2 and config['padding'] == 1:
        pytest.skip('covered by kernel 3')
    x, w, b, g, (gx, _, gb) = _problem(config, kernel)
    y = sketched_conv2d(x, w, b, probes=3, seed=1, **config)
    assert torch.equal(y, F.conv2d(x, w, b, **config))
    sx, _, sb = torch.autograd.grad(y, (x, w, b), g)
    torch.testing.assert_close(sx, gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sb, gb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('config', CONV_CONFIGS, ids=str)
def test_weight_gradient_is_unbiased_and_error_falls_like_one_over_sqrt_samples(config):
    exact, grads = _estimates(config, range(512))
    gw = exact[1]
    estimates = torch.stack([grad[1] for grad in grads])

    def mean_error(n):  # relative error of the mean of n estimates, averaged over disjoint groups of n
        groups = estimates.reshape(-1, n, *gw.shape).mean(1)
        return float(((groups - gw).flatten(1).norm(dim=1) / gw.norm()).mean())

    errors = {n: mean_error(n) for n in (1, 4, 16, 64)}
    for small, big in [(1, 4), (4, 16), (16, 64)]:  # 4x the samples: the error halves (1/sqrt), within sampling spread
        assert 1.6 < errors[small] / errors[big] < 2.5, errors
    # the mean of all 512 is as close as an unbiased estimator gets (a bias would stay as the noise averages out)
    assert float((estimates.mean(0) - gw).norm() / gw.norm()) < 1.5 * errors[1] / 512 ** 0.5


def test_error_falls_with_the_probe_count():
    config = CONV_CONFIGS[0]
    errors = {}
    for probes in (2, 8, 32):
        exact, grads = _estimates(config, range(200), probes=probes)
        errors[probes] = sum(float((grad[1] - exact[1]).norm() / exact[1].norm()) for grad in grads) / len(grads)
    assert 1.6 < errors[2] / errors[8] < 2.5 and 1.6 < errors[8] / errors[32] < 2.5, errors


def test_same_seed_same_estimate_and_probe_count_is_checked():
    x, w, b, g, _ = _problem(CONV_CONFIGS[0])
    a, c = (torch.autograd.grad(sketched_conv2d(x, w, b, padding=1, probes=2, seed=7), w, g)[0] for _ in range(2))
    assert torch.equal(a, c)
    for probes in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match='probes must be an integer >= 1'):
            sketched_conv2d(x, w, b, probes=probes)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        sketched_conv2d(x[0], w, b)


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while fn() builds its graph."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_a_sketched_conv_keeps_the_sketch_not_its_input():
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    weight_bytes = conv.weight.numel() * 4
    exact = _saved_bytes(lambda: conv(x)) - weight_bytes
    sketch_convs(conv, probes=4)
    sketched = _saved_bytes(lambda: conv(x)) - weight_bytes
    assert exact == x.numel() * 4 and sketched == 8 * 16 * 4 * 4  # B C N -> B C r numbers


def test_masked_relu_is_exact_and_keeps_a_bool_mask():
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    g = torch.randn_like(x)
    relu = MaskedReLU(inplace=True)
    y = relu(x.clone())
    assert torch.equal(y, torch.relu(x))
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(torch.relu(x), x, g)[0])
    assert _saved_bytes(lambda: relu(x.clone())) == x.numel()  # one byte a number


def _step_grads(model, x):
    model.zero_grad()
    F.cross_entropy(model(x), torch.arange(len(x)) % 5).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_timm_model_same_function_exact_gradients_except_conv_kernels():
    torch.manual_seed(0)
    plain = timm.create_model('resnet18', num_classes=5, zero_init_last=False).train()  # every conv gets a gradient
    sketched = sketch_convs(copy.deepcopy(plain), probes=8)
    convs = {name for name, _ in sketched_layers(sketched)}
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    assert all(type(m) is not nn.ReLU for m in sketched.modules())
    assert sketched.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 3, 32, 32)
    torch.testing.assert_close(sketched(x), plain(x), rtol=0, atol=0)
    pixels = {}  # input pixels of each conv: maps of <= 8 pixels (layer4 here) have nothing to save, run exact
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: pixels.__setitem__(name, args[0][0, 0].numel()))
             for name, m in sketched_layers(sketched)]
    exact, estimated = _step_grads(plain, x), _step_grads(sketched, x)
    for hook in hooks:
        hook.remove()
    assert sum(n > 8 for n in pixels.values()) >= 10
    for name, grad in exact.items():
        layer = name.rsplit('.', 1)[0]
        if layer in convs and name.endswith('weight') and pixels[layer] > 8:
            assert not torch.allclose(estimated[name], grad, rtol=1e-2)  # an estimate
        else:  # BN, fc, conv biases: exact (every activation gradient is)
            torch.testing.assert_close(estimated[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    sketched.eval()
    with torch.no_grad():
        torch.testing.assert_close(sketched(x), plain.eval()(x), rtol=0, atol=0)


def test_conversion_rules_and_errors():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), timm.layers.Conv2dSame(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1, padding_mode='reflect'))
    sketch_convs(model, probes=4, exclude=['3'])
    assert type(model[0]) is SketchedConv2d and type(model[1]) is timm.layers.Conv2dSame
    assert type(model[2]) is MaskedReLU and type(model[3]) is nn.Conv2d
    sketch_convs(model, probes=12)  # again: changes the probe count
    assert model[0].sketch_probes == 12 and model[3].sketch_probes == 12
    with pytest.raises(ValueError, match='probes must be an integer >= 1'):
        sketch_convs(model, probes=0)
    with pytest.raises(ValueError, match='no nn.Conv2d or DecorConv2d'):
        sketch_convs(nn.Linear(3, 3))
    assert type(sketch_convs(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), mask_relus=False)[1]) is nn.ReLU


def test_padding_modes_and_tiny_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for mode in ('reflect', 'circular', 'replicate'):
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
        plain = copy.deepcopy(conv)
        sketch_convs(conv, probes=2)
        torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
        conv(x.requires_grad_()).sum().backward()
    se = sketch_convs(nn.Conv2d(8, 4, 1), probes=4)  # a 1 x 1 map: nothing to save, the exact conv runs
    pooled = torch.randn(2, 8, 1, 1)
    se(pooled).sum().backward()
    plain = nn.Conv2d(8, 4, 1)
    plain.load_state_dict(se.state_dict())
    plain(pooled).sum().backward()
    torch.testing.assert_close(se.weight.grad, plain.weight.grad)


@pytest.mark.parametrize('structure', ['full', 'kron'])
def test_with_dbp_the_estimate_reaches_w_through_r_unbiased(structure):
    """A sketched DecorConv2d: same output as the DBP layer, and the mean estimated dL/dW -> the exact DBP dL/dW."""
    torch.manual_seed(0)
    layer = DecorConv2d(4, 6, 3, padding=1, decor_structure=structure).double()
    with torch.no_grad():  # a non-identity R
        layer.decor_matrix.add_(0.1 * torch.randn_like(layer.decor_matrix))
        if layer.decor_spatial.numel():
            layer.decor_spatial.add_(0.1 * torch.randn_like(layer.decor_spatial))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)  # small input: kron applies R_c to x first
    layer.decor_samples = 0
    y = layer(x)
    g = torch.randn_like(y)
    exact = torch.autograd.grad(y, layer.weight, g)[0]
    sketch_convs(layer, probes=4)
    assert type(layer) is SketchedDecorConv2d
    estimates = []
    for _ in range(400):
        y_sketched = layer(x)
        torch.testing.assert_close(y_sketched, y, rtol=1e-12, atol=1e-12)
        estimates.append(torch.autograd.grad(y_sketched, layer.weight, g)[0])
    mean = torch.stack(estimates).mean(0)
    single = sum(float((e - exact).norm() / exact.norm()) for e in estimates) / len(estimates)
    assert single > 0.3  # each one is noisy, their mean is as close as an unbiased estimator's
    assert float((mean - exact).norm() / exact.norm()) < 1.5 * single / 400 ** 0.5


def test_dbp_twin_trains_sketched_and_folds():
    torch.manual_seed(0)
    model = sketch_convs(timm.create_model('dbp_test_resnet', num_classes=5), probes=4)
    assert any(isinstance(m, SketchedDecorConv2d) for m in model.modules())
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        F.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
        opt.zero_grad()
    assert all(int(layer.decor_updates) == 2 for _, layer in timm_dbp.decor_layers(model))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_dbp.fold(copy.deepcopy(model))(x), model(x), rtol=1e-4, atol=1e-4)
    clone = pickle.loads(pickle.dumps(model))
    assert [type(m) for m in clone.modules()] == [type(m) for m in model.modules()]


def test_decorrelate_after_sketch_keeps_the_sketch():
    model = sketch_convs(nn.Sequential(nn.Conv2d(3, 4, 3)), probes=2, seed=5)
    seed = model[0].sketch_seed
    layer = decorrelate(model)[0]
    assert type(layer) is SketchedDecorConv2d and (layer.sketch_probes, layer.sketch_seed) == (2, seed)
    assert type(timm_dbp.fold(model)[0]) is nn.Conv2d
