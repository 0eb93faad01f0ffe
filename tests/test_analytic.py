""" Analytic least-squares head: the recursive solver equals the whole-batch solution, bounded memory, clear errors """
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import timm
import timm_dbp
from timm_dbp import RecursiveLeastSquares, fit_analytic_head

from test_distributed import _free_port


def _problem(case: str, seed: int = 0):
    """Features X (n, d) and targets Y (n, c), float64; 'dependent' and 'wide' X are rank-deficient."""
    g = torch.Generator().manual_seed(seed)
    n, d, c = (9, 20, 3) if case == 'wide' else (150, 12, 4)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if case == 'dependent':
        x[:, 5] = x[:, 2]  # a duplicated column
        x[:, 7] = 2 * x[:, 0] - x[:, 1]  # a linear combination
        x[:, 9] = 0  # a dead feature
    return x, torch.randn(n, c, generator=g, dtype=torch.float64)


def _with_ones(x):
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def _feed(solver, x, y, batch=33):
    for i in range(0, len(x), batch):  # batches that straddle the solver's blocks
        solver.update(x[i:i + batch], y[i:i + batch])
    return solver


@pytest.mark.parametrize('case', ['full', 'dependent', 'wide'])
@pytest.mark.parametrize('block_size', [1, 7, 64, 10000])
def test_recursive_equals_whole_batch_pseudo_inverse(case, block_size):
    x, y = _problem(case)
    a = _with_ones(x)
    expected = torch.linalg.pinv(a) @ y  # (d + 1, c): minimum-norm least squares, bias included
    solver = _feed(RecursiveLeastSquares(x.shape[1], y.shape[1], block_size=block_size), x, y)
    weight, bias, residual = solver.solution()
    torch.testing.assert_close(weight, expected[:-1].T, rtol=0, atol=1e-10)
    torch.testing.assert_close(bias, expected[-1], rtol=0, atol=1e-10)
    torch.testing.assert_close(residual, (a @ expected - y).square().sum(), rtol=1e-10, atol=1e-10)
    assert solver.num_samples == len(x)
    if case == 'dependent':
        assert torch.linalg.matrix_rank(a) < a.shape[1]  # the case really is rank-deficient


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('block_size', [1, 50])
def test_ridge_equals_closed_form(bias, block_size):
    x, y = _problem('dependent')
    ridge = 0.7
    a = _with_ones(x) if bias else x
    penalty = ridge * torch.eye(a.shape[1], dtype=a.dtype)
    if bias:
        penalty[-1, -1] = 0  # the bias is not regularised
    expected = torch.linalg.solve(a.T @ a + penalty, a.T @ y)
    solver = _feed(RecursiveLeastSquares(x.shape[1], y.shape[1], ridge=ridge, bias=bias, block_size=block_size), x, y)
    weight, fitted_bias, residual = solver.solution()
    torch.testing.assert_close(weight, expected[:x.shape[1]].T, rtol=0, atol=1e-10)
    assert (fitted_bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(fitted_bias, expected[-1], rtol=0, atol=1e-10)
    penalised = (a @ expected - y).square().sum() + ridge * expected[:x.shape[1]].square().sum()
    torch.testing.assert_close(residual, penalised, rtol=1e-10, atol=0)
    # one pass serves every ridge: the default can be overridden at solve time
    unpenalised = _feed(RecursiveLeastSquares(x.shape[1], y.shape[1], bias=bias), x, y)
    torch.testing.assert_close(unpenalised.solution(ridge=ridge).weight, weight)


def test_state_does_not_grow_with_samples():
    g = torch.Generator().manual_seed(0)
    solver = RecursiveLeastSquares(16, 3, block_size=128)

    def state():
        return {k: (tuple(v.shape), v.data_ptr()) for k, v in vars(solver).items() if isinstance(v, torch.Tensor)}

    solver.update(torch.randn(100, 16, generator=g), torch.randn(100, 3, generator=g))
    after_100, bytes_100 = state(), solver.state_bytes
    for _ in range(99):
        solver.update(torch.randn(100, 16, generator=g), torch.randn(100, 3, generator=g))
    assert solver.num_samples == 10000
    assert state() == after_100 and solver.state_bytes == bytes_100 == (128 + 20) * 20 * 8


def test_merge_equals_one_solver_fed_all_rows():
    x, y = _problem('dependent')
    first = _feed(RecursiveLeastSquares(12, 4, block_size=40), x[:60], y[:60])
    second = _feed(RecursiveLeastSquares(12, 4, block_size=7), x[60:], y[60:])
    first.merge(second)
    whole = _feed(RecursiveLeastSquares(12, 4), x, y)
    assert first.num_samples == whole.num_samples == len(x)
    for merged, single in zip(first.solution(), whole.solution()):
        torch.testing.assert_close(merged, single, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match='cannot merge'):
        first.merge(RecursiveLeastSquares(12, 4, bias=False))


def _all_reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    x, y = _problem('dependent')
    shard = slice(0, 60) if rank == 0 else slice(60, None)  # unequal shards
    solver = _feed(RecursiveLeastSquares(12, 4, block_size=50), x[shard], y[shard])
    solver.all_reduce()
    torch.save(dict(solution=solver.solution(), num_samples=solver.num_samples), os.path.join(out_dir, f'{rank}.pt'))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed not available')
def test_all_reduce_over_two_ranks_equals_one_solver(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x, y = _problem('dependent')
    whole = _feed(RecursiveLeastSquares(12, 4), x, y).solution()
    for rank in range(2):
        result = torch.load(tmp_path / f'{rank}.pt', weights_only=False)
        assert result['num_samples'] == len(x)
        for got, expected in zip(result['solution'], whole):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_solver_errors():
    with pytest.raises(ValueError, match='ridge'):
        RecursiveLeastSquares(4, 2, ridge=-1.0)
    with pytest.raises(ValueError, match='block_size'):
        RecursiveLeastSquares(4, 2, block_size=0)
    with pytest.raises(ValueError, match='>= 1'):
        RecursiveLeastSquares(0, 2)
    solver = RecursiveLeastSquares(4, 2)
    with pytest.raises(ValueError, match='no samples seen'):
        solver.solution()
    with pytest.raises(ValueError, match='2-D'):
        solver.update(torch.randn(3, 4, 1), torch.randn(3, 2))
    with pytest.raises(ValueError, match='3 feature rows but 2 target rows'):
        solver.update(torch.randn(3, 4), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r'expected features \(n, 4\) and targets \(n, 2\)'):
        solver.update(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r'expected features \(n, 4\) and targets \(n, 2\)'):
        solver.update(torch.randn(3, 4), torch.randn(3, 3))
    for bad in (float('nan'), float('inf')):
        features = torch.randn(3, 4)
        features[1, 2] = bad
        with pytest.raises(ValueError, match='NaN or inf'):
            solver.update(features, torch.randn(3, 2))
    assert solver.num_samples == 0  # refused rows are not counted
    solver.update(torch.randn(3, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match='ridge'):
        solver.solution(ridge=-0.1)


def _pooled_features(model, images):
    model.eval()
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True).double()


def _image_batches(num_classes=3, n=48, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, n, batch)], images, labels


@pytest.mark.parametrize('model_name', ['test_resnet', 'dbp_test_resnet'])
def test_fit_analytic_head_sets_the_least_squares_classifier(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=3)
    head = model.get_classifier()
    if isinstance(head, timm_dbp.DecorLinear):
        with torch.no_grad():
            head.decor_matrix.add_(0.1 * torch.randn_like(head.decor_matrix))  # a DBP head with R != I
    model.train()
    norm_stats = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k}
    loader, images, labels = _image_batches()
    info = fit_analytic_head(model, loader, ridge=0.0)

    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in norm_stats.items())  # features in eval mode
    features = _pooled_features(model, images)
    expected = torch.linalg.pinv(_with_ones(features)) @ torch.eye(3, dtype=torch.float64)[labels]
    linear = nn.Linear(head.in_features, 3)
    linear.load_state_dict(dict(weight=expected[:-1].T.float(), bias=expected[-1].float()))
    if isinstance(head, timm_dbp.DecorLinear):
        torch.testing.assert_close(head.decor_matrix, torch.eye(head.in_features))
    torch.testing.assert_close(head.weight, linear.weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.bias, linear.bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(images), linear(features.float()), rtol=1e-4, atol=1e-4)
    assert info['num_samples'] == 48 and info['num_features'] == head.in_features and info['num_classes'] == 3
    assert info['residual'] >= 0 and info['seconds'] > 0


