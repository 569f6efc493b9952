"""Bad input, hostile files, determinism and resource limits."""
import json
import math
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import piip_timm
from piip_timm.convert import convert_original_state_dict

from conftest import REFERENCE_DIR, load_case
from fixtures import (GARBAGE_SEEDS, branch_dicts, garbage_bytes, internvit_hf_weights, internvit_repo_files,
                      pretrained_tiny_branches, save_safetensors_bytes, timm_branch_weights)
from helpers import disable_drop_path, perturb, tiny_variant
from hubtools import LocalHub, run_python

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ('up4', 'up2', 'same', 'down2')
# Branch image sizes chosen here, coarse to fine: branch i sees the input scaled by size_i / size_finest.
CLASSIFIER_SIZES, DENSE_SIZES = (64, 96, 128), (64, 96, 128, 160)
CLASSIFIER = perturb(tiny_variant('piip_tsb', img_sizes=CLASSIFIER_SIZES)).eval()
DENSE = perturb(tiny_variant('piip_tsbl', img_sizes=DENSE_SIZES, head=None, num_classes=0, merge='conv',
                             pyramid=LEVELS)).eval()


def expected_problem(sizes, x):
    """What the model must say about x, worked out from the documented rules (None: it must run)."""
    if not x.is_floating_point():
        return TypeError, 'floating-point'
    if x.dtype != torch.float32:
        return TypeError, 'model weights are torch.float32'
    height, width = x.shape[-2:]
    for ratio in (size / sizes[-1] for size in sizes):
        h, w = (math.floor(height * ratio), math.floor(width * ratio)) if ratio < 1 else (height, width)
        if h < 16 or w < 16:
            return ValueError, 'too small'
    return None


def make_input(batch, height, width, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height + 3, width + 2, generator=g)
    x = x[:, :, 1:height + 1, 2:width + 2] if layout == 'strided' else x[:, :, :height, :width].contiguous()
    if layout == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    return (x * 100).to(dtype) if not dtype.is_floating_point else x.to(dtype)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), height=st.integers(1, 170), width=st.integers(1, 170),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16,
                              torch.int64, torch.uint8]),
       layout=st.sampled_from(['contiguous', 'channels_last', 'strided']),
       dense=st.booleans())
