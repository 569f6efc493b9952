"""PIIP-LLaVA (TPAMI 2025): the vision towers and their projector.

A PIIP-LLaVA vision tower is a two-branch PIIP whose output is each branch's own map after the last
interaction (``PIIP(head=None, merge=None)``): a CLIP ViT on a small image (the coarse branch) and a CLIP
ViT or ConvNeXt on the tower's input image. The ``separate_2branch_v1`` projector
(``layers.llava_projector.BranchMapProjector``) turns the two maps into the language model's image tokens.

This module holds the bridge from the original's LLaVA configs (``llava/configs/*.py`` ``model['backbone']``
and the projector config), the conversion of its checkpoints (tower under ``model.vision_tower.vision_tower.``,
projector under ``model.mm_projector.``, CLIP branches in transformers' ``CLIPVisionModel`` names, ConvNeXt
layer scales stored as ``weight``), the seven registered towers (``piip_llava_*``) with the nine released
models as tags (only the shards holding the tower or projector are downloaded) and branch-weight tags, the
projector factory and the original preprocessing.
"""
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .branch import BlockRanges, even_block_ranges
from .clip_branch import CLIPBranchCfg, hf_clip_state_dict
from .convert import checkpoint_filter_fn, convert_original_state_dict
from .convnext_branch import CONVNEXT_SIZES, ConvNeXtBranchCfg, convnext_layer_strides
from .hub import INDEX_FILES
from .hub import BranchSource, HubFile, check_hub_files, load_branch_state_dict, load_sharded_state_dict
from .layers.llava_projector import BranchMapProjector
from .piip import PIIP, BranchSpec, InteractionCfg
from .branch_kinds import as_branch_cfg
from .variants import CONVNEXT_SB_RANGES, VariantCfg, _cfg, customize_branches, requested_tag
from .weights import load_checkpoint_file, load_strict

__all__ = ['LLAVA_TASKS', 'TOWER_PREFIX', 'PROJECTOR_PREFIX', 'KNOWN_CLIP', 'translate_llava_config',
           'convert_llava_tower_state_dict', 'convert_llava_projector_state_dict', 'projector_from_config',
           'from_original_llava', 'VisionTower', 'TOWERS', 'TOWER_TAGS', 'create_llava_projector',
           'create_llava_transform', 'PadToSquare']

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


