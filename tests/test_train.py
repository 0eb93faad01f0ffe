""" Tests of train.py: DBP in the loop, exact resume, atomic checkpoints, clear errors on bad input """
import csv
import os

import pytest
import timm
import torch
import yaml

import timm_dbp
import train


def _args(data_dir, out_dir, experiment, *extra):
    return [
        '--dataset', 'fashion_mnist', '--data-dir', data_dir, '--model', 'dbp_test_resnet', '--opt', 'dbpsgd',
        '--img-size', '32', '-b', '32', '--epochs', '2', '--warmup-epochs', '0', '-j', '0', '--seed', '3',
        '--output', out_dir, '--experiment', experiment, '--log-interval', '100', '--checkpoint-hist', '1',
        '--decor-lr', '1e-3', *extra,
    ]


def _summary(out_dir, experiment):
    with open(os.path.join(out_dir, 'train', experiment, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def _last(out_dir, experiment):
    return torch.load(os.path.join(out_dir, 'train', experiment, 'last.pth.tar'), weights_only=False)


def run_stopped_at_second_epoch(monkeypatch, argv):
    """Run train.py and kill it (KeyboardInterrupt) when its second epoch starts."""
    original = train.train_one_epoch

    def stop_at_second_epoch(epoch, *args, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(epoch, *args, **kwargs)

    monkeypatch.setattr(train, 'train_one_epoch', stop_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.run(argv)
    monkeypatch.setattr(train, 'train_one_epoch', original)


def test_dbp_training_learns_R_and_logs_dbp_columns(tiny_fmnist, tmp_path):
    assert train.run(_args(tiny_fmnist, str(tmp_path), 'dbp', '--model-ema', '--model-ema-decay', '0.9')) == 0
    rows = _summary(str(tmp_path), 'dbp')
    assert [r['epoch'] for r in rows] == ['0', '1']
    for key in ('train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'train_decor_corr', 'train_decor_loss',
                'train_decor_skipped', 'train_time', 'eval_ema_top1'):
        assert key in rows[0], key
    assert float(rows[1]['train_time']) > float(rows[0]['train_time']) > 0
    ckpt = _last(str(tmp_path), 'dbp')
    moved = [k for k, v in ckpt['state_dict'].items() if k.endswith('decor_matrix') and not torch.equal(v, torch.eye(len(v)))]
    assert moved, 'R never moved'
    assert 'dbp' in ckpt['optimizer'] and ckpt['optimizer']['dbp']['step'] == 16  # 2 epochs x 8 steps
    assert any(k.endswith('decor_matrix') for k in ckpt['state_dict_ema'])
    files = sorted(os.listdir(os.path.join(str(tmp_path), 'train', 'dbp')))
    best = max(range(2), key=lambda e: float(rows[e]['eval_top1']))
    assert files == ['args.yaml', f'checkpoint-{best}.pth.tar', 'last.pth.tar', 'model_best.pth.tar', 'summary.csv']


@pytest.mark.parametrize('extra', [[], ['--sketch-probes', '4'], ['--decor-warmup', '2'], ['--decor-epochs', '1.5']],
                         ids=['dbp', 'dbp-xconv', 'dbp-warmup', 'dbp-decor-epochs'])
def test_resume_continues_exactly(tiny_fmnist, tmp_path, monkeypatch, extra):
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'straight', *extra)) == 0

    # the same run, stopped (killed) when the second epoch starts, then resumed in place with --resume auto
    run_stopped_at_second_epoch(monkeypatch, _args(tiny_fmnist, out, 'stopped', *extra))
    assert _last(out, 'stopped')['epoch'] == 0
    assert train.run(_args(tiny_fmnist, out, 'stopped', '--resume', 'auto', *extra)) == 0
    if '--sketch-probes' in extra:  # the probe streams continue where they were (8 steps an epoch; 2 x 2 maps exact)
        calls = _last(out, 'stopped')['sketch_calls']
        assert calls == _last(out, 'straight')['sketch_calls'] and max(calls.values()) == 16

    straight, resumed = _summary(out, 'straight'), _summary(out, 'stopped')
    for key in ('train_loss', 'eval_loss', 'eval_top1', 'train_decor_corr', 'train_decor_loss', 'lr'):
        assert straight[1][key] == resumed[1][key], key
    a, b = _last(out, 'straight'), _last(out, 'stopped')
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key

    # a finished run resumed again changes nothing: every file of the experiment stays byte for byte
    exp = os.path.join(out, 'train', 'stopped')

    def snapshot():
        return {name: open(os.path.join(exp, name), 'rb').read() for name in sorted(os.listdir(exp))}

    before = snapshot()
    assert train.run(_args(tiny_fmnist, out, 'stopped', '--resume', 'auto')) == 0
    assert snapshot() == before


def test_stop_after_epoch_trains_the_schedule_in_chunks_exactly(tiny_fmnist, tmp_path, caplog):
    """--stop-after-epoch ends a run after its first N epochs of the --epochs schedule (the LR stays on that
    schedule); the same command with --resume auto continues it to the same weights as one uninterrupted run, and
    the analytic head is refitted only at the schedule's end."""
    out = str(tmp_path)
    extra = ['--analytic-head']
    assert train.run(_args(tiny_fmnist, out, 'straight', *extra)) == 0
    chunk = _args(tiny_fmnist, out, 'chunks', *extra, '--stop-after-epoch', '1')
    with caplog.at_level('INFO'):
        assert train.run(chunk) == 0
    exp = os.path.join(out, 'train', 'chunks')
    assert [r['epoch'] for r in _summary(out, 'chunks')] == ['0'] and _last(out, 'chunks')['epoch'] == 0
    assert 'analytic_head.json' not in os.listdir(exp)
    assert 'Stopped after epoch 1 of 2' in caplog.text
    assert _summary(out, 'chunks')[0]['lr'] == _summary(out, 'straight')[0]['lr']  # the 2-epoch cosine, not 1

    assert train.run(chunk + ['--resume', 'auto']) == 0  # the chunk is done: nothing trained again
    assert [r['epoch'] for r in _summary(out, 'chunks')] == ['0']
    assert train.run(_args(tiny_fmnist, out, 'chunks', *extra, '--stop-after-epoch', '5', '--resume', 'auto')) == 0
    straight, chunks = _summary(out, 'straight'), _summary(out, 'chunks')
    assert [r['epoch'] for r in chunks] == ['0', '1']
    for key in ('train_loss', 'eval_loss', 'eval_top1', 'train_decor_corr', 'lr'):
        assert [r[key] for r in straight] == [r[key] for r in chunks], key
    a, b = _last(out, 'straight'), _last(out, 'chunks')
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
    assert 'analytic_head.json' in os.listdir(exp)


@pytest.mark.parametrize('value', ['0', '-1', '1.5'])
def test_stop_after_epoch_must_be_a_positive_integer(tiny_fmnist, tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.run(_args(tiny_fmnist, str(tmp_path), 'bad', '--stop-after-epoch', value))
    assert exit_info.value.code == 2 and '--stop-after-epoch' in capsys.readouterr().err


def test_decor_warmup_learns_R_first_and_keeps_the_data_order(tiny_fmnist, tmp_path, monkeypatch, caplog):
    original, rng_at_epoch_start = train.train_one_epoch, {}

    def record_rng(epoch, num_epochs, model, loader, optimizer, *args, **kwargs):
        rng_at_epoch_start[optimizer.dbp_summary()['decor_updates'] > 0] = torch.get_rng_state()
        return original(epoch, num_epochs, model, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, 'train_one_epoch', record_rng)
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'plain', '--epochs', '1')) == 0
    with caplog.at_level('INFO'):
        assert train.run(_args(tiny_fmnist, out, 'warm', '--epochs', '1', '--decor-warmup', '3')) == 0
    assert any('DBP warm-up: 3 R updates' in r.getMessage() for r in caplog.records)
    assert torch.equal(rng_at_epoch_start[False], rng_at_epoch_start[True])  # the epoch draws the same batches
    layers = len(list(timm_dbp.decor_layers(timm.create_model('dbp_test_resnet'))))
    plain, warm = _summary(out, 'plain')[0], _summary(out, 'warm')[0]
    assert int(plain['train_decor_updates']) == 8 * layers and int(warm['train_decor_updates']) == 11 * layers
    assert _last(out, 'warm')['optimizer']['dbp']['step'] == 8  # warm-up updates are not optimizer steps
    assert float(warm['train_time']) > 0


def test_decor_epochs_stops_R_learning_after_that_many_epochs(tiny_fmnist, tmp_path):
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'frozen', '--decor-epochs', '1.5')) == 0
    layers = len(list(timm_dbp.decor_layers(timm.create_model('dbp_test_resnet'))))
    rows = _summary(out, 'frozen')  # 8 steps an epoch: R learns in steps 0 .. 11, the weights in all 16
    assert [int(r['train_decor_updates']) for r in rows] == [8 * layers, 12 * layers]
    ckpt = _last(out, 'frozen')
    assert ckpt['optimizer']['dbp']['step'] == 16
    assert all(group['decor_steps'] == 12 for group in ckpt['optimizer']['param_groups'])
    with open(os.path.join(out, 'train', 'frozen', 'args.yaml')) as f:
        assert yaml.safe_load(f)['decor_epochs'] == 1.5


