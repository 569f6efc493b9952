"""PIIP backbones for timm: ``import piip_timm`` registers ``piip_tsb``, ``piip_sbl``, ``piip_tsbl`` and ``piip_lh6b``."""
from .convert import convert_original_state_dict, unwrap_state_dict
from .original import from_original, translate_original_config
from .piip import PIIP, BranchCfg, InteractionCfg, even_block_ranges

__version__ = '0.1.0'
