"""Uni-Perceiver as a PIIP branch (the original's ``uniperceiver.py`` ``UnifiedBertEncoder``).

timm has no Uni-Perceiver model, but its encoder is a timm ``VisionTransformer`` in all but its
embedding: no class token, LayerNorm eps 1e-5 everywhere, fused qkv with bias, layer scale starting
at zero, and an embedding made of the patch projection, a spatial position embedding (resized
bicubically to the token grid), row 0 of a temporal position embedding (8 rows; images use the
first) and a LayerNorm (timm's ``norm_pre``). ``UniPerceiverBranch`` is that ViT branch plus the
temporal table; ``original_state`` maps the original's names (those of its ``*_converted.pth``
pretrained files too) to it.
"""
import re
from dataclasses import dataclass
from typing import Dict, Literal, Mapping, Optional

import torch
from timm.layers import LayerNorm
from torch import nn

from .branch import Grid, on_meta
from .vit_branch import BranchCfg, ViTBranch

__all__ = ['UniPerceiverBranchCfg', 'UniPerceiverBranch']

NUM_TEMPORAL_POSITIONS = 8


@dataclass(frozen=True)
class UniPerceiverBranchCfg(BranchCfg):
    """A Uni-Perceiver branch: a ViT branch with Uni-Perceiver's defaults (q/k/v bias, layer scale
    starting at zero, LayerNorm eps 1e-5, linear drop-path schedule) and its embedding."""
    qkv_bias: bool = True
    init_values: Optional[float] = 0.0
    norm_eps: float = 1e-5
    drop_path_schedule: Literal['constant', 'linear'] = 'linear'
    kind: Literal['uniperceiver'] = 'uniperceiver'
    family = 'Uni-Perceiver'

    def __post_init__(self):
        if self.class_token or self.pos_embed_class_slot:
            raise ValueError('a Uni-Perceiver branch has no class token and no class slot in its position embedding.')

    def build(self, in_chans: int = 3, final_norm: bool = False, device=None, dtype=None) -> 'UniPerceiverBranch':
        return UniPerceiverBranch(self, in_chans=in_chans, final_norm=final_norm, device=device, dtype=dtype)


class UniPerceiverBranch(ViTBranch):
    """A timm ViT branch with Uni-Perceiver's embedding: + spatial + temporal[0], then LayerNorm."""

    def __init__(self, cfg: UniPerceiverBranchCfg, in_chans: int = 3, final_norm: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__(cfg, in_chans=in_chans, final_norm=final_norm, device=device, dtype=dtype)
        dd = dict(device=device, dtype=dtype)
        # (not timm's pre_norm=True, which would also drop the patch projection's bias, as CLIP has none)
        self.norm_pre = LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, **dd)
        self.temporal_pos_embed = nn.Parameter(torch.zeros(NUM_TEMPORAL_POSITIONS, cfg.embed_dim, **dd))
        if not on_meta(device):
            nn.init.trunc_normal_(self.temporal_pos_embed, std=0.02)

    def position_embedding(self, grid_hw: Grid) -> torch.Tensor:
        return super().position_embedding(grid_hw) + self.temporal_pos_embed[0]

    def layer_of_parameter(self, name: str) -> Optional[int]:
        return -1 if name == 'temporal_pos_embed' else super().layer_of_parameter(name)

    @staticmethod
    def original_state(state: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """UnifiedBertEncoder tensors (``visual_embed.*``, ``layers.*``) -> this branch's names; None for
        other kinds of branch. Keys it does not know pass unchanged, for strict loading to name them.
        ``spatial_pos_embed.weight`` (N, C), an nn.Embedding, becomes ``pos_embed`` (1, N, C)."""
        if not any(k.startswith('visual_embed.') for k in state):
            return None
        out = {}
        for key, value in state.items():
            if key in _RENAMES:
                out[_RENAMES[key]] = value
            elif key == 'visual_embed.patch_embed.spatial_pos_embed.weight':
                out['pos_embed'] = value.unsqueeze(0)
            elif m := _LAYER.match(key):
                layer, rest = m.group(1), m.group(2)
                part, _, param = rest.rpartition('.')
                if rest in ('gamma_1', 'gamma_2'):
                    out[f'blocks.{layer}.ls{rest[-1]}.gamma'] = value
                elif part in _LAYER_PARTS and param in ('weight', 'bias'):
                    out[f'blocks.{layer}.{_LAYER_PARTS[part]}.{param}'] = value
                else:
                    out[key] = value
            else:
                out[key] = value
        return out


_RENAMES = {
    'visual_embed.patch_embed.proj.weight': 'patch_embed.proj.weight',
    'visual_embed.patch_embed.proj.bias': 'patch_embed.proj.bias',
    'visual_embed.patch_embed.temporal_pos_embed.weight': 'temporal_pos_embed',
    'visual_embed.embeddings_norm.weight': 'norm_pre.weight',
    'visual_embed.embeddings_norm.bias': 'norm_pre.bias',
}
_LAYER = re.compile(r'^layers\.(\d+)\.(.+)$')
_LAYER_PARTS = {
    'self_attn.in_proj': 'attn.qkv',
    'self_attn.out_proj': 'attn.proj',
    'linear1': 'mlp.fc1',
    'linear2': 'mlp.fc2',
    'norm1': 'norm1',
    'norm2': 'norm2',
}
