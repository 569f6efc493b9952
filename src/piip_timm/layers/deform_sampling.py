"""Bilinear deformable sampling in pure PyTorch.

The core of single-level deformable attention (Deformable DETR's ``ms_deform_attn`` with one
level): every query gathers ``P`` bilinearly interpolated values per head and sums them with
softmax weights. The sampling rule is the CUDA kernel's: a location ``l`` in [0, 1] maps to
pixel ``l * size - 0.5`` and corners outside the map contribute zero, which is
``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``.

It is the formulation of Deformable DETR's ``ms_deform_attn_core_pytorch`` for one level,
without the per-level split, stack and flatten copies. ``grid_sample``'s fused kernels beat
every other pure-PyTorch formulation measured on CPU (a corner-index ``gather``, a fused
``embedding_bag`` over precomputed corners, ``index_add_``/``scatter_add_``/sort-based scatters and
COO/CSR sparse products for the backward): the value gradient is a scatter, and
``grid_sampler_2d_backward`` does it fastest. ``grid_sample`` is also what ONNX (GridSample) and
``torch.compile`` know.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ['deform_sample']


def _weighted_sum_over_points(sampled: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, D, P, Q) samples, (N, P, Q) weights -> (N, D, Q), one pass per point (no (N, D, P, Q) product)."""
    out = sampled[:, :, 0] * weights[:, None, 0]
    for point in range(1, sampled.shape[2]):
        out.addcmul_(sampled[:, :, point], weights[:, None, point])
    return out


def _bilinear_samples(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) maps at an (N, P, Q, 2) grid in [-1, 1] -> (N, D, P, Q), the CUDA kernel's sampling rule."""
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


class _WeightedBilinearSampling(torch.autograd.Function):
    """``grid_sample`` then a weighted sum over points, with the backward written out.

    Autograd's own backward of these two ops hands ``grid_sampler_2d_backward`` a gradient laid out
    like the weights, which the kernel first copies, and keeps the (N, D, P, Q) samples alive from
    forward to backward. Here the kernels get a contiguous gradient and grid, and the samples are
    recomputed in the backward (one cheap ``grid_sample``) instead of stored: less memory held for
    training. The backward has one (N, D, P, Q) buffer: the recomputed samples become the products
    for the point weights' gradient in place, then the gradient of the samples is written over them
    (peak below the plain formulation's, and no second large allocation).
    """

    @staticmethod
    def forward(ctx, images: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(images, grid, weights)
        return _weighted_sum_over_points(_bilinear_samples(images, grid), weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        images, grid, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()[:, :, None]  # (N, D, 1, Q)
        buffer = grad_images = grad_grid = grad_weights = None
        if ctx.needs_input_grad[2]:
            # d(loss)/d(weight of point p at query q) = sum over channels of grad_out * sample p.
            buffer = _bilinear_samples(images, grid).mul_(grad_out)
            grad_weights = buffer.sum(1)  # (N, P, Q)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_sampled = torch.mul(grad_out, weights[:, None], out=buffer)  # (N, D, P, Q), contiguous
            grad_images, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
                grad_sampled, images, grid, 0, 0, False, [ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
        return grad_images, grad_grid, grad_weights


def _kernel_layout(
        value: torch.Tensor,
        value_hw: Tuple[int, int],
        locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``deform_sample``'s inputs as its kernels take them, in at least fp32: (B * heads, head_dim, H, W) maps,
    an (B * heads, P, Q, 2) grid in [-1, 1] and (B * heads, P, Q) weights."""
    batch, num_values, heads, head_dim = value.shape
    height, width = value_hw
    _, num_queries, _, num_points, _ = locations.shape
    dtype = torch.promote_types(value.dtype, torch.float32)
    images = value.to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
    # Points lead and queries trail (N, P, Q, ...): the kernels then stream along queries.
    grid = (2 * locations.to(dtype) - 1).permute(0, 2, 3, 1, 4).reshape(batch * heads, num_points, num_queries, 2)
    weights = attention_weights.to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, num_points, num_queries)
    if grid.stride(2) > 2:  # queries not adjacent: grid_sample's gathers over the grid would stride
        grid = grid.contiguous()
    return images, grid, weights.contiguous()


def deform_sample(
        value: torch.Tensor,
        value_hw: Tuple[int, int],
        locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of bilinear samples of ``value`` at ``locations``, per head.

    Args:
        value: (B, H*W, heads, head_dim) values on an H x W grid, row-major.
        value_hw: (H, W) of that grid.
        locations: (B, Q, heads, P, 2) sampling locations (x, y) normalised to [0, 1].
        attention_weights: (B, Q, heads, P) weights of the P points (softmax already applied).

    Any memory layout works; ``locations`` and ``attention_weights`` that are views of
    (B, heads, P, [2,] Q) storage (queries contiguous, as ``DeformableCrossAttention`` makes them)
    are used without a copy.

    Returns:
        (B, Q, heads * head_dim), in ``value``'s dtype. Sampling runs in at least fp32
        (half-precision inputs are upcast): bilinear weights in bf16 would place a sample up to
        half a pixel off on a 100-pixel map.
    """
    batch, num_values, heads, head_dim = value.shape
    height, width = value_hw
    if num_values != height * width:
        raise ValueError(f'value has {num_values} positions but value_hw is {height}x{width}.')
    out = _WeightedBilinearSampling.apply(*_kernel_layout(value, value_hw, locations, attention_weights))
    return out.view(batch, heads * head_dim, locations.shape[1]).transpose(1, 2).to(value.dtype)
