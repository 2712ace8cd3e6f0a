"""vlonghorn: Vision Longhorn backbones for timm.

Importing the package registers the models with timm:

    import timm, vlonghorn
    model = timm.create_model("vlonghorn_small", num_classes=10)
"""
from . import ops
from .models import VisionLonghorn

__version__ = "0.1.0"
__all__ = ["ops", "VisionLonghorn", "__version__"]