def test_fit_analytic_head_soft_targets_and_ridge():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=3)
    loader, images, labels = _image_batches()
    soft = torch.softmax(torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(1)), 1)
    soft_loader = [(x, soft[i * 16:(i + 1) * 16]) for i, (x, _) in enumerate(loader)]
    fit_analytic_head(model, soft_loader, ridge=2.0)
    features = _with_ones(_pooled_features(model, images))
    penalty = 2.0 * torch.eye(features.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0
    expected = torch.linalg.solve(features.T @ features + penalty, features.T @ soft.double())
    torch.testing.assert_close(model.get_classifier().weight, expected[:-1].T.float(), rtol=1e-4, atol=1e-4)


class _ConvHeadModel(nn.Module):
    """A timm-like model whose classifier is a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(8, 3, 1)

    def get_classifier(self):
        return self.fc

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x


@pytest.mark.parametrize('make, match', [
    (lambda: timm.create_model('test_resnet', num_classes=0), 'Identity'),
    (lambda: timm.create_model('deit_tiny_distilled_patch16_224', img_size=32, patch_size=8), 'distilled'),
    (_ConvHeadModel, 'Conv2d'),
    (lambda: nn.Linear(3, 3), 'not a timm model'),
], ids=['no-classifier', 'distilled', 'conv-head', 'not-timm'])
def test_fit_analytic_head_refuses_models_without_a_linear_head(make, match):
    loader, _, _ = _image_batches()
    with pytest.raises(ValueError, match=match):
        fit_analytic_head(make(), loader)


def test_fit_analytic_head_bad_data():
    model = timm.create_model('test_resnet', num_classes=3)
    before = model.get_classifier().weight.clone()
    with pytest.raises(ValueError, match='no samples'):
        fit_analytic_head(model, [])
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 3\)'):
        fit_analytic_head(model, [(images, torch.tensor([0, 1, 2, 3]))])
    with pytest.raises(ValueError, match=r'soft targets \(n, 3\)'):
        fit_analytic_head(model, [(images, torch.rand(4, 5))])
    with pytest.raises(ValueError, match='ridge'):
        fit_analytic_head(model, [(images, torch.tensor([0, 1, 2, 0]))], ridge=-1.0)
    assert torch.equal(model.get_classifier().weight, before)  # a refused fit changes nothing


@pytest.mark.parametrize('flag', ['--analytic-head', '--analytic-head-only'])
def test_train_py_refits_the_head_and_reports_before_and_after(tiny_fmnist, tmp_path, flag):
    import json
    import train
    from test_train import _args
    argv = _args(tiny_fmnist, str(tmp_path), 'analytic', '--epochs', '1', '--train-num-samples', '64',
                 '--val-num-samples', '64', flag, '--analytic-ridge', '0.01')
    assert train.run(argv) == 0
    exp = tmp_path / 'train' / 'analytic'
    report = json.loads((exp / 'analytic_head.json').read_text())
    assert report['fit']['num_samples'] == 64 and report['fit']['ridge'] == 0.01
    assert report['head_only'] == (flag == '--analytic-head-only')
    # 4 classes told apart by one bright band: least squares on the features separates them better than chance
    assert report['after']['top1'] > 50 and report['after']['top1'] != report['before']['top1']
    trained = (exp / 'last.pth.tar').exists()
    assert trained == (flag == '--analytic-head')  # head-only runs no training epoch and writes no epoch checkpoint
    checkpoint = torch.load(exp / 'analytic_head.pth.tar', weights_only=False)
    state = checkpoint['state_dict']
    assert torch.equal(state['fc.decor_matrix'], torch.eye(state['fc.weight'].shape[1]))
    if trained:  # the refit changes the classifier and nothing else
        last = torch.load(exp / 'last.pth.tar', weights_only=False)['state_dict']
        changed = {k for k, v in state.items() if not torch.equal(v, last[k])}
        assert changed <= {'fc.weight', 'fc.bias', 'fc.decor_matrix'} and 'fc.weight' in changed


def test_train_py_refuses_a_negative_ridge_and_a_model_without_classifier(tiny_fmnist, tmp_path, capsys):
    import train
    from test_train import _args, _error_of
    with pytest.raises(SystemExit) as e:
        train.run(_args(tiny_fmnist, str(tmp_path), 'x', '--analytic-head', '--analytic-ridge', '-1'))
    assert e.value.code == 2 and 'must be >= 0' in capsys.readouterr().err
    err = _error_of(capsys, _args(tiny_fmnist, str(tmp_path), 'x', '--analytic-head-only', '--num-classes', '0',
                                  '--opt', 'sgd'))
    assert 'analytic-head' in err and 'Identity' in err


@pytest.mark.slow
def test_train_py_under_torchrun_fits_one_head_on_all_shards(tiny_fmnist, tmp_path):
    import train
    from test_train import _args, run_torchrun
    argv = _args(tiny_fmnist, str(tmp_path), 'one', '--analytic-head-only', '--train-num-samples', '64',
                 '--val-num-samples', '64')
    assert train.run(argv) == 0
    run_torchrun(_args(tiny_fmnist, str(tmp_path), 'two', *argv[argv.index('--analytic-head-only'):]))
    one, two = (torch.load(tmp_path / 'train' / name / 'analytic_head.pth.tar', weights_only=False) for name in
                ('one', 'two'))
    assert two['analytic_head']['fit']['num_samples'] == 64  # 32 per rank, merged
    for key in ('fc.weight', 'fc.bias'):
        torch.testing.assert_close(two['state_dict'][key], one['state_dict'][key], rtol=1e-4, atol=1e-4)
