""" Tests of the DBP optimizers and their timm registration (timm_dbp.optim) """
import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import Lookahead, create_optimizer_v2, list_optimizers

import timm_dbp
from timm_dbp import NoDecorLayersWarning, decor_layers, is_dbp_optimizer
from timm_dbp.optim import with_dbp

DBP_NAMES = list_optimizers('dbp*')
LR = {'dbpsgd': 0.05, 'dbpmomentum': 0.05, 'dbpsgdw': 0.05, 'dbplars': 0.05}


def _model(seed=0, name='dbp_test_resnet'):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=4)


def _batch(step, batch_size=4):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 4, (batch_size,), generator=g)


def _train(model, opt, steps, micro_batches=1):
    model.train()
    for step in steps:
        for micro in range(micro_batches):
            x, y = _batch(step * micro_batches + micro)
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _decor_matrices(model):
    return {name: layer.decor_matrix.clone() for name, layer in decor_layers(model)}


def test_advertised_names():
    for name in ('dbpsgd', 'dbpmomentum', 'dbpadamw', 'dbpadam', 'dbplamb', 'dbpmuon'):
        assert name in DBP_NAMES
    assert issubclass(timm.optim.get_optimizer_class('dbpmuon', bind_defaults=False), timm.optim.Muon)


@pytest.mark.parametrize('opt_name', DBP_NAMES)
def test_every_name_builds_dbp_and_moves_R(opt_name):
    model = _model()
    before = _decor_matrices(model)
    weight_before = model.conv1[0].weight.detach().clone()
    opt = create_optimizer_v2(model, opt=opt_name, lr=LR.get(opt_name, 1e-3), decor_lr=1e-3)
    assert is_dbp_optimizer(opt)
    _train(model, opt, range(2))
    after = _decor_matrices(model)
    assert all(not torch.equal(before[k], after[k]) for k in before), 'some R did not move'
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(model.conv1[0].weight, weight_before)
    assert opt.dbp_summary()['decor_updates'] == 2 * len(before)


@pytest.mark.parametrize('spelling, expected', [
    ('dbp_sgd', 'DBPSGD'), ('DBP_AdamW', 'DBPAdamW'), ('dbp_lamb', 'DBPLamb'), ('lookahead_dbp_adamw', 'DBPAdamW'),
])
def test_underscore_spellings_build_dbp(spelling, expected):
    opt = create_optimizer_v2(_model(), opt=spelling, lr=1e-3)
    assert is_dbp_optimizer(opt)
    base = opt._base_optimizer if isinstance(opt, Lookahead) else opt
    assert type(base).__name__ == expected
    assert isinstance(opt, Lookahead) == spelling.startswith('lookahead')


@pytest.mark.parametrize('spelling', ['dbp_sgdd', 'dbp_nosuch', 'foo_dbp_sgd'])
def test_unknown_dbp_spellings_fail_naming_the_right_ones(spelling):
    with pytest.raises(ValueError, match='dbpsgd'):
        create_optimizer_v2(_model(), opt=spelling, lr=1e-3)


def test_unknown_optimizer_name_fails():
    with pytest.raises(ValueError, match='not found'):
        create_optimizer_v2(_model(), opt='dbpsgdd', lr=1e-3)


@pytest.mark.parametrize('kwargs, arg', [
    (dict(kappa=1.5), 'kappa'), (dict(kappa=-0.1), 'kappa'), (dict(kappa='Auto'), 'kappa'),
    (dict(kappa=True), 'kappa'), (dict(decor_lr=-1e-3), 'decor_lr'),
    (dict(decor_samples=0), 'decor_samples'), (dict(decor_samples=2.5), 'decor_samples'),
    (dict(decor_interval=0), 'decor_interval'), (dict(decor_steps=-1), 'decor_steps'),
    (dict(decor_steps=2.5), 'decor_steps'), (dict(decor_steps=True), 'decor_steps'),
    (dict(decor_max_change=0), 'decor_max_change'),
    (dict(decor_batch='yes'), 'decor_batch'), (dict(decor_max_step=0), 'decor_max_step'),
    (dict(decor_max_step='inf'), 'decor_max_step'), (dict(decor_max_step=True), 'decor_max_step'),
    (dict(decor_max_change=None), 'decor_max_change'), (dict(decor_vectors_per_patch=0), 'decor_vectors_per_patch'),
    (dict(decor_vectors_per_patch=1.5), 'decor_vectors_per_patch'),
    (dict(decor_matmul_dtype='float16'), 'decor_matmul_dtype'), (dict(decor_matmul_dtype='Auto'), 'decor_matmul_dtype'),
    (dict(decor_matmul_dtype=torch.bfloat16), 'decor_matmul_dtype'),
])
def test_bad_values_raise_value_error_naming_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        create_optimizer_v2(_model(), opt='dbpsgd', lr=1e-3, **kwargs)


