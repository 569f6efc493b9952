from .attention import Attention
from .conv_ffn import ConvFFN
from .deform_attn import DeformableCrossAttention, reference_points
from .deform_sampling import deform_sample
from .injector import Injector
from .interaction import BidirectionalInteraction
from .merge import ConvMerge, LinearMerge
from .simple_pyramid import PYRAMID_SCALES, SimpleFeaturePyramid

__all__ = [
    'Attention', 'ConvFFN', 'DeformableCrossAttention', 'reference_points', 'deform_sample', 'Injector',
    'BidirectionalInteraction', 'ConvMerge', 'LinearMerge', 'PYRAMID_SCALES', 'SimpleFeaturePyramid',
]
