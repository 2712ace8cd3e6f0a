"""Triton kernels of vlonghorn (installed as vlonghorn.kernels): the fused bidirectional Longhorn scan (forward,
exact and reconstructing backward, chunked small-batch paths), the bidirectional depthwise conv1d + SiLU and the
fused residual add + RMSNorm.

    config.py        the typed launch configuration (CONFIG)
    scan_common.py   shared jit helpers and the per-token record
    scan_forward.py  scan_chunk.py  scan_backward.py  conv.py  norm.py      the kernels
    launch.py        buffers, grids and launches
    custom_ops.py    torch.library ops, fakes, autograd, and the entry points below
    recompute.py     recompute regions that keep only the scans' outputs

The entry points take inputs that `supports_scan` / `CONV_WIDTH` / `supports_norm` accept; choosing between these
kernels and the PyTorch path is vlonghorn.ops's job. `norm_forward` / `norm_backward` are the norm's launchers
without autograd, for recompute regions that differentiate around the norm themselves (eager mode). Importing this
package raises ImportError when Triton is not installed.
"""
try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("vlonghorn.kernels needs Triton (pip install triton)") from e

from .config import CONFIG, KernelConfig
from .custom_ops import SCAN_OP, add_rms_norm, bidirectional_conv1d_silu, bidirectional_longhorn_scan, longhorn_scan
from .launch import CONV_WIDTH, norm_backward, norm_forward, recon_share, supports_norm, supports_scan
from .recompute import ScanOutputs, keep_scan_outputs

__all__ = ["CONFIG", "KernelConfig", "longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu",
           "add_rms_norm", "norm_forward", "norm_backward", "supports_scan", "supports_norm", "CONV_WIDTH",
           "recon_share", "ScanOutputs", "keep_scan_outputs", "SCAN_OP"]