def test_no_decorrelated_layers_warns_loudly():
    with pytest.warns(NoDecorLayersWarning, match='plain backprop'):
        create_optimizer_v2(timm.create_model('test_resnet'), opt='dbpadamw', lr=1e-3)


def test_decor_lr_zero_is_exactly_plain_bp():
    dbp_model, plain_model = _model(), timm.create_model('test_resnet', num_classes=4)
    plain_model.load_state_dict(timm_dbp.fold(copy.deepcopy(dbp_model)).state_dict())
    dbp_opt = create_optimizer_v2(dbp_model, opt='dbpsgd', lr=0.05, weight_decay=1e-4, decor_lr=0.0)
    plain_opt = create_optimizer_v2(plain_model, opt='sgd', lr=0.05, weight_decay=1e-4)
    _train(dbp_model, dbp_opt, range(3))
    _train(plain_model, plain_opt, range(3))
    folded = timm_dbp.fold(dbp_model).state_dict()
    for k, v in plain_model.state_dict().items():
        assert torch.equal(folded[k], v), k


@pytest.mark.parametrize('batch, matmul_dtype', [(True, 'float32'), (False, 'float32'), (False, 'bfloat16')])
def test_optimizer_updates_every_layer_as_its_own_update_would(batch, matmul_dtype):
    """The optimizer batches equal-shape R factors across layers; the result is each layer's own update (bitwise
    with decor_batch=False), with the products in the group's decor_matmul_dtype."""
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.0, decor_lr=0.05, kappa=0.2, decor_max_step=0.2,
                              decor_batch=batch, decor_matmul_dtype=matmul_dtype)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    expected = {}
    for name, layer in decor_layers(model):
        twin = copy.deepcopy(layer)
        applied = twin.update_decorrelation(twin.take_decor_inputs(), lr=0.05, kappa=0.2, max_step=0.2,
                                            matmul_dtype=getattr(torch, matmul_dtype))
        expected[name] = (twin, bool(applied))
    opt.step()
    assert len(expected) > 10
    capped = [int(twin.decor_capped) for twin, _ in expected.values()]
    assert 0 < sum(capped) < len(capped), capped  # the step cap binds on some layers, not all
    for name, layer in decor_layers(model):
        twin, applied = expected[name]
        assert applied and int(layer.decor_updates) == 1, name
        for key in ('decor_matrix', 'decor_spatial', 'decor_loss', 'decor_corr', 'decor_kappa', 'decor_capped'):
            if batch:
                torch.testing.assert_close(getattr(layer, key), getattr(twin, key), msg=f'{name} {key}')
            else:
                assert torch.equal(getattr(layer, key), getattr(twin, key)), f'{name} {key}'


def _one_decorrelation_step(matmul_dtype):
    model = _model(name='dbp_resnet18')  # R's of 64 to 512 rows: both sides of MATMUL_DTYPE_MIN_DIM
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.0, decor_lr=0.05, decor_matmul_dtype=matmul_dtype)
    _train(model, opt, range(1))
    return {name: (layer.decor_matrix.clone(), layer.decor_spatial.clone()) for name, layer in decor_layers(model)}


def test_bfloat16_products_reach_every_wide_R_and_only_those(monkeypatch):
    """decor_matmul_dtype='bfloat16' changes every R of 128 rows or more by its rounding only, and leaves the
    narrower ones (and every spatial factor) bitwise as in float32; 'auto' is bfloat16 where the hardware has it."""
    from timm_dbp.layers import decorrelation
    start = {name: layer.decor_matrix.clone() for name, layer in decor_layers(_model(name='dbp_resnet18'))}
    runs = {dtype: _one_decorrelation_step(dtype) for dtype in ('float32', 'bfloat16')}
    wide = 0
    for name, (R32, S32) in runs['float32'].items():
        R16, S16 = runs['bfloat16'][name]
        assert torch.equal(S16, S32), name
        if R32.shape[0] < decorrelation.MATMUL_DTYPE_MIN_DIM:
            assert torch.equal(R16, R32), name
        else:
            wide += 1
            step = (R32 - start[name]).norm()
            assert step > 0 and 0 < (R16 - R32).norm() < 2e-2 * step, name
    assert wide >= 8
    for native, expected in ((True, 'bfloat16'), (False, 'float32')):
        monkeypatch.setattr(decorrelation, '_native_bfloat16', lambda *device, native=native: native)
        auto = _one_decorrelation_step('auto')
        assert all(torch.equal(auto[name][0], runs[expected][name][0]) for name in auto), native


