"""PIIP backbones for timm: ``import piip_timm`` registers ``piip_tsb``, ``piip_sbl``, ``piip_tsbl``,
``piip_lh6b``, ``piip_h6b`` and the ConvNeXt / ViT-ConvNeXt detectors ``piip_ct_cs_cb``, ``piip_ct_vs_vb``,
``piip_ct_cs_vb``, ``piip_ct_vs_cb``, ``piip_vt_cs_vb``, ``piip_vt_cs_cb``, ``piip_vt_vs_cb``. Any other
architecture: ``piip_timm.create_piip([...timm model names...])``, ``piip_timm.PIIP(branches=[BranchCfg(...),
ConvNeXtBranchCfg(...), BeitBranchCfg(...), UniPerceiverBranchCfg(...), ...])``, or ``branches=`` passed to any
of those entry points."""
from .beit_branch import BeitBranchCfg
from .builder import create_piip
from .config_file import read_backbone_config
from .convert import convert_original_state_dict, unwrap_state_dict
from .convnext_branch import ConvNeXtBranchCfg
from .original import from_original, translate_original_config
from .export import convert_checkpoint
from .hub import HubUnavailableError
from .piip import PIIP, BranchCfg, InteractionCfg, even_block_ranges
from .uniperceiver_branch import UniPerceiverBranchCfg
from . import variants  # registers the models
from . import llava  # registers the PIIP-LLaVA vision towers

__all__ = [
    'PIIP', 'BranchCfg', 'ConvNeXtBranchCfg', 'BeitBranchCfg', 'UniPerceiverBranchCfg', 'InteractionCfg',
    'even_block_ranges', 'create_piip', 'from_original', 'translate_original_config', 'convert_original_state_dict',
    'unwrap_state_dict', 'read_backbone_config', 'convert_checkpoint', 'HubUnavailableError',
]
__version__ = '0.1.0'