# --------------------------------------------------------------------------- variants and tags
def clip_l_branch(img_size: int, pretrain_size: int, block_ranges: BlockRanges) -> CLIPBranchCfg:
    """The OpenGVLab patch-16 CLIP-L (``clip-vit-large-patch14to16-{224,336}``) on ``img_size`` px."""
    return CLIPBranchCfg(img_size=img_size, embed_dim=1024, depth=24, num_heads=16, block_ranges=block_ranges,
                         pos_embed_grid=pretrain_size // 16)


def clip_b_branch(img_size: int, block_ranges: BlockRanges) -> CLIPBranchCfg:
    """OpenAI CLIP-B/16 (224 px pretraining) on ``img_size`` px."""
    return CLIPBranchCfg(img_size=img_size, embed_dim=768, depth=12, num_heads=12, block_ranges=block_ranges,
                         pos_embed_grid=14)


def convnext_tower_branch(size: str, img_size: int, block_ranges: BlockRanges) -> ConvNeXtBranchCfg:
    """ConvNeXt-B (``convnext_base``) or ConvNeXt-L (``convnext_large_mlp``, head MLP unused) on ``img_size`` px."""
    dims, depths = CONVNEXT_SIZES[size]
    return ConvNeXtBranchCfg(img_size=img_size, dims=dims, depths=depths, block_ranges=block_ranges)


# The original configs' interaction settings (all nine llava/configs/*.py).
TOWER_INTERACTION = InteractionCfg(num_heads=16, num_points=4, value_ratio=0.5, with_ffn=True, ffn_ratio=0.25,
                                   drop_path=0.4)
# ConvNeXt counted-layer ranges of the 24-interaction (13B) configs: each of the 12-interaction ranges in two.
CONVNEXT_24_RANGES = (
    (0, 1), (2, 2), (3, 4), (5, 6), (7, 9), (10, 10), (11, 12), (13, 13), (14, 15), (16, 16), (17, 18), (19, 19),
    (20, 21), (22, 22), (23, 24), (25, 25), (26, 27), (28, 28), (29, 30), (31, 31), (32, 33), (34, 34), (35, 36),
    (37, 38))
HALVES_12, HALVES_24 = even_block_ranges(12, 2), even_block_ranges(24, 2)


def tower(*branches: BranchSpec) -> VariantCfg:
    return VariantCfg(branches=tuple(branches), interaction=TOWER_INTERACTION, head=None, merge=None)


# The seven distinct towers of the nine released PIIP-LLaVA models (llava/configs/*.py), coarsest branch first.
TOWERS: Dict[str, VariantCfg] = {
    'piip_llava_clip_bl_512_256': tower(clip_l_branch(256, 224, HALVES_24), clip_b_branch(512, HALVES_12)),
    'piip_llava_clip_bl_512_448': tower(clip_l_branch(448, 336, even_block_ranges(24, 12)),
                                        clip_b_branch(512, even_block_ranges(12, 12))),
    'piip_llava_convnext_b_clip_l_640_224': tower(clip_l_branch(224, 224, HALVES_24),
                                                  convnext_tower_branch('B', 640, ((0, 19), (20, 38)))),
    'piip_llava_convnext_b_clip_l_1024_336': tower(clip_l_branch(336, 336, even_block_ranges(24, 12)),
                                                   convnext_tower_branch('B', 1024, CONVNEXT_SB_RANGES)),
    'piip_llava_convnext_b_clip_l_1024_336_13b': tower(clip_l_branch(336, 336, even_block_ranges(24, 24)),
                                                       convnext_tower_branch('B', 1024, CONVNEXT_24_RANGES)),
    'piip_llava_convnext_l_clip_l_1024_336': tower(clip_l_branch(336, 336, even_block_ranges(24, 12)),
                                                   convnext_tower_branch('L', 1024, CONVNEXT_SB_RANGES)),
    'piip_llava_convnext_l_clip_l_1024_336_13b': tower(clip_l_branch(336, 336, even_block_ranges(24, 24)),
                                                       convnext_tower_branch('L', 1024, CONVNEXT_24_RANGES)),
}

CLIP_FILES = ('model.safetensors', 'pytorch_model.bin')


@dataclass(frozen=True)
class CLIPRepo:
    """A transformers ``CLIPVisionModel`` / ``CLIPModel`` repository (the OpenGVLab patch-16 CLIP-L models)."""
    repo_id: str

    def hub_files(self) -> List[HubFile]:
        return [HubFile(self.repo_id, CLIP_FILES[0])]

    def load(self) -> Dict[str, torch.Tensor]:
        """The vision weights in timm's CLIP ViT keys (safetensors, else the pickled weights-only file)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
        for filename in CLIP_FILES:
            try:
                return hf_clip_state_dict(load_checkpoint_file(hf_hub_download(self.repo_id, filename)))
            except EntryNotFoundError:
                continue
        raise FileNotFoundError(f'{self.repo_id} has neither {" nor ".join(CLIP_FILES)}.')

    def __str__(self) -> str:
        return self.repo_id


CLIP_L_224, CLIP_L_336 = (CLIPRepo(f'OpenGVLab/clip-vit-large-patch14to16-{s}') for s in (224, 336))
CLIP_B = BranchSource(timm_model='vit_base_patch16_clip_quickgelu_224.openai')
CONVNEXT_B = BranchSource(timm_model='convnext_base.clip_laiona_augreg_320')
CONVNEXT_L = BranchSource(timm_model='convnext_large_mlp.clip_laion2b_ft_320')


@dataclass(frozen=True)
class TowerTag:
    """A pretrained tower: a released PIIP-LLaVA model (``repo``, its language model's width), or
    per-branch sources (the single models the original started from; interactions fresh)."""
    repo: Optional[str] = None
    llm_width: Optional[int] = None
    branch_sources: Tuple[Union[BranchSource, CLIPRepo], ...] = ()
    notes: str = ''

    def hub_files(self) -> List[HubFile]:
        if self.repo:
            return [HubFile(self.repo, name) for name in INDEX_FILES[:1]]
        return [f for s in self.branch_sources for f in s.hub_files()]

    def load_tower(self) -> Dict[str, torch.Tensor]:
        """The tower's weights: the original layout of a released model (only the shards holding it are
        downloaded), or the branches' single-model weights under ``branches.{i}.``."""
        if self.repo:
            return load_sharded_state_dict(self.repo, keep=lambda k: k.startswith(TOWER_PREFIX))
        return {f'branches.{i}.{k}': v for i, s in enumerate(self.branch_sources)
                for k, v in (s.load() if isinstance(s, CLIPRepo) else load_branch_state_dict(s)).items()}


def _released(name: str, llm_width: int, notes: str) -> TowerTag:
    return TowerTag(repo=f'OpenGVLab/{name}', llm_width=llm_width, notes=notes)


VICUNA_7B, VICUNA_13B = 4096, 5120
# variant -> tag -> weights; the first tag is what pretrained=True gives.
TOWER_TAGS: Dict[str, Dict[str, TowerTag]] = {
    'piip_llava_clip_bl_512_256': {
        'llava_7b': _released('PIIP-LLaVA_CLIP-BL_512-256_7B', VICUNA_7B, 'PIIP-LLaVA-7B vision tower'),
        'branches': TowerTag(branch_sources=(CLIP_L_224, CLIP_B), notes='CLIP-L/16, CLIP-B/16 branches'),
    },
    'piip_llava_clip_bl_512_448': {
        'llava_7b': _released('PIIP-LLaVA_CLIP-BL_512-448_7B', VICUNA_7B, 'PIIP-LLaVA-7B vision tower'),
        'llava_13b': _released('PIIP-LLaVA_CLIP-BL_512-448_13B', VICUNA_13B, 'PIIP-LLaVA-13B vision tower'),
        'branches': TowerTag(branch_sources=(CLIP_L_336, CLIP_B), notes='CLIP-L/16-336, CLIP-B/16 branches'),
    },
    'piip_llava_convnext_b_clip_l_640_224': {
        'llava_7b': _released('PIIP-LLaVA_ConvNeXt-B_CLIP-L_640-224_7B', VICUNA_7B, 'PIIP-LLaVA-7B vision tower'),
        'branches': TowerTag(branch_sources=(CLIP_L_224, CONVNEXT_B), notes='CLIP-L/16, CLIP ConvNeXt-B branches'),
    },
    'piip_llava_convnext_b_clip_l_1024_336': {
        'llava_7b': _released('PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_7B', VICUNA_7B, 'PIIP-LLaVA-7B vision tower'),
        'branches': TowerTag(branch_sources=(CLIP_L_336, CONVNEXT_B), notes='CLIP-L/16-336, CLIP ConvNeXt-B branches'),
    },
    'piip_llava_convnext_b_clip_l_1024_336_13b': {
        'llava_13b': _released('PIIP-LLaVA_ConvNeXt-B_CLIP-L_1024-336_13B', VICUNA_13B, 'PIIP-LLaVA-13B vision tower'),
        'branches': TowerTag(branch_sources=(CLIP_L_336, CONVNEXT_B), notes='CLIP-L/16-336, CLIP ConvNeXt-B branches'),
    },
    'piip_llava_convnext_l_clip_l_1024_336': {
        'llava_7b': _released('PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_7B', VICUNA_7B, 'PIIP-LLaVA-7B vision tower'),
        'llava_plus_7b': _released('PIIP-LLaVA-Plus_ConvNeXt-L_CLIP-L_1024-336_7B', VICUNA_7B,
                                   'PIIP-LLaVA-Plus-7B vision tower (more training data)'),
        'branches': TowerTag(branch_sources=(CLIP_L_336, CONVNEXT_L), notes='CLIP-L/16-336, CLIP ConvNeXt-L branches'),
    },
    'piip_llava_convnext_l_clip_l_1024_336_13b': {
        'llava_13b': _released('PIIP-LLaVA_ConvNeXt-L_CLIP-L_1024-336_13B', VICUNA_13B, 'PIIP-LLaVA-13B vision tower'),
        'branches': TowerTag(branch_sources=(CLIP_L_336, CONVNEXT_L), notes='CLIP-L/16-336, CLIP ConvNeXt-L branches'),
    },
}


def tower_filter_fn(state_dict: Dict[str, Any], model: PIIP) -> Dict[str, torch.Tensor]:
    """A released PIIP-LLaVA tower (original layout, under its LLaVA prefix or not), this package's layout, or
    assembled branch weights -> a complete state dict for ``model``."""
    return checkpoint_filter_fn(convert_llava_tower_state_dict(state_dict), model)


def _create_tower(variant: str, pretrained: bool = False, **kwargs) -> PIIP:
    name = requested_tag(kwargs, TOWER_TAGS[variant])
    tag = TOWER_TAGS[variant].get(name)
    spec = TOWERS[variant]
    branches = customize_branches(
        [as_branch_cfg(b) for b in kwargs.pop('branches', None) or spec.branches],
        kwargs.pop('img_size', None), -1, kwargs.pop('drop_path_rate', None))
    interaction = kwargs.pop('interaction', spec.interaction)
    if isinstance(interaction, Mapping):
        interaction = InteractionCfg(**interaction)
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if pretrained and not any(overlay.get(k) for k in ('file', 'state_dict', 'url')):
        if tag is None:
            raise ValueError(f'{variant} has no pretrained tag {name!r}; choose one of {sorted(TOWER_TAGS[variant])}.')
        check_hub_files(tag.hub_files())
        kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=tag.load_tower())
    # features_only: the two maps the projector takes (finest first); the plain tower's intermediates are
    # every branch's map after each interaction step.
    levels = 'branches' if kwargs.get('features_only') else 'steps'
    levels = kwargs.pop('feature_levels', levels)
    model = build_model_with_cfg(
        PIIP, variant, pretrained, pretrained_filter_fn=tower_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1)),
        branches=branches, interaction=interaction, head=None, merge=None, feature_levels=levels, **kwargs)
    cfg = getattr(model, 'pretrained_cfg', None)
    if isinstance(cfg, dict) and cfg.get('state_dict') is not None:
        cfg['state_dict'] = None  # do not keep a second copy of the weights alive
    return model


