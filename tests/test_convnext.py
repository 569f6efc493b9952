"""ConvNeXt and ViT-ConvNeXt hybrid PIIP (TPAMI 2025): the ConvNeXt branch, the seven registered
detectors, their regular-FPN outputs, loading, and the builder from timm model names."""
import json
import re
from dataclasses import replace

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.optim import param_groups_layer_decay

import piip_timm
from piip_timm.convert import checkpoint_filter_fn, convert_original_state_dict
from piip_timm.convnext_branch import ConvNeXtBranch, ConvNeXtBranchCfg
from piip_timm.original import translate_original_config
from piip_timm.variants import HYBRID_NAMES, VARIANTS, model_args

from conftest import REFERENCE_DIR, load_case
from fixtures import branch_dicts
from helpers import disable_drop_path, perturb

CASES = REFERENCE_DIR / 'convnext' / 'cases'
MANIFESTS = REFERENCE_DIR / 'convnext' / 'manifests'


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f'det_convnext_{name}_1024_672_448.json').read_text())


def case_model_kwargs(case_name: str) -> dict:
    """create_model kwargs for a reference case's architecture (its branches, interactions and outputs)."""
    case = load_case(CASES / f'{case_name}.json')[0]
    kwargs, _ = translate_original_config(case['constructor_kwargs'], 'det', case['pretrained_configs'])
    # as the registered models build them: without the original's unused final ConvNeXt norms
    branches = [replace(b, head_norm=False) if isinstance(b, ConvNeXtBranchCfg) else b for b in kwargs['branches']]
    return dict(branches=branch_dicts(branches), interaction=vars(kwargs['interaction']),
                out_interactions=kwargs['out_interactions'])


def output_tolerance_ok(ours, ref) -> bool:
    return (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


# --------------------------------------------------------------------------- the branch
def test_branch_is_a_timm_convnext_run_layer_by_layer():
    cfg = ConvNeXtBranchCfg(img_size=128, dims=(16, 16, 24, 32), depths=(1, 1, 3, 1),
                            block_ranges=((0, 0), (1, 4), (5, 8)))
    branch = perturb(ConvNeXtBranch(cfg)).eval()
    reference = ConvNeXt(num_classes=0, depths=(1, 1, 3, 1), dims=(16, 16, 24, 32)).eval()
    missing, unexpected = reference.load_state_dict(branch.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == {'head.norm.weight', 'head.norm.bias'}
    # counted layers: stage-0 block, then per stage its downsampling layer and blocks
    assert branch.num_layers == 9
    assert branch.layer_strides == (4, 8, 8, 16, 16, 16, 16, 32, 32)
    assert branch.layer_widths == (16, 16, 16, 24, 24, 24, 24, 32, 32)
    x = torch.randn(2, 3, 130, 100)
    with torch.no_grad():
        stages = reference.forward_intermediates(x, intermediates_only=True)
        tokens, prefix, hw = branch.embed(x)
        maps = []
        for step in range(len(cfg.block_ranges)):  # (1, 4) crosses stage 1 and ends inside stage 2
            tokens, prefix, hw = branch.forward_layers(branch.step_layers(step), tokens, prefix, hw)
            maps.append(tokens.transpose(1, 2).reshape(2, -1, *hw))
    assert prefix is None and tokens.is_contiguous()
    assert torch.allclose(maps[0], stages[0], atol=1e-5)
    assert maps[1].shape == (2, 24, 130 // 16, 100 // 16)
    assert torch.allclose(maps[2], stages[3], atol=1e-5)


# --------------------------------------------------------------------------- the seven detectors
def _without_unused_norms(keys):
    """The original keeps transformers' final ConvNeXt LayerNorm, which its forward never runs; the
    registered models leave it out (its tensors are dropped on load)."""
    return {k: v for k, v in keys.items() if not re.match(r'branches\.\d+\.head\.norm\.', k)}


@pytest.mark.parametrize('name', HYBRID_NAMES)
def test_registered_detectors_are_the_original_configurations(name):
    m = manifest(name)
    with torch.device('meta'):
        dense = timm.create_model(f'piip_{name}', features_only=True)
    converted = convert_original_state_dict({k: torch.empty(v, device='meta') for k, v in m['keys'].items()})
    expected = _without_unused_norms({k: list(v.shape) for k, v in converted.items()})
    assert {k: list(v.shape) for k, v in dense.model.state_dict().items()} == expected
    assert sum(p.numel() for p in dense.parameters()) == sum(map(lambda s: torch.Size(s).numel(), expected.values()))
    for branch, widths in zip(dense.model.branches, m['counted_layer_widths'].values()):
        assert list(branch.layer_widths) == widths
    # the variant table holds the original config's branches (the original's windows as one size per block)
    original, _ = translate_original_config(m['constructor_kwargs'], 'det', m['pretrained_configs'])
    normalise = lambda b: replace(b, head_norm=False) if isinstance(b, ConvNeXtBranchCfg) else \
        replace(b, window_size=b.block_windows())
    assert [normalise(b) for b in VARIANTS[f'piip_{name}'].branches] == [normalise(b) for b in original['branches']]
    assert VARIANTS[f'piip_{name}'].interaction == original['interaction']
    assert VARIANTS[f'piip_{name}'].out_interactions == original['out_interactions']
    assert dense.feature_info.reduction() == [4, 8, 16, 32]
    branch1 = m['counted_layer_widths']['branch1']
    ends = [r[1] for r in original['branches'][0].block_ranges]
    assert dense.feature_info.channels() == [branch1[ends[i]] for i in (0, 1, 10)] + [branch1[-1]]


# --------------------------------------------------------------------------- function, on the cases' sizes
@pytest.mark.parametrize('variant, case_name', [('piip_ct_cs_cb', 'det3_cnn_ctcscb'), ('piip_vt_cs_cb', 'det3_hybrid_vtcscb')])
def test_features_only_through_timm_reproduces_the_original(variant, case_name):
    """The entry point with a case's branches gives the original's outputs, and feature_info says what they are."""
    case, state, x, expected = load_case(CASES / f'{case_name}.json')
    model = timm.create_model(variant, features_only=True, **case_model_kwargs(case_name)).eval()
    # the registered models leave the unused final ConvNeXt norms out: the filter drops them
    model.model.load_state_dict(checkpoint_filter_fn(state, model.model), strict=True)
    with torch.no_grad():
        outs = model(x)
        intermediates = model.model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [list(o.shape) for o in outs] == case['output_shapes']
    assert all(output_tolerance_ok(o, ref) for o, ref in zip(outs, expected))
    assert model.feature_info.reduction() == case['output_strides_wrt_input']
    assert model.feature_info.channels() == [s[1] for s in case['output_shapes']]
    assert torch.equal(intermediates[0], outs[1]) and torch.equal(intermediates[1], outs[3])


def test_every_parameter_learns_and_checkpointing_changes_nothing():
    model = timm.create_model('piip_ct_vs_vb', features_only=True, **case_model_kwargs('det3_hybrid_ctvsvb'))
    disable_drop_path(perturb(model.model)).train()
    x = torch.randn(1, 3, 148, 160)
    grads = []
    for checkpointing in (False, True):
        model.model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        outs = model(x)
        sum(o.square().mean() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == {n for n, _ in model.named_parameters()}
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0]), 'a parameter got a zero gradient'
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7) for n in grads[0])


