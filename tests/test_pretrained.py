"""Pretrained weights through timm's machinery and the real hf_hub_download, against a local Hub.

Every tag of every variant is loaded from files in the exact layout of its real repositories
(tiny twins of the real shapes, or the reference cases' original-code weights), in a subprocess
pointed at a local server speaking the Hub's resolve protocol.
"""
import json
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import piip_timm
from piip_timm.convert import convert_original_state_dict
from piip_timm.original import translate_original_config
from piip_timm.convnext_branch import ConvNeXtBranchCfg
from piip_timm.piip import PIIP, InteractionCfg
from piip_timm.variants import PRETRAINED, PIIP_REPO

from conftest import REFERENCE_DIR, load_case
from helpers import reference_rel_pos_resize
from fixtures import (BRANCH_REPOS, GARBAGE_SEEDS, INTERNVIT_REPO, RELEASED_FILES, branch_dicts, garbage_bytes,
                      internvit_hf_weights, internvit_repo_files, pretrained_tiny_branches, random_like,
                      released_classifier_file, released_detector_file, save_safetensors_bytes, timm_branch_weights,
                      to_original_layout)
from hubtools import HungServer, LocalHub, dead_endpoint, run_python

TINY_INTERACTION = dict(num_heads=4)
# The Hub is filled from the file names and repositories written out in fixtures.py (not from the tag
# table), so a wrong name in the table fails to load.
RELEASED = sorted(RELEASED_FILES)
BRANCH_TAGS = sorted(BRANCH_REPOS)
# Reference cases (run through the original code) that stand in for each released file's weights (paths below
# the reference folder).
FAMILY_CASES = 'vit-families/cases/'
CASE_FOR_TAG = {
    'piip_tsb.in1k': 'cases/cls3_sephead', 'piip_sbl.in1k': 'cases/cls3_augreg', 'piip_sbl.in1k_320': 'cases/cls3_augreg',
    'piip_ct_cs_cb.coco_1024_672_448': 'convnext/cases/det3_cnn_ctcscb',
    **{f'piip_sbl.coco_{family}_1568_1120_672': f'{FAMILY_CASES}det3_{case}_sbl'
       for family, case in (('beitv2', 'beit'), ('uniperceiver', 'uniperceiver'), ('dinov2', 'dinov2'), ('mae', 'mae'),
                            ('augreg', 'augreg'))},
    'piip_sbl.coco_dino_1792_1120_672': f'{FAMILY_CASES}det3_dino_sbl384',
    'piip_h6b.coco_dino_1024_768': f'{FAMILY_CASES}det2_dino_h6b',
    **{f'piip_h6b.ade20k_512_{size}': f'{FAMILY_CASES}seg2_h6b' for size in (192, 256, 384, 512)},
}


def tag_of(name: str):
    variant, tag = name.split('.')
    return PRETRAINED[variant][tag]


def case_for(name: str) -> str:
    if name in CASE_FOR_TAG:
        return CASE_FOR_TAG[name]
    if name.startswith('piip_tsbl.coco'):
        return 'cases/det4'
    if name.startswith(('piip_tsb.coco', 'piip_sbl.coco')):
        return 'cases/det3'
    return ''  # H6B: no reference case; a tiny twin in the original layout


def tiny_interaction(tag) -> dict:
    return dict(vars(tag.arch.interaction), **TINY_INTERACTION)


