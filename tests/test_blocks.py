""" Tests of block-diagonal R over channels (`block_size`, model kwarg dbp_block_size): maths against the dense
block-diagonal matrix, the update block by block, the state of wide twins (a model's training, checkpoints and
folding: tests/test_structured.py) """
import copy

import pytest
import timm
import torch
from torch import nn

from timm_dbp.layers import (
    DecorConv2d, DecorLinear, block_count, decor_layers, decorrelate, decorrelation_update_, factor_problem,
    factor_product, factor_rows, grouped_decorrelation_update_, identity_factor, kron_decorrelation_update_,
    kron_factor_inputs, off_diagonal_pairs, offdiag_correlation, sample_kron_factor_inputs)


def _dense(R: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*R) if R.dim() == 3 else R


def _perturbed(layer, scale: float = 0.1):
    with torch.no_grad():
        for buffer in (layer.decor_matrix, layer.decor_spatial):
            buffer.add_(scale * torch.randn_like(buffer))
    return layer


def _dense_twin(layer):
    """The same layer with R's channel factor as one dense (block-diagonal) matrix."""
    twin = copy.deepcopy(layer)
    twin.decor_matrix = _dense(layer.decor_matrix).clone()
    return twin


@pytest.mark.parametrize('c, block_size, blocks', [
    (2048, 256, 8), (256, 256, 1), (255, 256, 1), (320, 256, 2), (1152, 256, 6), (7, 2, 7), (96, 40, 3),
    (64, None, 1)])
def test_block_count_is_the_fewest_equal_blocks(c, block_size, blocks):
    assert block_count(c, block_size) == blocks
    assert c % blocks == 0 and (block_size is None or c // blocks <= block_size)


def test_factor_helpers_are_the_dense_block_diagonal_matrix():
    torch.manual_seed(0)
    R = torch.randn(4, 8, 8, dtype=torch.double)
    v = torch.randn(5, 3, 32, dtype=torch.double)
    torch.testing.assert_close(factor_product(v, R), v @ _dense(R))
    torch.testing.assert_close(factor_product(v.float(), R.float(), torch.bfloat16), v.float() @ _dense(R).float(),
                               rtol=2e-2, atol=5e-2)
    rows = torch.randint(0, 32, (6, 3))
    assert torch.equal(factor_rows(R, rows), _dense(R)[rows])
    z = torch.randn(10, 32)
    R_blocks, z_blocks = factor_problem(R, z)
    assert R_blocks is R and z_blocks.shape == (4, 10, 8) and torch.equal(z_blocks[2], z[:, 16:24])
    assert torch.equal(identity_factor(R.shape), torch.eye(8).expand(4, 8, 8))
    assert torch.equal(factor_product(v, torch.eye(32, dtype=torch.double)), v)  # a dense R is left as it was


@pytest.mark.parametrize('structure', ['channel', 'kron'])
@pytest.mark.parametrize('cfg', [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=3, padding=1,
                                                                                         groups=2)], ids=str)
def test_block_conv_is_the_conv_with_the_dense_block_diagonal_R(structure, cfg):
    torch.manual_seed(0)
    layer = _perturbed(DecorConv2d.from_conv(nn.Conv2d(16, 6, **cfg).double(), structure, decor_block_size=3))
    c = 16 // cfg.get('groups', 1)
    assert layer.decor_blocks == block_count(c, 3) > 1 and layer.decor_matrix.shape[-1] == c // layer.decor_blocks
    dense = _dense_twin(layer)
    for shape in [(1, 16, 3, 3), (3, 16, 12, 12)]:  # input smaller / larger than the kernel: both code paths
        x = torch.randn(*shape, dtype=torch.double)
        torch.testing.assert_close(layer(x), dense(x))
        g = torch.randn_like(layer(x))
        grad, = torch.autograd.grad(layer(x), layer.weight, g)
        grad_dense, = torch.autograd.grad(dense(x), dense.weight, g)
        torch.testing.assert_close(grad, grad_dense)


def test_block_linear_is_the_linear_with_the_dense_block_diagonal_R():
    torch.manual_seed(0)
    layer = _perturbed(DecorLinear.from_linear(nn.Linear(12, 5).double(), decor_block_size=4))
    assert layer.decor_matrix.shape == (3, 4, 4)
    x = torch.randn(7, 12, dtype=torch.double)
    torch.testing.assert_close(layer(x), _dense_twin(layer)(x))
    torch.testing.assert_close(layer.decorrelated_weight(), layer.weight @ _dense(layer.decor_matrix))