def test_hybrid_classifier_and_layer_decay_groups():
    kwargs = case_model_kwargs('det3_hybrid_vtcscb')
    kwargs.pop('out_interactions')
    model = timm.create_model('piip_vt_cs_cb', num_classes=5, **kwargs).eval()
    assert model.head_style == 'merged' and model.out_merges is None  # no dense outputs without features_only
    with torch.no_grad():
        assert model(torch.randn(1, 3, 168, 192)).shape == (1, 5)
    layer_id = model.group_matcher()
    ranges = model.branch_cfgs[0].block_ranges  # ConvNeXt-B-like: ((0, 0), (1, 2), (3, 4), (5, 5), (6, 7))
    assert ranges == ((0, 0), (1, 2), (3, 4), (5, 5), (6, 7))
    # counted layers: 0 stage-0 block, 1 stage-1 downsampling, 2 its block, 3 stage-2 downsampling, 4-5 its
    # blocks, 6 stage-3 downsampling, 7 its block; interaction k's layers get id k + 1
    assert layer_id('branches.0.stem.0.weight') == 0
    assert layer_id('branches.0.stages.2.downsample.1.weight') == 3
    assert layer_id('branches.0.stages.3.downsample.0.weight') == 5
    assert layer_id('branches.0.stages.2.blocks.1.mlp.fc1.weight') == 4
    assert layer_id('branches.2.blocks.4.attn.qkv.weight') == 5
    assert layer_id('head.weight') == 6
    groups = param_groups_layer_decay(model, layer_decay=0.8)
    assert {len(g['params']) > 0 for g in groups} == {True}


def test_rebuilds_from_its_model_args_and_loads_the_original_layout_strictly():
    case, state, x, expected = load_case(CASES / 'det3_hybrid_ctvsvb.json')
    model = timm.create_model('piip_ct_vs_vb', features_only=True, **case_model_kwargs('det3_hybrid_ctvsvb')).model
    args = json.loads(json.dumps(model_args(model)))  # what a converted checkpoint's config.json stores
    rebuilt = timm.create_model('piip_ct_vs_vb', features_only=True, **args).model
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    incomplete = dict(state)
    del incomplete[next(k for k in incomplete if k.startswith('intermediate_merging_1_branch2'))]
    with pytest.raises(ValueError, match='1 missing'):
        checkpoint_filter_fn(incomplete, model)


