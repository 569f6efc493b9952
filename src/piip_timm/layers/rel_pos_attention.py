"""BEiT self-attention inside non-overlapping windows, with a relative position bias sized by the window.

timm's ``beit.Attention`` attends over the whole grid plus a class token, so its table has
(2w-1)^2 + 3 rows for a w x w grid. A windowed PIIP BEiT branch (the original's ``beit.py``) has no
class token and one table per block of (2w-1)^2 rows for that block's window w. Parameter names are
timm's (``qkv`` without bias, ``q_bias``, ``v_bias``, ``relative_position_bias_table``, ``proj``), so a
timm ``Beit`` whose blocks use this attention keeps timm's state-dict keys.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import _pad_to_windows as pad_to_windows, _window_merge as window_merge, \
    _window_partition as window_partition

__all__ = ['RelPosWindowAttention', 'window_relative_position_index']

torch.fx.wrap('pad_to_windows')  # branches on the grid's size: one node for torch.fx


def window_relative_position_index(window: int, device=None) -> torch.Tensor:
    """(w^2, w^2) table rows: index(i, j) = (h_i - h_j + w - 1) * (2w - 1) + (w_i - w_j + w - 1)."""
    coords = torch.stack(torch.meshgrid(
        torch.arange(window, device=device), torch.arange(window, device=device), indexing='ij')).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return relative[0] * (2 * window - 1) + relative[1]


class RelPosWindowAttention(nn.Module):
    """Multi-head attention in w x w windows with a learned bias per relative offset and head.

    A grid that the window does not divide is zero-padded at the bottom/right after the block's norm,
    as the original does: padded tokens project to the biases (q = q_bias, k = 0, v = v_bias), are
    attended to without a mask, and are cropped afterwards.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}.')
        if window_size < 1:
            raise ValueError(f'window_size must be a positive number of tokens, got {window_size}.')
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
            self.register_buffer('k_bias', torch.zeros(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer(
            'relative_position_index', window_relative_position_index(window_size, device=device), persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the buffers that are not in the state dict (after building on the meta device)."""
        self.relative_position_index = window_relative_position_index(
            self.window_size, device=self.relative_position_bias_table.device)
        if self.k_bias is not None:
            self.k_bias = torch.zeros_like(self.q_bias)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, w^2, w^2) bias added to the attention logits of every window."""
        area = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: a (B, H, W, C) token grid -> (B, H, W, C)."""
        if shared_rel_pos_bias is not None:
            raise ValueError('a shared relative position bias is not supported with windowed attention.')
        batch, height, width, channels = x.shape
        window = self.window_size
        x = pad_to_windows(x, window, None)  # zeros at the bottom and right, as the original pads
        qkv = self.qkv(window_partition(x, window))
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        num_windows, tokens, _ = qkv.shape
        q, k, v = qkv.view(num_windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.relative_position_bias().unsqueeze(0).to(q.dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(num_windows, tokens, channels)
        out = window_merge(out, window, batch, x.shape[1], x.shape[2])[:, :height, :width]
        return self.proj_drop(self.proj(out))
