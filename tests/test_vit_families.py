"""BEiT and Uni-Perceiver branch pieces, and the registered architectures of the TPAMI ViT-family checkpoints."""
import json
import math
from dataclasses import replace

import pytest
import timm
import torch

from piip_timm.beit_branch import BeitBranch, BeitBranchCfg
from piip_timm.layers import RelPosWindowAttention, window_relative_position_index
from piip_timm.original import from_original, translate_original_config
from piip_timm.rel_pos_resize import geometric_offsets, resize_rel_pos_table
from piip_timm.uniperceiver_branch import UniPerceiverBranchCfg
from piip_timm.variants import ALL_LEVELS, PRETRAINED

from conftest import REFERENCE_DIR
from helpers import benchmark_models, reference_rel_pos_resize


# --------------------------------------------------------------------------- BEiT table resize
@pytest.mark.parametrize('src, dst', [(27, 55), (27, 13), (13, 27), (27, 3)])
def test_table_resize_is_the_original_recipe(src, dst):
    table = torch.randn(src * src + 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(src + dst))
    ours = resize_rel_pos_table(table, dst)
    assert ours.shape == (dst * dst, 3)
    torch.testing.assert_close(ours, reference_rel_pos_resize(table, dst), rtol=0, atol=1e-10)


def test_geometric_warp_matches_the_original_numbers():
    x = geometric_offsets(27, 55)  # BEiTv2 at 224 (14x14 grid) to a window of 28
    assert len(x) == 27 and x[13] == 0.0 and x[14] == 1.0
    q = x[15] - x[14]
    assert q == pytest.approx(1.1144276, abs=1e-6)
    assert x[-1] == pytest.approx(26.99994, abs=1e-5) and x[0] == -x[-1]


def test_same_size_table_only_loses_its_class_rows_and_bad_shapes_are_refused():
    table = torch.randn(13 * 13 + 3, 2)
    assert torch.equal(resize_rel_pos_table(table, 13), table[:-3])
    with pytest.raises(ValueError, match='not a square grid'):
        resize_rel_pos_table(torch.randn(100, 2), 13)


# --------------------------------------------------------------------------- BEiT windowed attention
def test_relative_position_index_is_the_readme_formula():
    w = 3
    index = window_relative_position_index(w)
    for i in range(w * w):
        for j in range(w * w):
            (hi, wi), (hj, wj) = divmod(i, w), divmod(j, w)
            assert index[i, j] == (hi - hj + w - 1) * (2 * w - 1) + (wi - wj + w - 1)