def test_clear_errors():
    convnext = ConvNeXtBranchCfg(img_size=128, dims=(32, 32, 32, 32), depths=(1, 1, 1, 1), block_ranges=((0, 6),))
    vit = replace(VARIANTS['piip_vt_cs_cb'].branches[-1], depth=1, block_ranges=((0, 0),), img_size=256)
    with pytest.raises(ValueError, match='no per-branch classifier'):
        piip_timm.PIIP([convnext, vit], head='separate')
    model = piip_timm.PIIP([convnext, vit], head='merged', merge='single_conv', num_classes=3)
    with pytest.raises(ValueError, match='too small.*32px stride'):
        model(torch.randn(1, 3, 48, 48))  # the ConvNeXt sees 24 px, less than its last stride
    with pytest.raises(ValueError, match='multiple of 32'):
        piip_timm.PIIP([replace(convnext, dims=(40, 80, 160, 360)), vit], piip_timm.InteractionCfg(num_heads=4),
                       head="merged", merge="single_conv")
    with pytest.raises(ValueError, match='7 layers'):
        piip_timm.PIIP([replace(convnext, block_ranges=((0, 7),)), vit], head='merged', merge='conv')
    config = load_case(CASES / 'det3_cnn_ctcscb.json')[0]['constructor_kwargs']
    with pytest.raises(ValueError, match='pretrained_configs'):
        piip_timm.from_original(config, 'det')  # test/convnext-case-* are no real models
    real = dict(config, branch1=dict(config['branch1'], pretrained='facebook/convnext-base-224'))
    with pytest.raises(ValueError, match='downsample_ratios'):  # the case's ratios are for its small ConvNeXt
        translate_original_config(real, 'det', load_case(CASES / 'det3_cnn_ctcscb.json')[0]['pretrained_configs'])
    with pytest.raises(ValueError, match='windows'):
        timm.create_model('piip_ct_cs_cb', window_size=(None, 14, None), pretrained=False, device='meta')


# --------------------------------------------------------------------------- create_piip
def test_create_piip_from_timm_names_builds_the_paper_configuration():
    """The paper's VT-CS-VB from timm names: the same branches, interaction widths and outputs as the variant."""
    names = ['deit3_base_patch16_224.fb_in22k_ft_in1k', 'convnext_small.fb_in1k', 'deit_tiny_patch16_224.fb_in1k']
    built = piip_timm.create_piip(names, img_sizes=(448, 672, 1024), features_only=True, num_classes=0,
                                  device='meta')
    with torch.device('meta'):
        variant = timm.create_model('piip_vt_cs_vb', features_only=True)
    assert built.model.out_interactions == variant.model.out_interactions == (0, 1, 10)
    assert built.feature_info.channels() == variant.feature_info.channels() == [768] * 4
    assert built.feature_info.reduction() == [4, 8, 16, 32]
    ours = {k: v.shape for k, v in built.model.state_dict().items()}
    theirs = {k: v.shape for k, v in variant.model.state_dict().items()}
    # timm's DeiT-T has no layer scale; the original gives its DeiT branches one, fixed at 1.0
    assert set(theirs) - set(ours) == {k for k in theirs if re.match(r'branches\.2\.blocks\.\d+\.ls[12]\.gamma', k)}
    assert all(ours[k] == theirs[k] for k in ours)
    assert set(ours) <= set(theirs)


