"""The PIIP variants and their pretrained tags, declared once; timm's ``@register_model`` entry points.

Every registered name is a row of the paper: the NeurIPS 2024 ViT models (``piip_tsb``, ``piip_sbl``,
``piip_tsbl``, ``piip_lh6b``, ``piip_h6b``) and the TPAMI 2025 ConvNeXt / ViT-ConvNeXt detectors
(``piip_ct_cs_cb`` ... ``piip_vt_vs_cb``: the letters name the branches finest first, C for ConvNeXt,
V for ViT, T/S/B for the size). Any other mix of branches goes through the same entry points with
``branches=[...]``, or through ``piip_timm.PIIP`` / ``piip_timm.create_piip``.
"""
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .branch import BlockRanges, even_block_ranges
from .branch_kinds import BRANCH_KINDS, as_branch_cfg  # noqa: F401 (BRANCH_KINDS: its former home)
from .beit_branch import BeitBranchCfg
from .convert import checkpoint_filter_fn
from .convnext_branch import CONVNEXT_SIZES, ConvNeXtBranchCfg
from .hub import BranchSource, HubFile, check_hub_files, load_branch_state_dict
from .piip import PIIP, BranchSpec, HeadStyle, InteractionCfg, MergeStyle
from .uniperceiver_branch import UniPerceiverBranchCfg
from .vit_branch import BranchCfg
from .weights import allow_training_metadata, weight_file_error

__all__ = ['VARIANTS', 'PRETRAINED', 'VariantCfg', 'PretrainedTag', 'model_args', 'entry_point_name',
           'customize_branches']

# --------------------------------------------------------------------------- variants
# (embed_dim, depth, num_heads) of the ViT sizes PIIP combines.
VIT_SIZES = {
    'T': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'H': (1280, 32, 16),
    '6B': (3200, 48, 25),
}

# Branch families, as the original code configures them.
DEIT_CLS = dict(init_values=1.0, class_token=True)  # DeiT with layer scale 1.0 (ImageNet classifiers)
AUGREG_CLS = dict(class_token=True, pos_embed_class_slot=True)  # AugReg ViT (ImageNet classifiers)
DEIT_DET = dict(init_values=1.0, pos_embed_grid=14)  # DeiT / DeiT III at 224 (detectors)
INTERNVIT_6B = dict(
    qkv_bias=False, init_values=0.1, norm='rmsnorm', qk_norm=True, mlp_act='gelu_tanh', pos_embed_class_slot=True,
    pos_embed_grid=14, drop_path_schedule='linear')
MAE_H = dict(init_values=1.0, mlp_act='gelu_tanh', pos_embed_class_slot=True, pos_embed_grid=14,
             drop_path_schedule='linear')
DEIT3_L_384 = dict(init_values=1.0, mlp_act='gelu_tanh', pos_embed_grid=24)


def vit_branch(
        size: str,
        img_size: int,
        drop_path_rate: float,
        num_interactions: int,
        block_ranges: Optional[BlockRanges] = None,
        cfg_class: Type[BranchCfg] = BranchCfg,
        **kwargs,
) -> BranchCfg:
    """A branch of one of the standard ViT sizes (a ViT, or a ``cfg_class`` of the ViT family: BEiT,
    Uni-Perceiver), its blocks split evenly over the interactions by default."""
    embed_dim, depth, num_heads = VIT_SIZES[size]
    return cfg_class(
        img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        block_ranges=block_ranges or even_block_ranges(depth, num_interactions), drop_path_rate=drop_path_rate,
        **kwargs)


# Counted-layer ranges of the original's ConvNeXt branches (12 interactions): ConvNeXt-S/B (39 layers)
# and ConvNeXt-T (21); every stage change starts a range with its downsampling layer.
CONVNEXT_SB_RANGES = ((0, 2), (3, 6), (7, 10)) + tuple((i, i + 2) for i in range(11, 35, 3)) + ((35, 38),)
CONVNEXT_T_RANGES = ((0, 2), (3, 6), (7, 8)) + tuple((i, i) for i in range(9, 17)) + ((17, 20),)


def convnext_branch(size: str, img_size: int, drop_path_rate: float, **kwargs) -> ConvNeXtBranchCfg:
    """A ConvNeXt-T/S/B branch with the original's 12 interaction ranges."""
    dims, depths = CONVNEXT_SIZES[size]
    ranges = CONVNEXT_T_RANGES if size == 'T' else CONVNEXT_SB_RANGES
    return ConvNeXtBranchCfg(img_size=img_size, dims=dims, depths=depths, block_ranges=ranges,
                             drop_path_rate=drop_path_rate, **kwargs)


@dataclass(frozen=True)
class VariantCfg:
    """A PIIP architecture: branches, interactions, heads and dense outputs.

    No classifier builds a feature pyramid (it would get no gradient); ``features_only=True`` adds
    the detectors' merge and, with ``out_interactions`` (the regular-FPN detectors), the merges after
    those interactions, otherwise the simple pyramid.
    """
    branches: Tuple[BranchSpec, ...]
    interaction: InteractionCfg = InteractionCfg()
    head: HeadStyle = 'separate'
    merge: Optional[MergeStyle] = None
    out_interactions: Optional[Tuple[int, ...]] = None
    pyramid: Optional[Tuple[str, ...]] = None  # simple-pyramid levels features_only builds (default ALL_LEVELS)
    out_indices: Optional[Tuple[int, ...]] = None  # levels features_only returns (default all it builds)


