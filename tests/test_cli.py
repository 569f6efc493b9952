"""The piip-timm command line."""
import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from piip_timm.cli import main
from piip_timm.variants import PRETRAINED

from helpers import perturb
from test_examples import TINY_TSB


def test_every_subcommand_has_help(capsys):
    for command in ('list', 'info', 'features', 'convert', 'bench'):
        with pytest.raises(SystemExit) as exit_info:
            main([command, '--help'])
        assert exit_info.value.code == 0 and f'usage: piip-timm {command}' in capsys.readouterr().out, command


def test_console_script_entry_point():
    result = subprocess.run([sys.executable, '-m', 'piip_timm.cli', '--help'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith('    ') and
                not line.startswith('     ')]
    assert commands == ['list', 'info', 'features', 'bench', 'convert']


def test_list_shows_every_tag(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    for variant, tags in PRETRAINED.items():
        for tag in tags:
            assert f'{variant}.{tag}' in out
    # the PIIP-LLaVA towers too, with the sizes and repository of the released tower
    assert 'piip_llava_clip_bl_512_256.llava_7b (default)' in out and 'piip_llava_clip_bl_512_256.branches' in out
    line = next(x for x in out.splitlines() if x.startswith('piip_llava_clip_bl_512_256.llava_7b'))
    assert '256/512' in line and 'OpenGVLab/PIIP-LLaVA_CLIP-BL_512-256_7B' in line


def test_info_reports_branches_params_flops_and_pyramid(capsys):
    assert main(['info', 'piip_tsb']) == 0
    out = capsys.readouterr().out
    assert 'parameters: 144.03 M' in out
    assert 'multiply-accumulates (paper convention): 17.43 G' in out
    assert 'stride 4 x 768 ch, stride 8 x 768 ch, stride 16 x 768 ch, stride 32 x 768 ch' in out
    assert out.count('branch ') == 3


def test_features_writes_one_file_per_image(tmp_path, capsys):
    photo = str(resources.files('piip_timm') / 'assets' / 'chelsea.jpg')
    copy = tmp_path / 'cat2.jpg'
    copy.write_bytes(open(photo, 'rb').read())
    assert main(['features', 'piip_tsb', photo, str(copy), '--out', str(tmp_path / 'out'), '--img-size', '128',
                 '--no-pretrained', '--model-args', TINY_TSB, '--quiet']) == 0
    for stem in ('chelsea', 'cat2'):
        tensors = load_file(str(tmp_path / 'out' / f'{stem}.safetensors'))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            'stride_4': (96, 32, 32), 'stride_8': (96, 16, 16), 'stride_16': (96, 8, 8), 'stride_32': (96, 4, 4)}


def test_features_are_the_pyramid_of_the_normalised_image(tmp_path):
    """The saved levels equal the model's pyramid of the image normalised with ImageNet's mean and std
    (a 128 px image at --img-size 128: no resize, no crop), level by level."""
    kwargs = json.loads(TINY_TSB)
    model = perturb(timm.create_model('piip_tsb', merge='conv', pyramid=['up4', 'up2', 'same', 'down2'],
                                      **kwargs)).eval()
    weights = tmp_path / 'weights.safetensors'
    save_file(model.state_dict(), str(weights))
    pixels = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / 'image.png')  # lossless
    args = json.dumps(dict(kwargs, pretrained_cfg_overlay=dict(file=str(weights))))
    assert main(['features', 'piip_tsb', str(tmp_path / 'image.png'), '--out', str(tmp_path / 'out'),
                 '--img-size', '128', '--model-args', args, '--quiet']) == 0
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((torch.from_numpy(pixels).float() / 255 - mean) / std).permute(2, 0, 1)[None]
    with torch.no_grad():
        levels = model.forward_intermediates(x, intermediates_only=True)
    saved = load_file(str(tmp_path / 'out' / 'image.safetensors'))
    assert sorted(saved) == ['stride_16', 'stride_32', 'stride_4', 'stride_8']
    for stride, level in zip((4, 8, 16, 32), levels):
        assert torch.allclose(saved[f'stride_{stride}'], level[0], atol=1e-5, rtol=1e-4), stride


@pytest.mark.parametrize('argv, message', [
    (['info', 'piip_nonexistent'], "unknown model 'piip_nonexistent'"),
    (['features', 'piip_tsb', 'missing.jpg', '--out', 'x'], 'no such image file'),
    (['convert', 'missing.json', 'missing.pth', '--task', 'det', '--out', 'x'], 'no config file'),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1


def test_unreadable_image_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / 'not_an_image.jpg'
    bad.write_bytes(b'plain text')
    assert main(['features', 'piip_tsb', str(bad), '--out', str(tmp_path / 'o'), '--no-pretrained',
                 '--model-args', TINY_TSB, '--img-size', '64', '--quiet']) == 2
    assert 'not a readable image' in capsys.readouterr().err


def test_bench_times_a_model_against_a_baseline(capsys):
    assert main(['bench', 'piip_tsb', '--model-args', TINY_TSB, '--img-size', '64', '--repeats', '1',
                 '--baseline', 'vit_tiny_patch16_224']) == 0
    out = capsys.readouterr().out
    assert 'images/s' in out and 'ratio piip_tsb/vit_tiny_patch16_224' in out
