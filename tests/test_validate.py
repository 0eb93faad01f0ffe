""" Tests of validate.py: a checkpoint, its EMA, the folded model and the plain twin give consistent accuracy """
import json
import os

import pytest
import torch

import train
import validate


@pytest.fixture(scope='module')
def trained(tiny_fmnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('out'))
    argv = ['--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist, '--model', 'dbp_test_resnet', '--opt', 'dbpsgd',
            '--img-size', '32', '-b', '32', '--epochs', '1', '--warmup-epochs', '0', '-j', '0', '--output', out,
            '--experiment', 'v', '--decor-lr', '1e-2', '--model-ema', '--model-ema-decay', '0.5']
    assert train.run(argv) == 0
    return os.path.join(out, 'train', 'v', 'last.pth.tar')


def _validate(tiny_fmnist, checkpoint, *extra, model='dbp_test_resnet'):
    return validate.main(['--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist, '--model', model,
                          '--checkpoint', checkpoint, '--img-size', '32', '-j', '0', *extra])


def test_fold_gives_the_same_accuracy(tiny_fmnist, trained):
    plain = _validate(tiny_fmnist, trained)
    folded = _validate(tiny_fmnist, trained, '--fold')
    twin = _validate(tiny_fmnist, trained, model='test_resnet')  # DBP checkpoint folded into timm's model
    assert plain['dbp_layers'] == 16 and folded['dbp_layers'] == 0 and twin['dbp_layers'] == 0
    assert plain['top1'] == folded['top1'] == twin['top1']
    assert plain['loss'] == pytest.approx(folded['loss'], rel=1e-4) == pytest.approx(twin['loss'], rel=1e-4)
    ckpt = torch.load(trained, weights_only=False)
    assert plain['top1'] == pytest.approx(ckpt['metric'], abs=1e-4)  # validate.py reports 4 decimals


def test_ema_weights_and_results_file(tiny_fmnist, trained, tmp_path):
    results = tmp_path / 'r.json'
    ema = _validate(tiny_fmnist, trained, '--use-ema', '--fold', '--results-file', str(results))
    assert json.loads(results.read_text())['top1'] == ema['top1'] and ema['ema']


def test_bad_checkpoint_is_one_line(tiny_fmnist, tmp_path, capsys):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    code = validate.run(['--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist, '--model', 'dbp_test_resnet',
                         '--checkpoint', str(bad), '-j', '0'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith('validate.py: error:') and 'bad.pth' in err[-1]


def test_checkpoint_builds_the_model_with_its_pinned_dbp_kwargs(tiny_fmnist, tmp_path, capsys):
    """A train.py checkpoint of a model built with dbp_block_size=8 validates with no options (its pins); one without
    pins takes them from --model-kwargs; a pinned kwarg given otherwise is a one-line error."""
    out = str(tmp_path)
    argv = ['--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist, '--model', 'dbp_test_resnet', '--opt', 'dbpsgd',
            '--img-size', '32', '-b', '32', '--epochs', '1', '--warmup-epochs', '0', '-j', '0', '--output', out,
            '--experiment', 'blocks', '--model-kwargs', 'dbp_block_size=8']
    assert train.run(argv) == 0
    path = os.path.join(out, 'train', 'blocks', 'last.pth.tar')
    ckpt = torch.load(path, weights_only=False)
    assert _validate(tiny_fmnist, path)['top1'] == pytest.approx(ckpt['metric'], abs=1e-4)

    del ckpt['dbp_model_kwargs']
    unpinned = str(tmp_path / 'unpinned.pth.tar')
    torch.save(ckpt, unpinned)
    assert _validate(tiny_fmnist, unpinned, '--model-kwargs', 'dbp_block_size=8')['top1'] == pytest.approx(
        ckpt['metric'], abs=1e-4)
    for checkpoint, kwarg, message in ((path, 'dbp_block_size=0', 'dbp_block_size=0 (it has 8)'),
                                       (unpinned, 'dbp_block_size=0', 'block-diagonal')):
        code = validate.run(['--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist, '--model', 'dbp_test_resnet',
                             '--checkpoint', checkpoint, '--img-size', '32', '-j', '0', '--model-kwargs', kwarg])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith('validate.py: error:') and message in err[-1], err[-1]


def test_hf_hub_model_offline_from_the_cache_layout(tiny_fmnist, trained, tmp_path):
    """validate.py --model hf-hub:org/name, served from a Hugging Face cache folder with HF_HUB_OFFLINE=1."""
    import subprocess
    import sys
    import timm
    from timm.models import save_for_hf
    from hub import place_in_hf_cache  # the cache layout helper shared with tests/test_hub.py
    model = timm.create_model('dbp_test_resnet', num_classes=10, in_chans=1)
    model.load_state_dict(torch.load(trained, weights_only=False)['state_dict'])
    save_for_hf(model, str(tmp_path / 'folder'), model_args=dict(in_chans=1), safe_serialization=True)
    place_in_hf_cache(tmp_path / 'folder', 'timm-dbp/fmnist-test', cache_dir=tmp_path / 'hf' / 'hub')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1')
    cmd = [sys.executable, os.path.join(root, 'validate.py'), '--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist,
           '--model', 'hf-hub:timm-dbp/fmnist-test', '--img-size', '32', '-j', '0']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hub = json.loads(proc.stdout.strip().splitlines()[-1])
    local = _validate(tiny_fmnist, trained)
    assert hub['top1'] == local['top1'] and hub['dbp_layers'] == 16
