"""The registered variants and the timm contract."""
import json

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from piip_timm.convert import convert_original_state_dict

from conftest import REFERENCE_DIR
from helpers import disable_drop_path, perturb, tiny_variant

VARIANT_NAMES = ['piip_tsb', 'piip_sbl', 'piip_tsbl', 'piip_lh6b']
# Full-size structure and parameter counts of every variant and tag: test_tags.py.


def meta_model(name, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


def test_variants_are_registered():
    assert set(VARIANT_NAMES) <= set(timm.list_models('piip_*'))


def test_lh6b_features_only_is_the_original_detector_backbone():
    keys = json.loads((REFERENCE_DIR / 'manifests' / 'det_dino_lh6b_1536_1024_512.json').read_text())['keys']
    converted = convert_original_state_dict({k: torch.empty(v, device='meta') for k, v in keys.items()})
    dense = {k: list(v.shape) for k, v in meta_model('piip_lh6b', features_only=True).model.state_dict().items()}
    assert dense == {k: list(v.shape) for k, v in converted.items()}  # the classifier: test_tags.py


def test_readme_lists_every_pretrained_tag():
    from pathlib import Path
    from piip_timm.llava import TOWER_TAGS
    from piip_timm.variants import PRETRAINED
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    rows = {line.split('`')[1] for line in readme.splitlines() if line.startswith('| `piip_') and '.' in line.split('`')[1]}
    assert rows == {f'{v}.{t}' for table in (PRETRAINED, TOWER_TAGS) for v, tags in table.items() for t in tags}


def test_tsbl_branches_follow_the_paper_not_the_original_quirk():
    model = meta_model('piip_tsbl')
    assert model.embed_dims == (1024, 768, 384, 192)
    assert [b.img_size for b in model.branch_cfgs] == [448, 672, 896, 1344]


def test_full_size_piip_tsb_classifies_and_pools():
    model = timm.create_model('piip_tsb').eval()
    x = torch.randn(1, 3, 368, 368)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert torch.allclose(model(x), logits)
    assert [tuple(f.shape) for f in features] == [(1, 65, 768), (1, 145, 384), (1, 530, 192)]
    assert logits.shape == (1, 1000)
    assert pre_logits.shape == (1, model.num_features) == (1, 1344)
    assert model.head_hidden_size == 1344


def test_pretrained_cfg_describes_the_model():
    model = meta_model('piip_tsb')
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg['input_size'] == (3, 368, 368)
    assert cfg['first_conv'] == ('branches.0.patch_embed.proj', 'branches.1.patch_embed.proj',
                                 'branches.2.patch_embed.proj')
    assert cfg['classifier'] == ('head.0', 'head.1', 'head.2')
    assert meta_model('piip_lh6b').pretrained_cfg['classifier'] == 'head'
    for key in ('mean', 'std', 'pool_size', 'crop_pct', 'interpolation'):
        assert key in cfg


@pytest.mark.parametrize('name', VARIANT_NAMES)
def test_every_parameter_gets_a_gradient(name):
    model = disable_drop_path(perturb(tiny_variant(name))).train()
    model(torch.randn(2, 3, 128, 128)).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.parametrize('name', VARIANT_NAMES)
def test_features_only_pyramid(name):
    dense = tiny_variant(name, head=None, num_classes=0, merge='conv', pyramid=('up4', 'up2', 'same', 'down2'))
    features = dense.forward_intermediates(torch.randn(2, 3, 128, 96), intermediates_only=True)
    # The finest branch sees 128x96 -> an 8x6 token grid at stride 16.
    assert [tuple(f.shape) for f in features] == [(2, 96, 32, 24), (2, 96, 16, 12), (2, 96, 8, 6), (2, 96, 4, 3)]
    assert [info['reduction'] for info in dense.feature_info] == [4, 8, 16, 32]


def test_features_only_through_timm():
    model = timm.create_model('piip_tsb', features_only=True, out_indices=(1, 3), img_size=160).eval()
    assert model.feature_info.reduction() == [8, 32]
    assert model.feature_info.channels() == [768, 768]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 160, 160))
    assert [tuple(f.shape) for f in features] == [(1, 768, 20, 20), (1, 768, 5, 5)]
    inner = model.model
    assert inner.num_classes == 0
    assert all(isinstance(b.norm, torch.nn.Identity) for b in inner.branches)  # pruned: they feed nothing


