"""Triton kernels of vlonghorn (installed as vlonghorn.kernels): the fused bidirectional Longhorn scan
(forward and exact backward) and the bidirectional depthwise conv1d + SiLU, registered as torch.library ops.

Importing this package raises ImportError when Triton is not installed; vlonghorn.ops then uses PyTorch.
"""
try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("vlonghorn.kernels needs Triton (pip install triton)") from e

from .interface import (CONFIG, ScanOutputs, bidirectional_conv1d_silu_triton, bidirectional_longhorn_scan_triton,
                        keep_scan_outputs, longhorn_scan_triton)

__all__ = ["longhorn_scan_triton", "bidirectional_longhorn_scan_triton", "bidirectional_conv1d_silu_triton",
           "CONFIG", "ScanOutputs", "keep_scan_outputs"]