def test_vectors_per_patch_reaches_the_layers_of_its_param_group(monkeypatch):
    """decor_vectors_per_patch is a param-group option: a kron layer draws decor_samples / it patches."""
    import importlib
    module = importlib.import_module('timm_dbp.layers.decor_layers')
    drawn = []
    sample = module.sample_kron_factor_inputs
    monkeypatch.setattr(module, 'sample_kron_factor_inputs', lambda x, conv, R_c, R_s, n, *a, **k: drawn.append(
        (conv, n)) or sample(x, conv, R_c, R_s, n, *a, **k))
    model = _model()
    kron = [layer for _, layer in decor_layers(model) if layer.decor_spatial.numel()]
    first = {id(p) for p in kron[0].parameters()}
    groups = [dict(params=[p for p in model.parameters() if id(p) in first]),
              dict(params=[p for p in model.parameters() if id(p) not in first], decor_vectors_per_patch=2)]
    opt = with_dbp(torch.optim.SGD)(groups, lr=0.01, decor_samples=64)
    assert kron[0].decor_vectors_per_patch == 1 and kron[1].decor_vectors_per_patch == 2  # the default, the group's
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    assert not drawn  # the forward only keeps its input; the step draws the sample
    opt.step()
    requested = {id(conv): n for conv, n in drawn}
    assert requested[id(kron[0])] == 64 and requested[id(kron[1])] == 32
    assert int(kron[0].decor_updates) == int(kron[1].decor_updates) == 1


def test_interval_updates_every_k_steps_and_samples_only_then():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01, decor_interval=3)
    layer = model.conv1[0]
    changed = []
    for step in range(7):
        before = layer.decor_matrix.clone()
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        sampled = layer.decor_input is not None
        opt.step()
        opt.zero_grad()
        changed.append(not torch.equal(before, layer.decor_matrix))
        assert sampled == (step % 3 == 0)
    assert changed == [True, False, False, True, False, False, True]


@pytest.mark.parametrize('interval', [1, 2])
def test_decor_steps_stops_R_learning_and_sampling(interval):
    # R learns in steps 0 .. decor_steps - 1 only (every interval-th of them); afterwards nothing is sampled, R and
    # its counters stay fixed, and the weights keep training on the fixed R's decorrelated inputs
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01, decor_interval=interval, decor_steps=4)
    layer = model.conv1[0]
    changed, sampled = [], []
    for step in range(7):
        before, weight_before = layer.decor_matrix.clone(), layer.weight.detach().clone()
        x, y = _batch(step)
        F.cross_entropy(model(x), y).backward()
        sampled.append(layer.decor_input is not None)
        opt.step()
        opt.zero_grad()
        changed.append(not torch.equal(before, layer.decor_matrix))
        assert not torch.equal(weight_before, layer.weight)
    expected = [step < 4 and step % interval == 0 for step in range(7)]
    assert sampled == expected and changed == expected
    assert int(layer.decor_updates) == sum(expected)


def test_decor_steps_set_between_steps_with_refresh():
    # train.py's --decor-epochs sets decor_steps after the optimizer exists; refresh_dbp re-arms (here: disarms)
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    layer = model.conv1[0]
    assert layer.decor_samples > 0
    for group in opt.param_groups:
        group['decor_steps'] = 0
    opt.refresh_dbp()
    assert layer.decor_samples == 0
    for group in opt.param_groups:
        group['decor_steps'] = -1
    with pytest.raises(ValueError, match='decor_steps'):
        opt.refresh_dbp()


def test_grad_accumulation_updates_R_once_per_step():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpadamw', lr=1e-3)
    _train(model, opt, range(2), micro_batches=3)
    assert all(int(layer.decor_updates) == 2 for _, layer in decor_layers(model))


def test_skipped_step_skips_R_update():
    # GradScaler skips optimizer.step() on inf grads; without a step R must not move
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    before = _decor_matrices(model)
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.zero_grad()  # no step
    assert all(torch.equal(before[k], v) for k, v in _decor_matrices(model).items())


