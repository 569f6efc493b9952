"""BEiT (v2) as a PIIP branch: a stock timm ``Beit`` whose blocks attend in windows, each block with its
own relative-position table sized by its window (the original's ``beit.py`` in PIIP detectors).

No absolute position embedding and no class token; q/v biases and layer scales ``gamma_1/gamma_2``
as in timm, so parameter names are timm's. Weights: timm's BEiTv2 tables (the 14 x 14 grid plus
class rows) are resized to each block's window with the original's geometric-progression warp;
original PIIP checkpoints carry the tables already resized, plus ``relative_position_index``
buffers, which are checked and dropped (the branch computes its own).
"""
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Dict, Literal, Mapping, Optional

import torch
from timm.layers import LayerNorm
from timm.models.beit import Beit
from torch import nn

from .branch import BlockRanges, Grid, on_meta
from .layers import RelPosWindowAttention, window_relative_position_index
from .rel_pos_resize import resize_rel_pos_table
from .vit_branch import BranchCfg, IsotropicBranch, drop_single_model_parts

__all__ = ['BeitBranchCfg', 'BeitBranch']

_TABLE = re.compile(r'^blocks\.\d+\.attn\.relative_position_bias_table$')
_INDEX = re.compile(r'^blocks\.\d+\.attn\.relative_position_index$')


@dataclass(frozen=True)
class BeitBranchCfg(BranchCfg):
    """A BEiT branch: the ViT fields that BEiT has (sizes, ``qkv_bias`` for its q and v biases, layer
    scale, windows, drop path); a window in every block, since each block's relative-position table is
    sized by its window."""
    drop_path_schedule: Literal['constant', 'linear'] = 'linear'
    kind: Literal['beit'] = 'beit'

    def __post_init__(self):
        windows = self.block_windows()
        if not all(windows):
            raise ValueError(f'a BEiT branch needs a window in every block (its relative position tables are '
                             f'sized by the window), got {list(windows)}.')
        unsupported = [name for name, value, plain in (
            ('class_token', self.class_token, False), ('pos_embed_class_slot', self.pos_embed_class_slot, False),
            ('norm', self.norm, 'layernorm'), ('qk_norm', self.qk_norm, False), ('mlp_act', self.mlp_act, 'gelu'),
        ) if value != plain]
        if unsupported:
            raise ValueError(f'a BEiT branch has no {", ".join(unsupported)} option; leave it at its default.')

    family = 'BEiT'

    def build(self, in_chans: int = 3, final_norm: bool = False, device=None, dtype=None) -> 'BeitBranch':
        return BeitBranch(self, in_chans=in_chans, final_norm=final_norm, device=device, dtype=dtype)

    @classmethod
    def from_timm(cls, model: Beit, img_size: int, block_ranges: BlockRanges) -> 'BeitBranchCfg':
        """The branch of a timm Beit (built, e.g. on the meta device): its blocks attend in windows of its
        own grid, so its tables keep their size (less their class rows)."""
        if model.pos_embed is not None or model.rel_pos_bias is not None:
            raise ValueError('this BEiT has an absolute position embedding or a shared relative position bias, '
                             'which a PIIP BEiT branch does not support.')
        block = model.blocks[0]
        grid = model.patch_embed.grid_size
        if grid[0] != grid[1] or block.attn.relative_position_bias_table is None:
            raise ValueError('a PIIP BEiT branch needs a BEiT with per-block relative position tables on a square '
                             'grid.')
        return cls(
            img_size=img_size, embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=block.attn.num_heads,
            block_ranges=tuple(block_ranges), mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
            patch_size=model.patch_embed.patch_size[0], qkv_bias=block.attn.q_bias is not None,
            # timm's BEiTv2 layer-scale init (pretrained weights replace it)
            init_values=1e-5 if block.gamma_1 is not None else None, window_size=grid[0])


class BeitBranch(IsotropicBranch, Beit):
    """A timm ``Beit`` configured as a PIIP branch: windowed blocks with per-block tables, no head."""

    def __init__(self, cfg: BeitBranchCfg, in_chans: int = 3, final_norm: bool = False, device=None,
                 dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans, num_classes=0, global_pool='',
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias, norm_layer=partial(LayerNorm, eps=cfg.norm_eps), init_values=cfg.init_values,
            use_abs_pos_emb=False, use_rel_pos_bias=False,  # the tables come with the windowed attention below
            **dd)
        self.cfg = cfg
        for block, window in zip(self.blocks, cfg.block_windows()):
            block.attn = RelPosWindowAttention(cfg.embed_dim, cfg.num_heads, window, qkv_bias=cfg.qkv_bias, **dd)
        self.set_block_drop_paths()
        if not on_meta(device):
            self.init_weights()  # timm's BEiT init (incl. its depth rescaling) on the new attention modules
        self.cls_token = None  # PIIP branches run patch tokens only
        if not final_norm:
            self.norm = nn.Identity()

    def embed(self, image: torch.Tensor) -> tuple:
        x = self.patch_embed.proj(image)  # a strided conv: a partial last patch is dropped
        grid: Grid = (x.shape[-2], x.shape[-1])
        return self.pos_drop(x.flatten(2).transpose(1, 2).contiguous()), None, grid

    def from_pretrained_weights(self, source: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
        """Single-model BEiT weights (tables for its grid plus 3 class rows) -> each block's window, as the
        original loads them; classifier parts dropped."""
        own = self.state_dict()
        out = drop_single_model_parts(source, own)
        for name, table in source.items():
            if _TABLE.match(name) and name in own and table.shape != own[name].shape:
                out[name] = resize_rel_pos_table(table, math.isqrt(own[name].shape[0]))
        return {k: v for k, v in out.items() if not _INDEX.match(k)}  # timm keeps no index in its state dict

    @staticmethod
    def original_state(state: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """The original's ``BEiT`` (timm names already; None for branches without relative position tables):
        its index buffers are checked to be the standard window index and dropped."""
        if not any(_TABLE.match(k) for k in state):
            return None
        out = {}
        for name, value in state.items():
            if not _INDEX.match(name):
                out[name] = value
                continue
            window = math.isqrt(value.shape[0])
            if value.shape != (window * window,) * 2:
                raise ValueError(f'{name} has shape {tuple(value.shape)}, not (w^2, w^2) of a square window.')
            expected = window_relative_position_index(window, device='cpu')  # (cpu even under a meta default)
            if not value.is_meta and not torch.equal(value.cpu(), expected):
                raise ValueError(f'{name} is not the relative position index of a {window}x{window} window; '
                                 'the checkpoint was not made by the original BEiT branch.')
        return out
