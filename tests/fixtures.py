"""Weight files in the exact layouts of the real Hub repositories, at tiny sizes.

* ``timm/<model>``: ``model.safetensors`` with timm's ViT keys, from timm's own architecture
  definition at narrow width (so flags like class slot / layer scale / patch size are the real ones).
* ``OpenGVLab/InternViT-6B-224px``: transformers InternViT keys in two safetensors shards + index.
* ``OpenGVLab/PIIP``: original-layout PIIP checkpoints, ``{'model': ...}`` for classifiers and mmdet's
  ``{'state_dict': {'backbone.*', 'neck.*', ...}, 'meta': ...}`` for detectors.
"""
import argparse
import io
import json
import random
from dataclasses import asdict
from typing import Dict, List

import timm
import torch
from safetensors.torch import save as save_safetensors

from piip_timm.convnext_branch import ConvNeXtBranchCfg
from piip_timm.piip import BranchCfg

INTERNVIT_REPO = 'OpenGVLab/InternViT-6B-224px'


def random_like(state: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in state.items()}


def timm_branch_weights(timm_name: str, cfg, seed: int) -> Dict[str, torch.Tensor]:
    """A tiny twin of a timm pretrained model's weights (timm keys, the real model's flags and grid)."""
    arch = timm_name.split('.')[0]
    if isinstance(cfg, ConvNeXtBranchCfg):
        model = timm.create_model(arch, pretrained=False, dims=cfg.dims, depths=cfg.depths)
    else:
        model = timm.create_model(arch, pretrained=False, embed_dim=cfg.embed_dim, depth=cfg.depth,
                                  num_heads=cfg.num_heads)
    return random_like(model.state_dict(), seed)


