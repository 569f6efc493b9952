"""The models the benchmarks compare: PIIP configurations and the paper's single-branch baselines."""
from dataclasses import replace
from functools import partial
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import timm
import torch
from torch import nn

from piip_timm.layers import SimpleFeaturePyramid
from piip_timm.piip import PIIP, BranchCfg, build_branch, even_block_ranges
from piip_timm.variants import (ALL_LEVELS, VARIANTS, VariantCfg, h6b_backbone, hybrid_detector, sbl_detector,
                                tsb_detector, tsbl_detector)
from timm.layers import resample_abs_pos_embed


class PaperRow(NamedTuple):
    """A row of the paper's cost tables (OpenGVLab/PIIP README): what to build and the published figures."""
    name: str
    build: Callable[[], nn.Module]  # the model the paper counted
    input_size: int
    paper_params_m: Optional[float]  # None: the paper gives no parameter count for the row
    paper_gmacs: float


def piip_inside(model: nn.Module) -> PIIP:
    """The PIIP model itself, also when a benchmark wrapper (``MergedMaps``, ``DenseOutput``) holds it."""
    return getattr(model, 'model', model)


class MergedMaps(nn.Module):
    """forward(x) -> the merged maps of a regular-FPN PIIP detector, before its output levels: what
    mmdetection/get_flops_det.py counts (``cal_flops`` returns after the merges)."""

    def __init__(self, model: PIIP):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_merged(x)


def regular_fpn_detector(name: str) -> MergedMaps:
    """A ConvNeXt / hybrid detector backbone (``piip_ct_cs_cb`` ...) as the paper counted it."""
    arch = VARIANTS[name]
    return MergedMaps(PIIP(arch.branches, arch.interaction, head=None, merge=arch.merge,
                           out_interactions=arch.out_interactions, num_classes=0))


class ConvNeXtBaseline(nn.Module):
    """timm's ConvNeXt (no classifier) returning its four stage maps: the paper's single-branch ConvNeXt
    detector backbone (ConvNextHFWrapper, single_branch, regular FPN)."""

    def __init__(self, name: str = 'convnext_base'):
        super().__init__()
        self.convnext = timm.create_model(name, num_classes=0)

    def forward(self, x):
        return self.convnext.forward_intermediates(x, intermediates_only=True)


def paper_method(arch: VariantCfg) -> PIIP:
    """What classification/get_flops.py counts for a detection config: the classification PIIP built from it
    (pos_embed at the image grid, no class token, GroupNorm/Linear merge, a 1000-class head)."""
    branches = [replace(b, pos_embed_grid=None, class_token=False) for b in arch.branches]
    return PIIP(branches, arch.interaction, head='merged', merge='linear', num_classes=1000)


def vitdet_windows(depth: int) -> Tuple:
    """The baselines' windowed attention: windows of 14 except every third block (global)."""
    return tuple(None if i % 3 == 2 else 14 for i in range(depth))


def vit_branch_cfg(size: str, img_size: int, pos_grid=None, windows=None) -> BranchCfg:
    dims = {'B': (768, 12, 12), 'L': (1024, 24, 16)}[size]
    return BranchCfg(img_size=img_size, embed_dim=dims[0], depth=dims[1], num_heads=dims[2],
                     block_ranges=even_block_ranges(dims[1], 1), init_values=1.0, pos_embed_grid=pos_grid,
                     window_size=windows)


