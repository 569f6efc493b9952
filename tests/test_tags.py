"""Every pretrained tag's own full-size architecture, on the meta device, against the original's.

* Structure: each tag's branches (windows, padding, activation, norms, pos-embed grid, block ranges,
  drop path), interactions and heads against the original config it was trained with (the reference
  manifests' configs; the other sizes of a family differ from them only in the image sizes, as the
  original config files do), and its tensor shapes against the original model's.
* Loading: each released checkpoint's exact full-size key layout (tensors viewing one small storage)
  is served by a local Hub under the file name the original README gives, and loaded strictly
  through its tag, as ``timm.create_model(tag, pretrained=True)`` does.
* Parameter counts of the variants, from the original models' counts and an independent count of
  what differs.
"""
import copy
import json
import math
import re
import textwrap

import pytest
import timm
import torch
from timm.models import get_arch_pretrained_cfgs

from piip_timm.convert import convert_original_state_dict
from piip_timm.original import translate_original_config

from conftest import REFERENCE_DIR
from fixtures import (BRANCH_REPOS, RELEASED_FILES, released_classifier_file, released_detector_file,
                      shared_storage_state)
from helpers import branch_summary
from hubtools import LocalHub, run_python

TSB_CLS, SBL_CLS = 'cls_piip_3branch_tsb_368-192-128_cls_token_deit1', 'cls_piip_3branch_sbl_384-192-128_cls_token_augreg'
TSB_DET, SBL_DET, TSBL_DET = 'det_tsb_1120_896_448', 'det_sbl_1120_672_448', 'det_tsbl_1344_896_672_448'
# tag -> (reference manifest of its original config, image sizes of branch1..N in that config or None for the
# manifest's own). Sizes are the ones in the tag's (and the original config file's) name.
TAG_ORIGINS = {
    'piip_tsb.in1k': (TSB_CLS, None),
    'piip_tsb.deit_in1k': (TSB_CLS, None),
    'piip_tsb.coco_1120_896_448': (TSB_DET, None),
    'piip_tsb.coco_1568_896_448': (TSB_DET, (448, 896, 1568)),
    'piip_tsb.coco_1568_1120_672': (TSB_DET, (672, 1120, 1568)),
    'piip_tsb.deit3_in22k': (TSB_DET, None),
    'piip_sbl.in1k': (SBL_CLS, None),
    'piip_sbl.in1k_320': (SBL_CLS, (96, 160, 320)),
    'piip_sbl.augreg_in21k_ft_in1k': (SBL_CLS, None),
    'piip_sbl.coco_1120_672_448': (SBL_DET, None),
    'piip_sbl.coco_1344_896_448': (SBL_DET, (448, 896, 1344)),
    'piip_sbl.coco_1568_896_672': (SBL_DET, (672, 896, 1568)),
    'piip_sbl.coco_1568_1120_672': (SBL_DET, (672, 1120, 1568)),
    'piip_sbl.deit3_in22k': (SBL_DET, None),
    'piip_tsbl.deit3_in22k': (TSBL_DET, None),  # the paper's fourth branch (DeiT-T), see expected_branches
    'piip_tsbl.coco_1344_896_672_448': (TSBL_DET, None),
    'piip_tsbl.coco_1568_1120_672_448': (TSBL_DET, (448, 672, 1120, 1568)),
    'piip_tsbl.coco_1792_1568_1120_448': (TSBL_DET, (448, 1120, 1568, 1792)),
    'piip_lh6b.branches': ('det_dino_lh6b_1536_1024_512', None),
    'piip_h6b.coco_1024_512': ('det_maskrcnn_h6b_1024_512', None),
    'piip_h6b.branches': ('det_maskrcnn_h6b_1024_512', None),
    # The ConvNeXt / hybrid detectors (TPAMI 2025): the convnext family's manifests
    **{f'piip_{name}.{tag}': (f'convnext/manifests/det_convnext_{name}_1024_672_448', None)
       for name in ('ct_cs_cb', 'ct_vs_vb', 'ct_cs_vb', 'ct_vs_cb', 'vt_cs_vb', 'vt_cs_cb', 'vt_vs_cb')
       for tag in (('coco_1024_672_448', 'branches') if name == 'ct_cs_cb' else ('branches',))},
    # The SBL detectors of other pretrained families, the DINO detectors and the UperNet backbones (TPAMI
    # 2025): the vit-families manifests
    **{f'piip_sbl.{tag}': (f'vit-families/manifests/det_{family}_sbl_1568_1120_672', None)
       for family, tags in (('beit', ('coco_beitv2_1568_1120_672', 'beitv2_in22k')),
                            ('uniperceiver', ('coco_uniperceiver_1568_1120_672',)),
                            ('dinov2', ('coco_dinov2_1568_1120_672', 'dinov2_lvd142m')),
                            ('mae', ('coco_mae_1568_1120_672', 'mae_in1k')),
                            ('augreg', ('coco_augreg_1568_1120_672', 'augreg384_in21k_ft_in1k')))
       for tag in tags},
    **{f'piip_sbl.{tag}': ('vit-families/manifests/det_dino_deit384_sbl_1792_1120_672', None)
       for tag in ('coco_dino_1792_1120_672', 'deit3_384_in22k')},
    'piip_h6b.coco_dino_1024_768': ('vit-families/manifests/det_dino_h6b_1024_768', None),
    **{f'piip_h6b.ade20k_512_{size}': (f'vit-families/manifests/seg_upernet_h6b_{size}_512', None)
       for size in (192, 256, 384, 512)},
}
TAGS = sorted(TAG_ORIGINS)


