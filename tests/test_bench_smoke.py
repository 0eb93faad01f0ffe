""" Seconds-long smoke runs of the bench/ scripts (the real runs and their numbers are in docs/BENCHMARKS.md) """
import importlib.util
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
    for variant, phases in result['raw_phase_s'].items():  # one (forward, backward, step) per timed step
        assert len(phases) == 1 and sum(phases[0]) <= result['raw_s'][variant][0]
        assert set(result['phase_median_s'][variant]) == {'forward', 'backward', 'step'}


def test_layer_costs_smoke(tmp_path):
    out = _run('layer_costs.py', '--config', 'test_resnet:32:4', '--repeats', '1', '--out', str(tmp_path / 'l'))
    result = json.loads((tmp_path / 'l.json').read_text())
    import timm
    import timm_dbp
    expected = [n for n, _ in timm_dbp.decor_layers(timm.create_model('dbp_test_resnet'))]
    assert [row['layer'] for row in result['layers']] == expected  # every DBP layer, in model order
    assert {row['path'] for row in result['layers']} <= {'fused', 'input'}
    assert all(row['update_s'] > 0 and row['plain_fwd_bwd_s'] > 0 for row in result['layers'])
    assert result['fusion_by_path_s']['fused'] + result['fusion_by_path_s']['input'] == pytest.approx(
        result['totals_s']['fusion']) and 'R update' in out
    assert result['meta']['matmul_dtype'] == 'auto'  # the optimizer's default
    _run('layer_costs.py', '--config', 'test_resnet:32:4', '--repeats', '1', '--dbp', 'dbp_block_size=16',
         '--matmul-dtype', 'bfloat16', '--out', str(tmp_path / 'b'))
    blocks = json.loads((tmp_path / 'b.json').read_text())
    assert blocks['meta']['matmul_operands'] == 'torch.bfloat16'
    assert any(len(row['R']) == 3 for row in blocks['layers'])  # (G, b, b): the model kwarg reached the twin
    for bad_args, message in ((['--config', 'resnet18:64'], '--config must be'),
                              (['--samples', '0'], '--samples and --repeats must be'),
                              (['--dbp', 'decor_lr=0.1'], '--dbp takes dbp_* model kwargs only')):
        bad = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'layer_costs.py'), *bad_args],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-500:]


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


@pytest.mark.skipif(not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
                    reason='needs dataset-fashion-mnist (scripts/install.sh installs it)')
def test_kron_sampling_smoke(tmp_path):
    out = _run('kron_sampling.py', '--model', 'dbp_test_resnet', '--img-size', '32', '-b', '8', '--warmup-steps', '1',
               '--vectors', '64', '--per-patch', '1', '4', '--max-ref', '512', '--draws', '1',
               '--out', str(tmp_path / 'k.json'))
    result = json.loads((tmp_path / 'k.json').read_text())
    assert [entry['per_patch'] for entry in result['summary']] == [1, 4] and 'R_c error' in out
    assert all(0 < entry['channel_median'] < 10 and 0 < entry['spatial_median'] < 10 for entry in result['summary'])


def test_step_cost_with_dbp_settings_smoke(tmp_path):
    _run('step_cost.py', '--configs', 'test_resnet:32:4', '--repeats', '1', '--out', str(tmp_path / 's'),
         '--dbp', 'dbp_structure=kron', 'decor_interval=2')
    data = json.loads((tmp_path / 's.json').read_text())
    assert data['meta']['dbp_settings'] == {'dbp_structure': 'kron', 'decor_interval': 2}
    assert 0 < data['results'][0]['decor_state_mib'] < 1


def test_step_cost_compiled_smoke(tmp_path):
    _run('step_cost.py', '--configs', 'test_resnet:32:4', '--repeats', '1', '--out', str(tmp_path / 's'),
         '--compile', 'aot_eager')
    data = json.loads((tmp_path / 's.json').read_text())
    assert data['meta']['compile'] == 'aot_eager' and data['results'][0]['ratio_dbp_bp'] > 0