def test_forward_intermediates_returns_final_features_and_levels():
    model = tiny_variant('piip_tsbl', pyramid=('up4', 'up2', 'same', 'down2')).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        final, levels = model.forward_intermediates(x, indices=2)
        nhwc = model.forward_intermediates(x, indices=[0], output_fmt='NHWC', intermediates_only=True)
        assert torch.allclose(model.forward_head(final), model(x))
    assert [tuple(t.shape) for t in levels] == [(1, 96, 8, 8), (1, 96, 4, 4)]
    assert tuple(nhwc[0].shape) == (1, 32, 32, 96)


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one forward (outside checkpointed regions), counted per storage."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize('name', ['piip_tsb', 'piip_tsbl'])
def test_grad_checkpointing_modes_give_the_same_outputs_and_gradients(name):
    """Every mode: outputs and gradients of the plain run; the activations kept for the backward shrink
    as more is recomputed (units alone, layers alone, both)."""
    torch.manual_seed(0)
    model = disable_drop_path(perturb(tiny_variant(name))).train()
    x = torch.randn(2, 3, 128, 128)
    model(x).sum().backward()
    reference = model(x).detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    saved = {}
    for mode in (False, 'interactions', 'blocks', 'all', True):
        model.zero_grad()
        model.set_grad_checkpointing(mode)
        out = model(x)
        out.sum().backward()
        assert torch.allclose(out, reference, atol=1e-6), mode
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-4), (mode, n)
        saved[mode] = _saved_bytes(model, x)
    assert saved[False] > saved['interactions'] > saved['all'] and saved[False] > saved['blocks'] > saved['all']
    assert saved[True] == saved['all']
    with pytest.raises(ValueError, match='grad checkpointing must be'):
        model.set_grad_checkpointing('units')


def test_classifier_reset_and_pooling_options():
    model = tiny_variant('piip_tsb').eval()
    x = torch.randn(2, 3, 128, 128)
    assert len(model.get_classifier()) == 3
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, global_pool='')
    assert [t.shape[-1] for t in model(x)] == [96, 64, 32]
    model.reset_classifier(3, global_pool='token')
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = torch.stack([h(t[:, 0]) for h, t in zip(model.head, tokens)]).mean(0)
        assert torch.allclose(model.forward_head(tokens), expected)
    merged = tiny_variant('piip_lh6b', num_classes=0).eval()
    assert merged(x).shape == (2, 96)
    with pytest.raises(ValueError, match='global_pool'):
        merged.reset_classifier(2, global_pool='token')


def test_first_patch_pooling_is_the_released_classifiers_rule():
    """The original heads read norm(patch_tokens)[:, 0]: the first patch token, not the class token."""
    model = perturb(tiny_variant('piip_tsb')).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens, prefixes, _ = model.forward_branches(x)
        expected = torch.stack([head(branch.norm(t)[:, 0])
                                for head, branch, t in zip(model.head, model.branches, tokens)]).mean(0)
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_in_chans_and_timm_options():
    model = timm.create_model('piip_tsb', in_chans=1, num_classes=4, img_size=96, drop_path_rate=0.0).eval()
    assert [b.img_size for b in model.branch_cfgs] == [33, 50, 96]
    assert model(torch.randn(1, 1, 96, 96)).shape == (1, 4)
    per_branch = meta_model('piip_tsb', img_size=(64, 128, 256), window_size=(None, None, None))
    assert [b.img_size for b in per_branch.branch_cfgs] == [64, 128, 256]
    windowed = meta_model('piip_tsbl', window_size=14)
    assert all(b.block_windows() == (14,) * b.depth for b in windowed.branch_cfgs)
    with pytest.raises(ValueError, match='class token and windowed attention'):
        meta_model('piip_tsb', window_size=14)


