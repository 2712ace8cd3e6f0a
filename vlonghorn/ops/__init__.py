"""Public ops of vlonghorn: the Longhorn scan and the bidirectional conv, with backend dispatch."""
from .longhorn import (bidirectional_conv1d_silu, bidirectional_longhorn_scan, longhorn_scan, triton_available,
                       uses_triton)

__all__ = ["longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu", "triton_available",
           "uses_triton"]
