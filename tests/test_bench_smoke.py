""" Seconds-long smoke runs of the bench/ scripts (the real runs and their numbers are in docs/BENCHMARKS.md) """
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', script), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_step_cost_smoke(tmp_path):
    out = _run('step_cost.py', '--configs', 'test_resnet:32:4', '--repeats', '1', '--out', str(tmp_path / 's'))
    result = json.loads((tmp_path / 's.json').read_text())['results'][0]
    assert set(result['median_s']) == {'bp', 'fusion', 'sample', 'dbp'} and result['ratio_dbp_bp'] > 0
    assert (tmp_path / 's.png').exists() and 'ratio' in out


def test_inference_smoke(tmp_path):
    _run('inference.py', '--model', 'test_resnet', '--img-size', '32', '-b', '2', '--repeats', '1',
         '--out', str(tmp_path / 'i.json'))
    assert json.loads((tmp_path / 'i.json').read_text())['folded_over_plain'] > 0


@pytest.mark.skipif(not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
                    reason='needs dataset-fashion-mnist (scripts/install.sh installs it)')
def test_decor_samples_smoke(tmp_path):
    _run('decor_samples.py', '--model', 'dbp_test_resnet', '--img-size', '32', '-b', '8', '--warmup-steps', '1',
         '--samples', '16', '64', '--draws', '1', '--repeats', '1', '--out', str(tmp_path / 'd.json'))
    rows = json.loads((tmp_path / 'd.json').read_text())['rows']
    assert [r['n'] for r in rows] == [16, 64]