ALL_LEVELS = ('up4', 'up2', 'same', 'down2')


def tsb_detector(sizes=(448, 896, 1120)) -> VariantCfg:
    """mmdetection/configs/piip/3branch/mask_rcnn_deit_tsb_*: DeiT III-B/S, DeiT-T, windows of 14."""
    return VariantCfg(branches=(
        vit_branch('B', sizes[0], 0.15, 12, window_size=14, **DEIT_DET),
        vit_branch('S', sizes[1], 0.05, 12, window_size=14, **DEIT_DET),
        vit_branch('T', sizes[2], 0.05, 12, window_size=14, **DEIT_DET),
    ), head='merged', merge='conv')


def sbl_detector(sizes=(448, 672, 1120)) -> VariantCfg:
    """mmdetection/configs/piip/3branch/mask_rcnn_deit_sbl_*: DeiT III-L/B/S, windows of 28."""
    return VariantCfg(branches=(
        vit_branch('L', sizes[0], 0.4, 12, window_size=28, **DEIT_DET),
        vit_branch('B', sizes[1], 0.15, 12, window_size=28, **DEIT_DET),
        vit_branch('S', sizes[2], 0.05, 12, window_size=28, **DEIT_DET),
    ), head='merged', merge='conv')


def tsbl_detector(sizes=(448, 672, 896, 1344), released: bool = False) -> VariantCfg:
    """mmdetection/configs/piip/4branch/*: DeiT III-L/B/S, DeiT-T, windows of 28.

    ``released``: the released checkpoints' fourth branch is a copy of the third (DeiT-S), because
    ``piip_4branch.py`` builds it as ``vit_models(**branch3)``.
    """
    finest = vit_branch('S', sizes[3], 0.05, 12, window_size=28, **DEIT_DET) if released else \
        vit_branch('T', sizes[3], 0.05, 12, window_size=28, **DEIT_DET)
    return VariantCfg(branches=(
        vit_branch('L', sizes[0], 0.4, 12, window_size=28, **DEIT_DET),
        vit_branch('B', sizes[1], 0.15, 12, window_size=28, **DEIT_DET),
        vit_branch('S', sizes[2], 0.05, 12, window_size=28, **DEIT_DET),
        finest,
    ), head='merged', merge='conv')


# Branches the original builds as its InternViT6B class (DINOv2, MAE, AugReg weights in SBL detectors):
# LayerNorm, qkv bias, layer scale 1.0 (trained even where the pretrained model had none) and a
# pos_embed class slot that is never used.
INTERNVIT_CLASS = dict(init_values=1.0, pos_embed_class_slot=True, drop_path_schedule='linear')
BEIT_DET = dict(cfg_class=BeitBranchCfg, init_values=1e-6)
UNIPERCEIVER_DET = dict(cfg_class=UniPerceiverBranchCfg, pos_embed_grid=14)

# Coarse-to-fine branch options of the SBL detectors of other pretrained families
# (mmdetection/configs/piip/3branch/mask_rcnn_{family}_sbl_1568_1120_672_*), and their drop-path rates.
SBL_FAMILIES = {
    'beitv2': ((BEIT_DET, BEIT_DET, DEIT_DET), (0.4, 0.15, 0.05)),
    'uniperceiver': ((UNIPERCEIVER_DET, UNIPERCEIVER_DET, DEIT_DET), (0.4, 0.15, 0.05)),
    'dinov2': ((dict(INTERNVIT_CLASS, pos_embed_grid=32),) * 3, (0.4, 0.3, 0.2)),
    'mae': ((dict(INTERNVIT_CLASS, pos_embed_grid=14),) * 2 + (DEIT_DET,), (0.4, 0.15, 0.05)),
    'augreg': ((dict(INTERNVIT_CLASS, pos_embed_grid=24),) * 3, (0.4, 0.3, 0.2)),
}


def sbl_family_detector(family: str) -> VariantCfg:
    """L/B/S branches of one pretrained family on 672/1120/1568 px, windows of 28 (DeiT III-S as the
    finest branch where the family has no small model)."""
    options, rates = SBL_FAMILIES[family]
    return VariantCfg(branches=tuple(
        vit_branch(size, img_size, rate, 12, window_size=28, **extra)
        for size, img_size, rate, extra in zip('LBS', (672, 1120, 1568), rates, options)), head='merged', merge='conv')