class SingleViT(nn.Module):
    """A single-branch ViT (timm blocks) with ViTDet windows, a final feature map and, optionally,
    the same simple feature pyramid PIIP's detectors use: the paper's ViT-B / ViT-L baselines."""

    def __init__(self, size: str, img_size: int = 1024, pyramid: bool = True, classifier: bool = False):
        super().__init__()
        depth = {'B': 12, 'L': 24}[size]
        self.cfg = vit_branch_cfg(size, img_size, None if classifier else 14, vitdet_windows(depth))
        self.vit = build_branch(self.cfg, final_norm=classifier)
        self.head = nn.Linear(self.cfg.embed_dim, 1000) if classifier else None
        self.pyramid = SimpleFeaturePyramid(self.cfg.embed_dim, ALL_LEVELS) if pyramid else None

    def forward(self, x: torch.Tensor):
        tokens = self.vit.patch_embed.proj(x)
        batch, channels, height, width = tokens.shape
        grid = self.cfg.grid
        pos = resample_abs_pos_embed(self.vit.pos_embed, (height, width), (grid, grid), 0, antialias=False)
        tokens = tokens.flatten(2).transpose(1, 2).contiguous() + pos  # (B, N, C) memory, as PIIP's branches
        for block in self.vit.blocks:
            if getattr(block.attn, 'window_size', None):
                tokens = block(tokens.view(batch, height, width, channels)).flatten(1, 2)
            else:
                tokens = block(tokens)
        if self.head is not None:
            return self.head(self.vit.norm(tokens).mean(1))
        fmap = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.pyramid(fmap, range(4)) if self.pyramid is not None else fmap


def internvit_6b_baseline() -> nn.Module:
    """InternViT-6B at 1024 px as get_flops.py counts it (classification model, global attention)."""
    cfg = replace(VARIANTS['piip_lh6b'].branches[0], img_size=1024, pos_embed_grid=None,
                  block_ranges=even_block_ranges(48, 1))
    return _Classifier(cfg)


class _Classifier(nn.Module):
    def __init__(self, cfg: BranchCfg):
        super().__init__()
        self.cfg = cfg
        self.vit = build_branch(cfg, final_norm=True)
        self.head = nn.Linear(cfg.embed_dim, 1000)

    def forward(self, x):
        tokens = self.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.vit.pos_embed[:, 1:] if self.cfg.pos_embed_class_slot else tokens + self.vit.pos_embed
        for block in self.vit.blocks:
            tokens = block(tokens)
        return self.head(self.vit.norm(tokens).mean(1))


def imagenet_variant(name: str, sizes: Sequence[int]) -> PIIP:
    spec = VARIANTS[name]
    branches = [replace(b, img_size=s) for b, s in zip(spec.branches, sizes)]
    return PIIP(branches, spec.interaction, head=spec.head, merge=spec.merge, num_classes=1000)


def h6b_paper() -> PIIP:
    return paper_method(VARIANTS['piip_h6b'])