def h6b_twin():
    """A tiny H6B detector in this package's layout with non-trivial weights, and its original-layout file."""
    tag = PRETRAINED['piip_h6b']['coco_1024_512']
    branches = pretrained_tiny_branches(tag.arch.branches)
    model = PIIP(branches, interaction=InteractionCfg(**tiny_interaction(tag)), head=None, merge='conv',
                 pyramid=('up4', 'up2', 'same', 'down2'), num_classes=0)
    ours = random_like(model.state_dict(), seed=7)
    return branches, ours, to_original_layout(ours, layer_scale_as_gamma=set())


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """A local Hub holding every repository the pretrained tags read, plus the expected weights."""
    root = tmp_path_factory.mktemp('hub')
    server = LocalHub(root)
    for name in RELEASED:
        case = case_for(name)
        if case:
            _, state, _, _ = load_case(REFERENCE_DIR / f'{case}.json')
        else:
            _, _, state = h6b_twin()
        filename = RELEASED_FILES[name]
        data = released_classifier_file(state) if filename.startswith('classification/') else \
            released_detector_file(state)
        server.add(PIIP_REPO, filename, data)
    branch_weights = {}
    for name in BRANCH_TAGS:
        for repo, cfg in zip(BRANCH_REPOS[name], pretrained_tiny_branches(tag_of(name).arch.branches)):
            if repo in branch_weights:
                continue
            if repo == INTERNVIT_REPO:
                weights = internvit_hf_weights(cfg, seed=len(branch_weights))
                for filename, data in internvit_repo_files(weights).items():
                    server.add(INTERNVIT_REPO, filename, data)
            else:  # timm/<architecture>.<pretrained tag>
                weights = timm_branch_weights(repo.split('/')[1], cfg, seed=len(branch_weights))
                server.add(repo, 'model.safetensors', save_safetensors_bytes(weights))
            branch_weights[repo] = weights
    with server:
        yield server, branch_weights


LOAD_SCRIPT = textwrap.dedent('''
    import json, sys, torch, timm
    from safetensors.torch import save_file
    import piip_timm
    jobs = json.loads(open(sys.argv[-1]).read()) if False else json.loads({jobs!r})
    for job in jobs:
        model = timm.create_model(job['name'], pretrained=True, **job['kwargs']).eval()
        inner = getattr(model, 'model', model)
        tensors = {{'state.' + k: v.contiguous() for k, v in inner.state_dict().items()}}
        if job.get('input'):
            x = torch.load(job['input'])
            with torch.no_grad():
                out = model(x)
            for i, o in enumerate(out if isinstance(out, list) else [out]):
                tensors[f'output.{{i}}'] = o.contiguous()
        save_file(tensors, job['out'])
        print('loaded', job['name'], flush=True)
''')


def load_in_subprocess(jobs, endpoint, hf_home, extra_env=None, timeout=900):
    return run_python(LOAD_SCRIPT.format(jobs=json.dumps(jobs)), endpoint, hf_home, extra_env, timeout=timeout)


@pytest.fixture(scope='module')
def released_results(hub, tmp_path_factory):
    """Every released tag loaded through timm (one interpreter for all of them)."""
    server, _ = hub
    work = tmp_path_factory.mktemp('released')
    jobs = []
    for name in RELEASED:
        case = case_for(name)
        job = dict(name=name, out=str(work / f'{name}.safetensors'))
        if case:
            config, _, x, _ = load_case(REFERENCE_DIR / f'{case}.json')
            kwargs, _ = translate_original_config(config['constructor_kwargs'], config['task'],
                                                         config.get('pretrained_configs'))
            kwargs['branches'] = branch_dicts(kwargs['branches'])
            kwargs['interaction'] = vars(kwargs['interaction'])
            if config['task'] in ('det', 'seg'):
                # The case's layers with the tag's own outputs (the DINO detectors return three levels).
                kwargs = dict(branches=kwargs['branches'], interaction=kwargs['interaction'], head=None,
                              merge=kwargs['merge'], out_interactions=kwargs.get('out_interactions'),
                              features_only=True)
            else:
                kwargs['pretrained_cfg_overlay'] = dict(num_classes=kwargs['num_classes'])
            inputs = work / f'{case.replace("/", "_")}.input.pt'
            torch.save(x, inputs)
            job['input'] = str(inputs)
        else:
            branches, _, _ = h6b_twin()
            kwargs = dict(branches=branch_dicts(branches), interaction=tiny_interaction(tag_of(name)),
                          features_only=True)
        job['kwargs'] = kwargs
        jobs.append(job)
    # An ImageNet classifier as a backbone at another resolution: features_only=True, img_size=160 (96 in the
    # file). pos_embed_grid=None, as in the tags' own branches: the grid follows img_size, so the released
    # pos_embeds are resized on load.
    torch.save(torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(3)), work / 'x160.pt')
    jobs.append(dict(name='piip_sbl.in1k', out=str(work / 'piip_sbl.in1k.features_160.safetensors'),
                     input=str(work / 'x160.pt'), kwargs=sephead_architecture(
                         'cls3_augreg', pos_embed_grid=None, features_only=True, img_size=160,
                         pretrained_cfg_overlay=dict(num_classes=10))))
    home = work / 'hf_home'
    result = load_in_subprocess(jobs, server.endpoint, home)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, home