def test_create_piip_runs_small_timm_models_and_derives_ranges_and_outputs():
    names = ['deit_small_patch16_224', 'convnext_atto', 'deit_tiny_patch16_224']
    shrink = [dict(embed_dim=64, depth=4, num_heads=2), dict(dims=(32, 32, 64, 64), depths=(2, 1, 2, 1)),
              dict(embed_dim=32, depth=4, num_heads=2)]
    interaction = piip_timm.InteractionCfg(num_heads=4)
    dense = piip_timm.create_piip(names, (64, 96, 128), model_kwargs=shrink, interaction=interaction,
                                  features_only=True).eval()
    branches = dense.model.branches
    assert [b.cfg.block_ranges for b in branches] == [((0, 0), (1, 1), (2, 2), (3, 3)),
                                                      ((0, 1), (2, 3), (4, 5), (6, 8)),  # 9 layers, spread evenly
                                                      ((0, 0), (1, 1), (2, 2), (3, 3))]
    assert branches[1].cfg.conv_mlp  # convnext_atto's 1x1-conv MLPs, as timm builds it
    # the ConvNeXt is at strides 4, 8, 16 after interactions 0, 1, 2: those merges are outputs
    assert dense.model.out_interactions == (0, 1, 2)
    with torch.no_grad():
        outs = dense(torch.randn(1, 3, 128, 160))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 32, 40), (1, 64, 16, 20), (1, 64, 8, 10), (1, 64, 4, 5)]
    classifier = piip_timm.create_piip(names, (64, 96, 128), model_kwargs=shrink, interaction=interaction,
                                       num_classes=3).eval()
    with torch.no_grad():
        assert classifier(torch.randn(2, 3, 128, 128)).shape == (2, 3)
    vits = piip_timm.create_piip(names[::2], (64, 128), model_kwargs=shrink[::2], interaction=interaction,
                                 features_only=True)
    assert vits.model.merge_style == 'conv' and vits.feature_info.reduction() == [4, 8, 16, 32]
    with pytest.raises(ValueError, match='VisionTransformers, ConvNeXts or Beits'):
        piip_timm.create_piip(['resnet18', 'deit_tiny_patch16_224'], (64, 128), device='meta')


def test_classifier_intermediates_follow_the_finest_convnext_and_prune_at_any_step():
    """Without dense outputs, the maps are the finest branch's after each step: for a ConvNeXt its width and
    stride change between steps; pruning inside its stages keeps the taps and the model trains."""
    kwargs = case_model_kwargs('det3_cnn_ctcscb')
    kwargs.pop('out_interactions')
    model = disable_drop_path(perturb(timm.create_model('piip_ct_cs_cb', num_classes=4, **kwargs))).eval()
    finest = model.branches[-1]
    ends = [end for _, end in finest.cfg.block_ranges]
    assert [i['reduction'] for i in model.feature_info] == [finest.layer_strides[e] for e in ends] == [4, 8, 16, 16, 32]
    assert [i['num_chs'] for i in model.feature_info] == [finest.layer_widths[e] for e in ends] == [16, 16, 24, 24, 32]
    x = torch.randn(1, 3, 168, 176)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        assert [t.shape[1] for t in taps] == [16, 16, 24, 24, 32]
        assert torch.equal(model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)[0],
                           taps[2])
    pruned = model
    pruned.prune_intermediate_layers([2])  # inside stage 2 of every ConvNeXt: the final merge is made anew
    assert [b.num_layers for b in pruned.branches] == [b.cfg.block_ranges[2][1] + 1 for b in pruned.branches]
    with torch.no_grad():
        assert torch.allclose(pruned.forward_intermediates(x, indices=[2], intermediates_only=True)[0], taps[2])
    pruned.train()
    features = pruned.forward_features(x)
    assert features.shape[-1] == pruned.branches[0].layer_widths[-1]
    (pruned.forward_intermediates(x, indices=[2], intermediates_only=True)[0].sum() + features.sum()).backward()
    assert [n for n, p in pruned.named_parameters() if p.grad is None] == []


def test_fx_traces_a_regular_fpn_model_at_any_size():
    """torch.fx traces the ConvNeXt layers, the intermediate merges and the output levels (sizes as graph values)."""
    dense = timm.create_model('piip_vt_cs_cb', features_only=True, **case_model_kwargs('det3_hybrid_vtcscb'))
    perturb(dense.model).eval()
    traced = torch.fx.symbolic_trace(dense)
    for size in ((168, 192), (176, 160)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(traced(x), dense(x)))


def test_names_moved_out_of_piip_py_still_import_with_a_warning():
    import piip_timm.piip as old
    for name, module in (('VARIANTS', 'variants'), ('PRETRAINED', 'variants'), ('checkpoint_filter_fn', 'convert')):
        with pytest.warns(DeprecationWarning, match=f'piip_timm.{module}.{name}'):
            assert getattr(old, name) is getattr(getattr(piip_timm, module), name)


def test_converted_original_checkpoint_loads_from_a_folder(tmp_path):
    """convert_checkpoint on a ConvNeXt hybrid (architectures given as pretrained_configs) -> local-dir: loads
    strictly and gives the original's outputs."""
    case, state, x, expected = load_case(CASES / 'det3_hybrid_vtcscb.json')
    piip_timm.convert_checkpoint(case['constructor_kwargs'], 'det', state, tmp_path / 'converted',
                                 pretrained_configs=case['pretrained_configs'])
    model = timm.create_model(f'local-dir:{tmp_path / "converted"}', pretrained=True, features_only=True).eval()
    with torch.no_grad():
        outs = model(x)
    assert all(output_tolerance_ok(o, ref) for o, ref in zip(outs, expected))
