"""Original config files are read, never executed: hostile files and every way a read is refused."""
import json
import textwrap
import time

import pytest

from piip_timm import read_backbone_config
from piip_timm.cli import main

BACKBONE = "model = dict(backbone=dict(branch1=dict(depth=2), branch2=dict(depth=3)))\n"


def write(tmp_path, text, name='config.py'):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_statements_that_would_run_code_are_never_run(tmp_path):
    marker = tmp_path / 'ran'
    touch = f"__import__('os').system('touch {marker}')"
    config = write(tmp_path, textwrap.dedent(f'''
        import os
        from os import system
        os.system('touch {marker}')
        {touch}
        exec("open('{marker}', 'w')")
        a = os.system('touch {marker}')
        b = (lambda: {touch})()
        c = [{touch} for _ in range(1)]
        d = f"{{{touch}}}"
        e = open('{marker}', 'w')
        with open('{marker}', 'w') as f:
            pass
        if True:
            g = {touch}
        def h(x={touch}):
            return x
        class K:
            attribute = {touch}
        @{touch}
        def decorated():
            pass
        del os
    ''') + BACKBONE)
    assert read_backbone_config(config) == {'branch1': {'depth': 2}, 'branch2': {'depth': 3}}
    assert not marker.exists()


@pytest.mark.parametrize('model, message', [
    ("dict(backbone=__import__('os').system('true'))", 'unsupported expression Call'),
    ("dict(backbone=open('/etc/passwd').read())", 'unsupported expression Call'),
    ("dict(backbone=print('x'))", 'unsupported expression Call'),
    ("dict(backbone=dict(branch1))", 'unsupported expression Call'),  # positional arguments to dict
    ("dict(backbone=os.environ)", 'unsupported expression Attribute'),
    ("dict(backbone=[dict(branch1=1)][0])", 'unsupported expression Subscript'),
    ("dict(backbone=(lambda: 1)())", 'unsupported expression Call'),
    ("dict(backbone=[i for i in range(3)])", 'unsupported expression ListComp'),
    ("dict(backbone=f'{1}')", 'unsupported expression JoinedStr'),
    ("dict(backbone=1 if True else 2)", 'unsupported expression IfExp'),
    ("dict(backbone=not_defined_anywhere)", "'not_defined_anywhere' is not defined earlier in the file"),
    ("dict(backbone=defined_later)\ndefined_later = 1", "'defined_later' is not defined earlier"),
    ("dict(backbone='a' * 10)", 'arithmetic only on numbers'),
    ("dict(backbone=[1] + [2])", 'arithmetic only on numbers'),
    ("dict(backbone=-'a')", 'a sign only on numbers'),
    ("dict(backbone=1 << 4)", 'unsupported expression BinOp'),
    ("dict(backbone=1 / 0)", 'division by zero'),
    ("dict(backbone=7 % 0)", 'modulo by zero'),
    ("dict(backbone=10.0 ** 400)", 'Numerical result out of range'),
    ("dict(backbone=9 ** 9 ** 9)", 'exceed 256-bit integers'),
    ("dict(backbone={[1]: 2})", 'a list cannot be a dict key'),
    ("dict(backbone=dict(**[1, 2]))", '\\*\\* needs a dict, got list'),
])
def test_model_expressions_beyond_literals_are_refused_naming_the_line(tmp_path, model, message):
    config = write(tmp_path, f'x = 1\nmodel = {model}\n')
    with pytest.raises(ValueError, match=f'config.py, line 2: .*{message}'):
        read_backbone_config(config)


def test_squaring_a_name_again_and_again_is_refused_quickly(tmp_path):
    """Each statement is small, but 40 squarings of 10**100 would take more memory than exists."""
    lines = ['n0 = 10 ** 60'] + [f'n{i + 1} = n{i} * n{i}' for i in range(40)]
    config = write(tmp_path, '\n'.join(lines) + '\nmodel = dict(backbone=dict(branch1=dict(depth=n40)))\n')
    start = time.perf_counter()
    with pytest.raises(ValueError, match="'n40' is not defined"):  # n3 and later were refused, so never defined
        read_backbone_config(config)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize('text, message', [
    ('model = dict(backbone=dict(\n', 'is not valid Python \\(line 1'),
    ('model = ' + '(' * 300 + '1' + ')' * 300 + '\n', 'is not valid Python'),
    ('model = ' + '-' * 100_000 + '1\n', 'nested too deeply'),
    ('model = ' + '-' * 5_000 + '1\n', 'nested too deeply'),
])
def test_unparsable_and_absurdly_nested_files_are_value_errors(tmp_path, text, message):
    config = tmp_path / 'config.py'
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_backbone_config(config)


def test_names_and_dict_merges_are_read_like_python(tmp_path):
    config = write(tmp_path, '''
        depth = 12
        base = dict(depth=depth, embed_dim=64 * 3, drop_path_rate=-0.1 + 0.2, heads=2 ** 3 // 3 % 5)
        unused = os.environ  # refused, but only the model is needed
        model = dict(backbone=dict(branch1=dict(**base, real_size=448), branch2={**base, 'depth': 6}))
    ''')
    base = dict(depth=12, embed_dim=192, drop_path_rate=-0.1 + 0.2, heads=2)
    assert read_backbone_config(config) == {'branch1': dict(base, real_size=448), 'branch2': dict(base, depth=6)}


def test_every_refusal_of_read_backbone_config(tmp_path):
    with pytest.raises(FileNotFoundError, match='no config file at'):
        read_backbone_config(tmp_path / 'missing.py')
    with pytest.raises(ValueError, match='a config must be a .py \\(original\\) or .json file'):
        read_backbone_config(write(tmp_path, BACKBONE, 'config.yaml'))
    with pytest.raises(ValueError, match='has no model\\["backbone"\\]'):
        read_backbone_config(write(tmp_path, 'model = dict(neck=dict())\n'))
    with pytest.raises(ValueError, match='has no model\\["backbone"\\]'):
        read_backbone_config(write(tmp_path, 'x = 1\n'))
    with pytest.raises(ValueError, match='has no model\\["backbone"\\]'):
        read_backbone_config(write(tmp_path, json.dumps({'model': {'neck': {}}}), 'config.json'))
    backbone = {'branch1': {'depth': 2}, 'branch2': {'depth': 3}}
    assert read_backbone_config(write(tmp_path, json.dumps(backbone), 'config.json')) == backbone
    assert read_backbone_config(write(tmp_path, json.dumps({'model': {'backbone': backbone}}), 'c.json')) == backbone
    assert read_backbone_config(write(tmp_path, 'branch1 = dict(depth=2)\nbranch2 = dict(depth=3)\n')) == backbone


def test_the_converter_reports_a_hostile_config_in_one_line(tmp_path, capsys):
    marker = tmp_path / 'ran'
    config = write(tmp_path, f"model = dict(backbone=__import__('os').system('touch {marker}'))\n")
    assert main(['convert', str(config), str(tmp_path / 'missing.pth'), '--task', 'det',
                 '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'line 1: unsupported expression Call' in err
    assert not marker.exists() and not (tmp_path / 'out').exists()
