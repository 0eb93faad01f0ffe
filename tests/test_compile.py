""" torch.compile on DBP twins: R learns as in eager mode, and a training run compiles its graphs once """
import pytest
import timm
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import timm_dbp
import train
from timm_dbp import decor_layers

from test_train import _args, _last, _summary


def _train(steps: int, backend=None, in_chans: int = 3, **opt_kwargs):
    """dbp_test_resnet trained `steps` SGD steps on fixed random batches, eagerly or compiled with `backend`: (model,
    losses, number of frames dynamo had tried to compile after each step)."""
    torch.manual_seed(0)
    model = timm.create_model('dbp_test_resnet', num_classes=10, in_chans=in_chans)
    opt = timm.optim.create_optimizer_v2(model, opt='dbpsgd', lr=0.05, momentum=0.9, **opt_kwargs)
    forward = model if backend is None else torch.compile(model, backend=backend)
    data = torch.Generator().manual_seed(1)
    losses, frames = [], []
    for _ in range(steps):
        x, y = torch.randn(8, in_chans, 32, 32, generator=data), torch.randint(0, 10, (8,), generator=data)
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        frames.append(counters['frames']['total'])
    return model, losses, frames


@pytest.mark.parametrize('interval, in_chans', [(1, 3), (2, 3), (2, 1)])
def test_compiled_twin_learns_R_as_eager_and_compiles_once(interval, in_chans):
    torch._dynamo.reset()
    counters.clear()
    steps = 6
    compiled, compiled_losses, frames = _train(steps, 'aot_eager', in_chans, decor_interval=interval)
    eager, eager_losses, _ = _train(steps, in_chans=in_chans, decor_interval=interval)
    # armed and unarmed forwards (interval 2) are both compiled by step 3; later steps only reuse them (an older code
    # traced the sampling, whose seed changes every step: every step dynamo went through 32 frames again, 50x slower)
    assert frames[-1] == frames[2] > 0, frames
    # each a whole graph: the armed forward only keeps its layers' inputs, the step samples them (the sampling in the
    # forward, run eagerly, broke an armed forward into a graph per layer)
    assert not counters['graph_break'], dict(counters['graph_break'])
    assert counters['stats']['unique_graphs'] == min(interval, 2), dict(counters['stats'])
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(decor_layers(compiled), decor_layers(eager)):
        assert int(a.decor_updates) == int(b.decor_updates) == -(-steps // interval), name
        torch.testing.assert_close(a.decor_matrix, b.decor_matrix, rtol=1e-4, atol=1e-5, msg=name)


def test_train_py_torchcompile_trains_R_saves_plain_names_and_resumes(tiny_fmnist, tmp_path):
    out, compiled = str(tmp_path), ('--torchcompile', 'aot_eager')
    assert train.run(_args(tiny_fmnist, out, 'compiled', '--epochs', '1', *compiled)) == 0
    state = _last(out, 'compiled')['state_dict']
    assert not any('_orig_mod' in k for k in state)  # the old train.py saved the compiled module's names
    assert any(k.endswith('decor_matrix') and not torch.equal(v, torch.eye(len(v))) for k, v in state.items())
    timm.create_model('dbp_test_resnet', num_classes=10, in_chans=1).load_state_dict(state)  # a plain build loads it
    assert train.run(_args(tiny_fmnist, out, 'compiled', *compiled, '--resume', 'auto')) == 0  # to epoch 2 of 2
    assert [row['epoch'] for row in _summary(out, 'compiled')] == ['0', '1']


def test_compiled_spatial_product_is_the_plain_product():
    """Eagerly a large A @ R_s runs as a channels-last 1x1 conv (an autograd.Function); compiled, inductor makes that
    conv 3-5x slower (BENCHMARKS 44c), so the traced graph must hold the plain product, with the same values."""
    from timm_dbp.layers.decorrelation import SMALL_PRODUCT_CONV_MIN, times_small_matrix
    A = torch.randn(SMALL_PRODUCT_CONV_MIN // 9 + 1, 1, 9)
    M = torch.eye(9) + 0.1 * torch.randn(9, 9)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(times_small_matrix, backend=capture)(A, M)
    assert len(graphs) == 1 and 'autograd_function_apply' not in graphs[0] and 'matmul' in graphs[0], graphs
    torch.testing.assert_close(compiled, times_small_matrix(A, M))