def test_decor_epochs_bad_input(tiny_fmnist, tmp_path, capsys):
    argv = _args(tiny_fmnist, str(tmp_path), 'x', '--decor-epochs', '1', '--opt', 'sgd', '--model', 'test_resnet')
    at = argv.index('--decor-lr')
    del argv[at:at + 2]
    message = _error_of(capsys, argv)
    assert '--decor-epochs' in message and 'DBP optimizer' in message
    message = _error_of(capsys, _args(tiny_fmnist, str(tmp_path), 'x', '--decor-epochs', '1', '--opt-kwargs',
                                      'decor_steps=3'))
    assert '--decor-epochs' in message and 'decor_steps' in message
    for value in ('0', '-1', 'inf', 'nan', 'two'):
        with pytest.raises(SystemExit) as exit_info:
            train.run(_args(tiny_fmnist, str(tmp_path), 'x', '--decor-epochs', value))
        assert exit_info.value.code == 2 and '--decor-epochs' in capsys.readouterr().err


@pytest.mark.parametrize('kwarg, expected', [('dbp_structure=bogus', 'structure must be one of'),
                                             ('dbp_kron_max_dim=-1', 'kron_max_dim'),
                                             ('dbp_block_size=-1', 'block_size must be an int >= 1')])
def test_bad_model_kwarg_value_is_one_line(tiny_fmnist, tmp_path, capsys, kwarg, expected):
    message = _error_of(capsys, _args(tiny_fmnist, str(tmp_path), 'x', '--model-kwargs', kwarg))
    assert "model 'dbp_test_resnet'" in message and expected in message