def naive_windowed_attention(attn: RelPosWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The original's recipe, window by window in float64: zero-pad the normed tokens, q/k/v with q/v
    biases, softmax(q k^T / sqrt(d) + table[index]), crop, then proj."""
    batch, height, width, dim = x.shape
    w, heads = attn.window_size, attn.num_heads
    hd = dim // heads
    pad_h, pad_w = math.ceil(height / w) * w, math.ceil(width / w) * w
    padded = torch.zeros(batch, pad_h, pad_w, dim, dtype=torch.float64)
    padded[:, :height, :width] = x.double()
    wq, wk, wv = attn.qkv.weight.double().chunk(3)
    table = attn.relative_position_bias_table.double()
    out = torch.zeros_like(padded)
    for b in range(batch):
        for top in range(0, pad_h, w):
            for left in range(0, pad_w, w):
                tokens = padded[b, top:top + w, left:left + w].reshape(w * w, dim)
                q = tokens @ wq.T + attn.q_bias.double()
                k = tokens @ wk.T
                v = tokens @ wv.T + attn.v_bias.double()
                result = torch.zeros(w * w, dim, dtype=torch.float64)
                for h in range(heads):
                    cols = slice(h * hd, (h + 1) * hd)
                    logits = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
                    for i in range(w * w):
                        for j in range(w * w):
                            (hi, wi), (hj, wj) = divmod(i, w), divmod(j, w)
                            logits[i, j] += table[(hi - hj + w - 1) * (2 * w - 1) + (wi - wj + w - 1), h]
                    result[:, cols] = logits.softmax(-1) @ v[:, cols]
                out[b, top:top + w, left:left + w] = result.reshape(w, w, dim)
    return out[:, :height, :width] @ attn.proj.weight.double().T + attn.proj.bias.double()


def test_windowed_relative_position_attention_matches_the_original_recipe_on_a_padded_grid():
    torch.manual_seed(0)
    attn = RelPosWindowAttention(dim=8, num_heads=2, window_size=2).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_()
    x = torch.randn(2, 5, 3, 8)  # neither side a multiple of the window: padded bottom and right
    with torch.no_grad():
        ours = attn(x)
    torch.testing.assert_close(ours.double(), naive_windowed_attention(attn, x), rtol=0, atol=1e-5)


def test_original_beit_index_buffers_are_checked_and_dropped():
    index = window_relative_position_index(3)
    state = {'blocks.0.attn.relative_position_index': index, 'blocks.0.attn.q_bias': torch.zeros(4)}
    table = {'blocks.0.attn.relative_position_bias_table': torch.zeros(25, 2)}
    assert set(BeitBranch.original_state(dict(state, **table))) == {'blocks.0.attn.q_bias', *table}
    with pytest.raises(ValueError, match='not the relative position index'):
        BeitBranch.original_state(dict(table, **{'blocks.0.attn.relative_position_index': index.T.flip(0)}))
    assert BeitBranch.original_state({'blocks.0.gamma_1': torch.zeros(4)}) is None  # a ViT's keys: not BEiT's


def test_beit_branch_keeps_timm_beit_names_and_needs_windows():
    cfg = BeitBranchCfg(img_size=64, embed_dim=32, depth=2, num_heads=2, block_ranges=((0, 0), (1, 1)),
                        qkv_bias=True, init_values=1e-6, window_size=(2, 3))
    branch = cfg.build()
    assert isinstance(branch, timm.models.beit.Beit)
    keys = set(branch.state_dict())
    assert {'blocks.0.gamma_1', 'blocks.0.attn.q_bias', 'blocks.0.attn.v_bias', 'blocks.0.attn.qkv.weight'} <= keys
    assert branch.state_dict()['blocks.1.attn.relative_position_bias_table'].shape == (25, 2)
    assert not any('relative_position_index' in k or 'pos_embed' in k or 'cls_token' in k for k in keys)
    with pytest.raises(ValueError, match='window in every block'):
        replace(cfg, window_size=(2, None))


# --------------------------------------------------------------------------- Uni-Perceiver
def test_uniperceiver_branch_norms_use_eps_1e5_and_blocks_start_as_identities():
    """The reference cases cannot tell eps 1e-5 from 1e-6 (README): checked here."""
    cfg = UniPerceiverBranchCfg(img_size=64, embed_dim=32, depth=2, num_heads=2, block_ranges=((0, 0), (1, 1)),
                                pos_embed_grid=4)
    branch = cfg.build()
    norms = [m for m in branch.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * cfg.depth and all(m.eps == 1e-5 for m in norms)
    assert branch.temporal_pos_embed.shape == (8, 32) and branch.pos_embed.shape == (1, 16, 32)
    assert all(torch.count_nonzero(block.ls1.gamma) == 0 and torch.count_nonzero(block.ls2.gamma) == 0
               for block in branch.blocks)
    tokens = torch.randn(2, 4, 5, 32)
    with torch.no_grad():
        assert torch.equal(branch.blocks(tokens.flatten(1, 2)), tokens.flatten(1, 2))


# --------------------------------------------------------------------------- registered architectures
TAG_FOR_MANIFEST = {
    'det_beit_sbl_1568_1120_672': 'piip_sbl.coco_beitv2_1568_1120_672',
    'det_uniperceiver_sbl_1568_1120_672': 'piip_sbl.coco_uniperceiver_1568_1120_672',
    'det_dinov2_sbl_1568_1120_672': 'piip_sbl.coco_dinov2_1568_1120_672',
    'det_mae_sbl_1568_1120_672': 'piip_sbl.coco_mae_1568_1120_672',
    'det_augreg_sbl_1568_1120_672': 'piip_sbl.coco_augreg_1568_1120_672',
    'det_dino_deit384_sbl_1792_1120_672': 'piip_sbl.coco_dino_1792_1120_672',
    'det_dino_h6b_1024_768': 'piip_h6b.coco_dino_1024_768',
    **{f'seg_upernet_h6b_{s}_512': f'piip_h6b.ade20k_512_{s}' for s in (192, 256, 384, 512)},
}


def _tag(name):
    variant, tag = name.split('.')
    return PRETRAINED[variant][tag]


@pytest.mark.parametrize('manifest, name', TAG_FOR_MANIFEST.items(), ids=list(TAG_FOR_MANIFEST))
def test_registered_architecture_is_the_released_config(manifest, name):
    """Each released file's tag builds what the original config builds (layers, pyramid, returned levels)."""
    config = json.loads((REFERENCE_DIR / 'vit-families' / 'manifests' / f'{manifest}.json').read_text())
    kwargs, returned = translate_original_config(config['constructor_kwargs'], config['task'])
    arch = _tag(name).arch

    def normalized(b):
        return replace(b, window_size=b.block_windows())
    assert [normalized(b) for b in arch.branches] == [normalized(b) for b in kwargs['branches']]
    assert arch.interaction == kwargs['interaction']
    levels = arch.pyramid or ALL_LEVELS
    assert list(levels) == kwargs['pyramid']
    assert list(arch.out_indices or range(len(levels))) == returned


def test_dino_tags_return_the_three_levels_the_detector_uses():
    for name, reductions in (('piip_sbl.coco_dino_1792_1120_672', [8, 16, 32]),
                             ('piip_h6b.coco_dino_1024_768', [8, 16, 32])):
        with torch.device('meta'):
            model = timm.create_model(name, features_only=True)
        assert model.feature_info.reduction() == reductions, name


def test_beit_tables_are_excluded_from_weight_decay():
    config = json.loads((REFERENCE_DIR / 'vit-families' / 'cases' / 'det3_beit_sbl.json').read_text())
    model = from_original(config['constructor_kwargs'], 'det').model
    tables = {n for n, _ in model.named_parameters() if n.endswith('relative_position_bias_table')}
    assert len(tables) == 4 + 2 and tables <= model.no_weight_decay()


# (DINOv2's count equals AugReg's: the classification model replaces their pos-embed grids by the image grid.)
PAPER_METHOD = ['det_mae_sbl_1568_1120_672', 'det_augreg_sbl_1568_1120_672', 'det_dino_deit384_sbl_1792_1120_672',
                'seg_upernet_h6b_192_512']


@pytest.mark.parametrize('manifest', PAPER_METHOD)
def test_paper_method_parameter_counts_of_the_released_architectures(manifest):
    """classification/get_flops.py's count (the classification PIIP built from the config) of each tag's
    architecture, as the manifests record it; on the meta device."""
    expected = json.loads((REFERENCE_DIR / 'vit-families' / 'manifests' / f'{manifest}.json').read_text())
    with torch.device('meta'):
        model = benchmark_models().paper_method(_tag(TAG_FOR_MANIFEST[manifest]).arch)
    assert sum(p.numel() for p in model.parameters()) == expected['paper_method_params']


def test_create_piip_takes_a_timm_beit_as_a_windowed_branch():
    """A timm BEiT becomes a BEiT branch whose windows are its own grid (tables of the same size); the model runs."""
    from piip_timm import create_piip
    model = create_piip(['beitv2_base_patch16_224', 'deit_tiny_patch16_224'], img_sizes=(64, 128), num_classes=0,
                        model_kwargs=[dict(depth=2, embed_dim=64, num_heads=2), dict(depth=2)]).eval()
    beit = model.branches[0]
    assert isinstance(beit, timm.models.beit.Beit) and beit.cfg.block_windows() == (14, 14)
    assert beit.blocks[0].attn.relative_position_bias_table.shape == (27 * 27, 2)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 128, 128))
    assert out.shape == (1, 8 * 8, 64)


def test_fx_traces_beit_and_uniperceiver_branches_at_any_size():
    """One traced graph for every input size (BEiT's window padding is a single FX node), equal to eager."""
    from piip_timm import PIIP
    ranges = ((0, 0), (1, 1))
    branches = [
        BeitBranchCfg(img_size=64, embed_dim=64, depth=2, num_heads=2, block_ranges=ranges, window_size=3,
                      init_values=1e-6),
        UniPerceiverBranchCfg(img_size=96, embed_dim=32, depth=2, num_heads=2, block_ranges=ranges, pos_embed_grid=4),
    ]
    model = PIIP(branches, head='merged', merge='conv', num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial gammas everywhere (Uni-Perceiver's start at zero)
            p.add_(0.05 * torch.randn_like(p))
    graph = torch.fx.symbolic_trace(model)
    for size in ((96, 96), (101, 83)):  # grids the windows do not divide: padded
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
