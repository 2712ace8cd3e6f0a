"""timm model definitions of vlonghorn; importing this module registers them with timm."""
from .vision_longhorn import VisionLonghorn, checkpoint_filter_fn

__all__ = ["VisionLonghorn", "checkpoint_filter_fn"]
