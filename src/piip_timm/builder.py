"""A PIIP from any timm ViT / ConvNeXt / BEiT model names: the paper's recipe applied to other pretrained models.

``create_piip(['deit3_base_patch16_224.fb_in22k_ft_in1k', 'convnext_small.fb_in1k',
'deit_tiny_patch16_224.fb_in1k'], img_sizes=(448, 672, 1024), pretrained=True)`` builds the branches
from timm's own architectures (coarsest image, i.e. largest model, first), spreads the interactions
evenly over each branch's counted layers, sizes every interaction unit for the widths it connects,
chooses the outputs the paper gives such a mix (regular-FPN merges for models with a ConvNeXt, the
simple pyramid for ViTs only) and loads each branch's weights through timm's own Hub loader.
"""
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from timm.models import Beit, ConvNeXt, VisionTransformer
from timm.models._features import FeatureGetterNet
from torch import nn

from .beit_branch import BeitBranchCfg
from .branch import BlockRanges
from .convert import checkpoint_filter_fn
from .convnext_branch import ConvNeXtBranchCfg
from .hub import BranchSource, check_hub_files, load_branch_state_dict
from .piip import PIIP, BranchSpec, InteractionCfg, OUTPUT_STRIDES
from .variants import ALL_LEVELS, VariantCfg, _cfg
from .vit_branch import BranchCfg

__all__ = ['create_piip', 'spread_layers', 'regular_fpn_interactions']

# timm model classes a branch can be made of, and the config that describes such a branch.
BRANCH_CONFIGS = ((VisionTransformer, BranchCfg), (ConvNeXt, ConvNeXtBranchCfg), (Beit, BeitBranchCfg))