def test_sketched_conv_smoke(tmp_path):
    _run('sketched_conv.py', '--models', 'test_resnet:32:4', '--probes', '2', '--dbp-probes', '2', '--steps', '1',
         '--repeats', '1', '--out', str(tmp_path / 's'))
    row = json.loads((tmp_path / 's.json').read_text())['results'][0]
    assert set(row['variants']) == {'bp', 'relu_masks', 'xconv2', 'dbp_xconv2'}
    assert row['variants']['xconv2']['activation_bytes'] < row['variants']['bp']['activation_bytes']
    assert (tmp_path / 's.png').exists()


def test_memory_smoke(tmp_path):
    _run('memory.py', '--models', 'test_resnet', '--img-size', '32', '-b', '2', '--steps', '1', '--block-sizes', '16',
         '--out', str(tmp_path / 'm'))
    row = json.loads((tmp_path / 'm.json').read_text())['results'][0]
    state = row['decor_state_bytes']
    assert state['full'] > state['kron'] > state['channel'] > 0 and 0 < state['kron_b16'] < state['kron']
    assert set(row['peak']) == {'bp', 'full', 'channel', 'kron', 'kron_b16'}
    assert all(p['peak'] > 0 for p in row['peak'].values())
    assert (tmp_path / 'm.png').exists()


def test_memory_state_only_smoke(tmp_path):
    _run('memory.py', '--models', 'test_resnet', '--block-sizes', '16', '--state-only', '--out', str(tmp_path / 'm'))
    row = json.loads((tmp_path / 'm.json').read_text())['results'][0]
    assert 0 < row['decor_state_bytes']['kron_b16'] < row['decor_state_bytes']['kron'] and row['peak'] == {}
    assert (tmp_path / 'm.png').exists()


@pytest.mark.skipif(not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
                    reason='needs dataset-fashion-mnist (scripts/install.sh installs it)')