def paper_rows() -> List[PaperRow]:
    """Every configuration of the paper's ImageNet, COCO and ADE20K tables (OpenGVLab/PIIP README)."""
    return [
        PaperRow('PIIP-TSB 368/192/128 (ImageNet)', lambda: imagenet_variant('piip_tsb', (128, 192, 368)), 368, 144, 17.4),
        PaperRow('PIIP-SBL 320/160/96 (ImageNet)', lambda: imagenet_variant('piip_sbl', (96, 160, 320)), 320, 489, 39.0),
        PaperRow('PIIP-SBL 384/192/128 (ImageNet)', lambda: imagenet_variant('piip_sbl', (128, 192, 384)), 384, 489, 61.2),
        PaperRow('ViT-B 1024 (COCO)', lambda: SingleViT('B', 1024, pyramid=False, classifier=True), 1024, 90, 463),
        PaperRow('PIIP-TSB 1120/896/448 (COCO)', lambda: paper_method(tsb_detector((448, 896, 1120))), 1120, 146, 243),
        PaperRow('PIIP-TSB 1568/896/448 (COCO)', lambda: paper_method(tsb_detector((448, 896, 1568))), 1568, 147, 287),
        PaperRow('PIIP-TSB 1568/1120/672 (COCO)', lambda: paper_method(tsb_detector((672, 1120, 1568))), 1568, 149, 453),
        PaperRow('ViT-L 1024 (COCO)', lambda: SingleViT('L', 1024, pyramid=False, classifier=True), 1024, 308, 1542),
        PaperRow('PIIP-SBL 1120/672/448 (COCO)', lambda: paper_method(sbl_detector((448, 672, 1120))), 1120, 493, 727),
        PaperRow('PIIP-SBL 1344/896/448 (COCO)', lambda: paper_method(sbl_detector((448, 896, 1344))), 1344, 495, 1002),
        PaperRow('PIIP-SBL 1568/896/672 (COCO)', lambda: paper_method(sbl_detector((672, 896, 1568))), 1568, 497, 1464),
        PaperRow('PIIP-TSBL 1344/896/672/448 (COCO)', lambda: paper_method(tsbl_detector((448, 672, 896, 1344))), 1344, 506, 755),
        PaperRow('PIIP-TSBL 1568/1120/672/448 (COCO)', lambda: paper_method(tsbl_detector((448, 672, 1120, 1568))), 1568, 507, 861),
        PaperRow('PIIP-TSBL 1792/1568/1120/448 (COCO)', lambda: paper_method(tsbl_detector((448, 1120, 1568, 1792))), 1792, 512, 1535),
        PaperRow('InternViT-6B 1024 (COCO)', internvit_6b_baseline, 1024, 5919, 29323),
        PaperRow('PIIP-H6B 1024/512 (COCO)', h6b_paper, 1024, 6872, 11080),
        # ConvNeXt-based Mask R-CNN 1x rows (counted by mmdetection/get_flops_det.py; no #params given)
        PaperRow('ConvNeXt-B 1024 (COCO)', ConvNeXtBaseline, 1024, None, 321),
        *(PaperRow(f'PIIP-{name.upper().replace("_", "-")} 1024/672/448 (COCO)',
                   partial(regular_fpn_detector, f'piip_{name}'), 1024, None, gmacs)
          for name, gmacs in (('ct_cs_cb', 326), ('ct_vs_vb', 373), ('ct_cs_vb', 431), ('ct_vs_cb', 297),
                              ('vt_cs_vb', 291), ('vt_cs_cb', 231), ('vt_vs_cb', 193))),
        # ADE20K UperNet backbones (the README's segmentation table), input 512, branch1 at 192..512
        *(PaperRow(f'PIIP-H6B 512/{size} (ADE20K)',
                   lambda size=size: paper_method(h6b_backbone((size, 512), 'gelu_tanh', task='seg')),
                   512, params, gmacs)
          for size, params, gmacs in ((192, 6745, 1663), (256, 6745, 2354), (384, 6746, 4374), (512, 6747, 7308))),
    ]


def detector(arch: VariantCfg) -> PIIP:
    """A PIIP detection backbone as the detectors run it: conv merge and the simple pyramid."""
    return PIIP(arch.branches, arch.interaction, head=None, merge='conv', pyramid=ALL_LEVELS, num_classes=0)


def regular_detector(arch: VariantCfg) -> PIIP:
    """A ConvNeXt / hybrid detection backbone as the detectors run it: merges after its out interactions
    and at the end, each brought to strides 4, 8, 16, 32 (the regular FPN's inputs)."""
    return PIIP(arch.branches, arch.interaction, head=None, merge=arch.merge, out_interactions=arch.out_interactions,
                num_classes=0)


class DenseOutput(nn.Module):
    """forward(x) -> the pyramid (or, without merge, the branches' final tokens) of a PIIP detector."""

    def __init__(self, model: PIIP, with_merge: bool = True):
        super().__init__()
        self.model = model
        self.with_merge = with_merge

    def forward(self, x):
        if self.with_merge:
            return self.model.forward_intermediates(x, intermediates_only=True)
        return self.model.forward_branches(x)[0]


class SpeedPair(NamedTuple):
    """Two models timed against each other, with the FLOP ratio the paper's convention gives them."""
    name: str
    piip: Callable[[], nn.Module]
    piip_input: int
    baseline_name: str
    baseline: Callable[[], nn.Module]
    baseline_input: int
    batch: int  # for throughput