def test_use_dbp_group_flag_routes_layers():
    model = _model()
    conv1 = [p for n, p in model.named_parameters() if n.startswith('conv1.')]
    rest = [p for n, p in model.named_parameters() if not n.startswith('conv1.')]
    opt = timm_dbp.with_dbp(torch.optim.SGD)(
        [dict(params=conv1, use_dbp=False), dict(params=rest, kappa=0.5)], lr=0.01)
    before = _decor_matrices(model)
    _train(model, opt, range(1))
    after = _decor_matrices(model)
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith('conv1.'), k
    assert opt.param_groups[1]['kappa'] == 0.5 and opt.param_groups[0]['kappa'] == 0.0


def _run_resume(copy_fn):
    """Train 3 steps, copy model + optimizer with copy_fn, then train both 3 more steps with equal RNG."""
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpadamw', lr=1e-3, decor_interval=2)
    _train(model, opt, range(3))
    model2, opt2 = copy_fn(model, opt)
    torch.manual_seed(7)
    _train(model, opt, range(3, 6))
    torch.manual_seed(7)
    _train(model2, opt2, range(3, 6))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert opt.dbp_summary() == opt2.dbp_summary()
    assert opt2.dbp_step == 6


def test_state_dict_round_trip_reproduces_trajectory():
    def via_state_dict(model, opt):
        model2 = _model(seed=123)
        model2.load_state_dict(model.state_dict())
        opt2 = create_optimizer_v2(model2, opt='dbpadamw', lr=1e-3, decor_interval=2)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
        return model2, opt2
    _run_resume(via_state_dict)


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_copied_model_and_optimizer_continue_identically(how):
    copy_fn = copy.deepcopy if how == 'deepcopy' else lambda obj: pickle.loads(pickle.dumps(obj))
    _run_resume(lambda model, opt: copy_fn((model, opt)))


def test_summary_reports_loss_and_skips():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01, decor_lr=1e6, decor_max_step=None)  # all refused
    _train(model, opt, range(2))
    summary = opt.dbp_summary()
    n_layers = len(list(decor_layers(model)))
    assert summary['decor_layers'] == n_layers
    assert summary['decor_skipped'] == 2 * n_layers and summary['decor_updates'] == summary['decor_capped'] == 0
    assert summary['decor_loss'] > 0 and 0 < summary['decor_corr'] <= 1
    assert all(torch.isfinite(layer.decor_matrix).all() for _, layer in decor_layers(model))


def test_step_cap_tames_a_huge_decor_lr():
    """With the default step cap the decor_lr that the guard refuses above gives capped, applied updates that
    lower the decorrelation loss."""
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.0, decor_lr=1e6)
    _train(model, opt, range(6))
    summary = opt.dbp_summary()
    n_layers = summary['decor_layers']
    assert summary['decor_skipped'] == 0 and summary['decor_updates'] == summary['decor_capped'] == 6 * n_layers
    losses = []
    for step in range(2):  # the loss of a fresh sample, before and after 20 more capped updates
        _train(model, opt, range(20 * step, 20 * step + 20))
        losses.append(opt.dbp_summary()['decor_loss'])
    assert all(torch.isfinite(layer.decor_matrix).all() for _, layer in decor_layers(model))
    assert losses[1] < losses[0], losses


def test_nan_batch_leaves_R_finite():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    x, y = _batch(0)
    x[0, 0, 0, 0] = float('nan')
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for _, layer in decor_layers(model):
        assert torch.isfinite(layer.decor_matrix).all()
    assert opt.dbp_summary()['decor_skipped'] >= 1


def test_lookahead_wrapped_dbp_learns_R():
    model = _model()
    opt = create_optimizer_v2(model, opt='lookahead_dbpsgd', lr=0.01)
    before = _decor_matrices(model)
    _train(model, opt, range(2))
    assert any(not torch.equal(before[k], v) for k, v in _decor_matrices(model).items())


def test_any_timm_optimizer_gets_dbp_by_registration():
    info = timm_dbp.register_dbp_optimizer('adan')
    assert info.name == 'dbpadan' and 'dbpadan' in list_optimizers('dbp*')
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpadan', lr=1e-3)
    assert is_dbp_optimizer(opt) and isinstance(opt, timm.optim.Adan)
    before = _decor_matrices(model)
    _train(model, opt, range(1))
    assert all(not torch.equal(before[k], v) for k, v in _decor_matrices(model).items())
    with pytest.raises(ValueError, match='must not contain'):
        timm_dbp.register_dbp_optimizer('adan', name='dbp_adan')