def dino_sbl_detector(sizes=(672, 1120, 1792)) -> VariantCfg:
    """mmdetection/configs/piip/3branch/dino_4scale_deit_384_sbl_*: DeiT III-L/B/S-384, windows of 24 in
    blocks i % 3 != 2. The original builds fpn1 but returns only the three finer levels."""
    def branch(size, img, rate):
        depth = VIT_SIZES[size][1]
        windows = tuple(None if i % 3 == 2 else 24 for i in range(depth))
        return vit_branch(size, img, rate, 12, window_size=windows, init_values=1.0, pos_embed_grid=24)
    return VariantCfg(branches=(branch('L', sizes[0], 0.4), branch('B', sizes[1], 0.15), branch('S', sizes[2], 0.05)),
                      head='merged', merge='conv', out_indices=(1, 2, 3))


H6B_RANGES_H = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 10), (11, 13), (14, 16), (17, 19), (20, 22), (23, 25),
                (26, 28), (29, 31))


def h6b_backbone(sizes: Tuple[int, int], mlp_act: str = 'gelu', task: str = 'det') -> VariantCfg:
    """InternViT-6B / MAE ViT-H, 12 interactions. task 'det': mmdet Mask R-CNN; 'dino': mmdet DINO (no fpn1,
    three levels); 'seg': mmseg UperNet (pos_embed at each branch's size, no interaction projections or norms)."""
    grids = (sizes[0] // 16, sizes[1] // 16) if task == 'seg' else (14, 14)
    branches = (
        vit_branch('6B', sizes[0], 0.4, 12, **{**INTERNVIT_6B, 'mlp_act': mlp_act, 'pos_embed_grid': grids[0]}),
        vit_branch('H', sizes[1], 0.4, 12, block_ranges=H6B_RANGES_H,
                   **{**MAE_H, 'mlp_act': mlp_act, 'pos_embed_grid': grids[1]}),
    )
    if task == 'seg':
        return VariantCfg(branches, InteractionCfg(project=False, norm=False), head='merged', merge='conv')
    pyramid = ('up2', 'same', 'down2') if task == 'dino' else None
    return VariantCfg(branches, head='merged', merge='conv', pyramid=pyramid)


# The ConvNeXt and ViT-ConvNeXt hybrid detectors' branches (mmdetection/configs/piip/convnext/*): letter
# C or V (ConvNeXt or DeiT-family ViT) and size, with the image and drop-path rate the configs give them.
HYBRID_BRANCHES = {
    'cb': lambda size: convnext_branch('B', size, 0.4),
    'cs': lambda size: convnext_branch('S', size, 0.3),
    'ct': lambda size: convnext_branch('T', size, 0.3),
    'vb': lambda size: vit_branch('B', size, 0.15, 12, window_size=14, **DEIT_DET),
    'vs': lambda size: vit_branch('S', size, 0.05, 12, window_size=14, **DEIT_DET),
    'vt': lambda size: vit_branch('T', size, 0.05, 12, window_size=14, **DEIT_DET),
}
HYBRID_NAMES = ('ct_cs_cb', 'ct_vs_vb', 'ct_cs_vb', 'ct_vs_cb', 'vt_cs_vb', 'vt_cs_cb', 'vt_vs_cb')


def hybrid_detector(name: str, sizes=(448, 672, 1024)) -> VariantCfg:
    """mmdetection/configs/piip/convnext/mask_rcnn_*_regular-fpn.py: ``name`` lists the branches finest
    first (``'ct_cs_cb'``: ConvNeXt-T on the 1024 px image, ConvNeXt-S on 672, ConvNeXt-B on 448);
    regular-FPN outputs after interactions 0, 1 and 10 and at the end."""
    kinds = tuple(reversed(name.split('_')))
    return VariantCfg(
        branches=tuple(HYBRID_BRANCHES[kind](size) for kind, size in zip(kinds, sizes)),
        head='merged', merge='single_conv', out_interactions=(0, 1, 10))


VARIANTS: Dict[str, VariantCfg] = {
    # ImageNet PIIP-TSB 368/192/128 (classification/configs/piip_3branch_tsb_368-192-128_cls_token_deit1.py)
    'piip_tsb': VariantCfg(branches=(
        vit_branch('B', 128, 0.2, 12, **DEIT_CLS),
        vit_branch('S', 192, 0.05, 12, **DEIT_CLS),
        vit_branch('T', 368, 0.05, 12, **DEIT_CLS),
    )),
    # ImageNet PIIP-SBL 384/192/128 (classification/configs/piip_3branch_sbl_384-192-128_cls_token_augreg.py)
    'piip_sbl': VariantCfg(branches=(
        vit_branch('L', 128, 0.4, 12, **AUGREG_CLS),
        vit_branch('B', 192, 0.2, 12, **AUGREG_CLS),
        vit_branch('S', 384, 0.05, 12, **AUGREG_CLS),
    )),
    # COCO PIIP-TSBL 1344/896/672/448 as the paper describes it (branch4 DeiT-T)
    'piip_tsbl': tsbl_detector(),
    # COCO PIIP-LH6B 1536/1024/512 (mmdetection/configs/piip/3branch/*_internvit_lh6b_1536_1024_512_*)
    'piip_lh6b': VariantCfg(
        branches=(
            vit_branch('6B', 512, 0.4, 4, **INTERNVIT_6B),
            vit_branch('H', 1024, 0.4, 4, **MAE_H),
            vit_branch('L', 1536, 0.4, 4, **DEIT3_L_384),
        ),
        interaction=InteractionCfg(project=False, norm=False),
        head='merged', merge='conv'),
    # COCO PIIP-H6B 1024/512 (mmdetection/configs/piip/2branch/mask_rcnn_internvit_h6b_1024_512_*)
    'piip_h6b': h6b_backbone((512, 1024)),
    # COCO ConvNeXt / ViT-ConvNeXt hybrids 1024/672/448 (TPAMI 2025)
    **{f'piip_{name}': hybrid_detector(name) for name in HYBRID_NAMES},
}

# Weights of the branches' own pretrained models (how the paper starts every run).
DEIT_IN1K = ('deit_base_patch16_224.fb_in1k', 'deit_small_patch16_224.fb_in1k', 'deit_tiny_patch16_224.fb_in1k')
AUGREG = ('vit_large_patch16_224.augreg_in21k_ft_in1k', 'vit_base_patch16_224.augreg_in21k_ft_in1k',
          'vit_small_patch16_224.augreg_in21k_ft_in1k')
DEIT3_L, DEIT3_B, DEIT3_S = ('deit3_large_patch16_224.fb_in22k_ft_in1k', 'deit3_base_patch16_224.fb_in22k_ft_in1k',
                             'deit3_small_patch16_224.fb_in22k_ft_in1k')
DEIT_T = 'deit_tiny_patch16_224.fb_in1k'
BEITV2 = ('beitv2_large_patch16_224.in1k_ft_in22k', 'beitv2_base_patch16_224.in1k_ft_in22k')
DINOV2 = ('vit_large_patch14_dinov2.lvd142m', 'vit_base_patch14_dinov2.lvd142m', 'vit_small_patch14_dinov2.lvd142m')
MAE = ('vit_large_patch16_224.mae', 'vit_base_patch16_224.mae')
AUGREG_384 = ('vit_large_patch16_384.augreg_in21k_ft_in1k', 'vit_base_patch16_384.augreg_in21k_ft_in1k',
              'vit_small_patch16_384.augreg_in21k_ft_in1k')
DEIT3_384 = ('deit3_large_patch16_384.fb_in22k_ft_in1k', 'deit3_base_patch16_384.fb_in22k_ft_in1k',
             'deit3_small_patch16_384.fb_in22k_ft_in1k')
INTERNVIT_6B_REPO = 'OpenGVLab/InternViT-6B-224px'
MAE_H_TIMM = 'vit_huge_patch14_224.mae'
DEIT3_L_384_TIMM = 'deit3_large_patch16_384.fb_in22k_ft_in1k'
# The weights behind the original's facebook/convnext-*-224 (ImageNet-1k) and its DeiT (III) files.
HYBRID_BRANCH_WEIGHTS = {'ct': 'convnext_tiny.fb_in1k', 'cs': 'convnext_small.fb_in1k', 'cb': 'convnext_base.fb_in1k',
                         'vt': DEIT_T, 'vs': DEIT3_S, 'vb': DEIT3_B}


@dataclass(frozen=True)
class PretrainedTag:
    """One pretrained tag: its architecture, and either a released PIIP file or per-branch sources."""
    arch: VariantCfg
    file: Optional[str] = None  # in OpenGVLab/PIIP
    branch_sources: Tuple[BranchSource, ...] = ()
    notes: str = ''

    @property
    def is_classifier(self) -> bool:
        return self.file is not None and self.file.startswith('classification/')


def _timm(*names: str) -> Tuple[BranchSource, ...]:
    return tuple(BranchSource(timm_model=n) for n in names)


def _coco(kind: str, sizes: Sequence[int]) -> str:
    levels = '_'.join(str(s) for s in reversed(sizes))
    return f'detection/mask_rcnn_{kind}_{levels}_fpn_1x_coco_bs16.pth'


PIIP_REPO = 'OpenGVLab/PIIP'
# variant -> tag -> weights. The first tag of a variant is what pretrained=True gives.
PRETRAINED: Dict[str, Dict[str, PretrainedTag]] = {
    'piip_tsb': {
        'in1k': PretrainedTag(VARIANTS['piip_tsb'], 'classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth',
                              notes='ImageNet-1k classifier, 82.1% top-1'),
        'deit_in1k': PretrainedTag(VARIANTS['piip_tsb'], branch_sources=_timm(*DEIT_IN1K),
                                   notes='DeiT-B/S/T branches; interactions and heads fresh'),
        **{f'coco_{sizes[2]}_{sizes[1]}_{sizes[0]}': PretrainedTag(
            tsb_detector(sizes), _coco('deit_tsb', sizes), notes='COCO Mask R-CNN 1x backbone')
           for sizes in ((448, 896, 1120), (448, 896, 1568), (672, 1120, 1568))},
        'deit3_in22k': PretrainedTag(tsb_detector(), branch_sources=_timm(DEIT3_B, DEIT3_S, DEIT_T),
                                     notes='detector start: DeiT III-B/S, DeiT-T branches; the rest fresh'),
    },
    'piip_sbl': {
        'in1k': PretrainedTag(VARIANTS['piip_sbl'], 'classification/piip_3branch_sbl_384-192-128_cls_token_augreg.pth',
                              notes='ImageNet-1k classifier, 85.9% top-1'),
        'in1k_320': PretrainedTag(
            VariantCfg(branches=tuple(replace(b, img_size=s) for b, s in zip(VARIANTS['piip_sbl'].branches,
                                                                               (96, 160, 320)))),
            'classification/piip_3branch_sbl_320-160-96_cls_token_augreg.pth', notes='ImageNet-1k classifier, 85.2%'),
        'augreg_in21k_ft_in1k': PretrainedTag(VARIANTS['piip_sbl'], branch_sources=_timm(*AUGREG),
                                              notes='AugReg ViT-L/B/S branches; interactions and heads fresh'),
        **{f'coco_{sizes[2]}_{sizes[1]}_{sizes[0]}': PretrainedTag(
            sbl_detector(sizes), _coco('deit_sbl', sizes), notes='COCO Mask R-CNN 1x backbone')
           for sizes in ((448, 672, 1120), (448, 896, 1344), (672, 896, 1568), (672, 1120, 1568))},
        'deit3_in22k': PretrainedTag(sbl_detector(), branch_sources=_timm(DEIT3_L, DEIT3_B, DEIT3_S),
                                     notes='detector start: DeiT III-L/B/S branches; the rest fresh'),
        **{f'coco_{family}_1568_1120_672': PretrainedTag(
            sbl_family_detector(family), _coco(f'{file_kind}_sbl', (672, 1120, 1568)),
            notes=f'COCO Mask R-CNN 1x backbone, {branches} branches, {scores}')
           for family, file_kind, branches, scores in (
               ('beitv2', 'beit', 'BEiTv2-L/B, DeiT III-S', '51.8 box / 45.4 mask AP'),
               ('uniperceiver', 'uniperceiver', 'Uni-Perceiver-L/B, DeiT III-S', '48.8 box / 42.9 mask AP'),
               ('dinov2', 'dinov2', 'DINOv2-L/B/S', '51.0 box / 44.7 mask AP'),
               ('mae', 'mae', 'MAE-L/B, DeiT III-S', '49.1 box / 43.0 mask AP'),
               ('augreg', 'augreg', 'AugReg-384 L/B/S', '48.3 box / 42.6 mask AP'))},
        'coco_dino_1792_1120_672': PretrainedTag(
            dino_sbl_detector(), 'detection/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.pth',
            notes='COCO DINO 4-scale 3x backbone, DeiT III-L/B/S-384 branches, 57.8 box AP'),
        'beitv2_in22k': PretrainedTag(sbl_family_detector('beitv2'), branch_sources=_timm(*BEITV2, DEIT3_S),
                                      notes='detector start: BEiTv2-L/B, DeiT III-S branches; the rest fresh'),
        'dinov2_lvd142m': PretrainedTag(sbl_family_detector('dinov2'), branch_sources=_timm(*DINOV2),
                                        notes='detector start: DINOv2-L/B/S branches; the rest fresh'),
        'mae_in1k': PretrainedTag(sbl_family_detector('mae'), branch_sources=_timm(*MAE, DEIT3_S),
                                  notes='detector start: MAE-L/B, DeiT III-S branches; the rest fresh'),
        'augreg384_in21k_ft_in1k': PretrainedTag(sbl_family_detector('augreg'), branch_sources=_timm(*AUGREG_384),
                                                 notes='detector start: AugReg-384 L/B/S branches; the rest fresh'),
        'deit3_384_in22k': PretrainedTag(dino_sbl_detector(), branch_sources=_timm(*DEIT3_384),
                                         notes='DINO detector start: DeiT III-L/B/S-384 branches; the rest fresh'),
    },
    'piip_tsbl': {
        'deit3_in22k': PretrainedTag(VARIANTS['piip_tsbl'], branch_sources=_timm(DEIT3_L, DEIT3_B, DEIT3_S, DEIT_T),
                                     notes='DeiT III-L/B/S, DeiT-T branches; the rest fresh'),
        **{f'coco_{sizes[3]}_{sizes[2]}_{sizes[1]}_{sizes[0]}': PretrainedTag(
            tsbl_detector(sizes, released=True), _coco('deit_tsbl', sizes),
            notes='COCO Mask R-CNN 1x backbone (fourth branch: a DeiT-S copy, as released)')
           for sizes in ((448, 672, 896, 1344), (448, 672, 1120, 1568), (448, 1120, 1568, 1792))},
    },
    'piip_lh6b': {
        'branches': PretrainedTag(VARIANTS['piip_lh6b'], branch_sources=(
            BranchSource(internvit_repo=INTERNVIT_6B_REPO), BranchSource(timm_model=MAE_H_TIMM),
            BranchSource(timm_model=DEIT3_L_384_TIMM)),
            notes='InternViT-6B, MAE ViT-H, DeiT III-L-384 branches; the rest fresh'),
    },
    'piip_h6b': {
        'coco_1024_512': PretrainedTag(
            VARIANTS['piip_h6b'], 'detection/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms.pth',
            notes='COCO Mask R-CNN 1x backbone'),
        'branches': PretrainedTag(VARIANTS['piip_h6b'], branch_sources=(
            BranchSource(internvit_repo=INTERNVIT_6B_REPO), BranchSource(timm_model=MAE_H_TIMM)),
            notes='InternViT-6B, MAE ViT-H branches; the rest fresh'),
        'coco_dino_1024_768': PretrainedTag(
            h6b_backbone((768, 1024), task='dino'), 'detection/dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms.pth',
            notes='COCO DINO 4-scale 1x backbone, 60.0 box AP'),
        **{f'ade20k_512_{size}': PretrainedTag(
            h6b_backbone((size, 512), 'gelu_tanh', task='seg'),
            f'segmentation/upernet_internvit_h6b_{size}_512_80k_ade20k_bs16_lr4e-5.pth',
            notes=f'ADE20K UperNet 80k backbone (512x512 input), {miou} mIoU')
           for size, miou in ((192, 57.81), (256, 58.35), (384, 59.32), (512, 59.85))},
    },
    **{f'piip_{name}': {
        **({'coco_1024_672_448': PretrainedTag(
            VARIANTS['piip_ct_cs_cb'], 'detection/mask_rcnn_convnext-tsb_1024_672_448_regular-fpn.pth',
            notes='COCO Mask R-CNN 1x backbone (regular FPN), 46.4 box AP')} if name == 'ct_cs_cb' else {}),
        'branches': PretrainedTag(
            VARIANTS[f'piip_{name}'], branch_sources=_timm(*(HYBRID_BRANCH_WEIGHTS[k] for k in reversed(name.split('_')))),
            notes='ConvNeXt (ImageNet-1k) / DeiT (III) branches; the rest fresh'),
    } for name in HYBRID_NAMES},
}


def _per_branch(value: Any, count: int, name: str) -> List[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f'{name} needs one value per branch ({count}), got {len(value)}.')
        return list(value)
    return [value] * count


def customize_branches(
        branches: Sequence[BranchSpec],
        img_size: Union[None, int, Sequence[int]] = None,
        window_size: Union[None, int, Sequence[Optional[int]]] = -1,
        drop_path_rate: Optional[float] = None,
) -> Tuple[BranchSpec, ...]:
    """Branches with user choices applied.

    ``img_size``: the finest branch's size (the others keep their ratios) or one size per branch.
    ``window_size``: window side for every ViT block (None: global attention), or one per branch (None for
    ConvNeXt branches); -1 keeps the branches'. ``drop_path_rate``: the same rate for every branch.
    """
    branches = tuple(branches)
    if img_size is not None:
        if isinstance(img_size, (list, tuple)) and len(img_size) == 2 and len(branches) != 2 \
                and img_size[0] == img_size[1]:
            img_size = img_size[0]  # timm passes (H, W) from pretrained_cfg input_size
        if isinstance(img_size, (list, tuple)):
            sizes = _per_branch(img_size, len(branches), 'img_size')
        else:
            sizes = [round(b.img_size * img_size / branches[-1].img_size) for b in branches]
        too_small = [(s, b.min_img_size) for s, b in zip(sizes, branches) if s < b.min_img_size]
        if too_small:
            raise ValueError(f'img_size {img_size} gives branch sizes {sizes}; a branch needs at least its stride '
                             f'(got {too_small[0][0]} for a {too_small[0][1]}px stride).')
        branches = tuple(replace(b, img_size=int(s)) for b, s in zip(branches, sizes))
    if window_size != -1:
        windows = _per_branch(window_size, len(branches), 'window_size')
        windowed = []
        for i, (b, w) in enumerate(zip(branches, windows)):
            if 'window_size' in {f.name for f in fields(b)}:
                b = replace(b, window_size=w)
            elif w is not None and isinstance(window_size, (list, tuple)):
                raise ValueError(f'branch {i} is a {b.kind} branch, which has no attention windows; give None for it.')
            windowed.append(b)
        branches = tuple(windowed)
    if drop_path_rate is not None:
        branches = tuple(replace(b, drop_path_rate=drop_path_rate) for b in branches)
    return branches


def model_args(model: 'PIIP') -> Dict[str, Any]:
    """JSON-serialisable constructor arguments that rebuild ``model`` through any piip_* entry point
    (``timm.create_model(entry_point_name(model), **model_args(model))``)."""
    return dict(
        branches=[asdict(b) for b in model.branch_cfgs],
        interaction=asdict(model.interaction_cfg),
        head=model.head_style,
        merge=model.merge_style,
        pyramid=list(model.pyramid.level_names) if model.out_interactions is None and model.pyramid is not None
        else None,
        out_interactions=list(model.out_interactions) if model.out_interactions is not None else None,
        global_pool=model.global_pool,
    )


def entry_point_name(model: 'PIIP') -> str:
    """The registered variant whose branch widths ``model`` has (``piip_tsb`` if none): the architecture
    name a converted checkpoint's config.json gives timm; its ``model_args`` carry the whole architecture."""
    for name, variant in VARIANTS.items():
        if tuple((b.kind, b.final_width) for b in variant.branches) == \
                tuple((b.kind, w) for b, w in zip(model.branch_cfgs, model.embed_dims)):
            return name
    return 'piip_tsb'


def requested_tag(kwargs: Mapping[str, Any], tags: Mapping[str, Any]) -> Optional[str]:
    """The pretrained tag a create_model call names (the first of ``tags`` by default)."""
    cfg = kwargs.get('pretrained_cfg')
    if isinstance(cfg, str):
        return cfg
    if cfg is not None:
        return cfg.get('tag') if isinstance(cfg, Mapping) else getattr(cfg, 'tag', None)
    return next(iter(tags), None)


def _resolve_tag(variant: str, kwargs: Dict[str, Any]) -> Tuple[Optional[str], Optional[PretrainedTag]]:
    """The pretrained tag a create_model call refers to (the variant's first tag by default)."""
    tags = PRETRAINED.get(variant, {})
    tag = requested_tag(kwargs, tags)
    return tag, tags.get(tag)


def _create_piip(variant: str, pretrained: bool = False, **kwargs) -> PIIP:
    tag, weights = _resolve_tag(variant, kwargs)
    spec = weights.arch if weights else VARIANTS.get(variant)
    branches = kwargs.pop('branches', None) or (spec.branches if spec else None)
    if branches is None:
        raise ValueError(f'{variant} needs branches=[...] (a list of BranchCfg / ConvNeXtBranchCfg or their dicts).')
    branches = customize_branches(
        [as_branch_cfg(b) for b in branches],
        kwargs.pop('img_size', None), kwargs.pop('window_size', -1), kwargs.pop('drop_path_rate', None))
    interaction = kwargs.pop('interaction', spec.interaction if spec else InteractionCfg())
    if isinstance(interaction, Mapping):
        interaction = InteractionCfg(**interaction)
    head = kwargs.pop('head', spec.head if spec else 'merged')
    merge = kwargs.pop('merge', spec.merge if spec else None)
    pyramid = kwargs.pop('pyramid', None)
    out_interactions = kwargs.pop('out_interactions', None)
    out_indices = None
    if kwargs.get('features_only'):
        # The dense path needs merged maps: the regular-FPN detectors' merges after chosen interactions,
        # or the simple pyramid on the final merge (classifiers get the detectors' conv merge); a
        # variant's own levels (the DINO detectors return three of them) unless others are asked for.
        if out_interactions is None and pyramid is None and spec is not None:
            out_interactions, pyramid, out_indices = spec.out_interactions, spec.pyramid, spec.out_indices
        merge = merge or 'conv'
        if out_interactions is None:
            pyramid = pyramid or ALL_LEVELS
    if head == 'merged' and weights is not None and not weights.is_classifier and not weights.branch_sources:
        # Detector backbones: no classifier unless asked for one.
        head = 'merged' if kwargs.get('num_classes') else None
        kwargs.setdefault('num_classes', 0)

    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if pretrained and not any(overlay.get(k) for k in ('file', 'state_dict', 'url')):
        if weights is not None and weights.branch_sources:
            check_hub_files([f for s in weights.branch_sources for f in s.hub_files()])
            assembled = {}
            for i, source in enumerate(weights.branch_sources):
                assembled.update({f'branches.{i}.{k}': v for k, v in load_branch_state_dict(source).items()})
            kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=assembled)
        else:
            cfg = kwargs.get('pretrained_cfg')
            repo = (cfg.get('hf_hub_id') if isinstance(cfg, Mapping) else None) or (
                PIIP_REPO if weights is not None and weights.file else None)
            if repo:
                filename = weights.file if weights is not None and weights.file else 'model.safetensors'
                check_hub_files([HubFile(repo, filename)])
    try:
        with allow_training_metadata():
            model = build_model_with_cfg(
                PIIP, variant, pretrained,
                pretrained_filter_fn=checkpoint_filter_fn,
                feature_cfg=dict(feature_cls='getter', out_indices=out_indices or tuple(range(
                    len(out_interactions) + 1 if out_interactions is not None else len(pyramid or ())))),
                branches=branches, interaction=interaction, head=head, merge=merge, pyramid=pyramid,
                out_interactions=out_interactions,
                **kwargs,
            )
    except Exception as e:
        raise _weights_error(e, variant, overlay, weights, kwargs) or e
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
        cfg['state_dict'] = None  # do not keep a second copy of the weights alive
    return model


