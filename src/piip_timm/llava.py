"""PIIP-LLaVA (TPAMI 2025): the vision towers and their projector.

A PIIP-LLaVA vision tower is a two-branch PIIP whose output is each branch's own map after the last
interaction (``PIIP(head=None, merge=None)``): a CLIP ViT on a small image (the coarse branch) and a CLIP
ViT or ConvNeXt on the tower's input image. The ``separate_2branch_v1`` projector
(``layers.llava_projector.BranchMapProjector``) turns the two maps into the language model's image tokens.

This module holds the bridge from the original's LLaVA configs (``llava/configs/*.py`` ``model['backbone']``
and the projector config) and the conversion of its checkpoints (tower under
``model.vision_tower.vision_tower.``, projector under ``model.mm_projector.``, CLIP branches in transformers'
``CLIPVisionModel`` names, ConvNeXt layer scales stored as ``weight``).
"""
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
from torch import nn

from .clip_branch import CLIPBranchCfg, hf_clip_state_dict
from .convert import convert_original_state_dict
from .convnext_branch import ConvNeXtBranchCfg, convnext_layer_strides
from .layers.llava_projector import BranchMapProjector
from .piip import PIIP, InteractionCfg
from .weights import load_checkpoint_file, load_strict

__all__ = ['LLAVA_TASKS', 'TOWER_PREFIX', 'PROJECTOR_PREFIX', 'KNOWN_CLIP', 'translate_llava_config',
           'convert_llava_tower_state_dict', 'convert_llava_projector_state_dict', 'projector_from_config',
           'from_original_llava', 'VisionTower']

LLAVA_TASKS = ('llava_vision_tower', 'llava_projector')
TOWER_PREFIX = 'model.vision_tower.vision_tower.'
PROJECTOR_PREFIX = 'model.mm_projector.'

# transformers CLIPVisionConfig fields of the CLIP models the original names in ``pretrained``.
_CLIP_L16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=16)
KNOWN_CLIP = {
    'openai/clip-vit-base-patch16': dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=224, patch_size=16),
    'OpenGVLab/clip-vit-large-patch14to16-224': dict(_CLIP_L16, image_size=224),
    'OpenGVLab/clip-vit-large-patch14to16-336': dict(_CLIP_L16, image_size=336),
}
_CLIP_FIELDS = {'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'image_size',
                'patch_size', 'hidden_act', 'layer_norm_eps', 'num_channels', 'kind'}

# PIIPTwoBranchConfig's defaults (configuration_piip_2branch.py).
_TOWER_DEFAULTS = dict(n_points=4, deform_num_heads=6, with_cffn=False, cffn_ratio=0.25, deform_ratio=1.0,
                       interact_attn_type='normal', interaction_drop_path_rate=0.3, norm_layer='ln',
                       interaction_proj=True)
_TOWER_INERT = {'unfreeze', 'use_branch_merging', 'model_cls', 'branch1', 'branch2'}
_MODEL_CLASSES = {'2branch_v1': ('clip_hf',), '2branch_mix': ('clip_hf', 'convnext_timm')}


def _unknown_keys(config: Mapping[str, Any], allowed, where: str) -> None:
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f'{where}: unsupported or unknown keys {unknown}.')


def _clip_branch(config: Mapping[str, Any], where: str, pretrained_configs: Mapping[str, Any]) -> CLIPBranchCfg:
    """``CLIPHFWrapper``: transformers ``CLIPVisionModel.from_pretrained(pretrained).vision_model``."""
    _unknown_keys(config, {'model_type', 'img_size', 'patch_size', 'pretrain_patch_size', 'interaction_indexes',
                           'pretrained', 'use_cls_token', 'gradient_checkpointing'}, where)
    name = config.get('pretrained')
    arch = pretrained_configs.get(name) or KNOWN_CLIP.get(name)
    if arch is None:
        raise ValueError(f'{where}: the architecture of {name!r} is unknown; pass pretrained_configs={{{name!r}: '
                         '{...transformers CLIPVisionConfig fields...}}.')
    _unknown_keys(arch, _CLIP_FIELDS, f'{where}: pretrained_configs[{name!r}]')
    if arch.get('hidden_act', 'quick_gelu') != 'quick_gelu' or arch.get('num_channels', 3) != 3:
        raise ValueError(f'{where}: {name!r} needs hidden_act="quick_gelu" and 3 channels (a CLIP ViT).')
    patch_size, pretrain_patch = config.get('patch_size'), config.get('pretrain_patch_size')
    if pretrain_patch != arch['patch_size'] or patch_size != pretrain_patch:
        raise ValueError(f'{where}: patch_size {patch_size} and pretrain_patch_size {pretrain_patch} must both be '
                         f'the patch size of {name!r} ({arch["patch_size"]}).')
    if config['img_size'] % patch_size:
        raise ValueError(f'{where}: img_size {config["img_size"]} is not a multiple of patch_size {patch_size}.')
    width = arch['hidden_size']
    return CLIPBranchCfg(
        img_size=config['img_size'], embed_dim=width, depth=arch['num_hidden_layers'],
        num_heads=arch['num_attention_heads'], block_ranges=_ranges(config, where),
        mlp_ratio=arch['intermediate_size'] / width, patch_size=patch_size,
        pos_embed_grid=arch['image_size'] // pretrain_patch, class_token=bool(config.get('use_cls_token', False)),
        norm_eps=arch.get('layer_norm_eps', 1e-5))


