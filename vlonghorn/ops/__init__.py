"""Public ops of vlonghorn: the Longhorn scan and the bidirectional conv with backend dispatch, and the
recompute-around-the-scan helper the blocks use."""
from .longhorn import (bidirectional_conv1d_silu, bidirectional_longhorn_scan, longhorn_scan, scan_redone_share,
                       triton_available, uses_triton)
from .recompute import recompute_except_scan

__all__ = ["longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu", "triton_available",
           "uses_triton", "scan_redone_share", "recompute_except_scan"]
