"""The kinds of branch a PIIP can have, in one table: configs stored as dicts name their kind, and
checkpoints of the original code are told apart by their keys.

A new kind of branch is a config dataclass (with ``kind``, ``build``) and a ``PIIPBranch`` class in a
file of its own, registered here.
"""
from typing import Any, Dict, Mapping, Tuple, Type, Union

from .beit_branch import BeitBranch, BeitBranchCfg
from .branch import PIIPBranch
from .clip_branch import CLIPBranchCfg
from .convnext_branch import ConvNeXtBranch, ConvNeXtBranchCfg
from .uniperceiver_branch import UniPerceiverBranch, UniPerceiverBranchCfg
from .vit_branch import BranchCfg, ViTBranch

__all__ = ['BRANCH_KINDS', 'ORIGINAL_LAYOUTS', 'as_branch_cfg']

BRANCH_KINDS: Dict[str, type] = {
    'vit': BranchCfg,
    'convnext': ConvNeXtBranchCfg,
    'beit': BeitBranchCfg,
    'uniperceiver': UniPerceiverBranchCfg,
    'clip': CLIPBranchCfg,  # PIIP-LLaVA's CLIP ViTs (a BranchCfg subclass)
}
# Branch classes whose ``original_state`` recognises their own keys, asked in this order; a ViT takes any
# branch the others do not claim (BEiT keeps the ``gamma_1`` names that the ViT branch renames).
ORIGINAL_LAYOUTS: Tuple[Type[PIIPBranch], ...] = (ConvNeXtBranch, UniPerceiverBranch, BeitBranch, ViTBranch)


def as_branch_cfg(cfg: Union[BranchCfg, ConvNeXtBranchCfg, Mapping[str, Any]]) -> Union[BranchCfg, ConvNeXtBranchCfg]:
    """A branch config, or its dict (``kind``: one of ``BRANCH_KINDS``, 'vit' by default)."""
    if isinstance(cfg, tuple(BRANCH_KINDS.values())):
        return cfg
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(cfg).items()}
    cfg['block_ranges'] = tuple(tuple(r) for r in cfg['block_ranges'])
    kind = cfg.get('kind', 'vit')
    if kind not in BRANCH_KINDS:
        raise ValueError(f'unknown branch kind {kind!r}; choose from {sorted(BRANCH_KINDS)}.')
    return BRANCH_KINDS[kind](**cfg)
