"""PIIP backbones for timm: ``import piip_timm`` registers ``piip_tsb``, ``piip_sbl``, ``piip_tsbl``,
``piip_lh6b`` and ``piip_h6b``. Any other architecture: ``piip_timm.PIIP(branches=[BranchCfg(...), ...])``,
or ``branches=`` passed to any of those entry points."""
from .config_file import read_backbone_config
from .convert import convert_original_state_dict, unwrap_state_dict
from .original import from_original, translate_original_config
from .export import convert_checkpoint
from .hub import HubUnavailableError
from .piip import PIIP, BranchCfg, InteractionCfg, even_block_ranges

__all__ = [
    'PIIP', 'BranchCfg', 'InteractionCfg', 'even_block_ranges', 'from_original', 'translate_original_config',
    'convert_original_state_dict', 'unwrap_state_dict', 'read_backbone_config', 'convert_checkpoint',
    'HubUnavailableError',
]
__version__ = '0.1.0'