def _tower_cfg(variant: str, tag: TowerTag) -> Dict[str, Any]:
    """The tower's pretrained cfg: the original's preprocessing (square image of branch 2's size, ImageNet
    mean/std also for CLIP branches; timm's 'border' crop pads like LLaVA's image_aspect_ratio='pad', exactly
    so for square images: ``create_llava_transform`` is the original's for any image)."""
    arch = TOWERS[variant]
    if tag.repo:
        source = dict(hf_hub_id=tag.repo, notes=f'{tag.notes}; language-model width {tag.llm_width}')
    else:
        source = dict(notes=f'{tag.notes} (from {", ".join(str(s) for s in tag.branch_sources)}); the rest fresh')
    return _cfg(arch, num_classes=0, classifier=None, crop_mode='border', license=None,
                paper_ids='arXiv:2501.07783', **source)


default_cfgs = generate_default_cfgs({
    f'{variant}.{name}': _tower_cfg(variant, tag) for variant, tags in TOWER_TAGS.items() for name, tag in tags.items()
})


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PadToSquare:
    """LLaVA's ``image_aspect_ratio='pad'``: a PIL image centred on a square canvas of colour ``fill``."""

    def __init__(self, fill: Tuple[int, int, int]) -> None:
        self.fill = tuple(fill)

    def __call__(self, image):
        from PIL import Image
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        canvas = Image.new(image.mode, (side, side), self.fill)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        return canvas

    def __repr__(self) -> str:
        return f'{type(self).__name__}(fill={self.fill})'


