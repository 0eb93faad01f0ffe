""" Tests of the DBP maths and layers (timm_dbp.layers) """
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm_dbp.layers import (
    DecorConv2d, DecorLinear, auto_kappa, decorrelate, decorrelation_loss, decorrelation_update_, fold,
    grouped_decorrelation_update_, offdiag_correlation, sample_conv_patches, sample_indices,
)
from timm_dbp.layers.decorrelation import LOG_STAT_ROWS

CONV_CONFIGS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(1, 2)),
    dict(kernel_size=3, padding='same', dilation=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=5, padding=2, groups=4),  # depthwise (C_in = groups): one R shared by the channels
    dict(kernel_size=3, padding=2, padding_mode='reflect'),
    dict(kernel_size=1),
]


def _reference_update(R, x, lr, kappa):
    """R - lr [(1 - kappa) C + kappa diag(v)] R, written out in float64 from the definitions."""
    R, x = R.double(), x.double()
    z = x @ R.T
    X = z.T @ z / x.shape[0]
    C = X - torch.diag(torch.diag(X))
    v = torch.diag(X) - 1
    return R - lr * ((1 - kappa) * C + kappa * torch.diag(v)) @ R


@pytest.mark.parametrize('cfg', CONV_CONFIGS, ids=str)
def test_sampled_patches_are_unfold_patches(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, **cfg)
    x = torch.randn(2, 4, 9, 8)
    # reference: every patch, via F.unfold on the input padded the conv's own way
    mode = 'constant' if conv.padding_mode == 'zeros' else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (B, C*k*k, L)
    g = conv.groups
    ref = cols.reshape(2, g, -1, cols.shape[-1]).permute(0, 1, 3, 2).reshape(-1, conv.weight[0].numel())
    everything = sample_conv_patches(x, conv, num_samples=10 ** 6)
    assert everything.shape == ref.shape
    key = lambda t: t[torch.argsort(t @ torch.linspace(1, 2, t.shape[1]))]  # order-free comparison
    torch.testing.assert_close(key(everything), key(ref))
    channels_last = sample_conv_patches(x.to(memory_format=torch.channels_last), conv, num_samples=10 ** 6)
    torch.testing.assert_close(key(channels_last), key(ref))
    gen = lambda: torch.Generator().manual_seed(3)
    unflat = sample_conv_patches(x, conv, num_samples=7, generator=gen(), flat=False)  # (n, c, s) view, same patches
    assert unflat.shape == (7, 4 // g, conv.weight[0, 0].numel())
    torch.testing.assert_close(unflat.reshape(7, -1), sample_conv_patches(x, conv, num_samples=7, generator=gen()))
    some = sample_conv_patches(x, conv, num_samples=5)
    assert some.shape == (5, ref.shape[1])
    # without replacement: all drawn rows are distinct patches
    assert torch.unique(some, dim=0).shape[0] == 5
    # a few patches gather their pixels alone, many copy the whole input first (`_pixel_rows`): both are unfold's
    for drawn in (some, sample_conv_patches(x, conv, num_samples=60)):
        assert (drawn[:, None, :] - ref[None]).abs().amax(-1).min(1).values.max() < 1e-6


@pytest.mark.parametrize('total,n', [(400, 10), (40, 10), (7, 10)])  # the O(n) draw (total > 8 n); randperm
def test_sample_indices_are_distinct_and_uniform(total, n):
    """Distinct indices, min(n, total) of them; every index equally likely to be drawn, and to come first."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_indices(total, n, generator) for _ in range(4000)])
    k = min(n, total)
    assert draws.shape == (4000, k) and all(torch.unique(row).numel() == k for row in draws[:200])
    assert int(draws.min()) >= 0 and int(draws.max()) < total
    for column in (draws.flatten(), draws[:, 0]):  # every draw, and the first of each (a random order, not sorted)
        counts = torch.bincount(column, minlength=total).double()
        expected = column.numel() / total
        chi2 = ((counts - expected).square() / expected).sum().item()
        assert abs(chi2 - (total - 1)) < 5 * (2 * (total - 1)) ** 0.5  # chi-square with total - 1 dof: 5 sigma


@pytest.mark.parametrize('cfg', CONV_CONFIGS, ids=str)
def test_conv_at_identity_equals_plain_conv(cfg):
    torch.manual_seed(0)
    plain = nn.Conv2d(4, 8, **cfg)
    dbp = DecorConv2d.from_conv(plain)
    assert dbp.weight is plain.weight
    assert torch.equal(dbp.decor_matrix, torch.eye(dbp.decor_dim))
    x = torch.randn(2, 4, 9, 8)
    assert torch.equal(dbp(x), plain(x))


def test_linear_at_identity_equals_plain_linear():
    plain = nn.Linear(7, 3)
    dbp = DecorLinear.from_linear(plain)
    x = torch.randn(5, 2, 7)
    assert torch.equal(dbp(x), plain(x))


def test_linear_at_identity_is_bit_identical_on_non_contiguous_tokens_without_grad():
    # PiT's distilled pooling applies its Linear to a slice of the token tensor (2 of 731 tokens); torch picks a
    # different matmul kernel for such an input when the weight does not require grad, which rounded differently
    torch.manual_seed(0)
    plain = nn.Linear(144, 288)
    dbp = DecorLinear.from_linear(plain)
    tokens = torch.randn(2, 731, 144)[:, :2]
    with torch.no_grad():
        assert torch.equal(dbp(tokens), plain(tokens))
    assert torch.equal(dbp(tokens), plain(tokens))


@pytest.mark.parametrize('shape', [(6, 7), (2, 5, 7), (2, 3, 4, 7)], ids=['rows', 'tokens BNC', 'channels-last BHWC'])
def test_linear_on_tokens_is_linear_with_WR_and_samples_token_rows(shape):
    """ViT tokens (B, N, C) and ConvNeXt channels-last maps (B, H, W, C): y = x (W R)^T + b, the W gradient is BP on
    z = x R^T, the sample is rows of x over all leading dims, and fold gives the same layer."""
    torch.manual_seed(0)
    layer = DecorLinear(7, 3).double()
    with torch.no_grad():
        layer.decor_matrix.add_(0.1 * torch.randn(7, 7, dtype=torch.double))
    x = torch.randn(*shape, dtype=torch.double)
    R, W = layer.decor_matrix, layer.weight
    torch.testing.assert_close(layer(x), x @ (W @ R).T + layer.bias)
    g = torch.randn(*shape[:-1], 3, dtype=torch.double)
    grad_w, = torch.autograd.grad(layer(x), W, g)
    z = x @ R.T
    torch.testing.assert_close(grad_w, g.reshape(-1, 3).T @ z.reshape(-1, 7))
    layer.decor_samples = 10 ** 6
    layer(x)
    rows = layer.take_decor_inputs()  # z = R x of every input row, in random order
    assert rows.shape == (x[..., 0].numel(), 7) and rows.dtype == torch.float32
    key = lambda t: t[torch.argsort(t @ torch.linspace(1, 2, 7, dtype=t.dtype))]
    torch.testing.assert_close(key(rows), key(z.reshape(-1, 7).float()))
    torch.testing.assert_close(fold(layer)(x), layer(x))


@pytest.mark.parametrize('cfg', CONV_CONFIGS[:5], ids=str)
def test_fused_conv_gradient_is_bp_on_decorrelated_patches(cfg):
    torch.manual_seed(0)
    conv = DecorConv2d(4, 8, **cfg).double()
    d = conv.decor_dim
    conv.decor_matrix.copy_(torch.eye(d, dtype=torch.double) + 0.1 * torch.randn(d, d, dtype=torch.double))
    x = torch.randn(2, 4, 9, 8, dtype=torch.double)
    target = torch.randn_like(conv(x))
    (conv(x) * target).sum().backward()
    fused_grad = conv.weight.grad.clone()

    # unfused: z = R x for every patch, y = W z, plain backprop to W
    mode = 'constant' if conv.padding_mode == 'zeros' else conv.padding_mode
    xp = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    g = conv.groups
    patches = cols.reshape(2, g, d, -1)  # (B, g, d, L)
    z = torch.einsum('ij,bgjl->bgil', conv.decor_matrix, patches)
    W = conv.weight.detach().clone().requires_grad_()
    Wg = W.reshape(g, -1, d)  # (g, out/g, d)
    y = torch.einsum('god,bgdl->bgol', Wg, z).reshape(2, conv.out_channels, -1)
    if conv.bias is not None:
        y = y + conv.bias[None, :, None]
    (y.reshape(target.shape) * target).sum().backward()
    torch.testing.assert_close(fused_grad, W.grad)


@pytest.mark.parametrize('n', [5, 40])  # n < d (Gram path) and n >= d (direct path)
@pytest.mark.parametrize('kappa', [0.0, 0.3, 1.0])
def test_update_matches_reference(n, kappa):
    torch.manual_seed(0)
    d = 12
    R = torch.eye(d) + 0.05 * torch.randn(d, d)
    x = torch.randn(n, d) @ torch.randn(d, d)
    expected = _reference_update(R, x, lr=1e-3, kappa=kappa)
    step = decorrelation_update_(R, x, lr=1e-3, kappa=kappa)
    assert bool(step.applied)
    torch.testing.assert_close(R.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('n,d', [(40, 12), (5, 12), (300, 400)])  # X formed; Gram path; Gram of the first rows
@pytest.mark.parametrize('kappa', [0.3, 'auto'])
def test_logged_statistics_are_those_of_the_sample(n, d, kappa):
    """The step's loss, correlation and kappa are `decorrelation_loss`, `offdiag_correlation` and `auto_kappa` of
    z = R x before the update: of the whole sample when n >= d; when n < d, their off-diagonal parts are of the
    sample's first LOG_STAT_ROWS rows (the variance error v is always of the whole sample)."""
    torch.manual_seed(0)
    R = torch.eye(d) + 0.05 * torch.randn(d, d)
    x = F.relu(torch.randn(n, d) @ torch.randn(d, d))
    z = x @ R.T
    z_log = z if n >= d else z[:LOG_STAT_ROWS]
    step = decorrelation_update_(R, x, lr=1e-3, kappa=kappa)
    expected_kappa = auto_kappa(z_log, z.square().mean(0) - 1) if kappa == 'auto' else torch.tensor(kappa)
    torch.testing.assert_close(step.kappa, expected_kappa)
    variance_loss = (z.square().mean(0) - 1).square().mean()
    expected_loss = (1 - expected_kappa) * decorrelation_loss(z_log, 0.0) + expected_kappa * variance_loss
    torch.testing.assert_close(step.loss, expected_loss, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(step.correlation, offdiag_correlation(z_log), rtol=1e-4, atol=1e-7)


def test_update_matches_hand_computed_3x3():
    # one sample x = (1, 2, 0), R = I: X = x x^T, C = off-diagonal, v = diag(X) - 1 = (0, 3, -1)
    R = torch.eye(3)
    x = torch.tensor([[1., 2., 0.]])
    decorrelation_update_(R, x, lr=0.1, kappa=0.5)
    C = torch.tensor([[0., 2., 0.], [2., 0., 0.], [0., 0., 0.]])
    v = torch.tensor([0., 3., -1.])
    expected = torch.eye(3) - 0.1 * (0.5 * C + 0.5 * torch.diag(v))
    torch.testing.assert_close(R, expected)


def test_auto_kappa_is_the_diagonal_share_of_the_whitening_error():
    torch.manual_seed(0)
    z = torch.randn(30, 6, dtype=torch.double) @ torch.randn(6, 6, dtype=torch.double)
    X = z.T @ z / 30
    v = torch.diag(X) - 1
    C = X - torch.diag(torch.diag(X))
    expected = v.square().sum() / (C.square().sum() + v.square().sum())
    torch.testing.assert_close(auto_kappa(z, v), expected)
    # uncorrelated inputs with variances far from 1: mostly variance normalisation; correlated unit variances:
    # mostly decorrelation
    scaled = torch.randn(4096, 8) * torch.linspace(0.2, 3.0, 8)
    assert auto_kappa(scaled, scaled.square().mean(0) - 1) > 0.9
    mixed = torch.randn(4096, 8) @ (torch.eye(8) + 0.6 * torch.ones(8, 8)) / 2.3
    assert auto_kappa(mixed, mixed.square().mean(0) - 1) < 0.2


@pytest.mark.parametrize('n', [5, 40])
def test_auto_kappa_update_is_the_rule_at_the_chosen_kappa(n):
    torch.manual_seed(0)
    R = torch.eye(12, dtype=torch.double) + 0.05 * torch.randn(12, 12, dtype=torch.double)
    x = torch.randn(n, 12, dtype=torch.double) @ torch.randn(12, 12, dtype=torch.double)
    z = x @ R.T
    kappa = auto_kappa(z, z.square().mean(0) - 1).item()
    expected = _reference_update(R, x, lr=1e-3, kappa=kappa)
    step = decorrelation_update_(R, x, lr=1e-3, kappa='auto')
    assert step.kappa.item() == pytest.approx(kappa)
    torch.testing.assert_close(R, expected)


@pytest.mark.parametrize('kappa', [0.3, 'auto'])
def test_grouped_update_is_each_pairs_own_update(kappa):
    """Equal shapes are batched, yet every pair gets its own update and guard (a NaN sample refuses only its R), and
    the stacked steps come back in the pairs' order, also when a batch's members are not adjacent."""
    torch.manual_seed(0)
    shapes = [(6, 40), (5, 40), (6, 40), (6, 4), (6, 40)]  # (d, n): a batch of three (pairs 0, 2, 4), two alone
    problems = [(torch.eye(d, dtype=torch.double) + 0.1 * torch.randn(d, d, dtype=torch.double),
                 torch.randn(n, d, dtype=torch.double) @ torch.randn(d, d, dtype=torch.double)) for d, n in shapes]
    problems[2][1][0, 0] = float('nan')
    expected = [(R.clone(), x) for R, x in problems]
    expected_steps = [decorrelation_update_(R, x, lr=0.01, kappa=kappa) for R, x in expected]
    step = grouped_decorrelation_update_(problems, lr=0.01, kappa=kappa)
    assert step.applied.tolist() == [True, True, False, True, True]
    for (R, _), (R_expected, _) in zip(problems, expected):
        torch.testing.assert_close(R, R_expected)
    for field, values in step._asdict().items():
        assert values.shape == (len(problems),), field
        expected_values = torch.stack([getattr(s, field) for s in expected_steps])
        torch.testing.assert_close(values, expected_values, equal_nan=True, msg=field)


def test_grouped_update_leaves_large_R_unbatched(monkeypatch):
    """R's wider than BATCH_MAX_DIM are never stacked (a batch of them costs memory, not time): each is updated by
    its own call, bitwise; smaller ones still are."""
    from timm_dbp.layers import decorrelation
    torch.manual_seed(0)
    problems = [(torch.eye(d) + 0.1 * torch.randn(d, d), torch.randn(50, d)) for d in (6, 6, 3, 3)]
    expected = [(R.clone(), x) for R, x in problems]
    for R, x in expected:
        decorrelation_update_(R, x, lr=0.01, kappa=0.0)
    stacked = []
    stack = torch.stack
    monkeypatch.setattr(torch, 'stack', lambda tensors, *a, **k: stacked.append(tensors[0].shape) or stack(
        tensors, *a, **k))
    monkeypatch.setattr(decorrelation, 'BATCH_MAX_DIM', 5)
    grouped_decorrelation_update_(problems, lr=0.01, kappa=0.0)
    assert (6, 6) not in stacked and (3, 3) in stacked
    for (R, _), (R_expected, _) in zip(problems[:2], expected[:2]):
        assert torch.equal(R, R_expected)
    for (R, _), (R_expected, _) in zip(problems[2:], expected[2:]):
        torch.testing.assert_close(R, R_expected)


@pytest.mark.parametrize('threads, count', [(2, 3), (2, 4), (3, 2), (2, 5)])
def test_batch_matmul_balances_a_cpu_batch_over_threads(monkeypatch, threads, count):
    """A CPU batch of large float32 products that does not divide among the threads is one bmm over a multiple of them
    plus one mm per remaining product; every product is that of torch.bmm. Small products, products that need a
    gradient, bfloat16 products and batches that divide evenly stay one bmm."""
    from timm_dbp.layers import decorrelation
    torch.manual_seed(0)
    calls = []
    for op in ('bmm', 'mm'):
        original = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda a, b, *args, _op=op, _f=original, **kw: calls.append(
            (_op, a.shape[0] if _op == 'bmm' else 1)) or _f(a, b, *args, **kw))
    monkeypatch.setattr(torch, 'get_num_threads', lambda: threads)
    A, B = torch.randn(count, 96, 128), torch.randn(count, 128, 96)
    monkeypatch.setattr(decorrelation, 'BALANCED_BMM_MIN_MACS', 96 * 128 * 96)
    product = decorrelation.batch_matmul(A, B.mT.contiguous().mT)  # any strides
    rest = count % threads
    assert calls == ([('bmm', count)] if rest == 0 else [('bmm', count - rest)] * (count > rest) + [('mm', 1)] * rest)
    torch.testing.assert_close(product, torch.bmm(A, B))
    calls.clear()
    decorrelation.batch_matmul(A, B.clone().requires_grad_())  # a product that needs a gradient
    decorrelation.batch_matmul(A.bfloat16(), B.bfloat16())
    monkeypatch.setattr(decorrelation, 'BALANCED_BMM_MIN_MACS', 96 * 128 * 96 + 1)
    decorrelation.batch_matmul(A, B)  # small products
    assert calls == [('bmm', count)] * 3


def test_variance_term_scales_rows_not_columns():
    torch.manual_seed(0)
    d = 4
    R = torch.eye(d) + 0.3 * torch.randn(d, d)  # not symmetric, so diag(v) R != R diag(v)
    x = torch.randn(64, d) * torch.tensor([3., 1., .5, 2.])
    R0 = R.clone()
    z = x @ R0.T
    v = z.square().mean(0) - 1
    decorrelation_update_(R, x, lr=0.01, kappa=1.0)
    torch.testing.assert_close(R, R0 - 0.01 * v[:, None] * R0)  # diag(v) R: row i scaled by v_i
    assert not torch.allclose(R, R0 - 0.01 * R0 * v[None, :], atol=1e-4)


def _correlated(n, d, rho=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    cov = torch.full((d, d), rho) + (1 - rho) * torch.eye(d)
    L = torch.linalg.cholesky(cov)
    return torch.randn(n, d, generator=g) @ L.T


@pytest.mark.parametrize('d, matmul_dtype', [(16, torch.float32), (128, torch.float32), (128, torch.bfloat16)])
def test_update_decorrelates_strongly_correlated_inputs(d, matmul_dtype):
    R = torch.eye(d)
    held_out = _correlated(20000, d, seed=1)
    before = offdiag_correlation(held_out @ R.T)
    for step in range(300):
        decorrelation_update_(R, _correlated(512, d, seed=100 + step), lr=0.02, kappa=0.0, max_step=0.5,
                              matmul_dtype=matmul_dtype)
    after = offdiag_correlation(held_out @ R.T)
    assert before > 0.85 and R.dtype == torch.float32
    assert after < before / 10, (before, after)


@pytest.mark.parametrize('n', [400, 50])  # n >= d (X formed) and n < d (products through z)
@pytest.mark.parametrize('lr', [1e-3, 5e-2])  # the cap idle and binding
def test_bfloat16_products_change_the_step_by_their_rounding_only(n, lr):
    """matmul_dtype=bfloat16 rounds the operands of the update's products (8 significant bits): the step differs
    from float32's (so the bfloat16 products did run) by about 2^-8 relative, R stays float32, the cap binds alike,
    and a batch of problems gets each problem's own bfloat16 update."""
    torch.manual_seed(0)
    d = 160  # >= MATMUL_DTYPE_MIN_DIM
    R = torch.eye(d) + 0.01 * torch.randn(d, d)
    x = F.relu(torch.randn(n, d)) + 1.0
    steps, deltas = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        R_new = R.clone()
        steps[dtype] = decorrelation_update_(R_new, x, lr=lr, kappa=0.3, max_step=0.5, matmul_dtype=dtype)
        deltas[dtype] = R_new - R
        assert R_new.dtype == torch.float32 and bool(steps[dtype].applied)
    error = (deltas[torch.bfloat16] - deltas[torch.float32]).norm() / deltas[torch.float32].norm()
    assert 1e-5 < error < 2e-2, error
    assert bool(steps[torch.bfloat16].capped) == bool(steps[torch.float32].capped) == (lr > 1e-2)
    torch.testing.assert_close(steps[torch.bfloat16].loss, steps[torch.float32].loss, rtol=1e-2, atol=0)
    batch = [(R.clone(), x), (R.clone(), x.flip(0))]  # the same problem twice: one batched call
    grouped = grouped_decorrelation_update_(batch, lr=lr, kappa=0.3, max_step=0.5, matmul_dtype=torch.bfloat16)
    tolerance = 1e-3 * deltas[torch.float32].abs().max().item()  # float32 sums in another order, not bfloat16's 4e-3
    for R_batched, _ in batch:
        torch.testing.assert_close(R_batched - R, deltas[torch.bfloat16], rtol=0, atol=tolerance)
    assert grouped.applied.all()


def test_update_builds_no_autograd_graph():
    """R is never trained by autograd: an update from inputs that require grad leaves R and the step without one."""
    R = torch.eye(12)
    step = decorrelation_update_(R, torch.randn(40, 12, requires_grad=True), lr=1e-3, kappa=0.0)
    assert not R.requires_grad and not step.loss.requires_grad


def test_matmul_dtype_names(monkeypatch):
    """'auto' is bfloat16 where the hardware multiplies it natively, float32 elsewhere; unknown names are refused."""
    from timm_dbp.layers import decorrelation
    cpu = torch.device('cpu')
    assert decorrelation.matmul_dtype_named('bfloat16', cpu) == torch.bfloat16
    assert decorrelation.matmul_dtype_named('float32', cpu) == torch.float32
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(decorrelation, '_native_bfloat16', lambda *device, native=native: native)
        assert decorrelation.matmul_dtype_named('auto', cpu) == expected
    with pytest.raises(ValueError, match='decor_matmul_dtype'):
        decorrelation.matmul_dtype_named('float16', cpu)


def test_update_refuses_a_matmul_dtype_that_could_overflow():
    with pytest.raises(ValueError, match='matmul_dtype'):
        decorrelation_update_(torch.eye(4), torch.randn(8, 4), lr=1e-3, kappa=0.0, matmul_dtype=torch.float16)


def test_kappa_one_drives_variances_to_one():
    d = 8
    R = torch.eye(d)
    scales = torch.tensor([0.3, 0.5, 1., 2., 3., 0.7, 1.5, 2.5])
    for step in range(400):
        x = torch.randn(512, d, generator=torch.Generator().manual_seed(step)) * scales
        decorrelation_update_(R, x, lr=0.02, kappa=1.0)
    x = torch.randn(20000, d, generator=torch.Generator().manual_seed(-1 % 2 ** 31)) * scales
    torch.testing.assert_close((x @ R.T).square().mean(0), torch.ones(d), atol=0.05, rtol=0)


def test_kappa_zero_leaves_the_diagonal_free():
    # inputs with an exactly diagonal second moment of variances != 1: C = 0, so kappa = 0 changes nothing
    d = 5
    x = torch.cat([torch.eye(d) * s for s in (3., -3.)])  # X = diag(9 * 2 / 10)
    R = torch.eye(d)
    decorrelation_update_(R, x, lr=0.1, kappa=0.0)
    assert torch.equal(R, torch.eye(d))
    decorrelation_update_(R, x, lr=0.1, kappa=1.0)
    assert not torch.equal(R, torch.eye(d))


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_non_finite_inputs_are_skipped(bad):
    layer = DecorLinear(6, 3)
    x = torch.randn(32, 6)
    x[3, 2] = bad
    applied = layer.update_decorrelation(x, lr=1e-2, kappa=0.5)
    assert not bool(applied)
    assert torch.equal(layer.decor_matrix, torch.eye(6))
    assert int(layer.decor_skipped) == 1 and int(layer.decor_updates) == 0


def test_huge_decor_lr_is_refused_and_R_stays_finite():
    layer = DecorLinear(6, 3)
    for step in range(20):
        layer.update_decorrelation(_correlated(64, 6, seed=step), lr=1e3, kappa=0.0)
    assert torch.isfinite(layer.decor_matrix).all()
    assert torch.equal(layer.decor_matrix, torch.eye(6))
    assert int(layer.decor_skipped) == 20
    # a sane rate on the same layer still learns
    assert bool(layer.update_decorrelation(_correlated(64, 6), lr=1e-2, kappa=0.0))


def _update_matrix(R, x, kappa):
    """G = (1 - kappa) C + kappa diag(v) of the rule, in float64 from the definitions."""
    z = x.double() @ R.double().T
    X = z.T @ z / x.shape[0]
    return (1 - kappa) * (X - torch.diag(torch.diag(X))) + kappa * torch.diag(torch.diag(X) - 1)


@pytest.mark.parametrize('kappa', [0.0, 0.3])
@pytest.mark.parametrize('n', [50, 400])  # n < d (Gram path) and n >= d (direct path)
def test_step_cap_is_the_rule_at_the_capped_rate(kappa, n):
    """With max_step the update is the plain rule at lr_eff = min(lr, max_step / |lambda|_max(G)); inputs with a
    large shared mean (a ReLU's) make |lambda|_max about d m^2, far above max_step / lr."""
    torch.manual_seed(0)
    d, lr, max_step = 96, 5e-2, 0.5
    R = torch.eye(d) + 0.01 * torch.randn(d, d)
    x = F.relu(torch.randn(n, d)) + 1.0
    lam = torch.linalg.eigvalsh(_update_matrix(R, x, kappa)).abs().max().item()
    assert lr * lam > 2  # the plain step would overshoot
    capped, plain = R.clone(), R.clone()
    step = decorrelation_update_(capped, x, lr=lr, kappa=kappa, max_step=max_step)
    assert bool(step.applied) and bool(step.capped)
    decorrelation_update_(plain, x, lr=max_step / lam, kappa=kappa)  # the rule at the exact capped rate
    torch.testing.assert_close(capped, plain, rtol=1e-4, atol=1e-5)  # power iteration: |lambda| to ~1e-5
    # below the cap nothing changes (bitwise) and the step is not counted as capped
    calm, reference = R.clone(), R.clone()
    step = decorrelation_update_(calm, x, lr=0.1 * max_step / lam, kappa=kappa, max_step=max_step)
    decorrelation_update_(reference, x, lr=0.1 * max_step / lam, kappa=kappa)
    assert not bool(step.capped) and torch.equal(calm, reference)


def test_step_cap_keeps_a_wide_layer_stable_where_the_plain_rule_diverges():
    """A decor_lr 10x past the stable rate: the plain rule blows the loss up and the guard refuses the rest; capped,
    every update is applied and the decorrelation loss falls by orders of magnitude."""
    d, lr = 128, 0.05
    runs = {}
    for max_step in (float('inf'), 0.5):
        R, losses, applied = torch.eye(d), [], []
        for step in range(30):
            torch.manual_seed(step)
            step = decorrelation_update_(R, F.relu(torch.randn(512, d)) + 0.5, lr=lr, kappa=0.0, max_step=max_step)
            losses.append(step.loss.item())
            applied.append(bool(step.applied))
        runs[max_step] = (losses, applied, R)
    losses, applied, R = runs[float('inf')]
    assert not all(applied) and losses[-1] > losses[0]  # blown up, then refused
    losses, applied, R = runs[0.5]
    assert all(applied) and torch.isfinite(R).all() and losses[-1] < 1e-2 * losses[0], losses


def test_capture_only_when_armed_and_training():
    conv = DecorConv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    conv(x)
    assert conv.take_decor_inputs() is None  # unarmed: no sampling cost
    conv.decor_samples = 10
    conv.eval()
    conv(x)
    assert conv.take_decor_inputs() is None
    conv.train()
    conv(x)
    sample = conv.take_decor_inputs()
    assert sample.shape == (10, 27)
    assert conv.take_decor_inputs() is None  # consumed


def test_checkpoint_rerun_overwrites_the_sample():
    conv = DecorConv2d(3, 4, 3, padding=1)
    conv.decor_samples = 7
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    checkpoint(conv, x, use_reentrant=False).sum().backward()  # forward runs twice
    assert conv.take_decor_inputs().shape == (7, 27)


def test_decorrelate_skip_options_and_fold():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )
    x = torch.randn(2, 3, 10, 10)
    expected = model(x)
    decorrelate(model, exclude=['7'], max_dim=100)  # conv 4 has d = 144 > 100
    assert [type(m).__name__ for m in model] == [
        'DecorConv2d', 'ReLU', 'DecorConv2d', 'ReLU', 'Conv2d', 'AdaptiveAvgPool2d', 'Flatten', 'Linear']
    assert torch.equal(model(x), expected)
    for m in model:
        if isinstance(m, (DecorConv2d, DecorLinear)):
            m.decor_matrix.add_(0.05 * torch.randn_like(m.decor_matrix))
    moved = model(x)
    assert not torch.allclose(moved, expected)
    fold(model)
    assert not any(isinstance(m, (DecorConv2d, DecorLinear)) for m in model.modules())
    assert not any('decor' in k for k in model.state_dict())
    torch.testing.assert_close(model(x), moved)


def test_kron_max_dim_gives_the_wide_convs_a_channel_r():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    )
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    decorrelate(model, structure='kron', kron_max_dim=72)  # d: 27, 72, 16 (1x1), 144 > 72
    structures = [m.decor_structure for m in model if isinstance(m, (DecorConv2d, DecorLinear))]
    assert structures == ['kron', 'kron', 'full', 'channel', 'full']
    assert model[6].decor_matrix.shape == (16, 16) and model[6].decor_spatial.numel() == 0
    assert model[2].decor_spatial.shape == (9, 9)
    assert torch.equal(model(x), expected)  # R = I: the function is unchanged
    for m in model:
        if isinstance(m, (DecorConv2d, DecorLinear)):
            m.decor_matrix.add_(0.05 * torch.randn_like(m.decor_matrix))
    moved = model(x)
    fold(model)
    torch.testing.assert_close(model(x), moved)


@pytest.mark.parametrize('kwargs', [dict(structure='full', kron_max_dim=100), dict(structure='channel', kron_max_dim=1),
                                    dict(kron_max_dim=0)])
def test_bad_kron_max_dim(kwargs):
    with pytest.raises(ValueError, match='kron_max_dim'):
        decorrelate(nn.Sequential(nn.Conv2d(3, 4, 3)), **kwargs)


def test_decorrelate_layer_itself_and_bad_max_dim():
    assert isinstance(decorrelate(nn.Linear(3, 2)), DecorLinear)
    with pytest.raises(ValueError, match='max_dim'):
        decorrelate(nn.Linear(3, 2), max_dim=0)