def test_layer_decay_groups_follow_interaction_steps():
    """timm's optimizer (as the fine-tuning example builds it): layer ids from group_matcher (embeddings 0, interaction step k and the
    blocks it runs k + 1, the rest last), scale 0.5 ** (3 - id); no weight decay on embeddings and 1-D."""
    model = tiny_variant('piip_tsbl', depth=2)  # 2 interaction steps; branch 0 runs blocks 0-1, then 2-3
    groups = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g['lr_scale'] for g in groups for p in g['params']}
    decay = {names[id(p)]: g['weight_decay'] for g in groups for p in g['params']}
    assert sorted(scale) == sorted(names.values())  # every parameter in exactly one group
    expected_scale = {
        'branches.0.pos_embed': 0.125, 'branches.2.patch_embed.proj.weight': 0.125,
        'branches.0.blocks.1.attn.qkv.weight': 0.25, 'branches.0.blocks.2.mlp.fc1.weight': 0.5,
        'branches.3.blocks.0.norm1.weight': 0.25, 'branches.3.blocks.1.norm1.weight': 0.5,
        'interactions.0.0.fine_to_coarse.attn.value_proj.weight': 0.25,
        'interactions.1.2.fine_to_coarse.attn_gamma': 0.5,
        'merges.0.conv1.weight': 1.0, 'branch_weights': 1.0, 'norm.weight': 1.0, 'head.weight': 1.0,
    }
    assert {k: scale[k] for k in expected_scale} == expected_scale
    expected_decay = {
        'branches.0.pos_embed': 0.0, 'branches.0.blocks.1.attn.qkv.weight': 0.05,
        'branches.0.blocks.1.attn.qkv.bias': 0.0, 'branches.3.blocks.0.norm1.weight': 0.0,
        'interactions.1.2.fine_to_coarse.attn_gamma': 0.0, 'interactions.0.0.fine_to_coarse.attn.value_proj.weight': 0.05,
        'merges.0.conv1.weight': 0.05, 'head.weight': 0.05, 'head.bias': 0.0,
    }
    assert {k: decay[k] for k in expected_decay} == expected_decay
    matcher = model.group_matcher()
    assert matcher('branches.0.pos_embed') == 0
    assert matcher('branches.0.blocks.0.attn.qkv.weight') == 1  # branch 0 runs blocks 0-1 in step 0
    assert matcher('branches.0.blocks.3.mlp.fc1.weight') == 2
    assert matcher('branches.3.blocks.1.norm1.weight') == 2
    assert matcher('interactions.1.2.fine_to_coarse.attn_gamma') == 2
    assert matcher('head.weight') == matcher('merges.0.conv1.weight') == 3


def test_no_weight_decay_names_position_and_class_embeddings():
    names = meta_model('piip_tsb').no_weight_decay()
    assert {'branches.0.pos_embed', 'branches.0.cls_token', 'branches.2.pos_embed'} <= names
    params = dict(meta_model('piip_tsb').named_parameters())
    assert names <= set(params)


@pytest.mark.parametrize('shape, match', [
    ((2, 1, 128, 128), '3 input channels'),
    ((3, 128, 128), '4-D'),
    ((1, 3, 24, 128), 'too small'),
])
def test_bad_input_is_a_clear_value_error(shape, match):
    model = tiny_variant('piip_tsb')
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match='torch.Tensor'):
        tiny_variant('piip_tsb')([[0.0]])


def test_sizes_that_are_not_patch_multiples_drop_the_partial_patch():
    model = tiny_variant('piip_tsbl', img_sizes=[64, 96, 128, 160], head=None, num_classes=0).eval()
    with torch.no_grad():
        tokens, _, grids = model.forward_branches(torch.randn(1, 3, 133, 101))
    # Branch images floor(133 * r) x floor(101 * r) for r = 64/160, 96/160, 128/160, 1: 53x40, 79x60,
    # 106x80, 133x101; token grids floor(side / 16).
    expected = [(3, 2), (4, 3), (6, 5), (8, 6)]
    assert grids == expected
    assert [t.shape[1] for t in tokens] == [h * w for h, w in expected]