def create_llava_transform(size: Union[int, nn.Module]):
    """The original PIIP-LLaVA preprocessing for a tower input of ``size`` px (or a tower model's): pad to a
    square of the ImageNet mean colour (int(mean*255)), resize (bicubic) and centre-crop to the size,
    ImageNet mean/std (for the CLIP branches too). Branch 1's image is made inside the model.

    timm's ``create_transform(**resolve_data_config({}, model=tower))`` gives the same for square images; for
    other shapes it pads after resizing (its 'border' crop), with the mean rounded: nearly, not exactly, this.
    """
    from torchvision import transforms
    if isinstance(size, nn.Module):
        size = (size.model if isinstance(size, VisionTower) else size).branch_cfgs[-1].img_size
    return transforms.Compose([
        PadToSquare(tuple(int(m * 255) for m in IMAGENET_MEAN)),
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def create_llava_projector(
        name: str,
        pretrained: bool = False,
        out_dim: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> BranchMapProjector:
    """The ``separate_2branch_v1`` projector of a tower tag (``'piip_llava_clip_bl_512_448.llava_7b'``):
    tower maps -> image tokens of the language model's width (the tag's, or ``out_dim``).

    ``pretrained``: the released model's projector (only the shards holding it are downloaded).
    """
    variant, _, tag_name = name.partition('.')
    if variant not in TOWERS:
        raise ValueError(f'{variant!r} is not a PIIP-LLaVA tower; choose one of {sorted(TOWERS)}.')
    tag = TOWER_TAGS[variant].get(tag_name or next(iter(TOWER_TAGS[variant])))
    if pretrained and (tag is None or not tag.repo):
        raise ValueError(f'{name} has no released projector; use one of the llava_* tags or pretrained=False.')
    out_dim = out_dim or (tag.llm_width if tag is not None else None)
    if out_dim is None:
        raise ValueError(f'{name} is no released PIIP-LLaVA model; give out_dim (the language model\'s width).')
    widths = tuple(b.final_width for b in TOWERS[variant].branches)
    projector = BranchMapProjector(widths, out_dim, device=device, dtype=dtype)
    if pretrained:
        check_hub_files(tag.hub_files())
        state = load_sharded_state_dict(tag.repo, keep=lambda k: k.startswith(PROJECTOR_PREFIX))
        load_strict(projector, convert_llava_projector_state_dict(state))
    return projector


@register_model
def piip_llava_clip_bl_512_256(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16 on 256 px, CLIP-B/16 on 512 px, 2 interactions (PIIP-LLaVA-7B tower)."""
    return _create_tower('piip_llava_clip_bl_512_256', pretrained=pretrained, **kwargs)


@register_model
def piip_llava_clip_bl_512_448(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16-336 on 448 px, CLIP-B/16 on 512 px, 12 interactions (7B and 13B towers)."""
    return _create_tower('piip_llava_clip_bl_512_448', pretrained=pretrained, **kwargs)


@register_model
def piip_llava_convnext_b_clip_l_640_224(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16 on 224 px, ConvNeXt-B on 640 px, 2 interactions (7B tower)."""
    return _create_tower('piip_llava_convnext_b_clip_l_640_224', pretrained=pretrained, **kwargs)


@register_model
def piip_llava_convnext_b_clip_l_1024_336(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16-336 on 336 px, ConvNeXt-B on 1024 px, 12 interactions (7B tower)."""
    return _create_tower('piip_llava_convnext_b_clip_l_1024_336', pretrained=pretrained, **kwargs)


@register_model
def piip_llava_convnext_b_clip_l_1024_336_13b(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16-336 on 336 px, ConvNeXt-B on 1024 px, 24 interactions (13B tower)."""
    return _create_tower('piip_llava_convnext_b_clip_l_1024_336_13b', pretrained=pretrained, **kwargs)


@register_model
def piip_llava_convnext_l_clip_l_1024_336(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16-336 on 336 px, ConvNeXt-L on 1024 px, 12 interactions (7B, Plus-7B towers)."""
    return _create_tower('piip_llava_convnext_l_clip_l_1024_336', pretrained=pretrained, **kwargs)


@register_model
def piip_llava_convnext_l_clip_l_1024_336_13b(pretrained: bool = False, **kwargs) -> PIIP:
    """CLIP-L/16-336 on 336 px, ConvNeXt-L on 1024 px, 24 interactions (13B tower)."""
    return _create_tower('piip_llava_convnext_l_clip_l_1024_336_13b', pretrained=pretrained, **kwargs)