def test_block_update_is_the_rule_on_each_block():
    torch.manual_seed(0)
    layer = _perturbed(DecorLinear.from_linear(nn.Linear(12, 5), decor_block_size=4))
    layer.decor_samples = 64
    layer(torch.randn(64, 12) @ (torch.eye(12) + 0.3 * torch.randn(12, 12)))  # correlated inputs
    z = layer.take_decor_inputs()
    expected = layer.decor_matrix.clone()
    steps = [decorrelation_update_(expected[g], z[:, 4 * g:4 * g + 4], lr=0.1, kappa=0.3, decorrelated=True)
             for g in range(3)]
    assert bool(layer.update_decorrelation(z, lr=0.1, kappa=0.3))
    torch.testing.assert_close(layer.decor_matrix, expected)
    # logged: the blocks' mean loss and RMS correlation
    torch.testing.assert_close(layer.decor_loss, torch.stack([s.loss for s in steps]).mean())
    torch.testing.assert_close(layer.decor_corr, torch.stack([s.correlation for s in steps]).square().mean().sqrt())
    assert int(layer.decor_updates) == 1 and int(layer.decor_skipped) == 0


def test_grouped_update_mixes_blocks_dense_and_stacked_problems():
    torch.manual_seed(0)
    problems = [(torch.eye(4).expand(3, 4, 4).clone(), torch.randn(3, 20, 4)),  # two block R's of equal shape:
                (torch.eye(4).expand(3, 4, 4).clone(), torch.randn(3, 20, 4)),  # stacked into one call
                (torch.eye(6), torch.randn(20, 6)),
                (torch.eye(4).expand(2, 4, 4).clone(), torch.randn(2, 20, 4) * 1e6)]  # refused by the guard
    expected = [R.clone() for R, _ in problems]
    for R, z in zip(expected, [z for _, z in problems]):
        decorrelation_update_(R, z, lr=0.5, kappa=0.2, max_rel_change=0.5)
    step = grouped_decorrelation_update_(problems, lr=0.5, kappa=0.2, max_rel_change=0.5)
    for (R, _), R_expected in zip(problems, expected):
        torch.testing.assert_close(R, R_expected)
    assert step.applied.tolist() == [True, True, True, False]
    assert torch.equal(problems[3][0], torch.eye(4).expand(2, 4, 4))
    with pytest.raises(ValueError, match='block-diagonal'):
        grouped_decorrelation_update_([(torch.eye(2)[None, None], torch.randn(1, 1, 5, 2))], lr=0.1, kappa=0.0)


@pytest.mark.parametrize('channel_mixed', [False, True])
def test_kron_factor_inputs_with_a_block_channel_factor(channel_mixed):
    torch.manual_seed(0)
    R_c = torch.eye(4).expand(3, 4, 4) + 0.1 * torch.randn(3, 4, 4)
    R_s = torch.eye(9) + 0.1 * torch.randn(9, 9)
    P = torch.randn(50, 12, 9)
    for got, want in zip(kron_factor_inputs(R_c, R_s, P, 100, channel_mixed),
                         kron_factor_inputs(_dense(R_c), R_s, P, 100, channel_mixed)):
        torch.testing.assert_close(got, want)
    conv = nn.Conv2d(12, 4, 3, padding=1)
    x = torch.randn(2, 12, 6, 6)
    samples = [sample_kron_factor_inputs(x, conv, R, R_s, 40, 80, torch.Generator().manual_seed(1))
               for R in (R_c, _dense(R_c))]
    for got, want in zip(*samples):
        torch.testing.assert_close(got, want)


def _kron_block_steps(R_c, R_s, channel_vectors, spatial_vectors):
    """The expected update of a kron R with a (3, 4, 4) block R_c and a 3 x 3 kernel's R_s, in place, block by block;
    returns the RMS correlation over the 3 * 4 * 3 channel and 9 * 8 spatial off-diagonal pairs."""
    blocks = [decorrelation_update_(R_c[g], channel_vectors[:, 4 * g:4 * g + 4], lr=0.1, kappa=0.0,
                                    decorrelated=True) for g in range(3)]
    spatial = decorrelation_update_(R_s, spatial_vectors, lr=0.1, kappa=0.0, decorrelated=True)
    squares = sum(step.correlation.square() * 4 * 3 for step in blocks) + spatial.correlation.square() * 9 * 8
    return (squares / (3 * 4 * 3 + 9 * 8)).sqrt()