def test_any_image_batch_runs_to_documented_shapes_or_raises_one_clear_error(batch, height, width, dtype, layout,
                                                                             dense):
    model = DENSE if dense else CLASSIFIER
    x = make_input(batch, height, width, dtype, layout)
    problem = expected_problem(DENSE_SIZES if dense else CLASSIFIER_SIZES, x)
    run = (lambda t: model.forward_intermediates(t, intermediates_only=True)) if dense else model
    if problem is not None:
        with pytest.raises(problem[0], match=problem[1]):
            run(x)
        return
    with torch.no_grad():
        out = run(x)
        reference = run(x.contiguous())
    if dense:
        grid = (height // 16, width // 16)  # the finest branch sees the input itself
        shapes = [(batch, 96, grid[0] * 4, grid[1] * 4), (batch, 96, grid[0] * 2, grid[1] * 2),
                  (batch, 96) + grid, (batch, 96, grid[0] // 2, grid[1] // 2)]
        assert [tuple(o.shape) for o in out] == shapes
        assert all(torch.isfinite(o).all() for o in out)
        assert all(torch.allclose(o, r, atol=1e-5) for o, r in zip(out, reference))
    else:
        assert out.shape == (batch, 7) and torch.isfinite(out).all()
        assert torch.allclose(out, reference, atol=1e-5)  # memory layout does not change the result


@pytest.mark.parametrize('shape, error, message', [
    ((3, 128, 128), ValueError, 'add a batch dimension'),
    ((1, 1, 3, 128, 128), ValueError, '4-D'),
    ((2, 4, 128, 128), ValueError, '3 input channels'),
    ((0, 3, 128, 128), ValueError, 'empty'),
])
def test_malformed_batches(shape, error, message):
    with pytest.raises(error, match=message):
        CLASSIFIER(torch.zeros(shape))


def test_the_smallest_image_gives_the_coarsest_branch_one_patch():
    """The coarsest branch sees the input at 64/128: one 16 px patch there needs a 32 px input."""
    with torch.no_grad():
        assert CLASSIFIER(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    for shape in ((31, 32), (32, 31)):
        with pytest.raises(ValueError, match='too small: branch 0 sees it at 15x16|too small: branch 0 sees it at 16x15'):
            CLASSIFIER(torch.randn(1, 3, *shape))
    with pytest.raises(ValueError, match='use at least 32x32'):
        CLASSIFIER(torch.randn(1, 3, 20, 20))


def test_input_on_another_device_is_named():
    with pytest.raises(ValueError, match='is on meta but the model is on cpu'):
        CLASSIFIER(torch.zeros(1, 3, 128, 128, device='meta'))


def test_half_precision_input_under_autocast_stays_close_to_fp32():
    """bf16 autocast (8-bit mantissa) stays within 1% of the fp32 logits; leaving out the interactions alone
    moves them by about 3%."""
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = CLASSIFIER(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = CLASSIFIER(x.bfloat16())
    assert out.shape == (2, 7) and out.dtype == torch.bfloat16
    assert (out.float() - reference).norm() <= 1e-2 * reference.norm()


def test_nan_and_inf_in_the_input_propagate():
    """Documented behaviour: non-finite pixels are not hidden; they reach the output."""
    for bad in (float('nan'), float('inf')):
        x = torch.randn(2, 3, 128, 128)
        x[0, :, 40, 40] = bad
        with torch.no_grad():
            out = CLASSIFIER(x)
        assert not torch.isfinite(out[0]).all()
        assert torch.isfinite(out[1]).all()  # other images of the batch are unaffected


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize('name', ['piip_tsb', 'piip_sbl', 'piip_tsbl', 'piip_lh6b'])
def test_eval_outputs_are_bit_identical_across_calls_and_a_safetensors_round_trip(name, tmp_path):
    model = perturb(tiny_variant(name)).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    reloaded = tiny_variant(name).eval()
    reloaded.load_state_dict(load_file(str(tmp_path / 'w.safetensors')), strict=True)
    with torch.no_grad():
        assert torch.equal(reloaded(x), first)


def test_deterministic_algorithms_mode_runs_forward_and_backward():
    model = disable_drop_path(perturb(tiny_variant('piip_tsbl'))).train()
    torch.use_deterministic_algorithms(True)
    try:
        losses = []
        for _ in range(2):
            model.zero_grad()
            loss = model(torch.ones(2, 3, 128, 128)).square().mean()
            loss.backward()
            losses.append((loss.item(), model.interactions[0][0].fine_to_coarse.attn.value_proj.weight.grad.clone()))
    finally:
        torch.use_deterministic_algorithms(False)
    assert losses[0][0] == losses[1][0] and torch.equal(losses[0][1], losses[1][1])


def test_train_mode_drop_path_follows_the_seed():
    model = perturb(tiny_variant('piip_tsb')).train()
    x = torch.randn(4, 3, 128, 128)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(model(x).detach())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


# ----------------------------------------------------------------------------- resources
ENORMOUS = textwrap.dedent('''
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import tiny_variant
    model = tiny_variant('piip_tsbl', head=None, num_classes=0, merge='conv', pyramid={levels!r}).eval()
    # The bound this test sets: 2 GiB more address space than the process has mapped now (as under ulimit -v).
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmSize:'))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 ** 31, hard))
    x = torch.zeros(1, 3, 1, 1).expand(1, 3, 16000, 16000)  # no memory behind it
    try:
        model.forward_intermediates(x)
    except Exception as e:
        print(type(e).__name__ + ': ' + str(e))
    else:
        print('RAN')
''')


def test_an_image_beyond_the_memory_bound_fails_fast_with_a_clear_error():
    """A 16000 px image needs several GiB of activations: under a 2 GiB address-space bound set here, the
    model must refuse it up front, whatever the machine's RAM (it would otherwise die allocating)."""
    result = subprocess.run([sys.executable, '-c', ENORMOUS.format(tests=str(ROOT / 'tests'), levels=LEVELS)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    message = result.stdout.strip().splitlines()[-1]
    found = re.fullmatch(r'ValueError: a 1x3x16000x16000 batch needs at least ([\d.]+) GiB of activations at once, '
                         r'more than the ([\d.]+) GiB available on cpu; .*', message)
    assert found, message
    assert float(found.group(1)) > 2.0 >= float(found.group(2))


def test_property_tests_are_derandomized_and_keep_no_database(tmp_path, monkeypatch):
    from hypothesis import given, settings
    assert settings.default.derandomize and settings.default.database is None
    monkeypatch.chdir(tmp_path)
    runs = []

    @given(st.integers(0, 10 ** 6))
    def below_a_thousand(n):
        runs[-1].append(n)
        assert n < 1000

    for _ in range(2):
        runs.append([])
        with pytest.raises(AssertionError):
            below_a_thousand()
    assert runs[0][-1] == 1000 and runs[0] == runs[1]  # shrunk to the boundary through the same examples
    assert list(tmp_path.iterdir()) == []  # no .hypothesis/ written where the tests run


PROBE = textwrap.dedent('''
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import tiny_variant
    from piip_timm.layers import deform_sample
    def rss():
        return int(open('/proc/self/statm').read().split()[1]) * 4096
    def hwm():
        for line in open('/proc/self/status'):
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    what, side = sys.argv[1], int(sys.argv[2])
    if what == 'deform':
        g = torch.Generator().manual_seed(0)
        v = torch.randn(1, side * side, 16, 16, generator=g, requires_grad=True)
        loc = torch.rand(1, side * side, 16, 4, 2, generator=g, requires_grad=True)
        w = torch.rand(1, side * side, 16, 4, generator=g).softmax(-1).requires_grad_()
        run = lambda: deform_sample(v, (side, side), loc, w).sum().backward()
    else:
        model = tiny_variant('piip_lh6b', img_sizes=[side // 2, side * 2 // 3, side]).eval()
        x = torch.randn(1, 3, side, side)
        def run():
            with torch.no_grad():
                model(x)
    before = rss()
    open('/proc/self/clear_refs', 'w').write('5')
    run()
    print(json.dumps(hwm() - before))
''')


def peak_bytes(what: str, side: int) -> int:
    result = subprocess.run([sys.executable, '-c', PROBE.format(tests=str(ROOT / 'tests')), what, str(side)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('what, small, large', [('deform', 64, 128), ('model', 384, 768)])
def test_peak_memory_grows_linearly_with_the_number_of_tokens(what, small, large):
    """4x the tokens (global attention in every branch) must not cost 16x the memory."""
    ratio = peak_bytes(what, large) / max(peak_bytes(what, small), 1)
    assert ratio < 6.0, ratio


# ----------------------------------------------------------------------------- hostile and broken files
def test_broken_checkpoints_are_named_and_never_half_loaded(tmp_path):
    case, state, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_sephead.json')
    config = case['constructor_kwargs']
    good = convert_original_state_dict(state)
    extra = dict(good, **{'interactions.0.0.unknown': torch.zeros(3)})
    integers = dict(good)
    key = next(k for k in good if k.endswith('qkv.weight'))
    integers[key] = good[key].to(torch.int32)
    model = piip_timm.from_original(config, 'cls')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for broken, message in ((extra, '1 unexpected'), (integers, 'not floating point')):
        path = tmp_path / 'broken.safetensors'
        save_file(broken, str(path))
        with pytest.raises(ValueError, match=message):
            piip_timm.from_original(config, 'cls', checkpoint=str(path))
        with pytest.raises(ValueError, match=message):
            from piip_timm.weights import load_strict
            load_strict(model, broken)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    half_precision = {k: v.half() for k, v in good.items()}  # precisions convert; that is not an error
    loaded = piip_timm.from_original(config, 'cls', checkpoint=half_precision)
    assert loaded.state_dict()[key].dtype == torch.float32


def test_every_unreadable_file_is_one_clear_error_and_only_code_is_refused(tmp_path):
    from piip_timm.weights import load_checkpoint_file
    good = tmp_path / 'good.pth'
    torch.save({'w': torch.ones(2)}, good)
    # file name -> (bytes, the reader's error type the message names; None: not checked)
    files = {f'garbage_{name}.pth': (garbage_bytes(seed), name) for name, seed in GARBAGE_SEEDS.items()}
    files['truncated.pth'] = (good.read_bytes()[: good.stat().st_size // 2], None)
    files['truncated.safetensors'] = (save_safetensors_bytes({'w': torch.ones(64)})[:40], None)
    for filename, (data, reader_error) in files.items():
        path = tmp_path / filename
        path.write_bytes(data)
        with pytest.raises(ValueError) as raised:
            load_checkpoint_file(path)
        text = str(raised.value)
        assert filename in text and 'truncated or corrupt' in text and 'refused' not in text, text
        if reader_error is not None:
            assert f'({reader_error}: ' in text, text
    evil = tmp_path / 'evil.pth'
    evil.write_bytes(pickle.dumps(os.getcwd, protocol=2))  # torch.save's protocol; it names a function
    with pytest.raises(ValueError, match=r"were refused.*GLOBAL posix\.getcwd") as raised:
        load_checkpoint_file(evil)
    assert 'corrupt' not in str(raised.value)


def test_converter_leaves_nothing_behind_when_it_fails(tmp_path, capsys):
    case, state, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_sephead.json')
    _, other, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_augreg.json')
    config = tmp_path / 'config.json'
    config.write_text(json.dumps(case['constructor_kwargs']))
    wrong = tmp_path / 'wrong.safetensors'
    save_file(other, str(wrong))
    from piip_timm.cli import main
    assert main(['convert', str(config), str(wrong), '--task', 'cls', '--out', str(tmp_path / 'out')]) == 2
    assert 'does not fit' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'wrong.safetensors']
    # an existing output is only replaced by a complete new one
    good = tmp_path / 'good.safetensors'
    save_file(state, str(good))
    assert main(['convert', str(config), str(good), '--task', 'cls', '--out', str(tmp_path / 'out')]) == 0
    assert main(['convert', str(config), str(good), '--task', 'cls', '--out', str(tmp_path / 'out')]) == 2
    assert main(['convert', str(config), str(wrong), '--task', 'cls', '--out', str(tmp_path / 'out'),
                 '--overwrite']) == 2
    assert sorted(os.listdir(tmp_path / 'out')) == ['config.json', 'model.safetensors']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json', 'good.safetensors', 'out',
                                                          'wrong.safetensors']


CONVERT_WITH_A_FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    from piip_timm.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))  # config.json fits, model.safetensors does not
    config, checkpoint, parent = sys.argv[1:]
    for out, extra in (('fresh', []), ('existing', ['--overwrite'])):
        try:
            code = main(['convert', config, checkpoint, '--task', 'cls', '--out', f'{parent}/{out}'] + extra)
        except Exception as e:
            code = type(e).__name__
        print(out, code, flush=True)
""")


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_converter_is_complete_or_absent_when_writing_fails_after_staging(tmp_path):
    """A write that fails inside the staging folder (here: a file-size limit) leaves no partial folder,
    no staging leftovers, and an existing output exactly as it was; --overwrite with a good checkpoint
    replaces the output completely."""
    case, state, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_sephead.json')
    config = tmp_path / 'config.json'
    config.write_text(json.dumps(case['constructor_kwargs']))
    good = tmp_path / 'good.safetensors'
    save_file(state, str(good))
    parent = tmp_path / 'outputs'
    from piip_timm.cli import main
    assert main(['convert', str(config), str(good), '--task', 'cls', '--out', str(parent / 'existing')]) == 0
    before = tree(parent / 'existing')
    assert os.path.getsize(parent / 'existing' / 'model.safetensors') > 65536
    result = subprocess.run([sys.executable, '-c', CONVERT_WITH_A_FILE_SIZE_LIMIT, str(config), str(good), str(parent)],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONDONTWRITEBYTECODE='1'))
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = dict(line.split() for line in result.stdout.splitlines())
    assert outcomes == {'fresh': '2', 'existing': '2'}, result.stderr[-2000:]  # a one-line error, exit status 2
    assert result.stderr.count('could not write the converted model beside') == 2
    assert sorted(os.listdir(parent)) == ['existing']  # no 'fresh', no staging or old-output folders
    assert tree(parent / 'existing') == before
    # --overwrite that succeeds: the new weights, and nothing of the old folder left beside it
    changed = {k: v + 1 for k, v in state.items()}
    newer = tmp_path / 'newer.safetensors'
    save_file(changed, str(newer))
    assert main(['convert', str(config), str(newer), '--task', 'cls', '--out', str(parent / 'existing'),
                 '--overwrite']) == 0
    assert sorted(os.listdir(parent)) == ['existing']
    written = load_file(str(parent / 'existing' / 'model.safetensors'))
    expected = convert_original_state_dict(changed)
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


def test_index_pointing_at_a_missing_shard_is_a_clear_error(tmp_path):
    tag = piip_timm.variants.PRETRAINED['piip_lh6b']['branches']
    branches = pretrained_tiny_branches(tag.arch.branches)
    files = internvit_repo_files(internvit_hf_weights(branches[0], seed=0))
    root = tmp_path / 'hub'
    with LocalHub(root) as hub:
        for name, data in files.items():
            if name != 'model-00002-of-00002.safetensors':  # the index lists it; the repo lacks it
                hub.add('OpenGVLab/InternViT-6B-224px', name, data)
        for source, cfg in zip(tag.branch_sources[1:], branches[1:]):
            weights = timm_branch_weights(source.timm_model, cfg, seed=1)
            hub.add(timm.models.get_pretrained_cfg(source.timm_model).hf_hub_id, 'model.safetensors',
                    save_safetensors_bytes(weights))
        code = textwrap.dedent(f'''
            import timm, piip_timm
            try:
                timm.create_model('piip_lh6b', pretrained=True, branches={branch_dicts(branches)!r},
                                  interaction=dict(num_heads=4))
            except Exception as e:
                print(type(e).__name__ + ': ' + str(e))
        ''')
        result = run_python(code, hub.endpoint, tmp_path / 'home')
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FileNotFoundError: OpenGVLab/InternViT-6B-224px: the index lists shard 'model-00002-of-00002" in result.stdout