@pytest.mark.parametrize('name', RELEASED)
def test_released_checkpoint_loads_through_timm_with_every_tensor_converted(released_results, name):
    work, _ = released_results
    tensors = load_file(str(work / f'{name}.safetensors'))
    state = {k[len('state.'):]: v for k, v in tensors.items() if k.startswith('state.')}
    case = case_for(name)
    if case:
        _, original, _, outputs = load_case(REFERENCE_DIR / f'{case}.json')
    else:
        _, _, original = h6b_twin()
    expected = convert_original_state_dict(original)
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    if case:  # the original's logits / feature maps, reproduced through the released-file path
        produced = [tensors[f'output.{i}'] for i in range(len(outputs))]
        for ours, ref in zip(produced, outputs):
            assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.fixture(scope='module')
def branch_results(hub, tmp_path_factory):
    server, _ = hub
    work = tmp_path_factory.mktemp('branches')
    jobs = [dict(name=name, out=str(work / f'{name}.safetensors'),
                 kwargs=dict(branches=branch_dicts(pretrained_tiny_branches(tag_of(name).arch.branches)),
                             interaction=tiny_interaction(tag_of(name))))
            for name in BRANCH_TAGS]
    result = load_in_subprocess(jobs, server.endpoint, work / 'hf_home')
    assert result.returncode == 0, result.stderr[-3000:]
    return work


def independent_pos_resample(pos, target_grid, keep_slot):
    """Bicubic, align_corners=False, no antialias, on the square grid after the optional class slot."""
    n = pos.shape[1]
    slot = 0 if int(math.isqrt(n)) ** 2 == n else 1
    grid = math.isqrt(n - slot)
    image = pos[:, slot:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(target_grid, target_grid), mode='bicubic', align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, target_grid * target_grid, -1)
    return torch.cat((pos[:, :1], resized), 1) if keep_slot and slot else resized


def internvit_as_timm_vit(hf: dict) -> dict:
    """transformers' InternVisionModel keys -> timm ViT keys, written out for the test: the embeddings are
    renamed, block tensors keep their names under blocks.{i}, layer scales gain timm's .gamma suffix."""
    embeddings = {'embeddings.class_embedding': 'cls_token', 'embeddings.position_embedding': 'pos_embed',
                  'embeddings.patch_embedding.weight': 'patch_embed.proj.weight',
                  'embeddings.patch_embedding.bias': 'patch_embed.proj.bias'}
    out = {}
    for key, value in hf.items():
        if key in embeddings:
            out[embeddings[key]] = value
        else:
            _, _, layer, rest = key.split('.', 3)  # encoder.layers.{i}.{rest}
            out[f'blocks.{layer}.{rest}.gamma' if rest in ('ls1', 'ls2') else f'blocks.{layer}.{rest}'] = value
    return out


