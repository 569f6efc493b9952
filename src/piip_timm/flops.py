"""Multiply-accumulate counts in the PIIP paper's convention.

The paper's numbers come from ``classification/get_flops.py`` of the original code: mmcv's
``get_model_complexity_info`` (forward hooks on modules: a Linear counts input elements x output
features, a convolution kernel x input channels x output elements, norms their input elements
(x2 with affine), ReLU and pooling their elements; matrix products outside modules, GELU and
interpolation count nothing), plus terms added by hand: self-attention ``2 (hw)^2 C`` per block
(``2 hw w^2 C`` with windows of side w) and deformable attention ``5 hw K C`` per injector, on
the nominal grids (image size // 16) with the query branch's width and K = 4 points.

ConvNeXt branches are counted as ``mmdetection/get_flops_det.py`` counted them (the ConvNeXt rows):
their convolutions and Linears only (transformers' ``ConvNextLayerNorm`` is not an ``nn.LayerNorm``,
so mmcv skipped every ConvNeXt norm), no attention term, and the deformable terms of an interaction
on the grid (image size // stride) and at the width its branch has at that interaction.

``count_macs`` reproduces that convention on this package's models and also reports what the
convention leaves out: the deformable sampling as it actually runs (4 bilinear corners + 1
weight per point, per value channel) and the attention products on the actual token grids.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from timm.models.convnext import ConvNeXt

from .layers import Attention, ConvMerge, DeformableCrossAttention, SingleConvMerge

__all__ = ['MacCount', 'count_macs']


@dataclass
class MacCount:
    """Multiply-accumulates (G = 1e9) of one forward pass, by part."""
    modules: float  # mmcv-style module hooks
    attention: float  # the paper's self-attention terms
    deformable: float  # the paper's deformable-attention terms
    sampling_actual: float  # bilinear sampling as computed (not in the paper's convention)

    @property
    def paper(self) -> float:
        """Total in the paper's convention."""
        return self.modules + self.attention + self.deformable


def _module_macs(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output) -> int:
    x = inputs[0] if inputs else None
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features
    if isinstance(module, nn.ConvTranspose2d):  # mmcv deconv: every input pixel x kernel x channels
        batch, _, height, width = x.shape
        kernel = module.kernel_size[0] * module.kernel_size[1]
        macs = batch * height * width * kernel * module.in_channels * module.out_channels // module.groups
        return macs + (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Conv2d):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        macs = output.numel() * kernel * module.in_channels // module.groups
        return macs + (output.numel() if module.bias is not None else 0)
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        affine = module.elementwise_affine if isinstance(module, nn.LayerNorm) else module.affine
        return x.numel() * (2 if affine else 1)
    if isinstance(module, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d)):
        return x.numel() if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) else output.numel()
    if isinstance(module, DeformableCrossAttention):  # its offset and weight Linears run as one fused matmul
        return x.numel() * (module.sampling_offsets.out_features + module.attention_weights.out_features)
    if isinstance(module, ConvMerge):  # its ReLUs are functional; mmcv counted the original's nn.ReLU modules
        return 2 * output.numel()
    if isinstance(module, SingleConvMerge):
        return output.numel()
    return 0


def _uncounted_norms(model: nn.Module) -> set:
    """The norms of ConvNeXt models (transformers' ConvNextLayerNorm, which mmcv did not count)."""
    return {id(m) for convnext in model.modules() if isinstance(convnext, ConvNeXt)
            for m in convnext.modules() if isinstance(m, nn.LayerNorm)}


def count_macs(model: nn.Module, input_size: Tuple[int, int, int], device: Optional[torch.device] = None) -> MacCount:
    """Count one forward pass of ``model`` (a PIIP or any timm ViT-like model) on a (C, H, W) input."""
    from .piip import PIIP
    piip = model.model if hasattr(model, 'model') and isinstance(model.model, PIIP) else model
    counts = {'modules': 0, 'sampling': 0}
    handles = []
    skipped = _uncounted_norms(model)

    def hook(module, inputs, output):
        if id(module) not in skipped:
            counts['modules'] += _module_macs(module, inputs, output)

    def sampling_hook(module, inputs, output):
        query = inputs[0]
        value_dim = module.num_heads * module.head_dim
        counts['sampling'] += query.shape[0] * query.shape[1] * module.num_points * value_dim * 5

    for module in model.modules():
        handles.append(module.register_forward_hook(hook))
        if isinstance(module, DeformableCrossAttention):
            handles.append(module.register_forward_hook(sampling_hook))
    try:
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_size), device=device))
    finally:
        for handle in handles:
            handle.remove()
    attention, deformable = _paper_terms(piip) if isinstance(piip, PIIP) else (_vit_attention(model, input_size), 0)
    return MacCount(counts['modules'] / 1e9, attention / 1e9, deformable / 1e9, counts['sampling'] / 1e9)


def _block_attention(grid: int, dim: int, window: Optional[int]) -> int:
    tokens = grid * grid
    return 2 * tokens * window * window * dim if window else 2 * tokens * tokens * dim


def _paper_terms(model) -> Tuple[int, int]:
    """get_flops.py's hand-added terms: ViT self-attention on the nominal grids img_size // 16, deformable
    attention on each interaction's nominal grids img_size // stride at the widths of that interaction."""
    attention = 0
    for branch in model.branches:
        if not isinstance(branch, ConvNeXt):
            cfg = branch.cfg
            grid = cfg.img_size // 16
            attention += sum(_block_attention(grid, cfg.embed_dim, w) for w in cfg.block_windows())
    deformable = 0
    for step in range(len(model.interactions)):
        for coarse, fine in zip(model.branches[:-1], model.branches[1:]):
            for branch in (fine, coarse):
                grid = branch.cfg.img_size // branch.range_stride(step)
                deformable += 5 * grid * grid * 4 * branch.range_width(step)
    return attention, deformable


def _vit_attention(model: nn.Module, input_size: Tuple[int, int, int]) -> int:
    """Self-attention terms of a single-branch ViT, found as the first submodule with attention ``blocks``
    (windowed blocks use piip_timm's Attention); none for a model without (a ConvNeXt)."""
    blocks = next((m.blocks for m in model.modules() if isinstance(getattr(m, 'blocks', None), nn.Module)
                   and len(m.blocks) and hasattr(m.blocks[0], 'attn')), None)
    if blocks is None:
        return 0
    grid = input_size[-1] // 16
    total = 0
    for block in blocks:
        window = getattr(block.attn, 'window_size', None) if isinstance(block.attn, Attention) else None
        total += _block_attention(grid, block.attn.qkv.in_features, window)
    return total