def _weights_error(
        error: Exception,
        variant: str,
        overlay: Mapping[str, Any],
        weights: Optional[PretrainedTag],
        kwargs: Mapping[str, Any],
) -> Optional[Exception]:
    """A clear error for an unreadable or refused weight file, naming where it came from (None for anything else)."""
    cfg = kwargs.get('pretrained_cfg')
    where = overlay.get('file') or overlay.get('hf_hub_id') or (
        cfg.get('hf_hub_id') if isinstance(cfg, Mapping) else None) or (
        f'{PIIP_REPO}/{weights.file}' if weights is not None and weights.file else variant)
    return weight_file_error(error, where)


def _cfg(arch: VariantCfg, **kwargs) -> Dict[str, Any]:
    size = arch.branches[-1].img_size
    cfg = dict(
        url='', num_classes=1000, input_size=(3, size, size), pool_size=None, crop_pct=1.0,
        interpolation='bicubic', fixed_input_size=False,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv=tuple(f'branches.{i}.{b.first_conv}' for i, b in enumerate(arch.branches)),
        classifier=tuple(f'head.{i}' for i in range(len(arch.branches))) if arch.head == 'separate' else 'head',
        license='mit', paper_ids='arXiv:2406.04330, arXiv:2501.07783',
    )
    cfg.update(kwargs)
    return cfg


