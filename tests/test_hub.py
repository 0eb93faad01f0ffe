""" Tests of hub/: publishing a train.py run as a Hub folder (safetensors, timm's config.json, model card), uploading
with huggingface_hub's API (mocked: no network here), and loading it back through timm's `hf-hub:` / `local-dir:`
paths offline (HF_HUB_OFFLINE=1, from a Hugging Face cache layout the tests build) """
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import timm_dbp
import train
from hub import place_in_hf_cache, publish
from hub.load import HubLoadError, load_model
from timm_dbp import PretrainedWeightsError, decor_layers
from timm_dbp.optim import DBP_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Every test runs with huggingface_hub offline and its own empty cache: nothing can reach the network."""
    from huggingface_hub import constants
    home = tmp_path / 'hf'
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(home / 'hub'))
    return home / 'hub'


@pytest.fixture(scope='module')
def run_dir(tiny_fmnist, tmp_path_factory):
    """A tiny DBP run with a kron R, EMA and non-default DBP settings: 1 epoch of 64 images."""
    out = tmp_path_factory.mktemp('runs')
    argv = ['--dataset', 'fashion_mnist', '--data-dir', tiny_fmnist, '--model', 'dbp_test_resnet', '--opt', 'dbpsgd',
            '--img-size', '32', '-b', '16', '--epochs', '1', '--warmup-epochs', '0', '-j', '0', '--output', str(out),
            '--experiment', 'kron', '--train-num-samples', '64', '--val-num-samples', '32', '--decor-lr', '1e-2',
            '--kappa', '0.5', '--decor-samples', '256', '--decor-interval', '2', '--model-kwargs', 'dbp_structure=kron',
            '--model-ema', '--model-ema-decay', '0.5', '--no-energy', '--log-interval', '100']
    assert train.run(argv) == 0
    return out / 'train' / 'kron'


@pytest.fixture(scope='module')
def checkpoint(run_dir):
    return torch.load(run_dir / 'model_best.pth.tar', weights_only=False)


def _model_from_checkpoint(checkpoint, key='state_dict'):
    model = timm.create_model('dbp_test_resnet', num_classes=10, in_chans=1, dbp_structure='kron')
    model.load_state_dict(checkpoint[key])
    return model.eval()


def _export(run_dir, out, *extra):
    """publish --dry-run into `out`; HfApi must not even be constructed."""
    with mock.patch.object(publish, 'HfApi') as api:
        assert publish.run([str(run_dir), '--repo-id', 'timm-dbp-test/fmnist', '--dry-run', '--out', str(out),
                            *extra]) == 0
    api.assert_not_called()
    return out


@pytest.fixture(scope='module')
def dbp_folder(run_dir, tmp_path_factory):
    return _export(run_dir, tmp_path_factory.mktemp('pub') / 'dbp')


@pytest.fixture(scope='module')
def folded_folder(run_dir, tmp_path_factory):
    return _export(run_dir, tmp_path_factory.mktemp('pub') / 'folded', '--fold')


def _summary_row(run_dir, epoch):
    with open(run_dir / 'summary.csv') as f:
        return next(r for r in csv.DictReader(f) if r['epoch'] == str(epoch))


X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
# the dbp_* kwargs config.json pins: every one, defaults included, no limit as 0 (timm drops None; the run sets
# dbp_structure=kron)
DBP_ARGS = dict(dbp_exclude=[], dbp_max_dim=0, dbp_linear=True, dbp_structure='kron', dbp_kron_max_dim=0,
                dbp_block_size=0)


# --- the folder ----------------------------------------------------------------------------------------------------

def test_dry_run_writes_safetensors_and_timm_config(dbp_folder, checkpoint):
    assert sorted(os.listdir(dbp_folder)) == [
        'README.md', 'accuracy_vs_time.png', 'config.json', 'model.safetensors', 'summary.csv']
    weights = load_file(dbp_folder / 'model.safetensors')
    assert weights.keys() == checkpoint['state_dict'].keys()
    assert all(torch.equal(weights[k], v) for k, v in checkpoint['state_dict'].items())
    assert weights['layer1.0.conv1.decor_spatial'].shape == (9, 9)  # the kron factor travels with the weights
    config = json.loads((dbp_folder / 'config.json').read_text())
    assert config['architecture'] == 'dbp_test_resnet' and config['num_classes'] == 10
    assert config['num_features'] == 96 and config['global_pool'] == 'avg'
    assert config['model_args'] == dict(DBP_ARGS, in_chans=1, num_classes=10, global_pool='avg')
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [1, 32, 32] and cfg['mean'] == [0.286] and cfg['std'] == [0.353]
    assert not {'hf_hub_id', 'url', 'file', 'source', 'tag', 'architecture'} & set(cfg)
    timm.models.PretrainedCfg(**cfg)  # timm's hf-hub loader builds exactly this
    assert config['label_names'][0] == 'T-shirt/top' and len(config['label_names']) == 10


def test_model_card_metadata_and_facts(dbp_folder, run_dir, checkpoint, tiny_fmnist):
    from huggingface_hub import ModelCard
    card = ModelCard.load(dbp_folder / 'README.md')
    data = card.data
    assert data.library_name == 'timm' and data.license == 'apache-2.0' and data.pipeline_tag == 'image-classification'
    assert {'timm', 'dbp', 'timm-dbp', 'dbp-form'} <= set(data.tags)
    assert data.datasets == ['zalando-datasets/fashion_mnist'] and data.metrics == ['accuracy']
    row = _summary_row(run_dir, checkpoint['epoch'])
    top1, top5 = float(row['eval_top1']), float(row['eval_top5'])
    assert [r.metric_value for r in data.eval_results] == [round(top1, 3), round(top5, 3)]
    text = card.text
    assert f'| published | {checkpoint["epoch"]} | {top1:.2f} | {top5:.2f} |' in text
    for fact in ('| decor_lr | 0.01 |', '| kappa | 0.5 |', '| decor_samples | 256 |', '| decor_interval | 2 |',
                 '| R learned in | all of training |', '| decor_max_step | 0.5 |', '| decor_matmul_dtype | auto |',
                 '| R structure (dbp_structure) | kron |', f'{float(row["train_decor_corr"]):.4f}',
                 'Published in **DBP form**', 'DBP layers: 16', '32 images of the Fashion-MNIST test split',
                 "timm.create_model('hf-hub:timm-dbp-test/fmnist', pretrained=True)", 'import timm_dbp',
                 '![accuracy vs training time](accuracy_vs_time.png)', 'arxiv.org/abs/2405.02385'):
        assert fact in text, fact
    command = re.search(r'```bash\n(python train\.py .*)\n```', text).group(1)
    for flag in ('--model dbp_test_resnet', '--opt dbpsgd', '--kappa 0.5', '--decor-interval 2',
                 '--model-kwargs dbp_structure=kron', '--data-dir DATA_DIR', '--dataset fashion_mnist'):
        assert flag in command, flag
    assert tiny_fmnist not in text and str(run_dir) not in text  # local paths are not published
    dist = float(re.search(r'\|\|_F: mean ([0-9.]+)', text).group(1))
    assert dist > 0  # R moved away from I during training


def test_plot_from_summary_and_note_without_matplotlib(run_dir, tmp_path, monkeypatch):
    rows = list(csv.DictReader(open(run_dir / 'summary.csv')))
    names, note = publish._plot(rows, tmp_path, 'title', ema=True, epoch=0)
    assert names == ['accuracy_vs_time.png'] and (tmp_path / names[0]).read_bytes()[:4] == b'\x89PNG' and not note
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib -> ImportError
    names, note = publish._plot(rows, tmp_path, 'title', ema=False, epoch=0)
    assert names == [] and 'matplotlib' in note


def test_dbp_settings_of_a_run_from_before_the_step_cap_say_it_was_off():
    """args.yaml of older runs has no decor_max_step: they ran the plain rule, not today's default cap."""
    old = publish._dbp_settings(dict(decor_lr=3e-3, kappa=0.0, decor_samples=1024, decor_interval=1), {})
    new = publish._dbp_settings(dict(decor_lr=3e-3, kappa=0.0, decor_samples=1024, decor_interval=1,
                                     decor_max_step=0.5), {})
    assert old['decor_max_step'] is None and new['decor_max_step'] == 0.5
    # nor decor_vectors_per_patch: they drew one vector per patch; newer runs show the flag's value or the default
    assert old['decor_vectors_per_patch'] == 1 and new['decor_vectors_per_patch'] == 1
    assert publish._dbp_settings(dict(decor_vectors_per_patch=4), {})['decor_vectors_per_patch'] == 4
    newest = publish._dbp_settings(dict(decor_lr=3e-3, decor_max_step=0.5, decor_vectors_per_patch=None), {})
    assert newest['decor_vectors_per_patch'] == DBP_DEFAULTS['decor_vectors_per_patch'] == 1
    # nor decor_matmul_dtype: their R updates multiplied in float32; newer runs show the flag's value or the default
    assert old['decor_matmul_dtype'] == newest['decor_matmul_dtype'] == 'float32'
    unset = publish._dbp_settings(dict(decor_matmul_dtype=None), {})['decor_matmul_dtype']
    assert unset == DBP_DEFAULTS['decor_matmul_dtype'] == 'auto'
    assert publish._dbp_settings(dict(decor_matmul_dtype='bfloat16'), {})['decor_matmul_dtype'] == 'bfloat16'


