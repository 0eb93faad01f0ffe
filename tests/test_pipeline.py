""" Decoupled pipeline training (timm_dbp.pipeline): the split, and the trainer on 2 / 3 gloo processes on CPU.

The trainer is checked against two references computed here in one process:
- delay 0 is locked backpropagation: bit-identical to ordinary training of the whole model (with accumulation too);
- delay >= 1 is checked against a direct simulation of the delayed-gradient schedule, written without messages or
  functional calls: at its forward tick a stage is deep-copied (the weights of that moment), and at its backward tick
  the copy's gradients are added to the live stage.
"""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import timm
import timm_dbp  # noqa: F401 registers the models and optimizers
from timm_dbp.layers import decor_layers
from timm_dbp.pipeline import DecoupledTrainer, split_model

MODEL, CLASSES, SIZE = 'dbp_test_resnet', 4, 32
# decor_batch=False: R updated layer by layer, so a stage's R rounds as in the whole model (exact comparisons)
OPT = dict(opt='dbpsgd', lr=0.05, momentum=0.9, weight_decay=1e-4, decor_lr=1e-2, decor_samples=64, decor_batch=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _batches(num: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (4,), generator=g))
            for _ in range(num)]


@pytest.fixture(autouse=True)
def one_thread():
    """The workers run one thread each; the references here must too (kernels sum in a thread-dependent order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model():
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=CLASSES)


def _stages(model, num_stages):
    return split_model(model, num_stages, torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)))


def _optimizer(module):
    torch.manual_seed(0)  # the DBP sampling seed comes from the process seed
    return timm.optim.create_optimizer_v2(module, **OPT)


def _trained_state(model):
    """Parameters and R (and, for exact comparisons, every buffer) of the whole model, detached."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world_size, port, out_dir, delay, accum, shrink, epochs, num_batches):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        model = _model()
        stages = _stages(model, world_size)
        trainer = DecoupledTrainer(stages, rank, torch.device('cpu'), delay=delay, accum=accum, shrink=shrink)
        optimizer = _optimizer(stages[rank])
        trainer.attach_optimizer(optimizer)
        losses = []
        for _ in range(epochs):
            batches = _batches(num_batches) if rank == 0 else None
            losses.append(trainer.train_epoch(batches, num_batches, optimizer, F.cross_entropy)['loss'])
        evaluation = trainer.evaluate(_batches(3, seed=9) if rank == 0 else None, 3, F.cross_entropy)
        owned = {k: v for k, v in _trained_state(model).items() if stages[rank].owns(k)}
        torch.save(dict(state=owned, staleness=dict(trainer.staleness), losses=losses, evaluation=evaluation),
                   os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def _run_pipeline(tmp_path, world_size, delay, accum=1, shrink=1.0, epochs=2, num_batches=7):
    mp.spawn(_worker, args=(world_size, _free_port(), str(tmp_path), delay, accum, shrink, epochs, num_batches),
             nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(world_size)]
    state = {}
    for r in results:
        assert not set(state) & set(r['state'])
        state.update(r['state'])
    return state, results


def _bp_reference(accum, epochs=2, num_batches=7):
    """Ordinary training of the whole model, timm train.py's accumulation (the last window may be shorter)."""
    model = _model()
    optimizer = _optimizer(model)
    model.train()
    losses = []
    for _ in range(epochs):
        total = 0.0
        optimizer.zero_grad()
        for b, (x, y) in enumerate(_batches(num_batches)):
            start = b - b % accum
            size = min(accum, num_batches - start)
            loss = F.cross_entropy(model(x), y)
            total += float(loss.detach()) * x.shape[0]
            (loss / size).backward()
            if b == start + size - 1:
                optimizer.step()
                optimizer.zero_grad()
        losses.append(total / (num_batches * 4))
    return _trained_state(model), losses


def _simulate(num_stages, delay, accum=1, shrink=1.0, epochs=2, num_batches=7):
    """The delayed-gradient schedule, directly: stage k forwards batch b at tick b + kD on a deep copy of itself and
    back-propagates it at tick b + (2K - 2 - k)D through that copy; steps close windows of `accum` batches."""
    model = _model()
    stages = _stages(model, num_stages)
    optimizers = []
    for k, stage in enumerate(stages):
        opt = _optimizer(stage)
        offset = sum(len(list(decor_layers(s))) for s in stages[:k])
        opt.dbp_pipeline_stage(offset, _optimizer(model).dbp_seed)
        optimizers.append(opt)
    K, D = num_stages, delay
    for _ in range(epochs):
        batches = _batches(num_batches)
        acts, grads, copies = {}, {}, {}  # (stage, batch) -> stage input / gradient of its input / (copy, in, out)
        for stage in stages:
            stage.train()
        for opt in optimizers:
            opt.zero_grad()
        for tick in range(num_batches + 2 * D * (K - 1)):
            for k, stage in enumerate(stages):  # every forward of this tick reads only earlier ticks' outputs
                b = tick - k * D
                if not 0 <= b < num_batches:
                    continue
                x = batches[b][0] if k == 0 else acts[(k, b)].requires_grad_()
                frozen = copy.deepcopy(stage) if k < K - 1 and D > 0 else stage
                out = frozen(x)
                for (_, live), (_, used) in zip(decor_layers(stage), decor_layers(frozen)):
                    live.decor_input = used.decor_input  # the live layer's next R update samples this input
                copies[(k, b)] = (frozen, x, out)
                if k < K - 1:
                    acts[(k + 1, b)] = out.detach().clone()
            for k in reversed(range(K)):
                b = tick - (2 * K - 2 - k) * D
                if not 0 <= b < num_batches or (k < K - 1 and (k, b) not in grads):
                    continue
                frozen, x, out = copies.pop((k, b))
                start = b - b % accum
                size = min(accum, num_batches - start)
                if k == K - 1:
                    (F.cross_entropy(out, batches[b][1]) / size).backward()
                else:
                    g = grads.pop((k, b))
                    out.backward(g * shrink if D > 0 else g)
                if frozen is not stages[k]:
                    for p, q in zip(stages[k].parameters(), frozen.parameters()):
                        if q.grad is not None:
                            p.grad = q.grad.clone() if p.grad is None else p.grad + q.grad
                if k > 0:
                    grads[(k - 1, b)] = x.grad.detach().clone()
                if b == start + size - 1:
                    optimizers[k].step()
                    optimizers[k].zero_grad()
    return _trained_state(model)


def _assert_same(state, reference, keys=None, atol=0.0):
    keys = keys or list(reference)
    assert keys
    for key in keys:
        if atol == 0:
            difference = (state[key] - reference[key]).abs().max()
            assert torch.equal(state[key], reference[key]), f'{key} differs by {difference}'
        else:
            torch.testing.assert_close(state[key], reference[key], atol=atol, rtol=0, msg=key)


def _weights_and_R(state):
    return [k for k in state if not any(k.endswith(s) for s in ('running_mean', 'running_var', 'num_batches_tracked'))]


# ---- the split -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['dbp_test_resnet', 'dbp_resnet18', 'convnext_atto', 'efficientnet_b0',
                                  'mobilenetv3_small_100', 'regnety_002'])
