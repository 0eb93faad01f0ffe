""" Tests of structured R (channel, kron): maths against the full-R form, sampling, memory, models """
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_dbp
from timm_dbp.layers import (
    DecorConv2d, DecorLinear, DecorrelationStep, decor_layers, decorrelation, decorrelation_update_, fold,
    fold_state_dict, fused_weight, identity_factor, kron_decorrelation_update_, offdiag_correlation, record_decorrelation,
    sample_conv_patches, sample_kron_factor_inputs, sample_pixels, times_small_matrix,
)

CONV_CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 5), padding=(0, 2), dilation=(1, 2)),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=5, padding=2, groups=4),  # depthwise (C_in = groups): one R shared by the channels
    dict(kernel_size=3, padding=2, padding_mode='reflect'),
]


def _full_R(layer: DecorConv2d) -> torch.Tensor:
    """R as one d x d matrix: R_c (x) R_s, R_c (x) I or R itself."""
    s = layer.weight[0, 0].numel()
    if layer.decor_structure == 'full':
        return layer.decor_matrix
    spatial = layer.decor_spatial if layer.decor_structure == 'kron' else torch.eye(s, dtype=layer.decor_matrix.dtype)
    return torch.kron(layer.decor_matrix, spatial)


def _perturbed(layer: DecorConv2d, scale: float = 0.1) -> DecorConv2d:
    with torch.no_grad():
        for buffer in (layer.decor_matrix, layer.decor_spatial):
            buffer.add_(scale * torch.randn_like(buffer))
    return layer


@pytest.mark.parametrize('structure', ['channel', 'kron'])
@pytest.mark.parametrize('cfg', CONV_CONFIGS, ids=str)
def test_structured_forward_is_conv_with_kron_R(structure, cfg):
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 8, **cfg).double()
    layer = _perturbed(DecorConv2d.from_conv(plain, decor_structure=structure))
    A = (plain.weight.reshape(8, -1) @ _full_R(layer)).reshape(plain.weight.shape)
    mode = 'constant' if plain.padding_mode == 'zeros' else plain.padding_mode
    for shape in [(1, 4, 5, 6), (3, 4, 16, 16)]:  # input smaller / larger than the kernel: both code paths
        x = torch.randn(*shape, dtype=torch.double, requires_grad=True)
        expected = F.conv2d(F.pad(x, plain._reversed_padding_repeated_twice, mode=mode), A, plain.bias,
                            stride=plain.stride, dilation=plain.dilation, groups=plain.groups)
        torch.testing.assert_close(layer(x), expected)
        # gradient of W is BP on z = R x, identical on both paths
        g = torch.randn_like(expected)
        grad_w, = torch.autograd.grad(layer(x), layer.weight, g)
        A_var = A.detach().requires_grad_()
        out = F.conv2d(F.pad(x.detach(), plain._reversed_padding_repeated_twice, mode=mode), A_var, plain.bias,
                       stride=plain.stride, dilation=plain.dilation, groups=plain.groups)
        dA, = torch.autograd.grad(out, A_var, g)
        expected_grad_w = (dA.reshape(8, -1) @ _full_R(layer).T).reshape(plain.weight.shape)
        torch.testing.assert_close(grad_w, expected_grad_w)


def test_structure_shapes_and_state_bytes():
    conv = nn.Conv2d(8, 16, 3, groups=2)
    full = DecorConv2d.from_conv(conv, decor_structure='full')
    channel = DecorConv2d.from_conv(conv, decor_structure='channel')
    kron = DecorConv2d.from_conv(conv, decor_structure='kron')
    assert full.decor_matrix.shape == (36, 36) and full.decor_state_bytes == 36 * 36 * 4
    assert channel.decor_matrix.shape == (4, 4) and channel.decor_state_bytes == 16 * 4
    assert kron.decor_spatial.shape == (9, 9) and kron.decor_state_bytes == (16 + 81) * 4
    assert 'decor_spatial' in kron.state_dict() and 'decor_spatial' not in channel.state_dict()
    one_by_one = DecorConv2d.from_conv(nn.Conv2d(8, 4, 1), decor_structure='kron')
    assert one_by_one.decor_structure == 'full' and one_by_one.decor_matrix.shape == (8, 8)
    with pytest.raises(ValueError, match='decor_structure'):
        DecorConv2d(3, 3, 3, decor_structure='diagonal')
    with pytest.raises(ValueError, match='structure'):
        timm_dbp.decorrelate(nn.Sequential(nn.Conv2d(3, 3, 3)), structure='lowrank')


