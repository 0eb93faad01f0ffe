""" The README's table of dbp_ models is scripts/model_table.py's output for the registered models """
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_table_script():
    spec = importlib.util.spec_from_file_location('model_table', os.path.join(ROOT, 'scripts', 'model_table.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_model_table_is_current():
    module = _model_table_script()
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    start, end = '<!-- dbp-models-table -->\n', '<!-- /dbp-models-table -->'
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == module.model_table(), 'README table outdated: python scripts/model_table.py'


@pytest.mark.parametrize('name', ['dbp_resnet18', 'dbp_convnext_atto', 'dbp_vit_tiny_patch16_224'])
def test_model_table_full_r_column_is_the_full_structure_state(name):
    import timm
    from timm_dbp import decor_layers
    module = _model_table_script()
    kron = [layer for _, layer in decor_layers(timm.create_model(name, device='meta'))]
    full = [layer for _, layer in decor_layers(timm.create_model(name, device='meta', dbp_structure='full'))]
    assert [module.full_r_bytes(layer) for layer in kron] == [layer.decor_state_bytes for layer in full]


def test_readme_dbp_options_table_shows_the_library_defaults():
    import timm_dbp
    with open(os.path.join(ROOT, 'README.md')) as f:
        rows = {cells[1].strip(' `'): cells[2].strip(' `') for cells in (line.split('|') for line in f)
                if len(cells) > 3}
    for name, default in timm_dbp.DBP_DEFAULTS.items():
        assert name in rows, f'README has no row for DBP option {name}'
        if default is None or isinstance(default, (bool, str)):  # None, True / False, 'auto'
            shown, expected = rows[name].strip('\'"'), str(default)
        else:
            shown, expected = float(rows[name]), float(default)
        assert shown == expected, f'README says {name} defaults to {rows[name]}, the code {default}'