def test_time_to_accuracy_smoke(tmp_path):
    out = _run('time_to_accuracy.py', '--methods', 'bp_sgd', 'dbp_kron', '--lr-mults', '1', '--seeds', '0', '--epochs',
               '1', '--train-num-samples', '128', '--val-num-samples', '128', '--runs-dir', str(tmp_path / 'runs'),
               '--out', str(tmp_path / 't'))
    data = json.loads((tmp_path / 't.json').read_text())
    assert set(data['table']) == {'bp_sgd', 'dbp_kron'} and len(data['rows']) == 2
    assert all(len(r['curve']) == 1 and not r['failed'] for r in data['rows'])
    assert data['table']['bp_sgd']['time_median'] == 1.0 and 'to target' in out
    # resumable: a second call reads the finished runs instead of training again
    again = _run('time_to_accuracy.py', '--methods', 'bp_sgd', 'dbp_kron', '--lr-mults', '1', '--seeds', '0',
                 '--epochs', '1', '--train-num-samples', '128', '--val-num-samples', '128',
                 '--runs-dir', str(tmp_path / 'runs'), '--out', str(tmp_path / 't2'))
    assert '===' not in again
    # a shorter schedule: its runs are read into 'time to target, any budget'
    budgets = _run('time_to_accuracy.py', '--methods', 'bp_sgd', 'dbp_kron', '--lr-mults', '1', '--seeds', '0',
                   '--epochs', '2', '--budgets', '1', '--train-num-samples', '128', '--val-num-samples', '128',
                   '--runs-dir', str(tmp_path / 'runs'), '--out', str(tmp_path / 't3'))
    data = json.loads((tmp_path / 't3.json').read_text())
    assert sorted((r['method'], r['epochs']) for r in data['rows']) == [
        ('bp_sgd', 1), ('bp_sgd', 2), ('dbp_kron', 1), ('dbp_kron', 2)]
    for name, entry in data['table'].items():
        main_run = next(r for r in data['rows'] if r['method'] == name and r.get('chosen'))
        short_run = next(r for r in data['rows'] if r['method'] == name and r.get('budget'))
        assert len(main_run['curve']) == 2 and len(short_run['curve']) == 1
        assert entry['budget_final_top1'] == {'1': [short_run['final_top1']]}
        crossings = [t for t, acc in main_run['curve'] + short_run['curve'] if acc >= data['meta']['target']]
        expected = min(crossings) / data['meta']['bp_sgd_time'] if crossings else None
        assert entry['time_to_target_any'] == [expected]
    assert 'every schedule' in budgets
    # the same 2-epoch runs with --interleave-epochs: one epoch at a time, in step, and exactly the same curves
    interleaved = _run('time_to_accuracy.py', '--methods', 'bp_sgd', 'dbp_kron', '--lr-mults', '1', '--seeds', '0',
                       '--epochs', '2', '--interleave-epochs', '--train-num-samples', '128', '--val-num-samples',
                       '128', '--runs-dir', str(tmp_path / 'runs_interleaved'), '--out', str(tmp_path / 'ti'))
    calls = [line.split(':')[0] for line in interleaved.splitlines() if line.startswith('===')]
    assert calls == [f'=== {m} lr 0.05 seed 0 epochs 2, epoch {e}' for e in (1, 2) for m in ('bp_sgd', 'dbp_kron')]
    chunked = json.loads((tmp_path / 'ti.json').read_text())['rows']
    assert [[a for _, a in r['curve']] for r in chunked] == [
        [a for _, a in r['curve']] for r in data['rows'] if r.get('chosen')]
    # fixed multipliers skip the sweep (x2 is never trained) and shorter schedules only for --budget-methods: every
    # run needed is in the runs directory already, so nothing trains
    fixed = _run('time_to_accuracy.py', '--methods', 'bp_sgd', 'dbp_kron', '--lr-mults', '1', '2', '--fixed-lr-mults',
                 'bp_sgd=1', 'dbp_kron=1', '--seeds', '0', '--epochs', '2', '--budgets', '1', '--budget-methods',
                 'dbp_kron', '--train-num-samples', '128', '--val-num-samples', '128',
                 '--runs-dir', str(tmp_path / 'runs'), '--out', str(tmp_path / 't4'))
    data = json.loads((tmp_path / 't4.json').read_text())
    assert '===' not in fixed
    assert sorted((r['method'], r['epochs'], r['lr_mult']) for r in data['rows']) == [
        ('bp_sgd', 2, 1.0), ('dbp_kron', 1, 1.0), ('dbp_kron', 2, 1.0)]
    assert 'budget_final_top1' not in data['table']['bp_sgd'] and 'budget_final_top1' in data['table']['dbp_kron']
    assert data['meta']['args']['fixed_lr_mults'] == ['bp_sgd=1', 'dbp_kron=1']
    # a method's own schedule (--method-epochs): BP-SGD's 2 epochs against DBP's 1, both trained already
    own = _run('time_to_accuracy.py', '--methods', 'bp_sgd', 'dbp_kron', '--fixed-lr-mults', 'bp_sgd=1', 'dbp_kron=1',
               '--epochs', '2', '--method-epochs', 'dbp_kron=1', '--seeds', '0', '--train-num-samples', '128',
               '--val-num-samples', '128', '--runs-dir', str(tmp_path / 'runs'), '--out', str(tmp_path / 't6'))
    assert '===' not in own
    rows = json.loads((tmp_path / 't6.json').read_text())['rows']
    assert [(r['method'], r['epochs'], len(r['curve']), r.get('chosen')) for r in rows] == [
        ('bp_sgd', 2, 2, True), ('dbp_kron', 1, 1, True)]
    # a best LR at an edge widens the sweep: a one-point sweep is all edge, so x0.5 and x2 are added (x1 is read)
    wide = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'time_to_accuracy.py'), '--methods', 'bp_sgd',
                           '--lr-mults', '1', '--extend-edges', '1', '--seeds', '0', '--epochs', '1',
                           '--train-num-samples', '128', '--val-num-samples', '128', '--runs-dir',
                           str(tmp_path / 'runs'), '--out', str(tmp_path / 't5')], capture_output=True, text=True)
    assert wide.returncode == 0, wide.stderr[-2000:]
    data = json.loads((tmp_path / 't5.json').read_text())
    assert data['meta']['sweep'] == [0.5, 1.0, 2.0] and 'widened to x0.5 x1 x2' in wide.stdout
    assert sorted(r['lr_mult'] for r in data['rows']) == [0.5, 1.0, 2.0]
    chosen = next(r for r in data['rows'] if r.get('chosen'))
    assert chosen['final_top1'] == max(r['final_top1'] for r in data['rows'])
    at_edge = chosen['lr_mult'] != 1.0  # after one widening x0.5 and x2 are the edges
    assert data['table']['bp_sgd']['best_at_sweep_edge'] is at_edge
    assert ('lies at an edge of the sweep' in wide.stderr) is at_edge
    sweep_lines = wide.stdout.split('LR sweep, seed 0')[1].splitlines()
    assert sweep_lines[1].split() == ['method', 'x0.5', 'x1', 'x2']
    assert sweep_lines[2].split()[0] == 'bp_sgd' and f'*{chosen["final_top1"]:.2f}' in sweep_lines[2]
    for flags, message in [(['--epochs', '2', '--budgets', '2'], '--budgets must be'),
                           (['--extend-edges', '-1'], '--extend-edges must be'),
                           (['--methods', 'bp_sgd', '--budget-methods', 'dbp_kron'], '--budget-methods must be'),
                           (['--methods', 'bp_sgd', '--fixed-lr-mults', 'dbp_kron=2'], 'METHOD=VALUE'),
                           (['--methods', 'bp_sgd', '--fixed-lr-mults', 'bp_sgd'], 'METHOD=VALUE'),
                           (['--methods', 'bp_sgd', '--fixed-lr-mults', 'bp_sgd=0'], 'positive number'),
                           (['--methods', 'bp_sgd', '--fixed-lr-mults', 'bp_sgd=nan'], 'positive number'),
                           (['--methods', 'bp_sgd', '--fixed-lr-mults', 'bp_sgd=four'], 'positive number'),
                           (['--methods', 'bp_sgd', '--method-epochs', 'bp_sgd=2.5'], 'positive integer'),
                           (['--methods', 'bp_sgd', '--method-epochs', 'dbp_kron=2'], 'METHOD=VALUE'),
                           (['--epochs', '4', '--budgets', '2', '--method-epochs', 'bp_sgd=2'], 'shorter than every')]:
        bad = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'time_to_accuracy.py'), *flags,
                              '--out', str(tmp_path / 'x')], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr, (flags, bad.stderr)