def _tag_cfg(tag: PretrainedTag) -> Dict[str, Any]:
    if tag.file:
        extra = dict(hf_hub_id=PIIP_REPO, hf_hub_filename=tag.file, notes=tag.notes)
        if not tag.is_classifier:
            extra.update(num_classes=0, classifier=None)
        return _cfg(tag.arch, **extra)
    sources = ', '.join(str(s) for s in tag.branch_sources)
    return _cfg(tag.arch, notes=f'{tag.notes} (from {sources})')


default_cfgs = generate_default_cfgs({
    f'{variant}.{name}': _tag_cfg(tag) for variant, tags in PRETRAINED.items() for name, tag in tags.items()
})
for _variant, _tags in PRETRAINED.items():
    # The first tag is the default even when its weights are assembled from branch repos (timm would
    # otherwise prefer the first tag with a single weight file).
    default_cfgs[_variant].tags.remove(next(iter(_tags)))
    default_cfgs[_variant].tags.appendleft(next(iter(_tags)))


@register_model
def piip_tsb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSB: DeiT-B/S/T on 128/192/368 px (ImageNet); COCO tags: the detectors' configuration."""
    return _create_piip('piip_tsb', pretrained=pretrained, **kwargs)


@register_model
def piip_sbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-SBL: AugReg ViT-L/B/S on 128/192/384 px (ImageNet); COCO tags: DeiT III-L/B/S detectors."""
    return _create_piip('piip_sbl', pretrained=pretrained, **kwargs)


@register_model
def piip_tsbl(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-TSBL: DeiT III-L/B/S and DeiT-T on 448/672/896/1344 px (COCO configuration, windows of 28)."""
    return _create_piip('piip_tsbl', pretrained=pretrained, **kwargs)