@pytest.mark.parametrize('name', BRANCH_TAGS)
def test_branch_weights_are_assembled_from_the_branch_repos(hub, branch_results, name):
    _, sources = hub
    tag = tag_of(name)
    state = {k[len('state.'):]: v for k, v in
             load_file(str(branch_results / f'{name}.safetensors')).items() if k.startswith('state.')}
    branches = pretrained_tiny_branches(tag.arch.branches)
    for i, (repo, cfg) in enumerate(zip(BRANCH_REPOS[name], branches)):
        raw = sources[repo]
        weights = internvit_as_timm_vit(raw) if repo == INTERNVIT_REPO else raw
        prefix = f'branches.{i}.'
        if isinstance(cfg, ConvNeXtBranchCfg):  # timm's own names: every tensor but the classifier, bit-equal
            assert {prefix + k for k in weights if not k.startswith('head.')} == {k for k in state if
                                                                                    k.startswith(prefix)}
            assert all(torch.equal(state[prefix + k], v) for k, v in weights.items() if not k.startswith('head.'))
            continue
        for key, value in weights.items():
            if key.endswith('relative_position_bias_table'):  # BEiT: resized to the block's window
                window = cfg.block_windows()[int(key.split('.')[1])]
                torch.testing.assert_close(state[prefix + key], reference_rel_pos_resize(value, 2 * window - 1))
            elif key.startswith('blocks.'):
                assert torch.equal(state[prefix + key], value), prefix + key  # bit-equal block weights
        if 'pos_embed' in weights:
            assert torch.equal(state[prefix + 'pos_embed'],
                               independent_pos_resample(weights['pos_embed'], cfg.grid, cfg.pos_embed_class_slot))
        else:  # BEiTv2: relative position biases only
            assert prefix + 'pos_embed' not in state
        kernel = weights['patch_embed.proj.weight']
        if kernel.shape[-1] != cfg.patch_size:
            kernel = F.interpolate(kernel, size=(cfg.patch_size, cfg.patch_size), mode='bicubic', align_corners=False)
        assert torch.equal(state[prefix + 'patch_embed.proj.weight'], kernel)
        assert torch.equal(state[prefix + 'patch_embed.proj.bias'], weights['patch_embed.proj.bias'])
        for j in range(cfg.depth):
            if cfg.kind == 'vit' and cfg.init_values and f'blocks.{j}.ls1.gamma' not in weights:  # DeiT/MAE
                assert torch.all(state[f'{prefix}blocks.{j}.ls1.gamma'] == cfg.init_values)
        if cfg.class_token:
            assert torch.equal(state[prefix + 'cls_token'], weights['cls_token'])
        else:
            assert prefix + 'cls_token' not in state
        if tag.arch.head == 'separate':  # the branches' own classifiers seed the separate heads
            assert torch.equal(state[f'head.{i}.weight'], weights['head.weight'])
            assert torch.equal(state[prefix + 'norm.weight'], weights['norm.weight'])
    gammas = [v for k, v in state.items() if k.startswith('interactions.') and k.endswith('_gamma')]
    assert gammas and all(torch.count_nonzero(g) == 0 for g in gammas)  # fresh interactions start as no-ops


def sephead_architecture(case: str = 'cls3_sephead', pos_embed_grid=-1, **extra) -> dict:
    """create_model kwargs for a classification case's architecture (by default cls3_sephead, TSB-like), with
    ``pos_embed_grid`` for every branch if given."""
    case = load_case(REFERENCE_DIR / 'cases' / f'{case}.json')[0]
    kwargs, _ = translate_original_config(case['constructor_kwargs'], 'cls')
    branches = branch_dicts(kwargs['branches'])
    if pos_embed_grid != -1:
        branches = [dict(b, pos_embed_grid=pos_embed_grid) for b in branches]
    return dict(branches=branches, interaction=vars(kwargs['interaction']), **extra)