def test_dbp_settings_say_how_long_R_learned():
    assert publish._dbp_settings(dict(decor_epochs=1.5), {})['decor_learns'] == 'the first 1.5 epochs'
    steps = dict(opt_args=dict(decor_steps=300))
    assert publish._dbp_settings(steps, {})['decor_learns'] == 'the first 300 optimizer steps'
    assert publish._dbp_settings(dict(decor_epochs=None), {})['decor_learns'] == 'all of training'


def test_a_run_with_the_default_structure_is_published_with_it_pinned(checkpoint, tmp_path):
    """A run without --model-kwargs built its twin with the library's default R structure (kron): the card says so,
    and config.json names it, so the weights load whatever the default of a later release."""
    args = {k: v for k, v in vars(checkpoint['args']).items() if k != 'model_kwargs'}
    target = tmp_path / 'default.pth.tar'
    torch.save(dict(checkpoint, args=__import__('argparse').Namespace(**args)), target)
    out = _export(target, tmp_path / 'out')
    assert '| R structure (dbp_structure) | kron |' in (out / 'README.md').read_text()
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args'] == dict(DBP_ARGS, in_chans=1, num_classes=10, global_pool='avg')


def test_run_folder_png_is_published_as_is(run_dir, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    (run / 'bp-vs-dbp.png').write_bytes(b'\x89PNG fake plot')
    out = _export(run, tmp_path / 'out')
    assert (out / 'bp-vs-dbp.png').read_bytes() == b'\x89PNG fake plot' and not (out / 'accuracy_vs_time.png').exists()
    assert '![accuracy vs training time](bp-vs-dbp.png)' in (out / 'README.md').read_text()


# --- loading it back through timm ----------------------------------------------------------------------------------

def test_round_trip_hf_hub_and_local_dir_offline(dbp_folder, checkpoint, offline):
    """train -> publish --dry-run -> Hugging Face cache layout -> timm.create_model('hf-hub:...') offline."""
    snapshot = place_in_hf_cache(dbp_folder, 'timm-dbp-test/fmnist')
    assert (snapshot / 'model.safetensors').is_symlink()
    assert snapshot.parent.parent == offline / 'models--timm-dbp-test--fmnist'
    reference = _model_from_checkpoint(checkpoint)
    for name in ('hf-hub:timm-dbp-test/fmnist', f'local-dir:{dbp_folder}'):
        model = timm.create_model(name, pretrained=True).eval()
        assert model.dbp_args['structure'] == 'kron' and model.pretrained_cfg['input_size'] == (1, 32, 32)
        assert torch.equal(model(X), reference(X)), name
        for (key, layer), (_, ref) in zip(decor_layers(model), decor_layers(reference)):
            assert torch.equal(layer.decor_matrix, ref.decor_matrix) and torch.equal(
                layer.decor_spatial, ref.decor_spatial), key
    assert not torch.equal(reference.layer1[0].conv1.decor_matrix, torch.eye(32))  # a trained R, not I


def test_ema_weights(run_dir, checkpoint, tmp_path):
    out = _export(run_dir, tmp_path / 'ema', '--use-ema')
    reference = _model_from_checkpoint(checkpoint, 'state_dict_ema')
    assert torch.equal(timm.create_model(f'local-dir:{out}', pretrained=True).eval()(X), reference(X))
    row = _summary_row(run_dir, checkpoint['epoch'])
    text = (out / 'README.md').read_text()
    assert f'| published | {checkpoint["epoch"]} | {float(row["eval_ema_top1"]):.2f} |' in text and 'EMA weights' in text


def test_fold_publishes_the_plain_twin(folded_folder, checkpoint):
    config = json.loads((folded_folder / 'config.json').read_text())
    assert config['architecture'] == 'test_resnet' and not any(k.startswith('dbp_') for k in config['model_args'])
    weights = load_file(folded_folder / 'model.safetensors')
    assert not any('decor' in k for k in weights)
    expected = timm_dbp.fold_state_dict(checkpoint['state_dict'])
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], v) for k, v in expected.items())
    place_in_hf_cache(folded_folder, 'timm-dbp-test/fmnist-folded')
    model = timm.create_model('hf-hub:timm-dbp-test/fmnist-folded', pretrained=True).eval()
    assert type(model) is timm.models.ResNet and not list(decor_layers(model))
    torch.testing.assert_close(model(X), _model_from_checkpoint(checkpoint)(X), rtol=1e-4, atol=1e-5)
    text = (folded_folder / 'README.md').read_text()
    assert 'Published **folded**' in text and 'no timm-dbp needed' in text and '- folded' in text