def spread_layers(num_layers: int, num_interactions: int) -> BlockRanges:
    """``num_layers`` counted layers split into ``num_interactions`` consecutive ranges as evenly as possible."""
    if not 0 < num_interactions <= num_layers:
        raise ValueError(f'{num_interactions} interactions cannot split {num_layers} layers; use 1..{num_layers}.')
    bounds = [i * num_layers // num_interactions for i in range(num_interactions + 1)]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(num_interactions))


def regular_fpn_interactions(branches: Sequence[nn.Module]) -> Optional[tuple]:
    """The interactions after which a regular-FPN model merges: the last ones at which its finest ConvNeXt
    (a branch whose stride grows) is at strides 4, 8 and 16, as in the paper's configurations; None for
    branches whose strides never change (ViTs only)."""
    growing = [b for b in branches if len(set(b.layer_strides)) > 1]
    if not growing:
        return None
    finest = growing[-1]
    num_steps = len(finest.cfg.block_ranges)
    strides = [finest.range_stride(k) for k in range(num_steps)]
    out = []
    for target in OUTPUT_STRIDES[:-1]:
        steps = [k for k, s in enumerate(strides[:-1]) if s == target]
        if not steps:
            raise ValueError(f'no interaction ends while the finest ConvNeXt is at stride {target} (strides per '
                             f'interaction: {strides}); give out_interactions=[...] or other block_ranges.')
        out.append(steps[-1])
    return tuple(out)


def _timm_architecture(name: str, model_kwargs: Dict[str, Any]):
    """The config class that describes timm model ``name`` as a branch, and the model (built on meta)."""
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    for model_class, cfg_class in BRANCH_CONFIGS:
        if isinstance(model, model_class):
            return cfg_class, model
    raise ValueError(f'{name} is a timm {type(model).__name__}; PIIP branches are timm VisionTransformers, ConvNeXts '
                     'or Beits.')


def create_piip(
        model_names: Sequence[str],
        img_sizes: Sequence[int],
        pretrained: bool = False,
        num_interactions: Optional[int] = None,
        block_ranges: Optional[Sequence[BlockRanges]] = None,
        out_interactions: Optional[Sequence[int]] = None,
        interaction: InteractionCfg = InteractionCfg(),
        model_kwargs: Optional[Sequence[Dict[str, Any]]] = None,
        features_only: bool = False,
        window_size: Optional[int] = None,
        num_classes: int = 1000,
        **kwargs,
) -> nn.Module:
    """A PIIP whose branches are the timm models ``model_names``, coarsest image (largest model) first.

    Args:
        model_names: timm ViT (``VisionTransformer``), ConvNeXt or BEiT names, with a pretrained tag if wanted
            (a BEiT's blocks attend in windows of its own grid, its tables keeping their size).
        img_sizes: the image side each branch is designed for, in the same order; the last is the input size.
        pretrained: load every branch's pretrained weights through timm's Hub loader (interactions, merges
            and heads start fresh, their gammas at zero: a fresh model is the sum of its pretrained branches).
        num_interactions: interactions, spread evenly over each branch's counted layers (ViT blocks; ConvNeXt
            blocks and downsampling layers); default: the fewest layers of any branch.
        block_ranges: per branch, the inclusive layer ranges run before each interaction (instead of spreading).
        out_interactions: with ``features_only``, the interactions whose merges are dense outputs (models with a
            ConvNeXt); default: the last ones at strides 4, 8 and 16 of the finest ConvNeXt.
        interaction: interaction-unit hyper-parameters.
        model_kwargs: per branch, architecture arguments for ``timm.create_model`` (e.g. a smaller depth).
        features_only: the dense outputs at strides 4, 8, 16, 32 (``feature_info`` says which), timm style.
        window_size: windowed attention in every ViT block (None: global attention).
        num_classes: classes of the head on the merged map (0: none).
        kwargs: further ``PIIP`` arguments (``drop_rate``, ``in_chans``, ``device``, ``dtype``, ...).
    """
    names, sizes = list(model_names), list(img_sizes)
    if len(names) < 2 or len(sizes) != len(names):
        raise ValueError(f'give at least 2 model names and one image size per name; got {len(names)} names, '
                         f'{len(sizes)} sizes.')
    sources = [BranchSource(timm_model=n) for n in names]
    if pretrained:  # fail fast, before building anything, when a repository cannot be reached
        check_hub_files([f for s in sources for f in s.hub_files()])
    model_kwargs = list(model_kwargs or [{}] * len(names))
    ranges = list(block_ranges or [None] * len(names))
    if len(model_kwargs) != len(names) or len(ranges) != len(names):
        raise ValueError('model_kwargs and block_ranges need one entry per model name.')
    architectures = [_timm_architecture(n, k) for n, k in zip(names, model_kwargs)]
    layer_counts = [cfg_class.from_timm(m, s, ((0, 0),)).num_layers
                    for (cfg_class, m), s in zip(architectures, sizes)]
    if num_interactions is None and block_ranges is None:
        num_interactions = min(layer_counts)
    branches: List[BranchSpec] = [
        cfg_class.from_timm(m, s, r or spread_layers(count, num_interactions))
        for (cfg_class, m), s, r, count in zip(architectures, sizes, ranges, layer_counts)]
    if window_size is not None:
        branches = [replace(b, window_size=window_size) if isinstance(b, BranchCfg) else b for b in branches]
    with torch.device('meta'):
        built = [b.build(device='meta') for b in branches]
    regular = any(len(set(b.layer_strides)) > 1 for b in built)  # a ConvNeXt: the paper's regular-FPN outputs
    dense = dict(merge='single_conv' if regular else 'conv')
    if features_only and regular:
        dense.update(out_interactions=tuple(out_interactions or regular_fpn_interactions(built)))
    elif features_only:
        dense.update(pyramid=ALL_LEVELS)
    head = 'merged' if num_classes else None
    model = PIIP(branches, interaction, head=head, num_classes=num_classes, **dense, **kwargs)
    arch = VariantCfg(tuple(branches), interaction, head or 'merged', dense['merge'], dense.get('out_interactions'))
    finest_cfg = timm.models.get_pretrained_cfg(names[-1])
    model.pretrained_cfg = _cfg(arch, num_classes=num_classes, architecture='piip (create_piip)',
                                mean=getattr(finest_cfg, 'mean', None) or (0.485, 0.456, 0.406),
                                std=getattr(finest_cfg, 'std', None) or (0.229, 0.224, 0.225))
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        assembled = {f'branches.{i}.{k}': v for i, s in enumerate(sources) for k, v in load_branch_state_dict(s).items()}
        model.load_state_dict(checkpoint_filter_fn(assembled, model), strict=True)
    if features_only:
        model = FeatureGetterNet(model, out_indices=tuple(range(len(model.feature_info))))
    return model