@register_model
def piip_lh6b(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-LH6B: InternViT-6B / MAE ViT-H / DeiT III-L-384 on 512/1024/1536 px (COCO configuration)."""
    return _create_piip('piip_lh6b', pretrained=pretrained, **kwargs)


@register_model
def piip_h6b(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-H6B: InternViT-6B / MAE ViT-H on 512/1024 px (COCO configuration)."""
    return _create_piip('piip_h6b', pretrained=pretrained, **kwargs)




@register_model
def piip_ct_cs_cb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-CS-CB: ConvNeXt-T / S / B on 1024/672/448 px; default tag: the released COCO backbone (COCO regular-FPN configuration)."""
    return _create_piip('piip_ct_cs_cb', pretrained=pretrained, **kwargs)


@register_model
def piip_ct_vs_vb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-VS-VB: ConvNeXt-T, DeiT III-S / B on 1024/672/448 px (COCO regular-FPN configuration)."""
    return _create_piip('piip_ct_vs_vb', pretrained=pretrained, **kwargs)


@register_model
def piip_ct_cs_vb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-CS-VB: ConvNeXt-T / S, DeiT III-B on 1024/672/448 px (COCO regular-FPN configuration)."""
    return _create_piip('piip_ct_cs_vb', pretrained=pretrained, **kwargs)


@register_model
def piip_ct_vs_cb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-CT-VS-CB: ConvNeXt-T, DeiT III-S, ConvNeXt-B on 1024/672/448 px (COCO regular-FPN configuration)."""
    return _create_piip('piip_ct_vs_cb', pretrained=pretrained, **kwargs)


@register_model
def piip_vt_cs_vb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-VT-CS-VB: DeiT-T, ConvNeXt-S, DeiT III-B on 1024/672/448 px (COCO regular-FPN configuration)."""
    return _create_piip('piip_vt_cs_vb', pretrained=pretrained, **kwargs)


@register_model
def piip_vt_cs_cb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-VT-CS-CB: DeiT-T, ConvNeXt-S / B on 1024/672/448 px (COCO regular-FPN configuration)."""
    return _create_piip('piip_vt_cs_cb', pretrained=pretrained, **kwargs)


@register_model
def piip_vt_vs_cb(pretrained: bool = False, **kwargs) -> PIIP:
    """PIIP-VT-VS-CB: DeiT-T, DeiT III-S, ConvNeXt-B on 1024/672/448 px (COCO regular-FPN configuration)."""
    return _create_piip('piip_vt_vs_cb', pretrained=pretrained, **kwargs)