# --- uploading (huggingface_hub mocked) ----------------------------------------------------------------------------

def _mock_api(card_exists=False):
    """(HfApi class, its instance, what upload_folder got): autospecced, so a call huggingface_hub's real
    signatures would refuse fails here too."""
    from huggingface_hub import HfApi
    HfApi = mock.create_autospec(HfApi)
    api = HfApi.return_value
    api.create_repo.return_value.repo_id = 'my-org/dbp-fmnist'
    api.file_exists.return_value = card_exists
    uploaded = {}

    def upload_folder(**kwargs):
        uploaded.update(kwargs, files=sorted(os.listdir(kwargs['folder_path'])))  # the folder is gone afterwards
        return mock.sentinel.commit

    api.upload_folder.side_effect = upload_folder
    return HfApi, api, uploaded


def test_upload_creates_repo_and_uploads_the_folder(run_dir, tmp_path):
    HfApi, api, uploaded = _mock_api()
    with mock.patch.object(publish, 'HfApi', HfApi):
        assert publish.run([str(run_dir), '--repo-id', 'my-org/dbp-fmnist', '--private']) == 0
    HfApi.assert_called_once()
    assert 'token' not in HfApi.call_args.kwargs  # the token comes from $HF_TOKEN / `hf auth login`
    api.create_repo.assert_called_once_with('my-org/dbp-fmnist', private=True, exist_ok=True, repo_type='model')
    api.file_exists.assert_called_once_with('my-org/dbp-fmnist', 'README.md', revision=None)
    assert uploaded['repo_id'] == 'my-org/dbp-fmnist' and uploaded['ignore_patterns'] is None
    assert uploaded['files'] == ['README.md', 'accuracy_vs_time.png', 'config.json', 'model.safetensors',
                                 'summary.csv']
    assert not os.path.exists(uploaded['folder_path'])  # a temporary folder without --out

    HfApi, api, uploaded = _mock_api()
    with mock.patch.object(publish, 'HfApi', HfApi):
        assert publish.run([str(run_dir), '--repo-id', 'my-org/dbp-fmnist', '--out', str(tmp_path / 'o')]) == 0
    assert uploaded['folder_path'] == str(tmp_path / 'o') and (tmp_path / 'o' / 'model.safetensors').is_file()
    assert api.create_repo.call_args.kwargs['private'] is False


