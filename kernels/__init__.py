"""Triton kernels of vlonghorn (installed as vlonghorn.kernels): the fused bidirectional Longhorn scan (forward,
exact and reconstructing backward, chunked small-batch paths) and the bidirectional depthwise conv1d + SiLU.

    config.py        the typed launch configuration (CONFIG)
    scan_common.py   shared jit helpers and the per-token record
    scan_forward.py  scan_chunk.py  scan_backward.py  conv.py      the kernels
    launch.py        buffers, grids and launches
    custom_ops.py    torch.library ops, fakes, autograd, and the entry points below
    recompute.py     recompute regions that keep only the scans' outputs

The entry points take inputs that `supports_scan` / `CONV_WIDTH` accept; choosing between these kernels and the
PyTorch path is vlonghorn.ops's job. Importing this package raises ImportError when Triton is not installed.
"""
try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("vlonghorn.kernels needs Triton (pip install triton)") from e

from .config import CONFIG, KernelConfig
from .custom_ops import SCAN_OP, bidirectional_conv1d_silu, bidirectional_longhorn_scan, longhorn_scan
from .launch import CONV_WIDTH, recon_share, supports_scan
from .recompute import ScanOutputs, keep_scan_outputs

__all__ = ["CONFIG", "KernelConfig", "longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu",
           "supports_scan", "CONV_WIDTH", "recon_share", "ScanOutputs", "keep_scan_outputs", "SCAN_OP"]