def test_decor_warmup_bad_input(tiny_fmnist, tmp_path, capsys):
    argv = _args(tiny_fmnist, str(tmp_path), 'x', '--decor-warmup', '2', '--opt', 'sgd', '--model', 'test_resnet')
    at = argv.index('--decor-lr')
    del argv[at:at + 2]  # a plain optimizer takes no DBP kwargs
    message = _error_of(capsys, argv)
    assert '--decor-warmup' in message and 'DBP optimizer' in message
    for flag, value in (('--decor-warmup', '-1'), ('--decor-warmup', '1.5'), ('--decor-warmup-lr', '0'),
                        ('--decor-warmup-lr', 'inf')):
        with pytest.raises(SystemExit) as exit_info:
            train.run(_args(tiny_fmnist, str(tmp_path), 'x', flag, value))
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_grad_accumulation_updates_R_once_per_optimizer_step(tiny_fmnist, tmp_path):
    assert train.run(_args(tiny_fmnist, str(tmp_path), 'accum', '--grad-accum-steps', '2', '--epochs', '1')) == 0
    assert _last(str(tmp_path), 'accum')['optimizer']['dbp']['step'] == 4  # 8 batches / 2


def _error_of(capsys, argv):
    code = train.run(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith('train.py: error:'), err  # (log lines before it are the run's progress log)
    assert not any('Traceback' in line for line in err)
    return err[-1]


def test_unknown_model_names_it_and_suggests_dbp(tiny_fmnist, tmp_path, capsys):
    argv = _args(tiny_fmnist, str(tmp_path), 'x')
    argv[argv.index('dbp_test_resnet')] = 'dbp_resnet19'
    err = _error_of(capsys, argv)
    assert 'dbp_resnet19' in err and 'dbp_resnet18' in err


@pytest.mark.parametrize('opt', ['dbp_sgdd', 'sgdd', 'dbpsgdx'])
def test_unknown_optimizer(tiny_fmnist, tmp_path, capsys, opt):
    argv = _args(tiny_fmnist, str(tmp_path), 'x')
    argv[argv.index('dbpsgd')] = opt
    assert opt in _error_of(capsys, argv)


def test_dbp_optimizer_on_plain_model(tiny_fmnist, tmp_path, capsys):
    argv = _args(tiny_fmnist, str(tmp_path), 'x')
    argv[argv.index('dbp_test_resnet')] = 'test_resnet'
    assert 'no decorrelated layers' in _error_of(capsys, argv)


@pytest.mark.parametrize('make', ['missing', 'empty'])
def test_missing_or_empty_data_dir(tmp_path, capsys, make):
    data = tmp_path / 'data'
    if make == 'empty':
        (data / 'train').mkdir(parents=True)
        (data / 'validation').mkdir()
    argv = _args(str(data), str(tmp_path), 'x')
    argv[argv.index('fashion_mnist')] = ''
    err = _error_of(capsys, argv)
    assert str(data) in err


def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(tiny_fmnist, tmp_path, capsys):
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'run', '--epochs', '1')) == 0
    exp = os.path.join(out, 'train', 'run')
    last = os.path.join(exp, 'last.pth.tar')
    data = open(last, 'rb').read()
    with open(last, 'wb') as f:
        f.write(data[:len(data) // 2])  # truncated
    listing = {n: os.path.getmtime(os.path.join(exp, n)) for n in os.listdir(exp)}
    err = _error_of(capsys, _args(tiny_fmnist, out, 'run', '--resume', 'auto'))
    assert 'last.pth.tar' in err
    assert {n: os.path.getmtime(os.path.join(exp, n)) for n in os.listdir(exp)} == listing
    assert open(last, 'rb').read() == data[:len(data) // 2]


class _NotWeights:  # a pickled object a weights-only load must refuse (it could run code when unpickled)
    pass


def test_checkpoint_with_pickled_objects_is_refused(tiny_fmnist, tmp_path, capsys):
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'run', '--epochs', '1')) == 0
    last = os.path.join(out, 'train', 'run', 'last.pth.tar')
    checkpoint = torch.load(last, weights_only=False)
    checkpoint['extra'] = _NotWeights()
    torch.save(checkpoint, last)
    err = _error_of(capsys, _args(tiny_fmnist, out, 'run', '--resume', 'auto'))
    assert 'last.pth.tar' in err and 'weights_only' in err


def test_summary_rows_keep_their_columns(tmp_path):
    from timm_dbp.utils.checkpoint import append_summary
    path = str(tmp_path / 'summary.csv')
    append_summary(path, dict(epoch=0, train_loss=2.0, lr=0.1))
    append_summary(path, dict(epoch=1, train_loss=1.5, eval_top1=40.0, lr=0.05))  # a new column: rewritten
    append_summary(path, dict(epoch=2, train_loss=1.2, lr=0.01))  # a missing column: an empty cell
    with open(path) as f:
        assert f.read().splitlines() == [
            'epoch,train_loss,lr,eval_top1', '0,2.0,0.1,', '1,1.5,0.05,40.0', '2,1.2,0.01,']
    assert not os.path.exists(path + '.tmp')


def test_num_classes_mismatch_with_checkpoint(tiny_fmnist, tmp_path, capsys):
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'run', '--epochs', '1')) == 0
    ckpt = os.path.join(out, 'train', 'run', 'last.pth.tar')
    err = _error_of(capsys, _args(tiny_fmnist, out, 'other', '--resume', ckpt, '--num-classes', '7'))
    assert '10 classes' in err and '7' in err


