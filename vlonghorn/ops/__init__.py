"""Public ops of vlonghorn: the Longhorn scan, the bidirectional conv and the fused residual add + RMSNorm with
backend dispatch, and the recompute-around-the-scan helpers the blocks use."""
from .longhorn import (bidirectional_conv1d_silu, bidirectional_longhorn_scan, longhorn_scan, scan_redone_share,
                       triton_available, uses_triton)
from .norm import add_rms_norm, rms_norm, uses_triton_norm
from .recompute import recompute_except_scan, residual_branch

__all__ = ["longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu", "add_rms_norm", "rms_norm",
           "triton_available", "uses_triton", "uses_triton_norm", "scan_redone_share", "recompute_except_scan",
           "residual_branch"]