@pytest.mark.parametrize('overwrite', [False, True])
def test_an_existing_card_is_kept_unless_overwrite_card(run_dir, overwrite):
    HfApi, api, uploaded = _mock_api(card_exists=True)
    with mock.patch.object(publish, 'HfApi', HfApi):
        assert publish.run([str(run_dir), '--repo-id', 'my-org/dbp-fmnist',
                            *(['--overwrite-card'] if overwrite else [])]) == 0
    assert uploaded['ignore_patterns'] == (None if overwrite else ['README.md'])


def test_upload_failure_is_one_line(run_dir, capsys):
    HfApi, api, _ = _mock_api()
    api.create_repo.side_effect = RuntimeError('401 Unauthorized\nmore')
    with mock.patch.object(publish, 'HfApi', HfApi):
        assert publish.run([str(run_dir), '--repo-id', 'my-org/dbp-fmnist']) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('hub.publish: error: upload to my-org/dbp-fmnist failed') and 'HF_TOKEN' in err


# --- bad input -----------------------------------------------------------------------------------------------------

class _Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def _publish_error(capsys, *argv):
    with mock.patch.object(publish, 'HfApi') as api:
        code = publish.run([str(a) for a in argv])
    api.assert_not_called()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith('hub.publish: error:') and not any('Traceback' in e for e in err), err
    return err[-1]


