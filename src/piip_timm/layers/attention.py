"""Self-attention for timm blocks that need what timm's ``Attention`` lacks.

Two things: ViTDet-style windowed attention (per block, decided after the
model is built) and InternViT's qk-normalisation over the full width before
the head split. Parameter names are timm's (``qkv``, ``q_norm``, ``k_norm``,
``proj``), so a branch using this class keeps timm's state-dict keys.

A block whose attention is windowed receives its tokens as a (B, H, W, C) grid;
every other part of a timm ``Block`` is per-token, so the block works unchanged.
"""
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['Attention']

WindowPadding = Literal['tokens', 'qkv']


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of window -> (B * nH * nW, window * window, C)."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def _window_merge(windows: torch.Tensor, window: int, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of ``_window_partition``: -> (B, H, W, C)."""
    x = windows.view(batch, height // window, width // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def _pad_to_windows(qkv: torch.Tensor, window: int, pad_value: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, W, C) -> (B, H', W', C) with H', W' multiples of ``window``, padded at the bottom and right
    with ``pad_value`` (a (C,) vector) or zeros."""
    batch, height, width, channels = qkv.shape
    pad_h = (window - height % window) % window
    pad_w = (window - width % window) % window
    if not (pad_h or pad_w):
        return qkv
    if pad_value is None:
        return F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
    padded = pad_value.expand(batch, height + pad_h, width + pad_w, channels).clone()
    padded[:, :height, :width] = qkv
    return padded


torch.fx.wrap('_pad_to_windows')  # branches on the grid's size: one node for torch.fx


class Attention(nn.Module):
    """Multi-head self-attention, global or in non-overlapping windows.

    Args:
        dim: token width.
        num_heads: attention heads.
        qkv_bias: bias in the qkv projection.
        qk_norm: normalise q and k over the full width (InternViT), before splitting heads.
        norm_layer: norm used for ``qk_norm``.
        window_size: None for global attention, else the window side in tokens.
        window_padding: how a grid that the window does not divide is padded:
            ``'tokens'`` pads the block's input with zeros (ViTDet, and the original
            PIIP with flash attention), ``'qkv'`` pads the projected q, k, v with zeros
            (the original PIIP DeiT branches without flash attention).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            norm_layer: Optional[Callable[[int], nn.Module]] = None,
            window_size: Optional[int] = None,
            window_padding: WindowPadding = 'tokens',
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}.')
        if scale_norm:
            raise ValueError('scale_norm is not supported by piip_timm.layers.Attention.')
        if qk_norm and norm_layer is None:
            raise ValueError('qk_norm needs a norm_layer.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.window_padding = window_padding
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B', N, 3C) projected tokens -> (B', N, C) attention output before ``proj``."""
        batch, num_tokens, _ = qkv.shape
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return x.transpose(1, 2).reshape(batch, num_tokens, -1)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        """Attention inside windows, projected: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        window = self.window_size
        qkv = self.qkv(x)  # only real tokens are projected
        # A zero (padding) token projects to the bias: with 'tokens' padding, pad q/k/v with it.
        pad_value = self.qkv.bias if self.window_padding == 'tokens' else None
        qkv = _pad_to_windows(qkv, window, pad_value)
        out = self._attend(_window_partition(qkv, window))
        out = _window_merge(out, window, batch, qkv.shape[1], qkv.shape[2])
        return self.proj(out[:, :height, :width, :])
    def forward(
            self,
            x: torch.Tensor,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> torch.Tensor:
        """x: (B, N, C) tokens, or (B, H, W, C) a token grid (needed for windows)."""
        if attn_mask is not None or is_causal:
            raise ValueError('piip_timm.layers.Attention does not take attention masks.')
        if self.window_size:  # windowed blocks are always given the token grid
            return self.proj_drop(self._windowed(x))
        out = self._attend(self.qkv(x.flatten(1, -2))).view(x.shape)
        return self.proj_drop(self.proj(out))