def test_released_classifier_loads_as_a_backbone_at_another_resolution(released_results):
    """features_only=True and img_size=160 on the 96 px classifier: its weights, pos_embeds resized by the
    original's rule to the new grids (class slot kept), a fresh merge and pyramid, the heads and final norms
    pruned."""
    work, _ = released_results
    tensors = load_file(str(work / 'piip_sbl.in1k.features_160.safetensors'))
    state = {k[len('state.'):]: v for k, v in tensors.items() if k.startswith('state.')}
    _, original, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_augreg.json')
    original = convert_original_state_dict(original)
    grids = [round(size * 160 / 96) // 16 for size in (48, 64, 96)]  # the case's branch sizes, scaled to 160
    assert grids == [5, 6, 10]
    for i, grid in enumerate(grids):
        key = f'branches.{i}.pos_embed'
        assert torch.equal(state[key], independent_pos_resample(original[key], grid, keep_slot=True)), key
    kept = {k for k in original if not k.endswith('pos_embed')} & set(state)
    assert all(torch.equal(state[k], original[k]) for k in kept)
    assert {k.split('.')[0] for k in set(state) - set(original)} == {'merges', 'branch_weights', 'pyramid'}
    assert set(original) - set(state) == {k for k in original if k.startswith('head.') or '.norm.' in k}
    outputs = [tensors[f'output.{i}'] for i in range(4)]
    assert [tuple(o.shape) for o in outputs] == [(1, 64, 40, 40), (1, 64, 20, 20), (1, 64, 10, 10), (1, 64, 5, 5)]
    assert all(torch.isfinite(o).all() for o in outputs)


def load_offline(name, kwargs, home, out):
    result = load_in_subprocess([dict(name=name, out=str(out), kwargs=kwargs)], dead_endpoint(), home,
                                {'HF_HUB_OFFLINE': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    return load_file(str(out))


def test_prefilled_cache_works_offline_with_a_dead_endpoint(released_results, tmp_path):
    work, home = released_results
    offline = load_offline('piip_tsb.in1k', sephead_architecture(
        num_classes=10, pretrained_cfg_overlay=dict(num_classes=10)), home, tmp_path / 'offline.safetensors')
    online = load_file(str(work / 'piip_tsb.in1k.safetensors'))
    assert set(offline) == {k for k in online if k.startswith('state.')}
    assert all(torch.equal(offline[k], online[k]) for k in offline)


def test_other_num_classes_gets_a_fresh_classifier_and_keeps_the_rest(released_results, tmp_path):
    work, home = released_results
    five = load_offline('piip_tsb.in1k', sephead_architecture(num_classes=5), home, tmp_path / 'five.safetensors')
    full = load_file(str(work / 'piip_tsb.in1k.safetensors'))
    assert five['state.head.0.weight'].shape == (5, 80)
    assert all(torch.equal(five[k], full[k]) for k in five if not k.startswith('state.head.'))


FAIL_SCRIPT = textwrap.dedent('''
    import time, timm, piip_timm
    start = time.time()
    try:
        timm.create_model({name!r}, pretrained=True, **{kwargs!r})
    except Exception as e:
        print(type(e).__name__ + ': ' + str(e))
        print('elapsed', time.time() - start)
    else:
        print('LOADED')
''')


def _fail(name, endpoint, home, kwargs=None, env=None):
    result = run_python(FAIL_SCRIPT.format(name=name, kwargs=kwargs or {}), endpoint, home, env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    return lines[0], float(lines[1].split()[1]) if len(lines) > 1 else None


def test_dead_endpoint_fails_fast_naming_repo_file_and_the_local_alternative(tmp_path):
    message, elapsed = _fail('piip_tsb.in1k', dead_endpoint(), tmp_path)
    assert message.startswith('HubUnavailableError')
    assert 'OpenGVLab/PIIP/classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth' in message
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert elapsed < 10


def test_hung_endpoint_fails_within_the_timeout(tmp_path):
    with HungServer() as hung:
        message, elapsed = _fail('piip_lh6b', hung.endpoint, tmp_path, env={'PIIP_HUB_TIMEOUT': '2'})
    assert message.startswith('HubUnavailableError') and 'within 2 s' in message
    assert 'OpenGVLab/InternViT-6B-224px' in message
    assert elapsed < 15


def test_offline_without_cache_says_so(tmp_path):
    message, elapsed = _fail('piip_tsbl.coco_1344_896_672_448', dead_endpoint(), tmp_path, env={'HF_HUB_OFFLINE': '1'})
    assert 'HF_HUB_OFFLINE' in message and 'mask_rcnn_deit_tsbl_1344_896_672_448' in message
    assert elapsed < 5


def test_the_reachability_check_sends_one_metadata_request_per_repository_and_never_retries(tmp_path):
    with LocalHub(tmp_path / 'hub', failing={'flaky/repo': 503}) as server:
        server.add('timm/first', 'model.safetensors', b'1')
        server.add('timm/second', 'model.safetensors', b'2')
        server.add('OpenGVLab/PIIP', 'other.pth', b'3')
        code = textwrap.dedent('''
            from piip_timm.hub import HubFile, HubUnavailableError, check_hub_files
            check_hub_files([HubFile('timm/first', 'model.safetensors'), HubFile('timm/first', 'open_clip.bin'),
                             HubFile('timm/second', 'model.safetensors'), HubFile('timm/first', 'config.json'),
                             HubFile('OpenGVLab/PIIP', 'not/there.pth')])
            print('reachable', flush=True)
            try:
                check_hub_files([HubFile('flaky/repo', 'model.safetensors'), HubFile('flaky/repo', 'x.bin')])
            except HubUnavailableError as e:
                print('unavailable:', e)
        ''')
        result = run_python(code, server.endpoint, tmp_path / 'home')
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[0] == 'reachable'
    assert result.stdout.splitlines()[1].startswith('unavailable: could not reach') and 'flaky/repo' in result.stdout
    assert server.requests == [
        'HEAD /timm/first/resolve/main/model.safetensors',
        'HEAD /timm/second/resolve/main/model.safetensors',
        'HEAD /OpenGVLab/PIIP/resolve/main/not/there.pth',  # answered (EntryNotFound): the endpoint is up
        'HEAD /flaky/repo/resolve/main/model.safetensors',  # 503 once: no retry, no second file
    ]


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_malicious_pickle_is_refused_on_every_loading_path(hub, tmp_path):
    server, _ = hub
    marker = tmp_path / 'payload_ran'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {'branch1.pos_embed': torch.zeros(1), 'x': Payload(marker)}}, evil)
    server.add('mallory/piip', 'model.pth', evil)
    # 1. the Hub path (timm's hf_hub_download + torch.load weights_only)
    message, _ = _fail('piip_tsb', server.endpoint, tmp_path / 'home',
                       kwargs=dict(pretrained_cfg_overlay=dict(hf_hub_id='mallory/piip', hf_hub_filename='model.pth')))
    assert 'refused' in message and 'pickle' in message
    # 2. a local file through timm
    message, _ = _fail('piip_tsb', server.endpoint, tmp_path / 'home',
                       kwargs=dict(pretrained_cfg_overlay=dict(file=str(evil))))
    assert 'refused' in message
    # 3. the original-code bridge and the converter
    config = load_case(REFERENCE_DIR / 'cases' / 'cls2.json')[0]['constructor_kwargs']
    with pytest.raises(ValueError, match='refused'):
        piip_timm.from_original(config, 'cls', checkpoint=evil)
    from piip_timm.cli import main
    assert main(['convert', str(write_json(tmp_path / 'c.json', config)), str(evil), '--task', 'cls',
                 '--out', str(tmp_path / 'out')]) == 2
    assert not (tmp_path / 'out').exists()
    assert not marker.exists()


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_corrupt_files_and_wrong_variants_are_clear_errors(hub, tmp_path):
    server, _ = hub
    case, state, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_sephead.json')
    kwargs, _ = translate_original_config(case['constructor_kwargs'], 'cls')
    good = tmp_path / 'good.safetensors'
    save_file(convert_original_state_dict(state), str(good))
    truncated = tmp_path / 'truncated.safetensors'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # random bytes that torch's unpickler rejects as an unknown opcode (which timm re-raises as "needs
    # non-allowlisted globals") and as an empty stack (an IndexError timm passes through)
    garbage = {seed: tmp_path / f'garbage{seed}.pth' for seed in (GARBAGE_SEEDS['UnpicklingError'],
                                                                  GARBAGE_SEEDS['IndexError'])}
    for seed, path in garbage.items():
        path.write_bytes(garbage_bytes(seed))
    common = dict(branches=branch_dicts(kwargs['branches']), interaction=vars(kwargs['interaction']))
    message, _ = _fail('piip_tsb', server.endpoint, tmp_path / 'home',
                       kwargs=dict(common, pretrained_cfg_overlay=dict(file=str(truncated))))
    assert message.startswith('ValueError') and 'truncated.safetensors' in message
    assert 'truncated or corrupt' in message and 'refused' not in message
    for path in garbage.values():
        message, _ = _fail('piip_tsb', server.endpoint, tmp_path / 'home',
                           kwargs=dict(common, pretrained_cfg_overlay=dict(file=str(path))))
        assert message.startswith('ValueError') and path.name in message, message
        assert 'truncated or corrupt' in message and 'refused' not in message, message
    # another variant's checkpoint: the SBL-like case into the TSB-like model
    _, other, _, _ = load_case(REFERENCE_DIR / 'cases' / 'cls3_augreg.json')
    wrong = tmp_path / 'wrong.safetensors'
    save_file(convert_original_state_dict(other), str(wrong))
    message, _ = _fail('piip_tsb', server.endpoint, tmp_path / 'home',
                       kwargs=dict(common, pretrained_cfg_overlay=dict(file=str(wrong))))
    assert message.startswith('ValueError') and 'does not fit this model' in message and 'shape' in message
    # a checkpoint with one interaction tensor missing is not silently half-loaded
    partial = convert_original_state_dict(state)
    partial.pop(next(k for k in partial if k.startswith('interactions.')))
    save_file(partial, str(tmp_path / 'partial.safetensors'))
    message, _ = _fail('piip_tsb', server.endpoint, tmp_path / 'home',
                       kwargs=dict(common, pretrained_cfg_overlay=dict(file=str(tmp_path / 'partial.safetensors'))))
    assert '1 missing' in message


def test_converter_output_loads_from_a_folder_and_from_the_hub(hub, tmp_path):
    server, _ = hub
    case, state, x, outputs = load_case(REFERENCE_DIR / 'cases' / 'det3.json')
    checkpoint = tmp_path / 'det3.pth'
    checkpoint.write_bytes(released_detector_file(state))
    config = write_json(tmp_path / 'det3.json', {'model': {'backbone': case['constructor_kwargs']}})
    out = tmp_path / 'converted'
    result = run_python(
        f'from piip_timm.cli import main; raise SystemExit(main(["convert", {str(config)!r}, {str(checkpoint)!r}, '
        f'"--task", "det", "--out", {str(out)!r}]))', server.endpoint, tmp_path / 'home')
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
    for filename in os.listdir(out):
        server.add('someone/piip-tsb-det3', filename, out / filename)
    torch.save(x, tmp_path / 'x.pt')
    jobs = [dict(name=f'local-dir:{out}', kwargs=dict(features_only=True), input=str(tmp_path / 'x.pt'),
                 out=str(tmp_path / 'local.safetensors')),
            dict(name='hf-hub:someone/piip-tsb-det3', kwargs=dict(features_only=True), input=str(tmp_path / 'x.pt'),
                 out=str(tmp_path / 'hub.safetensors'))]
    result = load_in_subprocess(jobs, server.endpoint, tmp_path / 'home')
    assert result.returncode == 0, result.stderr[-3000:]
    for produced in ('local', 'hub'):
        tensors = load_file(str(tmp_path / f'{produced}.safetensors'))
        for i, ref in enumerate(outputs):
            assert (tensors[f'output.{i}'] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_create_piip_loads_every_branch_through_timms_hub_loader(hub, tmp_path):
    """create_piip(pretrained=True) fetches each named model's weights from its own repository."""
    server, sources = hub
    names = ['deit3_base_patch16_224.fb_in22k_ft_in1k', 'convnext_small.fb_in1k', 'deit_tiny_patch16_224.fb_in1k']
    shapes = [dict(embed_dim=64, depth=2, num_heads=2), dict(dims=(32, 32, 32, 32), depths=(2, 1, 3, 1)),
              dict(embed_dim=32, depth=2, num_heads=1)]  # the tiny twins the local Hub holds
    out = tmp_path / 'built.safetensors'
    code = textwrap.dedent(f'''
        import piip_timm
        from safetensors.torch import save_file
        model = piip_timm.create_piip({names!r}, (64, 96, 128), pretrained=True, model_kwargs={shapes!r},
                                      num_interactions=2, interaction=piip_timm.InteractionCfg(num_heads=4))
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, {str(out)!r})
    ''')
    result = run_python(code, server.endpoint, tmp_path / 'home')
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_file(str(out))
    for i, name in enumerate(names):
        weights = sources[f'timm/{name}']
        for key, value in weights.items():
            if key.startswith(('blocks.', 'stages.', 'stem.')):
                assert torch.equal(state[f'branches.{i}.{key}'], value), key
    gammas = [v for k, v in state.items() if k.startswith('interactions.') and k.endswith('_gamma')]
    assert gammas and all(torch.count_nonzero(g) == 0 for g in gammas)