def test_with_dbp_signature_and_type_checks():
    import inspect
    cls = timm_dbp.with_dbp(torch.optim.AdamW)
    assert timm_dbp.with_dbp(torch.optim.AdamW) is cls and timm_dbp.with_dbp(cls) is cls
    params = inspect.signature(cls.__init__).parameters
    for name in ('lr', 'betas', 'eps', 'decor_lr', 'kappa', 'decor_samples', 'decor_interval', 'verbose'):
        assert name in params
    with pytest.raises(TypeError):
        timm_dbp.with_dbp(torch.nn.Linear)


def test_sampling_never_draws_from_the_global_rng():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    state = torch.get_rng_state()
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.dbp_summary()['decor_updates'] > 0
    assert torch.equal(torch.get_rng_state(), state)


def _correlated_images(count, batch_size=8):
    """Batches whose neighbouring pixels are strongly correlated (cumulative sums of noise), like natural images."""
    g = torch.Generator().manual_seed(5)
    return [torch.randn(batch_size, 3, 32, 32, generator=g).cumsum(-1).cumsum(-2) / 30 for _ in range(count)]


def test_warm_up_decorrelates_the_inputs_before_training():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    assert opt.warm_up_decorrelation(model, _correlated_images(1)) == 1
    first = opt.dbp_summary()['decor_corr']  # measured on the first sample, before any update (R = I)
    assert opt.warm_up_decorrelation(model, _correlated_images(12)) == 12
    last = opt.dbp_summary()  # measured on a fresh batch's sample before the 13th update
    assert last['decor_updates'] == 13 * last['decor_layers'] and last['decor_skipped'] == 0
    assert last['decor_corr'] < 0.4 * first, (first, last['decor_corr'])


def test_warm_up_changes_R_only_and_not_the_training_steps_sampling():
    model = _model()
    model.eval()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    decor = {f'{name}.{b}' for name, layer in decor_layers(model) for b, _ in layer.named_buffers()}
    others = {k: v.clone() for k, v in model.state_dict().items() if k not in decor}
    seeds = [layer.decor_seed for _, layer in decor_layers(model)]
    opt_state = copy.deepcopy(opt.state_dict()['state'])
    rng = torch.get_rng_state()
    R = _decor_matrices(model)
    opt.warm_up_decorrelation(model, _correlated_images(3), lr=0.2)
    assert not model.training  # the mode is put back
    assert all(not torch.equal(R[k], v) for k, v in _decor_matrices(model).items()), 'some R did not move'
    for k, v in model.state_dict().items():
        if k in others:  # weights, BatchNorm's running statistics and its batch count
            assert torch.equal(v, others[k]), k
    assert opt.dbp_step == 0 and opt.state_dict()['state'] == opt_state
    assert [layer.decor_seed for _, layer in decor_layers(model)] == seeds  # step 0 samples as without warm-up
    assert all(layer.decor_input is None for _, layer in decor_layers(model))
    assert torch.equal(torch.get_rng_state(), rng)


def test_warm_up_leaves_groups_without_dbp_alone_and_refuses_a_bad_lr():
    model = _model()
    conv1 = [p for n, p in model.named_parameters() if n.startswith('conv1.')]
    rest = [p for n, p in model.named_parameters() if not n.startswith('conv1.')]
    opt = timm_dbp.with_dbp(torch.optim.SGD)([dict(params=conv1, decor_lr=0.0), dict(params=rest)], lr=0.01)
    before = _decor_matrices(model)
    opt.warm_up_decorrelation(model, _correlated_images(2))
    for k, v in _decor_matrices(model).items():
        assert torch.equal(before[k], v) == k.startswith('conv1.'), k
    for lr in (0, -1.0, float('inf'), float('nan'), True, 'x'):
        with pytest.raises(ValueError, match='warm-up lr'):
            opt.warm_up_decorrelation(model, _correlated_images(1), lr=lr)


def test_interrupted_warm_up_restores_the_model_state():
    model = _model()
    opt = create_optimizer_v2(model, opt='dbpsgd', lr=0.01)
    bn = model.bn1.running_mean.clone()

    def batches():
        yield from _correlated_images(2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.warm_up_decorrelation(model, batches())
    assert torch.equal(model.bn1.running_mean, bn)
    assert all(layer.decor_input is None for _, layer in decor_layers(model))
    assert [layer.decor_samples for _, layer in decor_layers(model)] == [1024] * len(list(decor_layers(model)))
