"""CLIP ViT as a PIIP branch: a stock timm ``VisionTransformer`` in its CLIP configuration.

timm's CLIP towers (``vit_*_clip_quickgelu_*``) are ViTs with QuickGELU, LayerNorm eps 1e-5, a pre-norm
(``norm_pre``, transformers' ``pre_layrnorm``), a bias-free patch conv and a class token whose position row
is part of ``pos_embed``. PIIP-LLaVA (TPAMI 2025) uses them as branches the way its ``CLIPHFWrapper`` does:
the patch rows of the position embedding are resampled (bicubic, no antialias, fp32) from the pretraining
grid to the token grid, the class row is added to the class token, all tokens go through ``norm_pre``;
the class token then runs through every block but never takes part in an interaction, and the final
norm (transformers' ``post_layernorm``) is never used, so the branch has none.

transformers ``CLIPVisionModel`` checkpoints are converted to timm's keys by ``hf_clip_state_dict``.
"""
import re
from dataclasses import dataclass
from functools import partial
from typing import Dict, Literal, Optional, Tuple

import torch
from timm.layers import DropPath, LayerNorm
from timm.models import VisionTransformer
from torch import nn

from .branch import Grid, on_meta
from .vit_branch import BranchCfg, ViTBranch, _pos_embed_for_grid

__all__ = ['CLIPBranchCfg', 'CLIPBranch', 'hf_clip_state_dict']

torch.fx.wrap('_pos_embed_for_grid')  # one traced node here too (fx.wrap patches the calling module's name)

# BranchCfg fields a CLIP ViT does not use, at the values that say so.
_NOT_CLIP = dict(qkv_bias=True, init_values=None, pos_embed_class_slot=True, norm='layernorm', qk_norm=False,
                 mlp_act='quick_gelu', window_size=None)


@dataclass(frozen=True)
class CLIPBranchCfg(BranchCfg):
    """One CLIP ViT branch and the size of the image it is designed for (a ``BranchCfg`` in CLIP's
    configuration: the fields for other ViT families must keep their defaults).

    ``pos_embed_grid``: side of the stored position grid (the CLIP model's ``image_size // patch_size``).
    ``class_token``: the class token runs through the blocks (PIIP-LLaVA's ``use_cls_token``); it is
    never part of the branch's output. ``pos_embed`` always holds the class token's row.
    """
    class_token: bool = True
    pos_embed_class_slot: bool = True
    mlp_act: Literal['quick_gelu'] = 'quick_gelu'
    norm_eps: float = 1e-5
    kind: Literal['clip'] = 'clip'  # the branch kind, for configs stored as dicts

    def __post_init__(self):
        other = {name: getattr(self, name) for name, default in _NOT_CLIP.items() if getattr(self, name) != default}
        if other:
            raise ValueError(f'a CLIP branch has none of the settings {other} (they belong to other ViT families).')

    def summary(self) -> str:
        return f'CLIP ViT width {self.embed_dim:>4}  depth {self.depth:>2}  heads {self.num_heads:>2}'

    def build(self, in_chans: int = 3, final_norm: bool = False, device=None, dtype=None) -> 'CLIPBranch':
        if final_norm:
            raise ValueError('CLIP branches have no per-branch classifier; use head=None (the tower maps) or "merged".')
        return CLIPBranch(self, in_chans=in_chans, device=device, dtype=dtype)


class CLIPBranch(ViTBranch):
    """A timm CLIP VisionTransformer run block by block on PIIP tokens (no final norm, no head)."""

    def __init__(self, cfg: CLIPBranchCfg, in_chans: int = 3, device=None, dtype=None) -> None:
        # ViTBranch.__init__ builds the DeiT-style ViT; a CLIP branch is timm's CLIP configuration instead.
        VisionTransformer.__init__(
            self,
            img_size=cfg.grid * cfg.patch_size,
            patch_size=cfg.patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool='',
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            class_token=True,
            pre_norm=True,
            final_norm=False,
            norm_layer=partial(LayerNorm, eps=cfg.norm_eps),
            act_layer='quick_gelu',
            weight_init='skip' if on_meta(device) else '',
            device=device,
            dtype=dtype,
        )
        self.cfg = cfg
        for block, rate in zip(self.blocks, cfg.drop_path_rates()):
            block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
            block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()

    def embed(self, image: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Grid]:
        x = self.patch_embed.proj(image)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2).contiguous()
        x = self.norm_pre(x + _pos_embed_for_grid(self.pos_embed[:, 1:], (grid_h, grid_w), self.cfg.grid))
        if not self.cfg.class_token:
            return x, None, (grid_h, grid_w)
        prefix = self.norm_pre(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return x, prefix, (grid_h, grid_w)


_HF_EMBED = {
    'embeddings.patch_embedding.weight': 'patch_embed.proj.weight',
    'pre_layrnorm.weight': 'norm_pre.weight',
    'pre_layrnorm.bias': 'norm_pre.bias',
    'post_layernorm.weight': 'norm.weight',
    'post_layernorm.bias': 'norm.bias',
}
_HF_LAYER = re.compile(r'^encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|self_attn\.out_proj|'
                       r'self_attn\.([qkv])_proj)\.(weight|bias)$')
_HF_LAYER_PARTS = {'layer_norm1': 'norm1', 'layer_norm2': 'norm2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
                   'self_attn.out_proj': 'attn.proj'}
# Parts of a full transformers CLIPModel (text tower, projections) or buffers that a vision branch has no use for.
_HF_NOT_VISION = re.compile(r'^(text_model\.|text_projection\.|visual_projection\.|logit_scale$|'
                            r'embeddings\.position_ids$)')


def hf_clip_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModel`` / ``CLIPModel`` vision weights -> timm CLIP ``VisionTransformer`` keys.

    q/k/v projections are concatenated into ``qkv``; ``post_layernorm`` becomes ``norm`` (the final norm,
    which PIIP branches do not have: drop it afterwards if the target is a branch). A ``vision_model.``
    prefix is accepted; text-tower parts and the ``position_ids`` buffer are dropped.
    """
    out, qkv, unknown = {}, {}, []
    for key, value in state_dict.items():
        key = key[len('vision_model.'):] if key.startswith('vision_model.') else key
        if _HF_NOT_VISION.match(key):
            continue
        if key in _HF_EMBED:
            out[_HF_EMBED[key]] = value
        elif key == 'embeddings.class_embedding':
            out['cls_token'] = value.reshape(1, 1, -1)
        elif key == 'embeddings.position_embedding.weight':
            out['pos_embed'] = value.unsqueeze(0)
        elif m := _HF_LAYER.match(key):
            layer, part, qkv_part, param = m.groups()
            if qkv_part:
                qkv.setdefault((layer, param), {})[qkv_part] = value
            else:
                out[f'blocks.{layer}.{_HF_LAYER_PARTS[part]}.{param}'] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f'{len(unknown)} keys are not transformers CLIP vision weights: {unknown[:6]}.')
    for (layer, param), parts in qkv.items():
        if sorted(parts) != ['k', 'q', 'v']:
            raise ValueError(f'CLIP layer {layer} has {param}s of only the {sorted(parts)} projections.')
        out[f'blocks.{layer}.attn.qkv.{param}'] = torch.cat([parts['q'], parts['k'], parts['v']], dim=0)
    return out