def _convnext_branch(config: Mapping[str, Any], where: str, pretrained_configs: Mapping[str, Any]) -> ConvNeXtBranchCfg:
    """``ConvNextTimmWrapper``: ``timm.create_model(pretrained, num_classes=0)``, blocks and downsampling
    layers as counted layers."""
    _unknown_keys(config, {'model_type', 'img_size', 'interaction_indexes', 'downsample_ratios', 'pretrained',
                           'load_timm_weights', 'gradient_checkpointing'}, where)
    name = config.get('pretrained')
    arch = dict(pretrained_configs.get(name) or {'timm_arch': name})
    arch.pop('kind', None)
    arch.pop('resolved', None)  # a note of what the name resolves to
    with torch.device('meta'):
        try:
            model = timm.create_model(arch.pop('timm_arch'), pretrained=False, num_classes=0, **arch)
        except (RuntimeError, KeyError, TypeError) as e:
            raise ValueError(f'{where}: {name!r} is no timm ConvNeXt this package can build ({e}); pass '
                             f"pretrained_configs={{{name!r}: {{'timm_arch': 'convnext_base', ...}}}}.") from e
    cfg = ConvNeXtBranchCfg.from_timm(model, config['img_size'], _ranges(config, where))
    strides = convnext_layer_strides(cfg.depths)
    if tuple(config.get('downsample_ratios') or ()) != strides:
        raise ValueError(f'{where}: downsample_ratios must give the stride after each of the {len(strides)} counted '
                         f'layers, {list(strides)}; got {config.get("downsample_ratios")}.')
    return cfg


def _ranges(config: Mapping[str, Any], where: str) -> Tuple[Tuple[int, int], ...]:
    indexes = config.get('interaction_indexes')
    if not indexes:
        raise ValueError(f'{where}: interaction_indexes is required.')
    return tuple((int(r[0]), int(r[-1])) for r in indexes)


_BRANCH_BUILDERS = {'clip_hf': _clip_branch, 'convnext_timm': _convnext_branch}


def translate_llava_config(config: Mapping[str, Any], pretrained_configs: Optional[Mapping[str, Any]] = None
                           ) -> Dict[str, Any]:
    """PIIP constructor kwargs for ``model['backbone']`` of an original ``llava/configs/*.py`` file."""
    options = dict(_TOWER_DEFAULTS, **{k: v for k, v in config.items() if k != 'type'})
    _unknown_keys(options, set(_TOWER_DEFAULTS) | _TOWER_INERT, 'backbone config')
    model_cls = options.get('model_cls')
    if model_cls not in _MODEL_CLASSES:
        raise ValueError(f'model_cls {model_cls!r} is not one of {sorted(_MODEL_CLASSES)}.')
    if options['interact_attn_type'] != 'deform':
        raise ValueError(f"interact_attn_type={options['interact_attn_type']!r} is not supported; only 'deform' is.")
    if options['norm_layer'] != 'ln':
        raise ValueError(f"norm_layer={options['norm_layer']!r} is not supported; only 'ln' is.")
    branches = []
    for name in ('branch1', 'branch2'):
        branch = dict(config.get(name) or {})
        kind = branch.get('model_type')
        if kind not in _MODEL_CLASSES[model_cls]:
            raise ValueError(f'{name}: model_type {kind!r} does not exist in the original {model_cls} model '
                             f'(it has {list(_MODEL_CLASSES[model_cls])}).')
        branches.append(_BRANCH_BUILDERS[kind](branch, name, pretrained_configs or {}))
    interaction = InteractionCfg(
        num_heads=options['deform_num_heads'], num_points=options['n_points'], value_ratio=options['deform_ratio'],
        with_ffn=options['with_cffn'], ffn_ratio=options['cffn_ratio'],
        drop_path=options['interaction_drop_path_rate'], project=options['interaction_proj'], norm=True)
    return dict(branches=branches, interaction=interaction, head=None, merge=None, num_classes=0)


