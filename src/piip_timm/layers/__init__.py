from .attention import Attention
from .branch_merge import BranchMerge, merge_branch_maps
from .conv_ffn import ConvFFN
from .deform_attn import DeformableCrossAttention, reference_points
from .deform_sampling import deform_sample
from .feature_levels import FeatureLevels
from .injector import Injector
from .interaction import BidirectionalInteraction
from .merge import ConvMerge, LinearMerge, SingleConvMerge
from .rel_pos_attention import RelPosWindowAttention, window_relative_position_index
from .simple_pyramid import PYRAMID_SCALES, SimpleFeaturePyramid

__all__ = [
    'Attention', 'BranchMerge', 'merge_branch_maps', 'ConvFFN', 'DeformableCrossAttention', 'reference_points',
    'deform_sample', 'FeatureLevels', 'Injector', 'BidirectionalInteraction', 'ConvMerge', 'LinearMerge',
    'SingleConvMerge', 'RelPosWindowAttention', 'window_relative_position_index', 'PYRAMID_SCALES',
    'SimpleFeaturePyramid',
]