def manifest(name: str) -> dict:
    """A manifest of the shared reference data: by name, or by its path below the reference folder."""
    path = REFERENCE_DIR / f'{name}.json' if '/' in name else REFERENCE_DIR / 'manifests' / f'{name}.json'
    return json.loads(path.read_text())


def original_config(tag: str):
    """The tag's original backbone config (the manifest's, at the tag's sizes) and its task."""
    name, sizes = TAG_ORIGINS[tag]
    found = manifest(name)
    config = copy.deepcopy(found['constructor_kwargs'])
    for i, size in enumerate(sizes or ()):
        config[f'branch{i + 1}']['img_size' if found['task'] == 'cls' else 'real_size'] = size
    return config, found['task']


def original_shapes(tag: str) -> dict:
    """Tensor shapes of the original model, in this package's key names."""
    name, sizes = TAG_ORIGINS[tag]
    keys = dict(manifest(name)['keys'])
    if sizes and manifest(name)['task'] == 'cls':  # the classifiers' pos_embed: a class slot + the image's grid
        for i, size in enumerate(sizes):
            keys[f'branch{i + 1}.pos_embed'] = [1, 1 + (size // 16) ** 2, keys[f'branch{i + 1}.pos_embed'][2]]
    converted = convert_original_state_dict({k: torch.empty(v, device='meta') for k, v in keys.items()})
    # The final LayerNorm of a transformers ConvNextModel is in the original's state dict but never runs;
    # the tags leave it out (their filter drops it from the released file).
    return {k: list(v.shape) for k, v in converted.items() if not re.match(r'branches\.\d+\.head\.norm\.', k)}


def window_index(window: int) -> torch.Tensor:
    """The relative position index buffer of the original BEiT for a window (row i, column j: the table row
    of the offset between tokens i and j), written out here."""
    side = 2 * window - 1
    return torch.tensor([[(i // window - j // window + window - 1) * side + (i % window - j % window + window - 1)
                          for j in range(window * window)] for i in range(window * window)])


def released_file(tag: str) -> bytes:
    """A checkpoint in the released file's exact layout (full-size shapes, one small shared storage; BEiT's
    index buffers hold the index, as in the real file)."""
    name, _ = TAG_ORIGINS[tag]
    shapes = {k: v for k, v in manifest(name)['keys'].items()}
    if tag == 'piip_sbl.in1k_320':  # the 320 px classifier: pos_embeds on its own grids
        for i, size in enumerate((96, 160, 320)):
            shapes[f'branch{i + 1}.pos_embed'] = [1, 1 + (size // 16) ** 2, shapes[f'branch{i + 1}.pos_embed'][2]]
    state = shared_storage_state(shapes)
    for key, shape in shapes.items():
        if key.endswith('.relative_position_index'):
            state[key] = window_index(math.isqrt(shape[0]))
    return released_classifier_file(state) if RELEASED_FILES[tag].startswith('classification/') \
        else released_detector_file(state)


BUILD_SCRIPT = textwrap.dedent('''
    import json, sys, warnings, torch, timm
    import piip_timm
    from helpers import architecture
    warnings.filterwarnings('ignore', message='.*non-meta parameter.*')  # loading into meta tensors is a no-op
    results = {{}}
    for name, pretrained, features_only in {jobs!r}:
        try:
            with torch.device('meta'):
                model = timm.create_model(name, pretrained=pretrained, features_only=features_only)
            inner = getattr(model, 'model', model)
            results[name] = dict(architecture(inner), params=sum(p.numel() for p in inner.parameters()))
        except Exception as e:
            results[name] = dict(error=f'{{type(e).__name__}}: {{e}}')
    open({out!r}, 'w').write(json.dumps(results))
''')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """Every tag built at full size on the meta device in one interpreter; released tags load their file."""
    root = tmp_path_factory.mktemp('full_size_hub')
    hub = LocalHub(root)
    for tag, filename in RELEASED_FILES.items():
        hub.add('OpenGVLab/PIIP', filename, released_file(tag))
    # Released detector and segmentation backbones are loaded as backbones (features_only=True).
    jobs = [(tag, tag in RELEASED_FILES, tag in RELEASED_FILES and not RELEASED_FILES[tag].startswith('classification/'))
            for tag in TAGS]
    out = root / 'built.json'
    with hub:
        result = run_python(BUILD_SCRIPT.format(jobs=jobs, out=str(out)), hub.endpoint, root / 'hf_home')
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_tables_here_name_every_tag():
    llava = 'piip_llava_*'  # the PIIP-LLaVA towers' tags: test_llava.py
    tags = {t for v in timm.list_models('piip_*', exclude_filters=llava) for t in get_arch_pretrained_cfgs(v) if '.' in t}
    assert set(RELEASED_FILES) == set(timm.list_pretrained('piip_*', exclude_filters=llava))  # with a weight file
    assert set(RELEASED_FILES) | set(BRANCH_REPOS) == set(TAG_ORIGINS) == tags
    assert not set(RELEASED_FILES) & set(BRANCH_REPOS)


def expected_branches(tag: str) -> list:
    config, task = original_config(tag)
    branches = translate_original_config(config, task)[0]['branches']
    if tag == 'piip_tsbl.deit3_in22k':
        # piip_4branch.py builds branch4 from branch3's settings; the paper's PIIP-TSBL (and this tag) has the
        # DeiT-T its config describes: branch4 read on its own, as a two-branch config would read it.
        pair = dict(config, branch1=config['branch3'], branch2=config['branch4'])
        del pair['branch3'], pair['branch4']
        branches[3] = translate_original_config(pair, task)[0]['branches'][1]
    return [json.loads(json.dumps(branch_summary(b))) for b in branches]


@pytest.mark.parametrize('tag', TAGS)
def test_tag_builds_the_architecture_it_was_released_with(built, tag):
    got = built[tag]
    assert 'error' not in got, got.get('error')
    config, task = original_config(tag)
    kwargs = translate_original_config(config, task)[0]
    expected_branch_list = expected_branches(tag)
    assert len(got['branches']) == len(expected_branch_list)
    for i, (ours, original) in enumerate(zip(got['branches'], expected_branch_list)):
        assert ours == original, (f'branch {i}', {k: (ours[k], original[k]) for k in ours if ours[k] != original[k]})
    assert got['interaction'] == json.loads(json.dumps(vars(kwargs['interaction'])))
    regular_fpn = task == 'det' and not config.get('with_simple_fpn', True)  # the ConvNeXt / hybrid detectors
    merge = 'single_conv' if regular_fpn else 'conv'
    if task == 'cls':
        expected = dict(head='separate', merge=None, pyramid=None, num_classes=1000, global_pool='first_patch')
    elif tag in RELEASED_FILES:  # a released detector / segmentation backbone, loaded with features_only=True
        # regular FPN: the merges after interactions 0, 1, 10 and the last are at strides 4-32 already; simple
        # pyramid: the levels the original builds (the two-branch DINO detector builds no fpn1)
        expected = dict(head=None, merge=merge, pyramid=['same'] * 4 if regular_fpn else kwargs['pyramid'],
                        num_classes=0)
    else:  # branch weights in a detector's configuration: the merged classifier (LayerNorm, pool, linear)
        expected = dict(head='merged', merge=merge, pyramid=None, num_classes=1000, global_pool='avg')
    assert {k: got[k] for k in expected} == expected

    shapes = original_shapes(tag)
    if task != 'cls' and tag not in RELEASED_FILES:  # a classifier: no dense outputs, a head on the merged map
        width = next(v[0] for k, v in shapes.items() if k.startswith('merges.0.norm'))
        shapes = {k: v for k, v in shapes.items() if not k.startswith(('pyramid.', 'out_merges.'))}
        shapes.update({'norm.weight': [width], 'norm.bias': [width], 'head.weight': [1000, width],
                       'head.bias': [1000]})
    if tag == 'piip_tsbl.deit3_in22k':  # branch4, its interaction unit and merge differ (DeiT-T); counted below
        paper_only = ('branches.3.', 'merges.3.')
        differs = {k for k in shapes if k.startswith(paper_only) or k.split('.')[:3:2] == ['interactions', '2']}
        shapes = {k: v for k, v in shapes.items() if k not in differs}
        got_shapes = {k: v for k, v in got['shapes'].items() if k in shapes}
        assert set(got['shapes']) - set(got_shapes) and got_shapes == shapes
    else:
        assert got['shapes'] == shapes


# ----------------------------------------------------------------------------- parameter counts
def interaction_unit_params(coarse: int, fine: int, heads: int = 16, points: int = 4, value_ratio: float = 0.5,
                            ffn_ratio: float = 0.25) -> int:
    """One original interaction unit (piip_modules.py) between widths ``coarse`` and ``fine``: a Linear each
    way between the widths and an injector on each side (query, feature and FFN LayerNorms; deformable
    attention with sampling offsets, attention weights, value and output projections; a ConvFFN with a
    depthwise 3x3; two gammas)."""
    def injector(d: int) -> int:
        value, hidden = int(d * value_ratio), int(d * ffn_ratio)
        norms = 3 * 2 * d
        attention = (d + 1) * heads * points * 3 + (d + 1) * value + (value + 1) * d
        ffn = (d + 1) * hidden + 10 * hidden + (hidden + 1) * d
        return norms + attention + ffn + 2 * d
    return (coarse + 1) * fine + (fine + 1) * coarse + injector(coarse) + injector(fine)


def conv_merge_params(width: int, out: int) -> int:
    """The detectors' merge of one branch: 3x3 conv (no bias), GroupNorm, 3x3 conv (no bias), GroupNorm."""
    return 9 * width * out + 2 * out + 9 * out * out + 2 * out


def classifier_params(width: int, classes: int = 1000) -> int:
    return 2 * width + (width + 1) * classes  # LayerNorm and Linear


def test_the_independent_counts_reproduce_the_original_models():
    tsb, sbl, tsbl = (manifest(n)['param_breakdown'] for n in (TSB_DET, SBL_DET, TSBL_DET))
    assert 12 * (interaction_unit_params(768, 384) + interaction_unit_params(384, 192)) == tsb['interactions']
    assert 12 * (interaction_unit_params(1024, 768) + interaction_unit_params(768, 384)) == sbl['interactions']
    assert 12 * (interaction_unit_params(1024, 768) + interaction_unit_params(768, 384)
                 + interaction_unit_params(384, 384)) == tsbl['interactions']
    assert [conv_merge_params(w, 768) for w in (768, 384, 192)] == [tsb[f'merge_branch{i}'] for i in (1, 2, 3)]
    assert [conv_merge_params(w, 1024) for w in (1024, 768, 384, 384)] == [tsbl[f'merge_branch{i}'] for i in
                                                                            (1, 2, 3, 4)]


def test_variant_parameter_counts_follow_from_the_original_counts(built):
    tsbl, lh6b = manifest(TSBL_DET), manifest('det_dino_lh6b_1536_1024_512')
    deit_t = manifest(TSB_DET)['param_breakdown']['branch3']  # DeiT-T at the 224 px grid, with layer scale
    paper_tsbl = (tsbl['num_params'] - tsbl['param_breakdown']['fpn1'] - tsbl['param_breakdown']['fpn2']
                  - tsbl['param_breakdown']['branch4'] + deit_t
                  - 12 * interaction_unit_params(384, 384) + 12 * interaction_unit_params(384, 192)
                  - conv_merge_params(384, 1024) + conv_merge_params(192, 1024) + classifier_params(1024))
    expected = {
        'piip_tsb': manifest(TSB_CLS)['num_params'],  # 144.03 M
        'piip_sbl': manifest(SBL_CLS)['num_params'],  # 488.93 M
        'piip_tsbl': paper_tsbl,  # 559.51 M
        'piip_lh6b': lh6b['num_params'] - lh6b['param_breakdown']['fpn1'] - lh6b['param_breakdown']['fpn2']
        + classifier_params(3200),  # 7361.45 M
    }
    for variant, count in expected.items():
        default = timm.models.get_pretrained_cfg(variant).tag
        assert built[f'{variant}.{default}']['params'] == count, variant