def test_kron_block_update_logs_the_rms_over_every_decorrelated_pair():
    """A kron R with a block R_c reports the RMS correlation over its G b (b - 1) channel pairs and s (s - 1)
    spatial pairs (pairs across blocks are not decorrelated and do not count), from a layer and from the function."""
    torch.manual_seed(0)
    layer = _perturbed(DecorConv2d.from_conv(nn.Conv2d(12, 4, 3, padding=1), 'kron', decor_block_size=4))
    assert off_diagonal_pairs(layer.decor_matrix) == 3 * 4 * 3 and off_diagonal_pairs(layer.decor_spatial) == 9 * 8
    layer.decor_samples = 256
    layer(torch.einsum('dc,bchw->bdhw', torch.eye(12) + 0.5 * torch.randn(12, 12), torch.randn(8, 12, 6, 6)))
    inputs = layer.take_decor_inputs()
    R_c, R_s = layer.decor_matrix.clone(), layer.decor_spatial.clone()
    expected = _kron_block_steps(R_c, R_s, *inputs)
    assert bool(layer.update_decorrelation(inputs, lr=0.1, kappa=0.0))
    torch.testing.assert_close(layer.decor_matrix, R_c)
    torch.testing.assert_close(layer.decor_spatial, R_s)
    torch.testing.assert_close(layer.decor_corr, expected)

    patches = torch.randn(64, 12, 9) + torch.randn(64, 1, 9)  # correlated channels
    got_c, got_s = R_c.clone(), R_s.clone()
    step = kron_decorrelation_update_(got_c, got_s, patches, lr=0.1, kappa=0.0)
    expected = _kron_block_steps(R_c, R_s, *kron_factor_inputs(R_c, R_s, patches))
    torch.testing.assert_close(got_c, R_c)
    torch.testing.assert_close(step.correlation, expected)


def test_block_updates_decorrelate_each_block():
    torch.manual_seed(0)
    layer = DecorConv2d.from_conv(nn.Conv2d(8, 4, 3, padding=1), 'kron', decor_block_size=4)
    mix = torch.eye(8) + 0.8 * torch.ones(8, 8)  # every channel correlated with every other one
    x = torch.einsum('dc,bchw->bdhw', mix, torch.randn(8, 8, 10, 10))
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 8)

    def block_correlation():
        z = pixels @ _dense(layer.decor_matrix).T
        return max(offdiag_correlation(z[:, 4 * g:4 * g + 4]).item() for g in range(2))

    before = block_correlation()
    for _ in range(200):
        layer.decor_samples = 256
        layer(x)
        layer.update_decorrelation(layer.take_decor_inputs(), lr=0.05, kappa=0.0)
    assert int(layer.decor_updates) == 200 and before > 0.4
    assert block_correlation() < 0.2 * before
    dense = _dense(layer.decor_matrix)
    assert torch.equal(dense[:4, 4:], torch.zeros(4, 4))  # R stays block-diagonal


def test_bad_block_size():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    for bad in (0, -1, 2.5, '64', True):
        with pytest.raises(ValueError, match='block_size'):
            decorrelate(copy.deepcopy(model), block_size=bad)
    for bad in (-1, 2.5, False):  # as a model kwarg 0 means dense R's (tests/test_models.py)
        with pytest.raises(ValueError, match='block_size'):
            timm.create_model('dbp_test_resnet', device='meta', dbp_block_size=bad)
    with pytest.raises(ValueError, match='decor_block_size'):
        DecorConv2d(4, 4, 1, decor_block_size=0)


def test_resnet50_block_state_bytes():
    def state_mib(**kwargs):
        model = timm.create_model('dbp_resnet50', device='meta', **kwargs)
        return sum(layer.decor_state_bytes for _, layer in decor_layers(model)) / 2 ** 20
    assert 90 < state_mib(dbp_block_size=0) < 93  # dense kron R: the 1x1 convs' c x c R's, c up to 2048
    # blocks of at most 256 channels: c * 256 numbers per channel factor (c <= 256: c^2), plus the 9 x 9 factors
    model = timm.create_model('dbp_resnet50', device='meta', dbp_block_size=256)
    expected = 0
    for _, layer in decor_layers(model):
        c = layer.weight.shape[1]
        expected += 4 * (c * min(c, 256) + layer.decor_spatial.numel())
        assert layer.decor_blocks == max(1, c // 256)
    assert state_mib(dbp_block_size=256) == state_mib() == expected / 2 ** 20 < 25  # the default of the wide twins
