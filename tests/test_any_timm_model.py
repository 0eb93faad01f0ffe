""" decorrelate() on any timm architecture: a fixed sample of timm's families (the whole registry is swept by
scripts/sweep_timm_models.py, result in docs/SWEEP.md), and the rule for layers whose weight the model reads itself """
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import timm_dbp
from timm_dbp import DecorLinear
from timm_dbp.utils.conformance import check_decorrelate, small_input

# small members of timm's families (CNNs, mobile nets, ViTs and hybrids, MLP mixers, reparameterisable nets);
# each must compute the same function at R = I, take a DBP step that reaches every R, and fold exactly
ARCHITECTURES = [
    'resnet18', 'resnet50d', 'seresnext26d_32x4d', 'densenet121', 'dla34', 'inception_v3', 'xception41',
    'mobilenetv2_050', 'mobilenetv3_small_050', 'efficientnet_b0', 'tf_efficientnet_b0', 'efficientnetv2_rw_t',
    'mnasnet_050', 'ghostnet_050', 'rexnet_100', 'regnetx_002', 'hrnet_w18_small', 'cspresnet50', 'convnext_atto',
    'convnextv2_atto', 'edgenext_xx_small', 'efficientformerv2_s0', 'fastvit_t8', 'mobileone_s0', 'repvgg_a0',
    'repvit_m1', 'levit_128s', 'vit_tiny_patch16_224', 'deit_tiny_patch16_224', 'eva02_tiny_patch14_224',
    'swin_tiny_patch4_window7_224', 'pit_ti_224', 'cait_xxs24_224', 'coat_tiny', 'convit_tiny', 'crossvit_tiny_240',
    'xcit_nano_12_p16_224', 'mixer_s16_224', 'resmlp_12_224', 'gmlp_ti16_224', 'poolformer_s12', 'pvt_v2_b0',
    'mobilevit_xxs', 'mobilevitv2_050', 'lcnet_050', 'res2net50_14w_8s', 'resnest14d', 'skresnet18', 'nf_resnet26',
    'resnetv2_50', 'botnet26t_256', 'halonet26t', 'gernet_s', 'selecsls42b', 'dpn48b', 'tinynet_e', 'starnet_s050',
    'tiny_vit_5m_224', 'efficientvit_b0', 'efficientvit_m0', 'mambaout_femto', 'inception_next_atto',
    'ese_vovnet19b_slim_dw', 'hiera_tiny_224', 'sequencer2d_s', 'visformer_tiny', 'nest_tiny', 'coatnet_nano_rw_224',
    'maxvit_nano_rw_256', 'hgnetv2_b0',
    # chaotic at init in eval mode (1e-15 relative weight noise moves its output by 0.4): fold checked layer by layer
    pytest.param('efficientnetv2_rw_m', marks=pytest.mark.large),
]


def test_sample_covers_many_families():
    from timm.models._registry import _model_to_module
    names = [n for n in ARCHITECTURES if isinstance(n, str)]
    assert len(names) >= 40 and len({_model_to_module[n] for n in names}) >= 40


@pytest.mark.parametrize('name', ARCHITECTURES)
def test_decorrelate_any_timm_architecture(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    result = check_decorrelate(model, small_input(name, model))
    assert result.ok, result.problems()


class _ReadsWeight(nn.Module):
    """Like BEiT's attention: uses its child's weight with its own bias, never calling the child."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(24))
        self.proj = nn.Linear(24, 8)

    def forward(self, x):
        return self.proj(F.linear(x, self.qkv.weight, self.q_bias))


class _ReadsWeightInHelper(_ReadsWeight):
    def forward(self, x):
        return self.proj(self._project(x))

    def _project(self, x):  # not a forward method: the static rule does not see it, the check must
        return F.linear(x, self.qkv.weight, self.q_bias)


def test_layer_whose_weight_the_parent_reads_stays_plain():
    model = timm_dbp.decorrelate(_ReadsWeight())
    assert type(model.qkv) is nn.Linear and isinstance(model.proj, DecorLinear)
    assert check_decorrelate(_ReadsWeight(), torch.randn(4, 8)).ok


def test_check_reports_a_layer_its_forward_never_runs():
    result = check_decorrelate(_ReadsWeightInHelper(), torch.randn(4, 8))
    assert not result.ok and result.unreached == ['qkv'] and 'never run by forward: qkv' in result.problems()


class _Chaotic(nn.Module):
    """sin(8 W x) twelve times (3x3 convs, kron R: DBP applies R_c to the small input, so the DBP model and its fold
    round differently): every layer stretches differences, so float32 round-off decides the output."""

    def __init__(self, width: int = 16, depth: int = 12):
        super().__init__()
        self.layers = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.sin(8 * layer(x))
        return x


def test_fold_of_a_chaotic_model_is_checked_layer_by_layer():
    torch.manual_seed(0)
    result = check_decorrelate(_Chaotic(), torch.randn(1, 16, 2, 2))
    assert result.fold_rel_diff > 1e-4, 'the model is not chaotic enough to test this'
    assert result.round_off_sensitivity > 1e-4 and result.layer_fold_rel_diff <= 1e-6
    assert result.chaotic and result.ok, result.problems()


@pytest.mark.parametrize('model, x', [(_Chaotic(), torch.randn(1, 16, 2, 2)), (_ReadsWeight(), torch.randn(4, 8))],
                         ids=['chaotic', 'plain'])
def test_check_catches_a_wrong_fold(model, x, monkeypatch):
    import timm_dbp.utils.conformance as conformance

    def wrong_fold(module):  # folds, then spoils every layer's weight by 1e-3 (relative)
        folded = timm_dbp.fold(module)
        with torch.no_grad():
            for m in folded.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.mul_(1.001)
        return folded

    monkeypatch.setattr(conformance, 'fold', wrong_fold)
    torch.manual_seed(0)
    result = check_decorrelate(model, x)
    assert not result.ok and 'folded model differs' in result.problems()


def test_sweep_script_records_resumes_and_reports_per_family(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                          'sweep_timm_models.py')
    out, summary = tmp_path / 'sweep.jsonl', tmp_path / 'SWEEP.md'

    def sweep(*args):
        proc = subprocess.run([sys.executable, script, '--out', str(out), '--summary', str(summary), '--threads', '1',
                               *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    first = sweep('--max-params', '1e6', 'test_resnet', 'test_vit', 'resnet18')
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    finished = {r['model']: r for r in rows if r['status'] != 'started'}
    assert finished['test_resnet']['status'] == 'ok' and finished['test_vit']['status'] == 'ok'
    assert finished['resnet18']['status'] == 'skipped' and '[1/3]' in first
    report = summary.read_text()
    assert '3 of 3 architectures swept: 2 ok, 1 skipped' in report
    assert '| resnet | 1 | 1 | 0 |' in report and '| vision_transformer | 1 | 0 | 0 |' in report
    assert 'Per timm model file: 2 files, 2 with at least one architecture ok.' in report
    assert '[1/' not in sweep('--max-params', '1e6', 'test_resnet', 'test_vit', 'resnet18')  # resumed: nothing to do
    # a process that died inside a model: recorded as a crash on the next run, and the family table says so
    with open(out, 'a') as f:
        f.write(json.dumps(dict(model='test_convnext', status='started')) + '\n')
    sweep('--max-params', '1e6', 'test_resnet', 'test_vit', 'resnet18', 'test_convnext')
    report = summary.read_text()
    assert '| test_convnext | crash |' in report and '| convnext | 0 | 0 | 1 |' in report
    assert 'none ok in: convnext' in report
