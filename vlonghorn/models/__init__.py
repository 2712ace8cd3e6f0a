"""timm model definitions of vlonghorn; importing this module registers them with timm."""
from .feature_pyramid import SimpleFeaturePyramid
from .vision_longhorn import VisionLonghorn, checkpoint_filter_fn

__all__ = ["VisionLonghorn", "checkpoint_filter_fn", "SimpleFeaturePyramid"]
