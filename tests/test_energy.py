""" Tests of the optional energy / CO2 measurement (timm_dbp.utils.energy and train.py's summary columns) """
import logging
import math
import os
import socket
import sys

import pytest

import train
from test_train import _args as train_args, _last, _summary, run_stopped_at_second_epoch
from timm_dbp.utils.energy import NOT_MEASURED, EnergyMeter, check_country_code


def _args(data_dir, out_dir, experiment, *extra):
    """test_train's run, shortened to one epoch of 64 images."""
    return train_args(data_dir, out_dir, experiment, '--train-num-samples', '64', '--val-num-samples', '64',
                      '--epochs', '1', *extra)


@pytest.fixture
def no_codecarbon(monkeypatch):
    """codecarbon not importable, as without the [energy] extra (None in sys.modules makes import fail)."""
    monkeypatch.setitem(sys.modules, 'codecarbon', None)


@pytest.fixture
def offline(monkeypatch):
    """Every socket connection attempt is recorded and refused; a codecarbon config asking for the network (an
    Electricity Maps token, CSV output) is set in the environment, to show the meter ignores it."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError('network disabled by the test')

    for name in ('getaddrinfo', 'create_connection'):  # (a name lookup comes first)
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setenv('CODECARBON_CO2_SIGNAL_API_TOKEN', 'test-token')
    monkeypatch.setenv('CODECARBON_SAVE_TO_FILE', 'true')
    return attempts


# --- country codes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('code', ['usa', 'US', 'USAA', 'U1A', '', None])
def test_bad_country_format_is_refused_even_without_codecarbon(no_codecarbon, code):
    with pytest.raises(ValueError, match='ISO 3166-1 alpha-3'):
        check_country_code(code)
    with pytest.raises(ValueError, match='ISO 3166-1 alpha-3'):
        EnergyMeter(code)


def test_lowercase_country_suggests_uppercase():
    with pytest.raises(ValueError, match="did you mean 'FRA'"):
        check_country_code('fra')


def test_unknown_country_is_refused_not_averaged():
    pytest.importorskip('codecarbon')
    assert check_country_code('FRA') == 'FRA'
    with pytest.raises(ValueError, match="unknown country code 'XXX'"):
        EnergyMeter('XXX')


@pytest.mark.parametrize('code', ['usa', 'XYZ'])
def test_train_bad_country_exits_2_with_one_line(tiny_fmnist, tmp_path, capsys, code):
    if code == 'XYZ':
        pytest.importorskip('codecarbon')  # the table of known countries is codecarbon's
    assert train.run(_args(tiny_fmnist, str(tmp_path), 'x', '--energy-country', code)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train.py: error: --energy-country:') and code in err[0], err
    assert not os.path.exists(os.path.join(str(tmp_path), 'train'))  # refused before anything is written


# --- without codecarbon ----------------------------------------------------------------------------------------

def test_meter_without_codecarbon_reports_unavailable(no_codecarbon):
    meter = EnergyMeter('DEU')
    assert meter.available is False
    with meter:
        pass
    meter.start()
    meter.stop()
    assert (meter.kwh, meter.co2_kg, meter.method) == (None, None, None)


def test_train_without_codecarbon_runs_and_says_not_measured(tiny_fmnist, tmp_path, caplog, no_codecarbon):
    caplog.set_level(logging.INFO, logger='train')
    assert train.run(_args(tiny_fmnist, str(tmp_path), 'plain')) == 0
    said = [r.getMessage() for r in caplog.records if r.name == 'train']
    assert said.count(NOT_MEASURED) == 1, said
    assert NOT_MEASURED == 'energy not measured: pip install timm-dbp[energy]'
    row, = _summary(str(tmp_path), 'plain')
    assert float(row['train_time']) > 0
    assert not any(k.startswith(('train_energy', 'train_co2')) for k in row), list(row)
    ckpt = _last(str(tmp_path), 'plain')
    assert ckpt['train_energy_kwh'] is None and ckpt['train_co2_kg'] is None


# --- with codecarbon -------------------------------------------------------------------------------------------

def test_meter_measures_offline_without_files(tmp_path, monkeypatch, offline):
    pytest.importorskip('codecarbon')
    monkeypatch.chdir(tmp_path)
    meter = EnergyMeter('FRA', kwh=1.0, co2_kg=2.0)
    assert meter.available
    for _ in range(2):
        with meter:
            sum(i * i for i in range(200_000))
    assert 1.0 < meter.kwh < 1.01 and 2.0 < meter.co2_kg < 2.01, (meter.kwh, meter.co2_kg)
    assert 'CPU: ' in meter.method, meter.method
    assert offline == [] and os.listdir(tmp_path) == []


def test_train_writes_energy_columns_and_resume_continues_them(tiny_fmnist, tmp_path, monkeypatch, caplog, offline):
    pytest.importorskip('codecarbon')
    caplog.set_level(logging.INFO, logger='train')
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = str(tmp_path / 'out')

    # 2 epochs, killed when the second one starts
    run_stopped_at_second_epoch(monkeypatch, _args(tiny_fmnist, out, 'e', '--epochs', '2', '--energy-country', 'DEU'))
    row0, = _summary(out, 'e')
    kwh0, co2_0 = float(row0['train_energy_kwh']), float(row0['train_co2_kg'])
    assert math.isfinite(kwh0) and math.isfinite(co2_0) and kwh0 > 0 and co2_0 > 0, row0
    assert 0.01 < co2_0 / kwh0 < 2.0  # kg CO2eq per kWh of a national grid
    assert list(row0).index('train_energy_kwh') == list(row0).index('train_time') + 1
    ckpt = _last(out, 'e')
    assert (ckpt['train_energy_kwh'], ckpt['train_co2_kg']) == (kwh0, co2_0)

    # resuming a measured run without codecarbon would drop the columns: refused, nothing written
    with monkeypatch.context() as m:
        m.setitem(sys.modules, 'codecarbon', None)
        assert train.run(_args(tiny_fmnist, out, 'e', '--epochs', '2', '--energy-country', 'DEU',
                               '--resume', 'auto')) == 2
    assert len(_summary(out, 'e')) == 1

    # resumed: the totals go on from the checkpoint's
    caplog.clear()
    assert train.run(_args(tiny_fmnist, out, 'e', '--epochs', '2', '--energy-country', 'DEU', '--resume', 'auto')) == 0
    rows = _summary(out, 'e')
    assert [r['epoch'] for r in rows] == ['0', '1'] and rows[0] == row0
    kwh1, co2_1 = float(rows[1]['train_energy_kwh']), float(rows[1]['train_co2_kg'])
    assert kwh1 > kwh0 and co2_1 > co2_0 and math.isfinite(kwh1) and math.isfinite(co2_1)
    said = [r.getMessage() for r in caplog.records if r.name == 'train']
    assert any(m.startswith(f'*** Energy of the training epochs: {kwh1:.4g} kWh, {co2_1:.4g} kg CO2eq (DEU grid')
               for m in said), said

    assert offline == []  # no connection tried
    assert os.listdir(cwd) == []  # codecarbon wrote nothing into the working directory


def test_no_energy_flag_leaves_columns_out(tiny_fmnist, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger='train')
    assert train.run(_args(tiny_fmnist, str(tmp_path), 'off', '--no-energy')) == 0
    row, = _summary(str(tmp_path), 'off')
    assert 'train_energy_kwh' not in row and 'train_co2_kg' not in row
    assert 'energy not measured: --no-energy' in [r.getMessage() for r in caplog.records if r.name == 'train']