@pytest.mark.parametrize('groups', [1, 2])
def test_sampled_pixels_are_input_pixels(groups):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4)
    everything = sample_pixels(x, groups, num_samples=10 ** 6)
    ref = x.permute(0, 2, 3, 1).reshape(-1, groups, 6 // groups).reshape(-1, 6 // groups)
    assert everything.shape == ref.shape
    key = lambda t: t[torch.argsort(t @ torch.linspace(1, 2, t.shape[1]))]
    torch.testing.assert_close(key(everything), key(ref))
    channels_last = sample_pixels(x.to(memory_format=torch.channels_last), groups, num_samples=10 ** 6)
    torch.testing.assert_close(key(channels_last), key(ref))
    some = sample_pixels(x, groups, num_samples=7)
    assert some.shape == (7, 6 // groups) and torch.unique(some, dim=0).shape[0] == 7


def test_channel_update_is_the_rule_on_pixel_vectors():
    torch.manual_seed(0)
    layer = _perturbed(DecorConv2d.from_conv(nn.Conv2d(5, 4, 3, padding=1), decor_structure='channel').double())
    layer.decor_samples = 10 ** 6
    x = torch.randn(2, 5, 6, 6, dtype=torch.double)
    layer(x)
    inputs = layer.take_decor_inputs()  # z = R_c x of every pixel vector, in random order
    assert inputs.shape == (72, 5)
    expected = layer.decor_matrix.clone()
    decorrelation_update_(expected, x.permute(0, 2, 3, 1).reshape(72, 5), lr=0.1, kappa=0.3)
    layer.update_decorrelation(inputs, lr=0.1, kappa=0.3)
    torch.testing.assert_close(layer.decor_matrix, expected)


def test_kron_update_factor_inputs_written_out(monkeypatch):
    """R_c learns from column k mod s of P_k R_s^T, R_s from row k mod c of R_c P_k (one vector per patch each)."""
    torch.manual_seed(0)
    c, s, n = 3, 4, 6
    Rc, Rs = torch.eye(c, dtype=torch.double) + 0.1 * torch.randn(c, c, dtype=torch.double), \
        torch.eye(s, dtype=torch.double) + 0.1 * torch.randn(s, s, dtype=torch.double)
    P = torch.randn(n, c, s, dtype=torch.double)
    channel_vectors = torch.stack([(P[k] @ Rs.T)[:, k % s] for k in range(n)])
    spatial_vectors = torch.stack([(Rc @ P[k])[k % c, :] for k in range(n)])
    monkeypatch.setattr(decorrelation, 'KRON_MIN_VECTORS', 1)  # one vector per patch
    exp_c, exp_s = Rc.clone(), Rs.clone()
    decorrelation_update_(exp_c, channel_vectors, lr=0.05, kappa=0.5)
    decorrelation_update_(exp_s, spatial_vectors, lr=0.05, kappa=0.5)
    step = kron_decorrelation_update_(Rc, Rs, P.reshape(n, c * s), lr=0.05, kappa=0.5)
    assert bool(step.applied)
    torch.testing.assert_close(Rc, exp_c)
    torch.testing.assert_close(Rs, exp_s)


def test_kron_small_sample_uses_every_position():
    """A few patches (deep layers of small images): every column / row is used, so padding-only positions cannot
    leave a factor without data."""
    torch.manual_seed(0)
    c, s, n = 3, 9, 2
    Rc, Rs = torch.eye(c, dtype=torch.double), torch.eye(s, dtype=torch.double)
    P = torch.zeros(n, c, s, dtype=torch.double)
    P[:, :, 4] = torch.randn(n, c, dtype=torch.double)  # only the centre is inside the image
    exp_c, exp_s = Rc.clone(), Rs.clone()
    decorrelation_update_(exp_c, P.transpose(1, 2).reshape(-1, c), lr=0.05, kappa=0.0)
    decorrelation_update_(exp_s, P.reshape(-1, s), lr=0.05, kappa=0.0)
    kron_decorrelation_update_(Rc, Rs, P, lr=0.05, kappa=0.0)
    torch.testing.assert_close(Rc, exp_c)
    torch.testing.assert_close(Rs, exp_s)
    assert not torch.equal(Rc, torch.eye(c, dtype=torch.double))


def test_kron_layer_stores_factor_vectors_of_its_patches():
    """An armed kron layer draws decor_samples / decor_vectors_per_patch patches and keeps the decor_samples vectors
    each factor learns from (computed with its current R), not the patches: the same vectors (up to float rounding:
    the channel vectors are summed by embedding_bag) and the same update as from the patches drawn with the same
    seed."""
    torch.manual_seed(0)
    layer = _perturbed(DecorConv2d.from_conv(nn.Conv2d(6, 5, 3, padding=1), decor_structure='kron').double())
    x = torch.randn(4, 6, 20, 20, dtype=torch.double)
    layer.decor_samples, layer.decor_seed, layer.decor_vectors_per_patch = 1000, 7, 4
    layer(x)
    stored = layer.take_decor_inputs()
    patches = sample_conv_patches(x, layer, 250, torch.Generator().manual_seed(7), flat=False)
    expected = decorrelation.kron_factor_inputs(layer.decor_matrix, layer.decor_spatial, patches, num_vectors=1000)
    assert isinstance(stored, tuple) and [t.shape for t in stored] == [(1000, 6), (1000, 9)]  # 4 vectors per patch
    for got, want in zip(stored, expected):
        torch.testing.assert_close(got, want)
    twin = copy.deepcopy(layer)
    assert bool(layer.update_decorrelation(stored, lr=0.05, kappa=0.3))
    assert bool(twin.update_decorrelation(expected, lr=0.05, kappa=0.3))
    for key in ('decor_matrix', 'decor_spatial', 'decor_loss', 'decor_corr'):
        torch.testing.assert_close(getattr(layer, key), getattr(twin, key), msg=key)


def _kron_z_columns_and_rows(Rc, Rs, P, num_vectors):
    """From the definition: z_k = R_c P_k R_s^T; column (k q + j) mod s and row (k q + j) mod c of each, j < q."""
    n, c, s = P.shape
    z = Rc @ P @ Rs.T
    columns, rows = [], []
    for size, out, pick in ((s, columns, lambda k, i: z[k][:, i]), (c, rows, lambda k, i: z[k][i, :])):
        q = min(size, max(1, num_vectors // n))
        out.extend(pick(k, (k * q + j) % size) for k in range(n) for j in range(q))
    return torch.stack(columns), torch.stack(rows)


@pytest.mark.parametrize('channel_mixed', [False, True], ids=['x', 'Rc_x'])
@pytest.mark.parametrize('config', CONV_CONFIGS)
@pytest.mark.parametrize('num_patches', [8, 37, 300, 10 ** 6])  # 8 x s entries gather their pixels alone
def test_sample_kron_factor_inputs_are_those_of_the_sampled_patches(config, num_patches, channel_mixed):
    """The fused sampler (channel vectors by embedding_bag, spatial vectors from the gathered rows) gives the
    columns and rows of z = R_c P R_s^T of the patches sample_conv_patches draws with the same seed (kron_factor_inputs
    as well), for every conv geometry (stride, dilation, padding modes, groups), for one, several or all vectors per
    patch, and whether it reads x or the input-side product R_c x (channel_mixed: R_c not applied again)."""
    torch.manual_seed(0)
    layer = _perturbed(DecorConv2d.from_conv(nn.Conv2d(4, 8, **config), decor_structure='kron').double())
    Rc, Rs = layer.decor_matrix, layer.decor_spatial
    x = torch.randn(3, 4, 9, 11, dtype=torch.double)
    read = F.conv2d(x, Rc.repeat(layer.groups, 1)[:, :, None, None], groups=layer.groups) if channel_mixed else x
    got = sample_kron_factor_inputs(read, layer, Rc, Rs, num_patches, 600, torch.Generator().manual_seed(5),
                                    channel_mixed)
    patches = sample_conv_patches(x, layer, num_patches, torch.Generator().manual_seed(5), flat=False)
    want = _kron_z_columns_and_rows(Rc, Rs, patches, 600)
    for a, b, c in zip(got, want, decorrelation.kron_factor_inputs(Rc, Rs, patches, num_vectors=600)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b.float())
        torch.testing.assert_close(c, b.float())


@pytest.mark.parametrize('structure,kernel_size,groups', [
    ('kron', 3, 1), ('kron', 3, 2), ('channel', 3, 1), ('channel', 3, 2), ('full', 1, 1), ('full', 1, 2)])
def test_sample_is_the_same_z_on_either_path(structure, kernel_size, groups, monkeypatch):
    """An armed layer keeps z = R x whether R_c is applied to the input (the sample is then drawn from R_c x) or
    fused into W (the sample is drawn from x and R applied to it): the same vectors for the same seed."""
    torch.manual_seed(0)
    layer = _perturbed(DecorConv2d.from_conv(
        nn.Conv2d(4, 8, kernel_size, padding=kernel_size // 2, groups=groups), decor_structure=structure).double())
    x = torch.randn(3, 4, 9, 11, dtype=torch.double)
    samples = []
    for on_input in (False, True):
        monkeypatch.setattr(DecorConv2d, 'channel_factor_on_input', lambda self, x, _on=on_input: _on)
        layer.decor_samples, layer.decor_seed = 200, 3
        layer(x)
        samples.append(layer.take_decor_inputs())
    for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in samples)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b)
    if structure != 'kron':  # the rows are R applied to the drawn patches / pixels
        gen = torch.Generator().manual_seed(3)
        drawn = (sample_pixels(x, groups, 200, gen) if structure == 'channel'
                 else sample_conv_patches(x, layer, 200, gen))
        torch.testing.assert_close(samples[0], (drawn @ layer.decor_matrix.T).float())


def test_kron_layer_with_few_positions_uses_more_vectors_per_patch():
    """A deep layer of a small image has fewer patches than asked for: each gives more vectors (up to all s), so the
    factors still learn from decor_samples vectors where the patches hold them."""
    layer = DecorConv2d.from_conv(nn.Conv2d(16, 4, 3, padding=1), decor_structure='kron')
    layer.decor_samples = 1024
    layer(torch.randn(8, 16, 4, 4))  # 128 patches
    channel_vectors, spatial_vectors = layer.take_decor_inputs()
    assert channel_vectors.shape == (1024, 16) and spatial_vectors.shape == (1024, 9)  # 8 vectors per patch
    layer.decor_vectors_per_patch = 2
    layer(torch.randn(8, 16, 32, 32))  # 8192 patches: 512 are drawn, 2 vectors each
    assert [t.shape[0] for t in layer.take_decor_inputs()] == [1024, 1024]
    layer.decor_vectors_per_patch = 1000  # more than a patch has: every column / row of the 2 patches drawn
    layer(torch.randn(8, 16, 32, 32))
    assert [t.shape[0] for t in layer.take_decor_inputs()] == [2 * 9, 2 * 16]


def test_kron_guard_refuses_and_reports():
    Rc, Rs = torch.eye(3), torch.eye(4)
    P = torch.randn(8, 12)
    P[0, 0] = float('nan')
    step = kron_decorrelation_update_(Rc, Rs, P, lr=0.1, kappa=0.0)
    assert not bool(step.applied)
    assert torch.equal(Rc, torch.eye(3)) and torch.equal(Rs, torch.eye(4))


def _correlated_images(n: int = 64, c: int = 6, size: int = 12) -> torch.Tensor:
    """Images whose channels mix one another and whose pixels are smooth (spatially correlated)."""
    torch.manual_seed(1)
    base = F.avg_pool2d(torch.randn(n, c, size + 2, size + 2), 3, stride=1)
    mix = torch.eye(c) + 0.8 * torch.ones(c, c) / c
    return torch.einsum('ij,njhw->nihw', mix, base) * 3


@pytest.mark.parametrize('structure', ['channel', 'kron'])
def test_structured_updates_decorrelate_patches(structure):
    torch.manual_seed(0)
    layer = DecorConv2d.from_conv(nn.Conv2d(6, 4, 3, padding=1), decor_structure=structure)
    x = _correlated_images()
    plain_patches = sample_conv_patches(x, layer, 2048, torch.Generator().manual_seed(0))

    def patch_correlation():
        return offdiag_correlation(plain_patches @ _full_R(layer).T).item()

    def channel_correlation():
        return offdiag_correlation(sample_pixels(x, 1, 2048, torch.Generator().manual_seed(0)) @ layer.decor_matrix.T).item()

    before, before_c = patch_correlation(), channel_correlation()
    for _ in range(300):
        layer.decor_samples = 512
        layer(x)
        layer.update_decorrelation(layer.take_decor_inputs(), lr=0.05, kappa=0.0)
    assert int(layer.decor_skipped) == 0 and int(layer.decor_updates) == 300
    assert channel_correlation() < 0.3 * before_c  # channels decorrelated
    if structure == 'kron':  # and neighbouring pixels too: the whole patch decorrelates
        assert patch_correlation() < 0.5 * before
    assert torch.isfinite(layer.decor_loss) and torch.isfinite(layer.decor_corr)


@pytest.mark.parametrize('structure, block_size', [('channel', None), ('kron', None), ('kron', 8)])
def test_structured_model_trains_folds_and_loads(structure, block_size, tmp_path):
    """block_size: R's over more channels block-diagonal (tests/test_blocks.py)"""
    torch.manual_seed(0)
    dbp_kwargs = dict(dbp_structure=structure, dbp_block_size=block_size)
    model = timm.create_model('dbp_test_resnet', num_classes=3, **dbp_kwargs)
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.05, decor_lr=1e-2)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 3, (4,))).backward()
        opt.step()
        opt.zero_grad()
    convs = [layer for _, layer in decor_layers(model) if isinstance(layer, DecorConv2d)]
    assert any(layer.decor_structure == structure for layer in convs)
    assert all(layer.decor_updates.item() == 3 for _, layer in decor_layers(model))
    assert any(not torch.equal(layer.decor_matrix, identity_factor(layer.decor_matrix.shape)) for layer in convs)
    assert any(layer.decor_blocks > 1 for layer in convs) == (block_size is not None)
    model.eval()
    x = torch.randn(2, 3, 40, 40)
    expected = model(x)
    # checkpoint round trip keeps every factor
    path = tmp_path / 'dbp.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model('dbp_test_resnet', num_classes=3, **dbp_kwargs).eval()
    timm.models.load_checkpoint(loaded, str(path))
    torch.testing.assert_close(loaded(x), expected)
    # folding, in the model and in the state dict, gives timm's plain twin
    plain = timm.create_model('test_resnet', num_classes=3).eval()
    plain.load_state_dict(fold_state_dict(model.state_dict()))
    torch.testing.assert_close(plain(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fold(copy.deepcopy(model))(x), expected, rtol=1e-4, atol=1e-5)
    # timm BP weights start a structured twin at R = I
    plain_path = tmp_path / 'plain.pth'
    torch.save(plain.state_dict(), plain_path)
    started = timm.create_model('dbp_test_resnet', pretrained=True, num_classes=3, **dbp_kwargs,
                                pretrained_cfg_overlay=dict(file=str(plain_path), num_classes=3)).eval()
    torch.testing.assert_close(started(x), plain(x), rtol=0, atol=0)
    if block_size is not None:  # block weights into a dense twin: the error names both settings
        with pytest.raises(timm_dbp.models.PretrainedWeightsError, match=r'block-diagonal .*dbp_block_size=0'):
            timm.create_model('dbp_test_resnet', pretrained=True, num_classes=3, dbp_structure=structure,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=3))


def test_resnet18_state_bytes_by_structure():
    def state_mib(**kwargs):
        model = timm.create_model('dbp_resnet18', device='meta', **kwargs)
        return sum(layer.decor_state_bytes for _, layer in decor_layers(model)) / 2 ** 20
    assert 340 < state_mib(dbp_structure='full', dbp_max_dim=0) < 360  # full patch R on every layer: about 352 MiB
    assert 100 < state_mib(dbp_structure='full') < 120  # the default keeps layer4's 512 x 512 x 3 x 3 convs plain
    assert state_mib(dbp_structure='channel') < 35
    assert state_mib(dbp_structure='kron') < 3  # 2.7 MiB by default, 5.7 MiB on every layer
    assert 5 < state_mib(dbp_structure='kron', dbp_max_dim=0, dbp_kron_max_dim=0) < 6


def test_fused_weight_factor_order():
    torch.manual_seed(0)
    W = torch.randn(5, 3, 2, 2, dtype=torch.double)
    Rc, Rs = torch.randn(3, 3, dtype=torch.double), torch.randn(4, 4, dtype=torch.double)
    expected = (W.reshape(5, 12) @ torch.kron(Rc, Rs)).reshape(W.shape)
    A = fused_weight(W, Rc, Rs)
    torch.testing.assert_close(A, expected)
    assert A.is_contiguous()  # a transposed view would reach the conv as a channels-last kernel
    torch.testing.assert_close(fused_weight(W, None, Rs), (W.reshape(5, 3, 4) @ Rs).reshape(W.shape))
    torch.testing.assert_close(fused_weight(W, Rc, None), torch.einsum('cd,ocij->odij', Rc, W))


@pytest.mark.parametrize('shape', [(64, 1024, 9), (300, 20, 49), (4, 2, 9)])  # conv path (2), matmul path (1)
def test_times_small_matrix_is_the_product_and_its_gradient(shape, monkeypatch):
    """The spatial factor's product (a 1x1 conv on CPU for a large A) gives A @ M and, backwards, grad @ M^T;
    exactly A at M = I (a fresh layer stays the plain layer); M may not ask for a gradient."""
    torch.manual_seed(0)
    A = torch.randn(*shape, requires_grad=True)
    M, grad = torch.randn(shape[2], shape[2]), torch.randn(*shape)
    calls = []
    monkeypatch.setattr(F, 'conv2d', lambda *a, _conv=F.conv2d, **k: calls.append(1) or _conv(*a, **k))
    out = times_small_matrix(A, M)
    assert len(calls) == (A.numel() >= decorrelation.SMALL_PRODUCT_CONV_MIN) and out.is_contiguous()
    torch.testing.assert_close(out, A.detach().double().matmul(M.double()).float())
    out.backward(grad)
    torch.testing.assert_close(A.grad, grad.double().matmul(M.double().T).float())
    assert torch.equal(times_small_matrix(A.detach(), torch.eye(shape[2])), A.detach())
    if calls:  # the conv path would silently give M no gradient
        with pytest.raises(RuntimeError, match='must not require grad'):
            times_small_matrix(A, M.requires_grad_())


@pytest.mark.parametrize('groups', [1, 2])
def test_one_by_one_conv_applies_R_to_the_smaller_input(groups, monkeypatch):
    """A 1x1 conv's R acts on channels: on an input smaller than the kernel it is applied to x (R_c x, then W),
    otherwise fused (W R); both are conv(x, W R), and both give W the gradient of BP on z = R x."""
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 64, 1, stride=2, groups=groups).double()
    layer = _perturbed(DecorConv2d.from_conv(plain))
    assert layer.decor_structure == 'full' and layer.decor_matrix.shape[0] == 4 // groups
    A = (plain.weight.reshape(64, -1) @ layer.decor_matrix).reshape(plain.weight.shape)
    for shape in [(1, 4, 3, 3), (2, 4, 8, 8)]:
        x = torch.randn(*shape, dtype=torch.double)
        assert (x.numel() < layer.weight.numel()) == (shape[0] == 1)  # one shape per path
        expected = F.conv2d(x, A, plain.bias, stride=2, groups=groups)
        calls = []
        with monkeypatch.context() as m:
            m.setattr(F, 'conv2d', lambda *a, _conv=F.conv2d, **k: calls.append(1) or _conv(*a, **k))
            torch.testing.assert_close(layer(x), expected)
        assert len(calls) == (2 if shape[0] == 1 else 1)  # R_c x then the conv, or one fused conv
        g = torch.randn_like(expected)
        grad_w, = torch.autograd.grad(layer(x), layer.weight, g)
        A_var = A.detach().requires_grad_()
        dA, = torch.autograd.grad(F.conv2d(x, A_var, plain.bias, stride=2, groups=groups), A_var, g)
        torch.testing.assert_close(grad_w, (dA.reshape(64, -1) @ layer.decor_matrix.T).reshape(plain.weight.shape))


def test_record_decorrelation_of_many_layers_counts_and_logs_each_layer():
    """The batched bookkeeping gives each layer its own counters and statistics: full and kron R's, linears, equal
    and different shapes, applied, refused and capped steps; a kron R's two steps combined (updated iff both were,
    losses summed, correlation the RMS over both factors' off-diagonal entries, kappa the mean)."""
    torch.manual_seed(0)
    layers = [DecorConv2d.from_conv(nn.Conv2d(4, 3, 3), decor_structure='kron'),
              DecorConv2d.from_conv(nn.Conv2d(6, 3, 5), decor_structure='kron'),
              DecorConv2d.from_conv(nn.Conv2d(4, 3, 3), decor_structure='full'),
              DecorLinear.from_linear(nn.Linear(5, 2)),
              DecorConv2d.from_conv(nn.Conv2d(4, 3, 3), decor_structure='kron')]
    dims = [(4, 9), (6, 25), None, None, (4, 9)]

    def random_step():
        return DecorrelationStep(torch.rand(()) < 0.5, torch.rand(()), torch.rand(()), torch.rand(()), torch.rand(()),
                                 torch.rand(()) < 0.5)

    for _ in range(6):
        steps = [[random_step() for _ in range(1 if d is None else 2)] for d in dims]
        expected = []
        for layer, layer_steps, d in zip(layers, steps, dims):
            updates, skipped, capped = int(layer.decor_updates), int(layer.decor_skipped), int(layer.decor_capped)
            if d is None:
                (step,) = layer_steps
                loss, corr, kappa = step.loss, step.correlation, step.kappa
                applied, was_capped = step.applied, step.capped
            else:
                ch, sp = layer_steps
                pairs_c, pairs_s = d[0] * (d[0] - 1), d[1] * (d[1] - 1)
                loss, kappa = ch.loss + sp.loss, (ch.kappa + sp.kappa) / 2
                corr = ((ch.correlation ** 2 * pairs_c + sp.correlation ** 2 * pairs_s) / (pairs_c + pairs_s)).sqrt()
                applied, was_capped = ch.applied & sp.applied, ch.capped | sp.capped
            expected.append((updates + int(applied), skipped + int(~applied), capped + int(was_capped & applied),
                             float(loss), float(corr), float(kappa), bool(applied)))
        stacked = DecorrelationStep(*(torch.stack(field) for field in zip(*(s for layer_steps in steps
                                                                             for s in layer_steps))))
        returned = record_decorrelation(layers, stacked)
        for layer, want, got_applied in zip(layers, expected, returned):
            got = (int(layer.decor_updates), int(layer.decor_skipped), int(layer.decor_capped), float(layer.decor_loss),
                   float(layer.decor_corr), float(layer.decor_kappa), bool(got_applied))
            assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match='steps of 8 problems'):  # one factor's step missing
        record_decorrelation(layers, DecorrelationStep(*(field[1:] for field in stacked)))