def speed_pairs() -> List[SpeedPair]:
    return [
        SpeedPair('PIIP-TSB 368 (ImageNet)', lambda: timm.create_model('piip_tsb'), 368,
                  'DeiT-B 224', lambda: timm.create_model('deit_base_patch16_224'), 224, 8),
        SpeedPair('PIIP-SBL 384 (ImageNet)', lambda: timm.create_model('piip_sbl'), 384,
                  'ViT-L 224', lambda: timm.create_model('vit_large_patch16_224'), 224, 4),
        SpeedPair('PIIP-TSB 1120/896/448 + merge + pyramid', lambda: DenseOutput(detector(tsb_detector())), 1120,
                  'ViTDet-B 1024 + pyramid', lambda: SingleViT('B', 1024), 1024, 2),
        SpeedPair('PIIP-TSB 1120/896/448 branches + interactions', lambda: DenseOutput(detector(tsb_detector()), False),
                  1120, 'ViTDet-B 1024 (no pyramid)', lambda: SingleViT('B', 1024, pyramid=False), 1024, 2),
        SpeedPair('PIIP-SBL 1120/672/448 + merge + pyramid', lambda: DenseOutput(detector(sbl_detector())), 1120,
                  'ViTDet-L 1024 + pyramid', lambda: SingleViT('L', 1024), 1024, 1),
        SpeedPair('PIIP-SBL 1120/672/448 branches + interactions', lambda: DenseOutput(detector(sbl_detector()), False),
                  1120, 'ViTDet-L 1024 (no pyramid)', lambda: SingleViT('L', 1024, pyramid=False), 1024, 1),
        SpeedPair('PIIP-TSBL 1344/896/672/448 + merge + pyramid', lambda: DenseOutput(detector(tsbl_detector())), 1344,
                  'ViTDet-L 1024 + pyramid', lambda: SingleViT('L', 1024), 1024, 1),
        SpeedPair('PIIP-CT-CS-CB 1024/672/448 + merges (regular-FPN inputs)',
                  lambda: DenseOutput(regular_detector(VARIANTS['piip_ct_cs_cb'])), 1024,
                  'ConvNeXt-B 1024 (4 stage maps)', ConvNeXtBaseline, 1024, 1),
    ]


def tiny_pairs() -> List[SpeedPair]:
    """Small stand-ins with the same code paths, for the CI smoke run."""
    def tiny(arch: VariantCfg, sizes) -> VariantCfg:
        widths = ((96, 3), (64, 2), (32, 1), (32, 2))
        branches = tuple(replace(b, img_size=s, embed_dim=widths[i][0], num_heads=widths[i][1], depth=2,
                                 block_ranges=even_block_ranges(2, 2), window_size=2 if b.window_size else None)
                         for i, (b, s) in enumerate(zip(arch.branches, sizes)))
        return VariantCfg(branches, replace(arch.interaction, num_heads=4), arch.head, arch.merge)
    return [
        SpeedPair('tiny PIIP-TSB (ImageNet structure)', lambda: PIIP(tiny(VARIANTS['piip_tsb'], (32, 48, 64)).branches,
                                                                    replace(VARIANTS['piip_tsb'].interaction, num_heads=4),
                                                                    num_classes=10), 64,
                  'tiny ViT', lambda: timm.create_model('vit_tiny_patch16_224', img_size=64, num_classes=10, depth=2), 64, 2),
        SpeedPair('tiny PIIP-TSB detector', lambda: DenseOutput(detector(tiny(tsb_detector(), (32, 64, 96)))), 96,
                  'tiny ViTDet', lambda: SingleViT('B', 96), 96, 1),
        SpeedPair('tiny PIIP-CT-CS-CB detector', lambda: DenseOutput(regular_detector(tiny_convnext_detector())), 128,
                  'ConvNeXt-atto', lambda: ConvNeXtBaseline('convnext_atto'), 128, 1),
    ]


def tiny_convnext_detector() -> VariantCfg:
    """PIIP-CT-CS-CB's structure at a tiny size: three narrow ConvNeXts, four interactions, regular-FPN outputs."""
    arch = VARIANTS['piip_ct_cs_cb']
    ranges = ((0, 1), (2, 3), (4, 5), (6, 8))  # 9 counted layers: strides 4, 8, 16 after interactions 0, 1, 2
    branches = tuple(replace(b, img_size=s, dims=(32, 32, 64, 64), depths=(2, 1, 2, 1), block_ranges=ranges)
                     for b, s in zip(arch.branches, (64, 96, 128)))
    return VariantCfg(branches, replace(arch.interaction, num_heads=4), arch.head, arch.merge, (0, 1, 2))