def test_resume_builds_the_r_shapes_the_checkpoint_pinned(tiny_fmnist, tmp_path, capsys):
    """A checkpoint pins every dbp_ model kwarg its model was built with: resumed without them (as after a change of
    the model's default) it builds the same block-diagonal R's and trains on, as a new run from it as
    --initial-checkpoint does; a pinned kwarg given with another value is an error; a checkpoint without pins
    (written before them) says which option differs."""
    out = str(tmp_path)
    assert train.run(_args(tiny_fmnist, out, 'run', '--epochs', '1', '--model-kwargs', 'dbp_block_size=8')) == 0
    ckpt_path = os.path.join(out, 'train', 'run', 'last.pth.tar')
    ckpt = _last(out, 'run')
    assert ckpt['dbp_model_kwargs'] == dict(timm_dbp.models.dbp_model_kwargs(
        timm.create_model('dbp_test_resnet', dbp_block_size=8).dbp_args))
    assert ckpt['dbp_model_kwargs']['dbp_block_size'] == 8 and ckpt['dbp_model_kwargs']['dbp_max_dim'] == 0

    assert train.run(_args(tiny_fmnist, out, 'run', '--resume', ckpt_path)) == 0  # epoch 1 of 2, no dbp_block_size
    resumed = _last(out, 'run')
    assert resumed['epoch'] == 1 and resumed['dbp_model_kwargs'] == ckpt['dbp_model_kwargs']
    assert any(v.dim() == 3 for k, v in resumed['state_dict'].items() if k.endswith('decor_matrix'))
    assert train.run(_args(tiny_fmnist, out, 'same', '--resume', ckpt_path, '--model-kwargs', 'dbp_block_size=8',
                           'dbp_max_dim=0')) == 0  # the pinned values given again: no conflict

    err = _error_of(capsys, _args(tiny_fmnist, out, 'other', '--resume', ckpt_path, '--model-kwargs',
                                  'dbp_block_size=0'))
    assert 'built with other dbp_ model kwargs: dbp_block_size=0 (it has 8)' in err
    assert train.run(_args(tiny_fmnist, out, 'init', '--epochs', '1', '--initial-checkpoint', ckpt_path)) == 0
    assert _last(out, 'init')['dbp_model_kwargs'] == ckpt['dbp_model_kwargs']  # a new run from its weights and R's

    del ckpt['dbp_model_kwargs']
    old = os.path.join(out, 'old.pth.tar')
    torch.save(ckpt, old)
    err = _error_of(capsys, _args(tiny_fmnist, out, 'other', '--resume', old))
    assert 'does not fit model' in err and 'decor_matrix' in err
    assert 'block-diagonal' in err and 'dbp_block_size=0' in err