@pytest.mark.parametrize('case', ['missing', 'empty', 'truncated', 'garbage', 'unknown-arch', 'pickle', 'shape',
                                  'pinned'])
def test_bad_checkpoints_are_one_line_errors(case, run_dir, checkpoint, tmp_path, capsys):
    target = tmp_path / 'x.pth.tar'
    if case == 'missing':
        target = tmp_path / 'no-such-run'
    elif case == 'empty':
        target = tmp_path / 'empty-run'
        target.mkdir()
    elif case == 'truncated':
        data = (run_dir / 'last.pth.tar').read_bytes()
        target.write_bytes(data[:len(data) // 2])
    elif case == 'garbage':
        target.write_bytes(b'not a checkpoint at all')
    elif case == 'unknown-arch':
        torch.save(dict(checkpoint, arch='dbp_resnet19'), target)
    elif case == 'pickle':
        torch.save(dict(checkpoint, extra=_Exploit(str(tmp_path / 'pwned'))), target)
    elif case in ('shape', 'pinned'):  # args that do not match the weights; 'shape': without pins (older files)
        args = dict(vars(checkpoint['args']), model_kwargs={'dbp_structure': 'full'})
        bad = dict(checkpoint, args=__import__('argparse').Namespace(**args))
        if case == 'shape':
            del bad['dbp_model_kwargs']
        torch.save(bad, target)
    err = _publish_error(capsys, target, '--repo-id', 'org/name', '--dry-run', '--out', tmp_path / 'out')
    assert target.name in err
    expected = {'missing': 'not found', 'empty': 'no checkpoint', 'truncated': 'cannot read checkpoint',
                'garbage': 'cannot read checkpoint', 'unknown-arch': "'dbp_resnet19'", 'pickle': 'weights_only',
                'shape': 'decor_matrix',
                'pinned': "other dbp_ model kwargs: dbp_structure='full' (it has 'kron')"}[case]
    assert expected in err
    assert not (tmp_path / 'pwned').exists()  # the pickled call never ran
    if case == 'unknown-arch':
        assert 'dbp_resnet18' in err  # close matches
    if case == 'shape':
        assert 'model kwargs differ' in err


@pytest.mark.parametrize('repo_id', ['no-slash', 'a/b/c', 'org/bad name', '/name', 'org/'])
def test_bad_repo_id(repo_id, run_dir, tmp_path, capsys):
    err = _publish_error(capsys, run_dir, '--repo-id', repo_id, '--dry-run', '--out', tmp_path / 'out')
    assert 'bad --repo-id' in err and repr(repo_id) in err


def test_dry_run_needs_out_and_out_must_hold_only_our_files(run_dir, tmp_path, capsys):
    assert '--out' in _publish_error(capsys, run_dir, '--repo-id', 'org/name', '--dry-run')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'secret.txt').write_text('x')
    assert 'secret.txt' in _publish_error(capsys, run_dir, '--repo-id', 'org/name', '--dry-run', '--out',
                                          tmp_path / 'out')


def test_publish_builds_the_model_its_checkpoint_pinned(run_dir, tmp_path, capsys, monkeypatch):
    """publish builds the run's model with the dbp_ kwargs its checkpoint pinned, not today's defaults: after the
    default structure changed to 'full' (monkeypatched), a kron run whose args no longer name its structure publishes
    its kron model; without the pins it is refused, naming the R the weights hold."""
    run = tmp_path / 'run'
    shutil.copytree(run_dir, run)
    (run / 'args.yaml').write_text((run / 'args.yaml').read_text().replace('dbp_structure: kron', ''))
    for path in run.glob('*.pth.tar'):
        ckpt = torch.load(path, weights_only=False)
        assert ckpt['dbp_model_kwargs']['dbp_structure'] == 'kron'
        ckpt['args'].model_kwargs = {}
        torch.save(ckpt, path)
    monkeypatch.setitem(timm_dbp.models.DBP_MODEL_KWARGS, 'structure', ('dbp_structure', 'full'))
    assert timm.create_model('dbp_test_resnet').dbp_args['structure'] == 'full'
    folder = _export(run, tmp_path / 'pinned')
    assert json.loads((folder / 'config.json').read_text())['model_args']['dbp_structure'] == 'kron'

    for path in run.glob('*.pth.tar'):
        ckpt = torch.load(path, weights_only=False)
        del ckpt['dbp_model_kwargs']
        torch.save(ckpt, path)
    err = _publish_error(capsys, run, '--repo-id', 'org/name', '--dry-run', '--out', tmp_path / 'unpinned')
    assert 'model kwargs differ from the training run' in err and "kron R, the model dbp_structure='full'" in err


# --- clear errors when loading -------------------------------------------------------------------------------------

@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_corrupt_weights_name_the_file(damage, dbp_folder, folded_folder, tmp_path):
    for kind, folder in (('dbp', dbp_folder), ('folded', folded_folder)):
        bad = tmp_path / kind
        shutil.copytree(folder, bad)
        weights = bad / 'model.safetensors'
        data = weights.read_bytes()
        weights.write_bytes(data[:len(data) // 3] if damage == 'truncated' else b'\x00garbage' * 64)
        if kind == 'dbp':  # a DBP architecture: timm.create_model itself names the file
            with pytest.raises(PretrainedWeightsError, match=re.escape(str(weights))):
                timm.create_model(f'local-dir:{bad}', pretrained=True)
            snapshot = place_in_hf_cache(bad, 'org/broken')
            with pytest.raises(PretrainedWeightsError) as e:
                timm.create_model('hf-hub:org/broken', pretrained=True)
            assert 'hf-hub:org/broken' in str(e.value) and str(snapshot / 'model.safetensors') in str(e.value)
        with pytest.raises(HubLoadError, match=re.escape(str(weights))):  # any architecture, through hub.load
            load_model(f'local-dir:{bad}')


def test_unknown_architecture_says_import_timm_dbp(dbp_folder, tmp_path):
    bad = tmp_path / 'bad'
    shutil.copytree(dbp_folder, bad)
    config = json.loads((bad / 'config.json').read_text())
    (bad / 'config.json').write_text(json.dumps(dict(config, architecture='dbp_resnet19')))
    with pytest.raises(HubLoadError) as e:
        load_model(f'local-dir:{bad}')
    assert str(bad / 'config.json') in str(e.value) and "'dbp_resnet19'" in str(e.value)
    assert '`import timm_dbp`' in str(e.value)
    (bad / 'config.json').write_text('{"architecture": ')
    with pytest.raises(HubLoadError, match=re.escape(str(bad / 'config.json')) + '.*not a readable config.json'):
        load_model(f'local-dir:{bad}')
    with pytest.raises(HubLoadError, match='hf-hub:org/not-cached'):
        load_model('hf-hub:org/not-cached')


def test_null_size_limits_of_older_folders_load_as_no_limit(tmp_path):
    """Folders published before 0 meant "no limit" pin null, which timm drops, so dbp_resnet18's layer defaults would
    apply to weights with R on every layer: load_model passes 0."""
    from timm.models import save_for_hf
    every_layer = dict(dbp_max_dim=0, dbp_kron_max_dim=0)
    model = timm.create_model('dbp_resnet18', num_classes=10, **every_layer)
    with torch.no_grad():
        for name, R in model.state_dict().items():
            if name.endswith('decor_matrix'):
                R.add_(0.01 * torch.randn_like(R))
    pinned = dict(timm_dbp.models.dbp_model_kwargs(model.dbp_args), dbp_max_dim=None, dbp_kron_max_dim=None,
                  dbp_block_size=None)
    save_for_hf(model, str(tmp_path / 'old'), model_args=pinned, safe_serialization=True)
    with pytest.raises(PretrainedWeightsError, match='layer4'):
        timm.create_model(f'local-dir:{tmp_path / "old"}', pretrained=True)  # timm's own path: the defaults apply
    loaded = load_model(f'local-dir:{tmp_path / "old"}')
    assert loaded.dbp_args['max_dim'] is None and loaded.dbp_args['kron_max_dim'] is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert load_model(f'local-dir:{tmp_path / "old"}', dbp_max_dim=4608).dbp_args['max_dim'] == 4608  # given: kept


def test_structure_and_architecture_mismatch_name_the_key(dbp_folder, folded_folder, tmp_path):
    def with_config(folder, name, **changes):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        config = json.loads((bad / 'config.json').read_text())
        config.update(changes)
        (bad / 'config.json').write_text(json.dumps(config))
        return bad

    config = json.loads((dbp_folder / 'config.json').read_text())
    bad = with_config(dbp_folder, 'full', model_args=dict(config['model_args'], dbp_structure='full'))
    with pytest.raises(PretrainedWeightsError) as e:
        timm.create_model(f'local-dir:{bad}', pretrained=True)
    message = str(e.value)
    assert str(bad / 'model.safetensors') in message and re.search(r'\.decor_matrix is \(\d+, \d+\) in the weights',
                                                                    message)
    assert "kron R, the model dbp_structure='full'" in message

    bad = with_config(dbp_folder, 'arch', architecture='dbp_resnet18')
    with pytest.raises(PretrainedWeightsError, match=re.escape(str(bad / 'model.safetensors'))
                       + r' does not fit dbp_resnet18: \S+ is \(\d+.*\) in the weights but'):
        timm.create_model(f'local-dir:{bad}', pretrained=True)

    bad = with_config(folded_folder, 'plain', architecture='resnet18')  # timm's own model: through hub.load
    with pytest.raises(HubLoadError) as e:
        load_model(f'local-dir:{bad}')
    assert re.fullmatch(re.escape(str(bad / 'model.safetensors')) + r' does not fit resnet18: \S+ is \(\d+.*\) in the '
                        r'weights but \(\d+.*\) in the model', str(e.value)), str(e.value)


# --- pretrained tags: timm's BP weights into the DBP twin ----------------------------------------------------------

@pytest.fixture(scope='module')
def fake_timm_resnet18(tmp_path_factory):
    """A stand-in for timm/resnet18.a1_in1k: random weights of the right shapes, safetensors, as on the Hub."""
    folder = tmp_path_factory.mktemp('timm-resnet18')
    torch.manual_seed(0)
    model = timm.create_model('resnet18')
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # BN statistics that are not the init values
            if name.endswith(('running_mean', 'running_var')):
                buffer.uniform_(0.5, 1.5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps(dict(architecture='resnet18', num_classes=1000)))
    return folder


def test_pretrained_tag_starts_dbp_from_timm_weights_offline(fake_timm_resnet18):
    place_in_hf_cache(fake_timm_resnet18, 'timm/resnet18.a1_in1k')
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    bp = timm.create_model('resnet18.a1_in1k', pretrained=True).eval()
    expected = bp(x)
    for structure in ('full', 'kron'):
        dbp = timm.create_model('dbp_resnet18.a1_in1k', pretrained=True, dbp_structure=structure).eval()
        assert dbp.pretrained_cfg['hf_hub_id'] == 'timm/resnet18.a1_in1k'
        assert torch.equal(dbp(x), expected), structure
        for name, layer in decor_layers(dbp):
            assert torch.equal(layer.decor_matrix, torch.eye(len(layer.decor_matrix))), name
            if structure == 'kron' and layer.decor_spatial.numel():
                assert torch.equal(layer.decor_spatial, torch.eye(len(layer.decor_spatial))), name
        assert torch.equal(dbp.layer1[0].conv1.weight, bp.layer1[0].conv1.weight)
    # fine-tuning shapes: timm drops the 1000-class head and adapts the stem; R stays I
    tuned = timm.create_model('dbp_resnet18.a1_in1k', pretrained=True, num_classes=10, in_chans=1,
                              dbp_structure='kron')
    assert tuned.fc.out_features == 10 and tuned.conv1.weight.shape[1] == 1
    assert torch.equal(tuned.conv1.decor_matrix, torch.eye(1))


def test_only_loadable_tags_are_advertised():
    tags = timm.list_pretrained('dbp_*')
    assert 'dbp_resnet50.a1_in1k' in tags and 'dbp_resnet18.a1_in1k' in tags
    for tag in tags:
        twin = tag[len('dbp_'):]
        assert twin in timm.list_pretrained(twin), tag  # timm publishes the weights the tag loads
        cfg, twin_cfg = timm.models.get_pretrained_cfg(tag), timm.models.get_pretrained_cfg(twin)
        assert cfg.hf_hub_id == twin_cfg.hf_hub_id == f'timm/{twin}', tag  # no DBP-trained tags (none exist yet)


def test_dbp_checkpoint_into_other_in_chans_folds_the_stem_R(dbp_folder, checkpoint):
    """A published DBP model loaded with another in_chans: the stem's W R is adapted by timm and R restarts at I."""
    model = timm.create_model(f'local-dir:{dbp_folder}', pretrained=True, in_chans=3).eval()
    assert model.conv1[0].weight.shape[1] == 3 and torch.equal(model.conv1[0].decor_matrix, torch.eye(3))
    ref = _model_from_checkpoint(checkpoint)
    assert torch.equal(model.layer1[0].conv1.decor_matrix, ref.layer1[0].conv1.decor_matrix)
    stem = ref.conv1[0]
    assert not torch.equal(stem.decor_spatial, torch.eye(9))  # a trained stem R (kron: 1 x 1 and 3*3 x 3*3)
    x = X.repeat(1, 3, 1, 1)  # timm repeats the stem weight over 3 channels, scaled 1/3: same outputs on grey images
    torch.testing.assert_close(model(x), ref(X), rtol=1e-4, atol=1e-5)


# --- the README section, as written ------------------------------------------------------------------------------

def _readme_section() -> str:
    text = (ROOT / 'README.md').read_text()
    start = text.index('## Publishing and loading weights')
    end = text.find('\n## ', start + 1)
    return text[start:end if end > 0 else None]


def test_readme_commands_run_as_written(run_dir, fake_timm_resnet18, tmp_path, monkeypatch, offline):
    section = _readme_section()
    bash = [line for block in re.findall(r'```bash\n(.*?)```', section, re.S) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith('#')]
    python = re.findall(r'```python\n(.*?)```', section, re.S)
    assert bash and python and all(line.startswith('python -m hub.publish ') for line in bash), bash
    (tmp_path / 'output' / 'train').mkdir(parents=True)
    (tmp_path / 'output' / 'train' / 'my-run').symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    uploads = []
    for line in bash:
        argv = shlex.split(line)[3:]
        HfApi, api, uploaded = _mock_api()
        api.create_repo.return_value.repo_id = argv[argv.index('--repo-id') + 1]
        with mock.patch.object(publish, 'HfApi', HfApi):
            assert publish.run(argv) == 0, line
        if '--dry-run' in argv:
            HfApi.assert_not_called()
            assert (tmp_path / argv[argv.index('--out') + 1] / 'model.safetensors').is_file()
        else:
            repo = argv[argv.index('--repo-id') + 1]
            api.create_repo.assert_called_once_with(repo, private='--private' in argv, exist_ok=True,
                                                    repo_type='model')
            assert uploaded['repo_id'] == repo
            uploads.append(uploaded)
    assert uploads and all('model.safetensors' in u['files'] and 'README.md' in u['files'] for u in uploads)
    # the Python blocks, in a fresh process: HF_HUB_OFFLINE=1, a cache holding only what the test placed in it
    place_in_hf_cache(fake_timm_resnet18, 'timm/resnet18.a1_in1k')
    env = dict(os.environ, HF_HOME=str(offline.parent), HF_HUB_OFFLINE='1', PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', '\n'.join(python)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