def test_split_chains_to_the_model_and_partitions_its_tensors(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    for num_stages in (1, 2, 3):
        stages = split_model(model, num_stages, x)
        assert len(stages) == num_stages and stages[-1].is_last and not any(s.is_last for s in stages[:-1])
        y = x
        with torch.no_grad():
            for stage in stages:
                y = stage.eval()(y)
            assert torch.equal(y, model(x))
        for key in model.state_dict():
            assert sum(stage.owns(key) for stage in stages) == 1, key
        params = sum(p.numel() for s in stages for p in s.parameters())
        assert params == sum(p.numel() for p in model.parameters())


def test_split_refuses_what_it_cannot_split():
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(ValueError, match='not the sequence of its child modules'):
        split_model(timm.create_model('vit_tiny_patch16_224'), 2, x)  # cls token / pos embed added between children
    with pytest.raises(ValueError, match='6 stages at most'):
        split_model(timm.create_model('dbp_test_resnet'), 7, x[..., :32, :32])
    with pytest.raises(ValueError, match='no stage information'):
        split_model(torch.nn.Sequential(torch.nn.Linear(3, 3)), 2, torch.randn(2, 3))
    with pytest.raises(ValueError, match='>= 1'):
        split_model(timm.create_model('dbp_test_resnet'), 0, x[..., :32, :32])
    with pytest.raises(ValueError, match='bad cuts'):
        split_model(timm.create_model('dbp_test_resnet'), 2, x[..., :32, :32], cuts=[1])


def test_trainer_refuses_bad_settings():
    stages = _stages(_model(), 1)
    with pytest.raises(ValueError, match='needs delay >= 1'):
        DecoupledTrainer(stages, 0, torch.device('cpu'), delay=0, shrink=0.5)
    with pytest.raises(ValueError, match='accum >= 1'):
        DecoupledTrainer(stages, 0, torch.device('cpu'), accum=0)


# ---- the trainer -----------------------------------------------------------------------------------------------------

def test_one_stage_is_ordinary_training():
    model = _model()
    stages = _stages(model, 1)
    trainer = DecoupledTrainer(stages, 0, torch.device('cpu'), delay=1, accum=2)
    optimizer = _optimizer(stages[0])
    trainer.attach_optimizer(optimizer)
    losses = [trainer.train_epoch(_batches(7), 7, optimizer, F.cross_entropy)['loss'] for _ in range(2)]
    reference, reference_losses = _bp_reference(accum=2)
    _assert_same(_trained_state(model), reference)
    assert losses == pytest.approx(reference_losses, abs=1e-6)
    assert dict(trainer.staleness) == {0: 14}


@pytest.mark.parametrize('accum', [1, 3])
def test_delay_0_is_bit_identical_to_backprop(tmp_path, accum):
    state, results = _run_pipeline(tmp_path, 2, delay=0, accum=accum)
    reference, reference_losses = _bp_reference(accum)
    assert set(state) == set(reference)
    _assert_same(state, reference)  # weights, R, BatchNorm statistics
    moved = [k for k in state if k.endswith('decor_matrix') and not torch.equal(state[k], torch.eye(state[k].shape[0]))]
    assert len(moved) == sum(k.endswith('decor_matrix') for k in state) > 0, 'every R must have been updated'
    for r in results:
        assert r['losses'] == pytest.approx(reference_losses, abs=1e-6)
        assert r['staleness'] == {0: 14}


@pytest.mark.parametrize('num_stages,delay,accum,shrink', [
    (2, 1, 1, 1.0), (2, 1, 3, 0.5), (3, 1, 2, 1.0), (2, 2, 1, 1.0)])
def test_delayed_gradients_follow_the_schedule(tmp_path, num_stages, delay, accum, shrink):
    state, results = _run_pipeline(tmp_path, num_stages, delay=delay, accum=accum, shrink=shrink)
    reference = _simulate(num_stages, delay, accum, shrink)
    _assert_same(state, reference, _weights_and_R(reference), atol=1e-6)
    for k, r in enumerate(results):  # staleness: optimizer steps between a batch's forward and its own update
        lag = 2 * delay * (num_stages - 1 - k)
        expected = {}
        for _ in range(2):
            for b in range(7):
                fwd_tick, bwd_tick = b + k * delay, b + (2 * num_stages - 2 - k) * delay
                closes = [c for c in range(7) if c % accum == accum - 1 or c == 6]  # batches that close a window
                steps = sum(1 for c in closes if fwd_tick <= c + (2 * num_stages - 2 - k) * delay < bwd_tick)
                expected[steps] = expected.get(steps, 0) + 1
        assert r['staleness'] == expected, (k, lag)
    if accum == 1:  # the first stage's steady state is exactly 2 D (K - 1) steps stale
        assert max(results[0]['staleness']) == 2 * delay * (num_stages - 1)


def test_evaluation_runs_through_the_pipeline(tmp_path):
    state, results = _run_pipeline(tmp_path, 2, delay=1, epochs=1)
    model = _model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        hits, loss = 0, 0.0
        for x, y in _batches(3, seed=9):
            out = model(x)
            hits += int((out.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(out, y)) * 4
    for r in results:
        assert r['evaluation']['top1'] == pytest.approx(100 * hits / 12)
        assert r['evaluation']['loss'] == pytest.approx(loss / 12, abs=1e-6)


# ---- train.py --decoupled --------------------------------------------------------------------------------------------

def _train_args(data_dir, out_dir, experiment, *extra):
    from test_train import _args
    return _args(data_dir, out_dir, experiment, '--sched', 'step', '--decay-epochs', '100', *extra)


def _last(out_dir, experiment):
    return torch.load(os.path.join(out_dir, 'train', experiment, 'last.pth.tar'), weights_only=False)


def _summary(out_dir, experiment):
    from test_train import _summary
    return _summary(out_dir, experiment)


@pytest.mark.parametrize('extra', [(), ('--decor-epochs', '0.5')], ids=['R-learns', 'R-fixed-after-4-steps'])
def test_train_py_delay_0_pipeline_is_the_one_process_run(tiny_fmnist, tmp_path, extra):
    import train
    from test_train import run_torchrun
    out = str(tmp_path)
    layer_by_layer = ('--opt-kwargs', 'decor_batch=False')  # R rounds alike in a stage and in the whole model
    log = run_torchrun(_train_args(tiny_fmnist, out, 'pipe', '--epochs', '1', '--decoupled', '2',
                                   '--decoupled-delay', '0', *layer_by_layer, *extra))
    assert 'Pipeline stages: 0: ' in log
    assert train.run(_train_args(tiny_fmnist, out, 'plain', '--epochs', '1', *layer_by_layer, *extra)) == 0
    updates = int(_summary(out, 'plain')[0]['train_decor_updates'])
    assert updates == (4 if extra else 8) * len(list(decor_layers(timm.create_model('dbp_test_resnet'))))
    pipe, plain = _last(out, 'pipe'), _last(out, 'plain')
    assert set(pipe['state_dict']) == set(plain['state_dict'])
    for key, value in plain['state_dict'].items():
        assert torch.equal(value, pipe['state_dict'][key]), key
    assert len(pipe['optimizer']) == 2 and pipe['decoupled']['delay'] == 0
    assert [o['dbp']['step'] for o in pipe['optimizer']] == [8, 8] == [plain['optimizer']['dbp']['step']] * 2
    for key in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5'):
        assert float(_summary(out, 'pipe')[0][key]) == pytest.approx(float(_summary(out, 'plain')[0][key]), abs=1e-9)


def test_train_py_pipeline_resumes_exactly(tiny_fmnist, tmp_path):
    from test_train import run_torchrun
    out = str(tmp_path)
    pipe = ('--decoupled', '2', '--grad-accum-steps', '2')
    run_torchrun(_train_args(tiny_fmnist, out, 'straight', '--epochs', '2', '--decoupled-cuts', 'layer1', *pipe))
    run_torchrun(_train_args(tiny_fmnist, out, 'stopped', '--epochs', '1', '--decoupled-cuts', 'layer1', *pipe))
    # resumed without --decoupled-cuts: the run continues the checkpoint's split instead of timing a new one
    run_torchrun(_train_args(tiny_fmnist, out, 'stopped', '--epochs', '2', '--resume', 'auto', *pipe))
    a, b = _last(out, 'straight'), _last(out, 'stopped')
    assert a['decoupled'] == b['decoupled'] and a['decoupled']['stages'][0][-1] == 'layer1'
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
    straight, resumed = _summary(out, 'straight'), _summary(out, 'stopped')
    for key in ('train_loss', 'train_staleness', 'eval_loss', 'eval_top1', 'lr'):
        assert straight[1][key] == resumed[1][key], key
    # 8 batches an epoch, windows of 2: the first stage's gradients are 2 ticks late, so 1 step stale once warm
    assert 0 < float(straight[1]['train_staleness']) <= 1


@pytest.mark.parametrize('extra,message', [
    (['--decoupled', '2'], 'torchrun --nproc_per_node=2'),
    (['--decoupled', '1', '--model', 'vit_tiny_patch16_224'], 'not the sequence of its child modules'),
    (['--decoupled', '1', '--model-ema'], 'does not support --model-ema'),
    (['--decoupled', '1', '--clip-grad', '1'], 'does not support --clip-grad'),
    (['--decoupled', '1', '--decoupled-delay', '0', '--decoupled-shrink', '0.5'], 'needs --decoupled-delay >= 1'),
    (['--decoupled', '1', '--decoupled-shrink', '1.5'], 'must be in (0, 1]'),
    (['--decoupled', '1', '--amp'], 'bfloat16'),
], ids=['world-size', 'not-sequential', 'ema', 'clip', 'shrink-no-delay', 'shrink-range', 'amp-fp16'])
def test_train_py_refuses_bad_pipelines(tiny_fmnist, tmp_path, capsys, extra, message):
    import train
    assert train.run(_train_args(tiny_fmnist, str(tmp_path), 'bad', *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('value', ['0', '-1', 'two'])
def test_train_py_decoupled_needs_a_positive_count(tiny_fmnist, tmp_path, value):
    import train
    with pytest.raises(SystemExit) as e:
        train.run(_train_args(tiny_fmnist, str(tmp_path), 'bad', '--decoupled', value))
    assert e.value.code == 2


def test_train_py_resuming_across_pipelines_is_refused(tiny_fmnist, tmp_path, capsys):
    import train
    out = str(tmp_path)
    assert train.run(_train_args(tiny_fmnist, out, 'one', '--epochs', '1', '--decoupled', '1')) == 0
    ckpt = os.path.join(out, 'train', 'one', 'last.pth.tar')
    assert train.run(_train_args(tiny_fmnist, out, 'plain', '--epochs', '2', '--resume', ckpt)) == 2
    assert 'trained with 1 pipeline stages, this run has no pipeline' in capsys.readouterr().err
    # the weights alone load anywhere: --no-resume-opt, or --initial-checkpoint
    assert train.run(_train_args(tiny_fmnist, out, 'plain2', '--epochs', '2', '--resume', ckpt, '--no-resume-opt')) == 0


def test_time_balanced_and_named_cuts():
    model = _model()
    x = torch.randn(8, 3, SIZE, SIZE)
    stages = split_model(model, 3, x, balance='time')  # times each child (act1 is an in-place ReLU) on copies
    assert len(stages) == 3
    named = split_model(model, 3, x, cuts=[s.owned[-1] for s in stages[:-1]])
    assert [s.owned for s in named] == [s.owned for s in stages]
    assert [s.owned[-1] for s in split_model(model, 2, x, cuts=['layer3'])[:1]] == ['layer3']
    with pytest.raises(ValueError, match='cannot cut after layer3.0'):
        split_model(model, 2, x, cuts=['layer3.0'])
    with pytest.raises(ValueError, match="balance must be"):
        split_model(model, 2, x, balance='flops')


def test_a_stage_may_start_with_an_in_place_op():
    class Tiny(torch.nn.Module):  # a timm-like model whose second stage starts with ReLU(inplace=True)
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3)
            self.act1 = torch.nn.ReLU(inplace=True)
            self.conv2 = torch.nn.Conv2d(4, 4, 3)
            self.fc = torch.nn.Linear(4, 2)
            self.feature_info = [dict(module='conv1'), dict(module='conv2')]

        def forward_features(self, x):
            return self.conv2(self.act1(self.conv1(x)))

        def forward_head(self, x):
            return self.fc(x.mean((2, 3)))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    model = Tiny()
    stages = split_model(model, 2, torch.randn(2, 3, 8, 8))
    assert stages[1].owned == ['act1', 'conv2', 'fc']
    trainer = DecoupledTrainer(stages, 1, torch.device('cpu'), delay=0)  # no messages are sent here
    received = torch.randn(2, 4, 6, 6).requires_grad_()  # a leaf, as a received activation is
    out, _ = trainer._forward(received, torch.enable_grad)
    out.sum().backward()
    assert received.grad is not None


def test_train_py_split_error_on_rank_0_stops_every_rank(tiny_fmnist, tmp_path):
    # rank 0 alone times the stages; its error must reach the other ranks (which would otherwise wait for its cuts)
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(root, 'train.py'), *_train_args(tiny_fmnist, str(tmp_path), 'vit', '--decoupled', '2',
                                                        '--model', 'vit_tiny_patch16_224'), '--device', 'cpu']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode != 0
    assert proc.stderr.count('not the sequence of its child modules') >= 2  # both ranks say why