def test_yaml_config_unknown_key_warns_invalid_value_refused(tiny_fmnist, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('epochs: 1\nnot_a_flag: 3\n')
    with pytest.warns(UserWarning, match='not_a_flag'):
        assert train.run(['-c', str(cfg)] + _args(tiny_fmnist, str(tmp_path), 'yaml')) == 0
    assert len(_summary(str(tmp_path), 'yaml')) == 2  # the command line's --epochs 2 beats the YAML
    cfg.write_text('epochs: many\n')
    with pytest.raises(SystemExit) as e:
        train.run(['-c', str(cfg)] + _args(tiny_fmnist, str(tmp_path), 'yaml2'))
    assert e.value.code == 2


def test_yaml_config_does_not_leak_into_later_calls(tmp_path):
    """A config's values are that call's defaults only (hub/publish.py compares args with train.py's defaults)."""
    defaults, _ = train._parse_args([])
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('model: dbp_test_resnet\nlr: 0.123\nmodel_kwargs: {dbp_structure: full}\n')
    configured, _ = train._parse_args(['-c', str(cfg), '--lr', '0.5'])
    assert (configured.model, configured.lr, configured.model_kwargs) == (
        'dbp_test_resnet', 0.5, {'dbp_structure': 'full'})
    with pytest.raises(SystemExit):
        train._parse_args(['-c', str(cfg), '--epochs', 'many'])  # a refused command line restores them too
    assert vars(train._parse_args([])[0]) == vars(defaults)


def run_torchrun(argv, nproc=2):
    """train.py under torchrun with `nproc` CPU processes; asserts that it succeeded, returns stdout + stderr."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(root, 'train.py'), *argv, '--device', 'cpu']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'process {nproc - 1} of {nproc}' in proc.stderr + proc.stdout
    return proc.stderr + proc.stdout


def test_torchrun_two_cpu_processes(tiny_fmnist, tmp_path):
    run_torchrun(_args(tiny_fmnist, str(tmp_path), 'ddp', '--epochs', '1'))
    ckpt = _last(str(tmp_path), 'ddp')
    assert ckpt['optimizer']['dbp']['step'] == 4  # 256 images / (2 ranks x 32)
    assert any(not torch.equal(v, torch.eye(len(v))) for k, v in ckpt['state_dict'].items() if k.endswith('decor_matrix'))


def test_image_folder_dataset(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('validation', 6)):
        for cls in ('cat', 'dog', 'fox'):
            folder = tmp_path / 'data' / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    argv = _args(str(tmp_path / 'data'), str(tmp_path), 'folder', '--epochs', '1', '--num-classes', '3')
    argv[argv.index('fashion_mnist')] = ''
    assert train.run(argv) == 0
    rows = _summary(str(tmp_path), 'folder')
    assert len(rows) == 1 and float(rows[0]['eval_top1']) >= 0


@pytest.mark.parametrize('extra', [
    ['--sched', 'wsd', '--decay-epochs', '1', '--lr-stable-timescale', '0.5'],
    ['--sched', 'step', '--decay-epochs', '1', '--opt', 'dbpadamw'],
    ['--aa', 'rand-m9-mstd0.5', '--mixup', '0.2', '--cutmix', '1.0', '--reprob', '0.25'],
    ['--amp', '--amp-dtype', 'bfloat16', '--channels-last', '--clip-grad', '1.0', '--grad-accum-steps', '2'],
    ['--amp', '--clip-grad', '1.0'],
    ['--bce-loss', '--model-ema', '--val-interval', '2', '--opt', 'lookahead_dbp_sgd'],
    ['--opt', 'dbplamb', '--opt-kwargs', 'decor_interval=2', 'kappa=0.5', '--layer-decay', '0.8'],
], ids=['wsd', 'step-adamw', 'aa-mixup-cutmix', 'amp-bf16-accum', 'amp-fp16-scaler', 'bce-ema-lookahead', 'lamb-kwargs'])
def test_timm_recipe_flags_train_dbp(tiny_fmnist, tmp_path, extra):
    argv = _args(tiny_fmnist, str(tmp_path), 'flags', *extra)
    assert train.run(argv) == 0
    rows = _summary(str(tmp_path), 'flags')
    assert len(rows) == 2 and int(rows[-1]['train_decor_updates']) > 0
    assert None not in rows[-1] and 0 <= float(rows[-1]['lr']) <= 0.1  # every value under its own column
    if '--val-interval' in extra:  # epoch 0 not validated: its eval cells are empty, epoch 1's are filled
        assert rows[0]['eval_top1'] == '' and rows[0]['eval_ema_top1'] == '' and float(rows[1]['eval_top1']) >= 0
    ckpt = _last(str(tmp_path), 'flags')
    assert all(torch.isfinite(v).all() for k, v in ckpt['state_dict'].items() if k.endswith('decor_matrix'))


@pytest.mark.parametrize('structure', ['channel', 'kron'])
def test_auto_kappa_and_structured_R_from_the_command_line(tiny_fmnist, tmp_path, structure):
    argv = _args(tiny_fmnist, str(tmp_path), 'auto', '--kappa', 'auto', '--model-kwargs', f'dbp_structure={structure}')
    assert train.run(argv) == 0
    rows = _summary(str(tmp_path), 'auto')
    assert 0 < float(rows[-1]['train_decor_kappa']) < 1 and int(rows[-1]['train_decor_skipped']) == 0
    state = _last(str(tmp_path), 'auto')['state_dict']
    assert state['layer1.0.conv1.decor_matrix'].shape[0] == state['layer1.0.conv1.weight'].shape[1]  # channel factor
    assert ('layer1.0.conv1.decor_spatial' in state) == (structure == 'kron')
    # args.yaml records the DBP settings used, defaults resolved (not None), and loads back as a config
    args_yaml = os.path.join(str(tmp_path), 'train', 'auto', 'args.yaml')
    recorded = yaml.safe_load(open(args_yaml))
    assert (recorded['decor_lr'], recorded['kappa']) == (1e-3, 'auto')
    assert (recorded['decor_samples'], recorded['decor_interval']) == (
        timm_dbp.DBP_DEFAULTS['decor_samples'], timm_dbp.DBP_DEFAULTS['decor_interval'])
    reloaded, _ = train._parse_args(['-c', args_yaml])
    assert (reloaded.decor_samples, reloaded.kappa) == (recorded['decor_samples'], 'auto')


def test_decor_matmul_dtype_flag_reaches_the_optimizer(tiny_fmnist, tmp_path, capsys):
    args, _ = train._parse_args(_args(tiny_fmnist, str(tmp_path), 'x', '--decor-matmul-dtype', 'bfloat16'))
    assert train._optimizer_kwargs(args)['decor_matmul_dtype'] == 'bfloat16'
    with pytest.raises(SystemExit) as exit_info:  # float16 could overflow the second moment: not offered
        train.run(_args(tiny_fmnist, str(tmp_path), 'x', '--decor-matmul-dtype', 'float16'))
    assert exit_info.value.code == 2 and '--decor-matmul-dtype' in capsys.readouterr().err


@pytest.mark.parametrize('value', ['0', '-2', 'x'])
def test_bad_sketch_probes(tiny_fmnist, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train.run(_args(tiny_fmnist, str(tmp_path), 'x', '--sketch-probes', value))
    assert exit_info.value.code == 2 and '--sketch-probes' in capsys.readouterr().err


def test_bad_schedule_is_one_line(tiny_fmnist, tmp_path, capsys):
    assert 'wsd' in _error_of(capsys, _args(tiny_fmnist, str(tmp_path), 'x', '--sched', 'wsd'))


def test_initial_checkpoint_plain_weights_into_dbp(tiny_fmnist, tmp_path, capsys):
    import timm
    plain = timm.create_model('test_resnet', num_classes=10, in_chans=1)
    torch.save(plain.state_dict(), tmp_path / 'plain.pth')
    assert train.run(_args(tiny_fmnist, str(tmp_path), 'init', '--epochs', '1',
                           '--initial-checkpoint', str(tmp_path / 'plain.pth'))) == 0
    (tmp_path / 'garbage.pth').write_bytes(b'garbage')
    err = _error_of(capsys, _args(tiny_fmnist, str(tmp_path), 'x', '--initial-checkpoint', str(tmp_path / 'garbage.pth')))
    assert 'garbage.pth' in err