# --------------------------------------------------------------------------- checkpoints
_TOWER_BRANCH = re.compile(r'^branch(\d)\.(clip_model|convnext_model)\.(.+)$')
_CONVNEXT_LAYER_SCALE = re.compile(r'^(stages\.\d+\.blocks\.\d+)\.weight$')
_INJECTOR_GAMMAS = (('.ca_weight', '.ca_gamma'), ('.cffn_weight', '.cffn_gamma'))
# Parts of the original branches that its forward never uses: CLIP's post_layernorm (timm: norm) and a
# ConvNeXt's classifier head (norm, and the pre-logits MLP of convnext_large_mlp).
UNUSED_BRANCH_PARTS = re.compile(r'^branches\.\d+\.(norm|head)\.')


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (without it) if any key has it, else all of them."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def convert_llava_tower_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An original PIIP-LLaVA tower state dict (optionally still under ``model.vision_tower.vision_tower.``)
    -> this package's keys; the branches' unused parts (CLIP ``post_layernorm``, ConvNeXt ``head``) are dropped.
    A state dict already in this package's layout passes as it is."""
    state = _strip_prefix(state_dict, TOWER_PREFIX)
    if any(k.startswith('branches.') for k in state):
        return state
    clip: Dict[int, Dict[str, torch.Tensor]] = {}
    out, interactions, unknown = {}, {}, []
    for key, value in state.items():
        if m := _TOWER_BRANCH.match(key):
            index, kind, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
            if kind == 'clip_model':
                clip.setdefault(index, {})[rest] = value
            else:
                rest = _CONVNEXT_LAYER_SCALE.sub(r'\1.gamma', rest)  # the original's monkey patch names it weight
                out[f'branches.{index}.{rest}'] = value
        elif key.startswith('interactions.'):
            for old, new in _INJECTOR_GAMMAS:
                key = key.replace(old, new)
            interactions[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f'{len(unknown)} keys are not part of an original PIIP-LLaVA vision tower: {unknown[:6]}.')
    for index, weights in clip.items():
        out.update({f'branches.{index}.{k}': v for k, v in hf_clip_state_dict(weights).items()})
    out.update(convert_original_state_dict(interactions))
    return {k: v for k, v in out.items() if not UNUSED_BRANCH_PARTS.match(k)}


_PROJECTOR_KEY = re.compile(r'^branch(\d)\.(1|3|6)\.(weight|bias)$')
_PROJECTOR_LAYERS = {'1': 'fc1', '3': 'norm', '6': 'fc2'}


def convert_llava_projector_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An original ``TwoBranchMLP`` state dict (optionally under ``model.mm_projector.`` or ``mm_projector.``)
    -> ``BranchMapProjector`` keys; one in this package's layout passes as it is."""
    state = _strip_prefix(_strip_prefix(state_dict, PROJECTOR_PREFIX), 'mm_projector.')
    if any(k.startswith('mlps.') for k in state):
        return state
    out, unknown = {}, []
    for key, value in state.items():
        if m := _PROJECTOR_KEY.match(key):
            out[f'mlps.{int(m.group(1)) - 1}.{_PROJECTOR_LAYERS[m.group(2)]}.{m.group(3)}'] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f'{len(unknown)} keys are not part of a separate_2branch_v1 projector: {unknown[:6]}.')
    return out


def projector_from_config(config: Mapping[str, Any], out_dim: int, **factory_kwargs) -> BranchMapProjector:
    """The projector of an original config's ``model['projector']`` for a language model of width ``out_dim``."""
    _unknown_keys(config, {'type', 'dim1', 'dim2', 'norm', 'out_shape'}, 'projector config')
    if config.get('type') != 'separate_2branch_v1':
        raise ValueError(f"projector type {config.get('type')!r} is not supported; only 'separate_2branch_v1' is.")
    if config.get('norm', 'gn') != 'gn' or config.get('out_shape') is not None:
        raise ValueError('only the GroupNorm projector without out_shape (what every released config uses) is supported.')
    return BranchMapProjector((config['dim1'], config['dim2']), out_dim, **factory_kwargs)


def _state(checkpoint: Union[str, os.PathLike, Mapping[str, Any]]) -> Mapping[str, torch.Tensor]:
    return load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint


def from_original_llava(
        config: Mapping[str, Any],
        task: str,
        checkpoint: Union[None, str, os.PathLike, Mapping[str, Any]] = None,
        pretrained_configs: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """``from_original`` for the PIIP-LLaVA tasks (see ``original.from_original``).

    ``'llava_vision_tower'``: ``config`` is ``model['backbone']``; the module's forward returns the two
    branch maps. ``'llava_projector'``: ``config`` is ``{'config': model['projector'], 'out_dim': LLM width}``;
    the module's forward takes the two maps and returns the image tokens.
    """
    if task == 'llava_projector':
        if pretrained_configs:
            raise ValueError('pretrained_configs describes tower branches; the projector takes none.')
        model = projector_from_config(config['config'], config['out_dim'])
        if checkpoint is not None:
            load_strict(model, convert_llava_projector_state_dict(_state(checkpoint)))
        return model
    if task != 'llava_vision_tower':
        raise ValueError(f'task must be one of {LLAVA_TASKS}, got {task!r}.')
    model = PIIP(**translate_llava_config(config, pretrained_configs))
    if checkpoint is not None:
        load_strict(model, convert_llava_tower_state_dict(_state(checkpoint)))
    return VisionTower(model)


class VisionTower(nn.Module):
    """A tower whose forward returns what the original's returns: the branch maps, coarsest first
    (``model.forward_features``). The PIIP model itself pools them in ``forward`` (timm's contract)."""

    def __init__(self, model: PIIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_features(x)
