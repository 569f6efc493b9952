from .attention import Attention
from .branch_merge import BranchMerge, merge_branch_maps
from .conv_ffn import ConvFFN
from .deform_attn import DeformableCrossAttention, reference_points
from .deform_sampling import deform_sample
from .feature_levels import FeatureLevels
from .injector import Injector
from .interaction import BidirectionalInteraction
from .merge import ConvMerge, LinearMerge, SingleConvMerge
from .simple_pyramid import PYRAMID_SCALES, SimpleFeaturePyramid

__all__ = [
    'Attention', 'BranchMerge', 'merge_branch_maps', 'ConvFFN', 'DeformableCrossAttention', 'reference_points',
    'deform_sample', 'FeatureLevels', 'Injector', 'BidirectionalInteraction', 'ConvMerge', 'LinearMerge',
    'SingleConvMerge', 'PYRAMID_SCALES', 'SimpleFeaturePyramid',
]