def test_time_to_accuracy_widens_the_sweep_beyond_an_edge_where_a_best_lr_lies():
    spec = importlib.util.spec_from_file_location('tta', os.path.join(ROOT, 'bench', 'time_to_accuracy.py'))
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    sweep = [0.5, 1.0, 2.0, 4.0, 8.0]
    assert tta.edge_extension(sweep, {'bp_sgd': 1.0, 'dbp': 4.0}) == []
    assert tta.edge_extension(sweep, {'bp_sgd': 1.0, 'dbp': 8.0}) == [16.0]
    assert tta.edge_extension(sweep, {'bp_sgd': 0.5, 'dbp': 2.0}) == [0.25]
    assert tta.edge_extension(sweep, {'bp_sgd': 0.5, 'dbp': 8.0}) == [0.25, 16.0]
    assert tta.edge_extension([1.0, 3.0, 10.0], {'a': 10.0}) == [pytest.approx(100 / 3)]  # the outer spacing
    assert tta.edge_extension([1.0], {'a': 1.0}) == [0.5, 2.0]  # one point: both edges, x2 apart
    assert tta.edge_extension(sweep, {}) == []


@pytest.mark.skipif(not os.path.exists('/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'),
                    reason='needs dataset-fashion-mnist (scripts/install.sh installs it)')
def test_analytic_head_smoke(tmp_path):
    out = _run('analytic_head.py', '--train-num-samples', '256', '--val-num-samples', '128', '--brief-num-samples',
               '128', '--full-epochs', '1', '--probe-epochs', '1', '--ridges', '0', '1', '--runs-dir',
               str(tmp_path / 'runs'), '--out', str(tmp_path / 'a'))
    rows = json.loads((tmp_path / 'a.json').read_text())['rows']
    assert [r['backbone'] for r in rows] == ['random', 'brief', 'full']
    for row in rows:
        assert [a['ridge'] for a in row['analytic']] == [0.0, 1.0] and row['fit_samples'] == 256
        assert all(0 <= a['top1'] <= 100 and a['seconds'] > 0 for a in row['analytic'])
        assert len(row['probe']['curve']) == 1 and row['analytic_e2e']['ridge'] == 1e-3
    assert (tmp_path / 'a.png').exists() and 'linear probe' in out