def internvit_hf_weights(cfg: BranchCfg, seed: int) -> Dict[str, torch.Tensor]:
    """A tiny InternViT-6B-224px in transformers' InternVisionModel layout (patch 14, 16x16 grid + class)."""
    d = cfg.embed_dim
    shapes = {
        'embeddings.class_embedding': (1, 1, d),
        'embeddings.patch_embedding.weight': (d, 3, 14, 14),
        'embeddings.patch_embedding.bias': (d,),
        'embeddings.position_embedding': (1, 257, d),
    }
    for i in range(cfg.depth):
        p = f'encoder.layers.{i}.'
        shapes.update({
            p + 'attn.qkv.weight': (3 * d, d), p + 'attn.q_norm.weight': (d,), p + 'attn.k_norm.weight': (d,),
            p + 'attn.proj.weight': (d, d), p + 'attn.proj.bias': (d,),
            p + 'mlp.fc1.weight': (4 * d, d), p + 'mlp.fc1.bias': (4 * d,),
            p + 'mlp.fc2.weight': (d, 4 * d), p + 'mlp.fc2.bias': (d,),
            p + 'norm1.weight': (d,), p + 'norm2.weight': (d,), p + 'ls1': (d,), p + 'ls2': (d,),
        })
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def internvit_repo_files(weights: Dict[str, torch.Tensor]) -> Dict[str, bytes]:
    """Two shards and the index, as transformers writes them."""
    keys = sorted(weights)
    halves = {'model-00001-of-00002.safetensors': keys[: len(keys) // 2],
              'model-00002-of-00002.safetensors': keys[len(keys) // 2:]}
    files = {name: save_safetensors({k: weights[k].contiguous() for k in names}) for name, names in halves.items()}
    index = {'metadata': {'total_size': sum(v.numel() * v.element_size() for v in weights.values())},
             'weight_map': {k: name for name, names in halves.items() for k in names}}
    files['model.safetensors.index.json'] = json.dumps(index).encode()
    return files


# Seeds of 4 KiB of random bytes that make torch's weights-only unpickler fail in each of the ways seen
# (found by trying seeds: an unknown opcode, an empty stack, an unknown memo key, an undecodable string).
GARBAGE_SEEDS = {'UnpicklingError': 0, 'IndexError': 2, 'KeyError': 20, 'UnicodeDecodeError': 195}


def garbage_bytes(seed: int) -> bytes:
    return random.Random(seed).randbytes(4096)


def save_safetensors_bytes(weights: Dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in weights.items()})


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def released_classifier_file(original_state: Dict[str, torch.Tensor]) -> bytes:
    """A DeiT-style training checkpoint: weights under 'model', training arguments as a Namespace."""
    return torch_bytes({'model': original_state, 'epoch': 299,
                        'args': argparse.Namespace(model='piip_3branch', lr=5e-4, input_size=368)})


def released_detector_file(original_state: Dict[str, torch.Tensor]) -> bytes:
    """An mmdet checkpoint: the backbone under 'backbone.', beside neck and heads, with mmcv's meta."""
    state = {f'backbone.{k}': v for k, v in original_state.items()}
    state.update({'neck.lateral_convs.0.conv.weight': torch.zeros(4, 4, 1, 1),
                  'rpn_head.rpn_conv.weight': torch.zeros(4, 4, 3, 3)})
    meta = {'mmdet_version': '2.25.3', 'CLASSES': ('person', 'bicycle'), 'epoch': 12, 'iter': 87960,
            'config': 'model = dict(...)', 'hook_msgs': {'last_ckpt': 'work_dirs/epoch_12.pth'}}
    return torch_bytes({'meta': meta, 'state_dict': state})


def branch_dicts(branches: List[BranchCfg]) -> List[dict]:
    return [asdict(b) for b in branches]


# Tiny widths by the real branch width: every tag that uses a pretrained model gets the same twin.
TINY_WIDTH = {3200: 128, 1280: 96, 1024: 96, 768: 64, 384: 32, 192: 32}


# Tiny ConvNeXt stages by the real ones: (dims, depths) of T, S and B twins (widths fit GroupNorm(32)).
TINY_CONVNEXT = {((96, 192, 384, 768), (3, 3, 9, 3)): ((32, 32, 32, 32), (2, 1, 2, 1)),
                 ((96, 192, 384, 768), (3, 3, 27, 3)): ((32, 32, 32, 32), (2, 1, 3, 1)),
                 ((128, 256, 512, 1024), (3, 3, 27, 3)): ((32, 32, 64, 64), (2, 1, 3, 1))}


def pretrained_tiny_branches(branches: List[BranchCfg], interactions: int = 2) -> List[BranchCfg]:
    """Tiny twins of a tag's branches whose shapes depend only on the pretrained model of each branch."""
    from dataclasses import replace
    from piip_timm.builder import spread_layers
    from piip_timm.piip import even_block_ranges
    out = []
    for i, b in enumerate(branches):
        if isinstance(b, ConvNeXtBranchCfg):
            dims, depths = TINY_CONVNEXT[(tuple(b.dims), tuple(b.depths))]
            tiny = replace(b, dims=dims, depths=depths, img_size=64 * (i + 2))
            out.append(replace(tiny, block_ranges=spread_layers(tiny.num_layers, interactions)))
            continue
        dim = TINY_WIDTH[b.embed_dim]
        per_step = 1 if all(s == e for s, e in b.block_ranges) else 2
        depth = per_step * interactions
        out.append(replace(
            b, embed_dim=dim, num_heads=dim // 32, depth=depth, img_size=32 * (i + 2),
            pos_embed_grid=4 if b.pos_embed_grid else None, block_ranges=even_block_ranges(depth, interactions),
            window_size=2 if b.window_size else None))
    return out


def to_original_layout(state: Dict[str, torch.Tensor], layer_scale_as_gamma: set) -> Dict[str, torch.Tensor]:
    """This package's layout -> the original's, written out independently of piip_timm.convert.

    ``layer_scale_as_gamma``: branch indices built as deit.py vit_models (gamma_1/gamma_2 names).
    """
    import re
    units = {'fine_to_coarse_proj': 'branch2to1_proj', 'coarse_to_fine_proj': 'branch1to2_proj',
             'fine_to_coarse': 'branch2to1_injector', 'coarse_to_fine': 'branch1to2_injector'}
    merges = {'conv1': '0', 'norm1': '1', 'conv2': '3', 'norm2': '4'}
    out = {}
    for key, value in state.items():
        if m := re.match(r'branches\.(\d+)\.(.*)', key):
            i, rest = int(m.group(1)), m.group(2)
            if i in layer_scale_as_gamma:
                rest = re.sub(r'ls([12])\.gamma$', r'gamma_\1', rest)
            out[f'branch{i + 1}.{rest}'] = value
        elif m := re.match(r'interactions\.(\d+)\.(\d+)\.([a-z_]+)\.(.*)', key):
            step, u, part, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            rest = rest.replace('attn_gamma', 'ca_gamma').replace('ffn_gamma', 'cffn_gamma')
            rest = rest.replace('ffn.dwconv.', 'ffn.dwconv.dwconv.')
            out[f'interactions.{step}.interaction_units_{u + 1}{u + 2}.{units[part]}.{rest}'] = value
        elif m := re.match(r'merges\.(\d+)\.([a-z0-9]+)\.(.*)', key):
            out[f'merge_branch{int(m.group(1)) + 1}.{merges[m.group(2)]}.{m.group(3)}'] = value
        elif key == 'branch_weights':
            for i, w in enumerate(value):
                out[f'w{i + 1}'] = w.clone()
        elif m := re.match(r'pyramid\.up4\.(.*)', key):
            out[f'fpn1.{m.group(1)}'] = value
        elif m := re.match(r'pyramid\.up2\.(.*)', key):
            out[f'fpn2.{m.group(1)}'] = value
        else:
            raise KeyError(key)
    return out


# The released PIIP checkpoints in OpenGVLab/PIIP, written out from the original README's download links
# (not read from this package's tag table, so a wrong file name in the table fails to load).
RELEASED_FILES = {
    'piip_tsb.in1k': 'classification/piip_3branch_tsb_368-192-128_cls_token_deit1.pth',
    'piip_sbl.in1k': 'classification/piip_3branch_sbl_384-192-128_cls_token_augreg.pth',
    'piip_sbl.in1k_320': 'classification/piip_3branch_sbl_320-160-96_cls_token_augreg.pth',
    'piip_tsb.coco_1120_896_448': 'detection/mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16.pth',
    'piip_tsb.coco_1568_896_448': 'detection/mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16.pth',
    'piip_tsb.coco_1568_1120_672': 'detection/mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_1120_672_448': 'detection/mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_1344_896_448': 'detection/mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_1568_896_672': 'detection/mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_1568_1120_672': 'detection/mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_tsbl.coco_1344_896_672_448': 'detection/mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16.pth',
    'piip_tsbl.coco_1568_1120_672_448': 'detection/mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16.pth',
    'piip_tsbl.coco_1792_1568_1120_448': 'detection/mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16.pth',
    'piip_h6b.coco_1024_512': 'detection/mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms.pth',
    'piip_ct_cs_cb.coco_1024_672_448': 'detection/mask_rcnn_convnext-tsb_1024_672_448_regular-fpn.pth',
    'piip_sbl.coco_beitv2_1568_1120_672': 'detection/mask_rcnn_beit_sbl_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_uniperceiver_1568_1120_672':
        'detection/mask_rcnn_uniperceiver_sbl_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_dinov2_1568_1120_672': 'detection/mask_rcnn_dinov2_sbl_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_mae_1568_1120_672': 'detection/mask_rcnn_mae_sbl_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_augreg_1568_1120_672': 'detection/mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16.pth',
    'piip_sbl.coco_dino_1792_1120_672': 'detection/dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms.pth',
    'piip_h6b.coco_dino_1024_768': 'detection/dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms.pth',
    'piip_h6b.ade20k_512_192': 'segmentation/upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5.pth',
    'piip_h6b.ade20k_512_256': 'segmentation/upernet_internvit_h6b_256_512_80k_ade20k_bs16_lr4e-5.pth',
    'piip_h6b.ade20k_512_384': 'segmentation/upernet_internvit_h6b_384_512_80k_ade20k_bs16_lr4e-5.pth',
    'piip_h6b.ade20k_512_512': 'segmentation/upernet_internvit_h6b_512_512_80k_ade20k_bs16_lr4e-5.pth',
}
_DEIT3 = {size: f'timm/deit3_{size}_patch16_224.fb_in22k_ft_in1k' for size in ('large', 'base', 'small')}
_DEIT_T = 'timm/deit_tiny_patch16_224.fb_in1k'
_MAE_H = 'timm/vit_huge_patch14_224.mae'
# The Hub repositories of every branch of the tags assembled from single-model weights (coarse to fine):
# the pretrained models the paper starts from (DeiT, DeiT III, AugReg, MAE, InternViT-6B).
# Written out from the original README's model table: PIIP-LLaVA tower tag -> the config (and manifest)
# it was trained with.
RELEASED_TOWER_CONFIGS = {
    'piip_llava_clip_bl_512_256.llava_7b': 'piip-llava_clip-bl_512-256_7B',
    'piip_llava_clip_bl_512_448.llava_7b': 'piip-llava_clip-bl_512-448_7B',
    'piip_llava_clip_bl_512_448.llava_13b': 'piip-llava_clip-bl_512-448_13B',
    'piip_llava_convnext_b_clip_l_640_224.llava_7b': 'piip-llava_convnext-b_clip-l_640-224_7B',
    'piip_llava_convnext_b_clip_l_1024_336.llava_7b': 'piip-llava_convnext-b_clip-l_1024-336_7B',
    'piip_llava_convnext_b_clip_l_1024_336_13b.llava_13b': 'piip-llava_convnext-b_clip-l_1024-336_13B',
    'piip_llava_convnext_l_clip_l_1024_336.llava_7b': 'piip-llava_convnext-l_clip-l_1024-336_7B',
    'piip_llava_convnext_l_clip_l_1024_336.llava_plus_7b': 'piip-llava-plus_convnext-l_clip-l_1024-336_7B',
    'piip_llava_convnext_l_clip_l_1024_336_13b.llava_13b': 'piip-llava_convnext-l_clip-l_1024-336_13B',
}
BRANCH_REPOS = {
    'piip_tsb.deit_in1k': ('timm/deit_base_patch16_224.fb_in1k', 'timm/deit_small_patch16_224.fb_in1k', _DEIT_T),
    'piip_tsb.deit3_in22k': (_DEIT3['base'], _DEIT3['small'], _DEIT_T),
    'piip_sbl.augreg_in21k_ft_in1k': tuple(f'timm/vit_{size}_patch16_224.augreg_in21k_ft_in1k'
                                           for size in ('large', 'base', 'small')),
    'piip_sbl.deit3_in22k': (_DEIT3['large'], _DEIT3['base'], _DEIT3['small']),
    'piip_tsbl.deit3_in22k': (_DEIT3['large'], _DEIT3['base'], _DEIT3['small'], _DEIT_T),
    'piip_lh6b.branches': (INTERNVIT_REPO, _MAE_H, 'timm/deit3_large_patch16_384.fb_in22k_ft_in1k'),
    'piip_h6b.branches': (INTERNVIT_REPO, _MAE_H),
    # ConvNeXt / hybrid detectors: timm's ImageNet-1k ConvNeXts (the original's facebook/convnext-*-224), DeiT (III)
    'piip_ct_cs_cb.branches': ('timm/convnext_base.fb_in1k', 'timm/convnext_small.fb_in1k', 'timm/convnext_tiny.fb_in1k'),
    'piip_ct_vs_vb.branches': (_DEIT3['base'], _DEIT3['small'], 'timm/convnext_tiny.fb_in1k'),
    'piip_ct_cs_vb.branches': (_DEIT3['base'], 'timm/convnext_small.fb_in1k', 'timm/convnext_tiny.fb_in1k'),
    'piip_ct_vs_cb.branches': ('timm/convnext_base.fb_in1k', _DEIT3['small'], 'timm/convnext_tiny.fb_in1k'),
    'piip_vt_cs_vb.branches': (_DEIT3['base'], 'timm/convnext_small.fb_in1k', _DEIT_T),
    'piip_vt_cs_cb.branches': ('timm/convnext_base.fb_in1k', 'timm/convnext_small.fb_in1k', _DEIT_T),
    'piip_vt_vs_cb.branches': ('timm/convnext_base.fb_in1k', _DEIT3['small'], _DEIT_T),
    # SBL detectors of other pretrained families (TPAMI 2025): timm models holding the same weights
    'piip_sbl.beitv2_in22k': ('timm/beitv2_large_patch16_224.in1k_ft_in22k', 'timm/beitv2_base_patch16_224.in1k_ft_in22k',
                              _DEIT3['small']),
    'piip_sbl.dinov2_lvd142m': tuple(f'timm/vit_{size}_patch14_dinov2.lvd142m' for size in ('large', 'base', 'small')),
    'piip_sbl.mae_in1k': ('timm/vit_large_patch16_224.mae', 'timm/vit_base_patch16_224.mae', _DEIT3['small']),
    'piip_sbl.augreg384_in21k_ft_in1k': tuple(f'timm/vit_{size}_patch16_384.augreg_in21k_ft_in1k'
                                              for size in ('large', 'base', 'small')),
    'piip_sbl.deit3_384_in22k': tuple(f'timm/deit3_{size}_patch16_384.fb_in22k_ft_in1k'
                                      for size in ('large', 'base', 'small')),
}


def shared_storage_state(shapes: Dict[str, List[int]], seed: int = 0, size: int = 1 << 20) -> Dict[str, torch.Tensor]:
    """Tensors of any (full-model) shapes as views of one random buffer of ``size`` floats, so a
    checkpoint of a multi-billion-parameter layout saves and loads in megabytes. Tensors larger than
    the buffer repeat it along their leading dimensions."""
    buffer = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    state = {}
    for key, shape in shapes.items():
        shape = tuple(shape)
        inner, split = 1, len(shape)
        while split and inner * shape[split - 1] <= size:
            split -= 1
            inner *= shape[split]
        strides, step = [], 1
        for dim in reversed(shape[split:]):
            strides.insert(0, step)
            step *= dim
        state[key] = buffer.as_strided(shape, [0] * split + strides)
    return state