def test_decoupled_smoke(tmp_path):
    out = _run('decoupled.py', '--methods', 'bp_1thread', 'fdg_k2', '--model', 'dbp_test_resnet', '--seeds', '0',
               '--epochs', '1', '--train-num-samples', '256', '--val-num-samples', '128', '-b', '32',
               '--runs-dir', str(tmp_path / 'runs'), '--out', str(tmp_path / 'd'))
    data = json.loads((tmp_path / 'd.json').read_text())
    assert set(data['table']) == {'bp_1thread', 'fdg_k2'}
    assert all(not r['failed'] and len(r['curve']) == 1 and r['images_per_s'] > 0 for r in data['rows'])
    assert (tmp_path / 'd.png').exists() and 'img/s' in out


def test_decor_stability_smoke(tmp_path):
    out = _run('decor_stability.py', '--models', 'dbp_test_resnet', '--decor-lrs', '1e6', '--max-steps', 'inf', '0.5',
               '--epochs', '1', '--train-num-samples', '256', '--val-num-samples', '128',
               '--runs-dir', str(tmp_path / 'runs'), '--out', str(tmp_path / 'st'))
    uncapped, capped = json.loads((tmp_path / 'st.json').read_text())['results']
    assert uncapped['max_step'] == float('inf') and capped['max_step'] == 0.5
    # decor_lr 1e6: the plain rule is refused at every update, the capped one applied (and capped) at every update
    assert uncapped['epochs'][-1]['skipped'] > 0 == uncapped['epochs'][-1]['updates']
    assert capped['epochs'][-1]['capped'] == capped['epochs'][-1]['updates'] > 0 == capped['epochs'][-1]['skipped']
    assert (tmp_path / 'st.png').exists() and 'refused / capped / updates' in out


def test_small_product_smoke(tmp_path):
    out = _run('small_product.py', '--model', 'test_resnet', '--repeats', '1', '--out', str(tmp_path / 'p'))
    rows = json.loads((tmp_path / 'p.json').read_text())['rows']
    assert rows and all(row['fwd_speedup'] > 0 and row['fwd_bwd_speedup'] > 0 for row in rows)
    assert all(row['weight'][2] > 1 for row in rows) and 'fwd+bwd' in out  # kron layers only


def test_op_counts_smoke(tmp_path):
    out = _run('op_counts.py', '--config', 'test_resnet:32:2', '--warmup', '1', '--out', str(tmp_path / 'o'))
    results = json.loads((tmp_path / 'o.json').read_text())['results']
    for phase in ('forward', 'backward', 'step'):
        assert results['dbp'][phase]['ops'] > 0 and results['bp'][phase]['ops'] > 0
        assert 0 < results['dbp'][phase]['dispatch_ops'] <= results['dbp'][phase]['ops']
    assert results['dbp']['step']['ops'] > results['bp']['step']['ops'] and 'self CPU' in out  # R is updated
    assert results['dbp']['step']['dispatch_ops'] > results['bp']['step']['dispatch_ops']


def test_matmul_dtype_smoke(tmp_path):
    out = _run('matmul_dtype.py', '--dims', '8', '130', '--batches', '2', '--samples', '64', '--repeats', '1',
               '--out', str(tmp_path / 'm'))
    data = json.loads((tmp_path / 'm.json').read_text())
    assert [(row['batch'], row['d']) for row in data['rows']] == [(2, 8), (2, 130)]
    for row in data['rows']:
        assert set(row['median_s']) == {'update_float32', 'update_bfloat16', 'update_float32_one_bmm', 'gemm_float32',
                                        'gemm_bfloat16', 'gemm_float32_balanced'}
        assert row['update_speedup'] > 0 and row['balanced_speedup'] > 0 and min(row['gemm_gflops'].values()) > 0
    assert data['meta']['matmul_dtype_min_dim'] == 128 and 'GFLOP/s' in out
