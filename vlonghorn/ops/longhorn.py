"""The public Longhorn ops and their backend dispatch (longhorn.md section 2).

Models call only these functions; which backend runs (Triton kernels on CUDA, PyTorch elsewhere, and PyTorch
for what the kernels do not take: fp64, other state sizes, other conv widths) is decided here and only here, per
call, from the tensors and the `backend` argument.
"""
import os

import torch
import torch.nn.functional as F

from .scan_torch import bidirectional_longhorn_scan_torch, longhorn_scan_torch

__all__ = ["longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu", "triton_available",
           "uses_triton", "scan_redone_share"]

_BACKENDS = ("auto", "triton", "torch")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Set VLONGHORN_DEBUG=1 to check every op input for NaN/inf (one device sync per call, so off by default).
_DEBUG = os.environ.get("VLONGHORN_DEBUG", "0") not in ("", "0")
# VLONGHORN_BACKEND=torch (or triton) decides what backend="auto" means, e.g. to compare a model's two paths.
_AUTO = os.environ.get("VLONGHORN_BACKEND", "auto")


def triton_available():
    """True when the Triton kernels can be imported (a Triton install; CUDA or TRITON_INTERPRET=1 to run)."""
    try:
        from vlonghorn import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend, x):
    """The backend `backend` means for tensors like x, before looking at what the kernels support."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto" and _AUTO != "auto":
        if _AUTO not in _BACKENDS:
            raise ValueError(f"VLONGHORN_BACKEND must be one of {_BACKENDS}, got {_AUTO!r}")
        backend = _AUTO
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' was asked for but the Triton kernels cannot be imported "
                           "(is triton installed?)")
    return backend


def _scan_backend(backend, x, n_state, *tensors):
    """Where a scan runs: the kernels when the backend says Triton and they take the state size and dtypes (fp64
    and state sizes the kernels' record cannot hold run on PyTorch, as documented in longhorn.md section 2)."""
    if _resolve_backend(backend, x) != "triton":
        return "torch"
    from vlonghorn.kernels import supports_scan
    ok = all(supports_scan(n_state, t.dtype) for t in (x, *tensors) if t is not None)
    return "triton" if ok else "torch"


def _conv_backend(backend, x, width):
    if _resolve_backend(backend, x) != "triton":
        return "torch"
    from vlonghorn.kernels import CONV_WIDTH
    return "triton" if width == CONV_WIDTH and x.dtype != torch.float64 else "torch"


def uses_triton(x, backend="auto", d_state=16):
    """True when a scan called with `backend` on tensors like x (state size d_state) runs the Triton kernels."""
    return _scan_backend(backend, x, d_state) == "triton"


def _check_tensor(name, t, ndim, shape=None, floating=True):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if _DEBUG and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf (VLONGHORN_DEBUG is set)")


def _check_scan_inputs(x, dt, k, q, dt_bias, D, z, suffix=""):
    _check_tensor("x" + suffix, x, 3)
    batch, length, channels = x.shape
    _check_tensor("dt" + suffix, dt, 3, x.shape)
    _check_tensor("k" + suffix, k, 3)
    if k.shape[:2] != x.shape[:2]:
        raise ValueError(f"k{suffix} must have shape ({batch}, {length}, N) to match x{suffix} "
                         f"{tuple(x.shape)}, got {tuple(k.shape)}")
    _check_tensor("q" + suffix, q, 3, k.shape)
    _check_tensor("dt_bias" + suffix, dt_bias, 1, (channels,))
    if D is not None:
        _check_tensor("D" + suffix, D, 1, (channels,))
    if z is not None:
        _check_tensor("z", z, 3, x.shape)
    devices = {t.device for t in (x, dt, k, q, dt_bias, D, z) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def longhorn_scan(x, dt, k, q, dt_bias, D=None, z=None, reverse=False, backend="auto"):
    """One direction of the Longhorn scan.

    x, dt, z: (B, L, E); k, q: (B, L, N); dt_bias, D: (E,). Returns y with x's shape and dtype:
    y_t = sum_n S_t[:, n] q_t[n] + D x_t, times silu(z_t) when z is given; reverse=True scans t = L-1 .. 0.
    Inputs may be fp16, bf16, fp32 or fp64; the state and all accumulation are fp32 (fp64 for fp64 inputs).
    """
    _check_scan_inputs(x, dt, k, q, dt_bias, D, z)
    if _scan_backend(backend, x, k.shape[-1], dt, k, q, z) == "triton":
        from vlonghorn import kernels
        return kernels.longhorn_scan(x, dt, k, q, dt_bias, D, z, reverse)
    return longhorn_scan_torch(x, dt, k, q, dt_bias, D, z, reverse)


def bidirectional_longhorn_scan(x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev,
                                dt_bias_fwd, dt_bias_rev, D_fwd=None, D_rev=None, z=None, backend="auto"):
    """Both scan directions of a Vision Longhorn block, combined: (y_fwd + y_rev) / 2 * silu(z).

    Each direction has its own inputs and parameters (shapes as in `longhorn_scan`); the `fwd` direction scans
    t = 0 .. L-1, the `rev` direction t = L-1 .. 0. z (B, L, E) is shared; without it the result is
    (y_fwd + y_rev) / 2.
    """
    _check_scan_inputs(x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, z, "_fwd")
    _check_scan_inputs(x_rev, dt_rev, k_rev, q_rev, dt_bias_rev, D_rev, z, "_rev")
    if x_rev.shape != x_fwd.shape or k_rev.shape != k_fwd.shape:
        raise ValueError(f"both directions must have the same shapes, got x {tuple(x_fwd.shape)} / "
                         f"{tuple(x_rev.shape)} and k {tuple(k_fwd.shape)} / {tuple(k_rev.shape)}")
    if _scan_backend(backend, x_fwd, k_fwd.shape[-1], x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev, z) == "triton":
        from vlonghorn import kernels
        return kernels.bidirectional_longhorn_scan(x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev,
                                                   dt_bias_fwd, dt_bias_rev, D_fwd, D_rev, z)
    return bidirectional_longhorn_scan_torch(x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev,
                                             dt_bias_fwd, dt_bias_rev, D_fwd, D_rev, z)


def bidirectional_conv1d_silu(x, weight_fwd, bias_fwd, weight_rev, bias_rev, backend="auto"):
    """Depthwise conv1d + SiLU for both scan directions from one input.

    x: (B, L, E) token-major; weight_*: (E, W) (W = 4 in the models); bias_*: (E,) or None.
    Returns (x_fwd, x_rev), each (B, L, E): x_fwd is causal (x_fwd[t] sees x[t-W+1 .. t]); x_rev is causal
    in the rev scan's order (x_rev[t] sees x[t .. t+W-1], weight_rev[-1] on x[t]). The Triton kernel takes
    W = 4 and fp16 / bf16 / fp32; anything else runs on PyTorch.
    """
    _check_tensor("x", x, 3)
    channels = x.shape[-1]
    _check_tensor("weight_fwd", weight_fwd, 2)
    width = weight_fwd.shape[-1]
    _check_tensor("weight_fwd", weight_fwd, 2, (channels, width))
    _check_tensor("weight_rev", weight_rev, 2, (channels, width))
    for name, bias in (("bias_fwd", bias_fwd), ("bias_rev", bias_rev)):
        if bias is not None:
            _check_tensor(name, bias, 1, (channels,))
    if _conv_backend(backend, x, width) == "triton":
        from vlonghorn import kernels
        return kernels.bidirectional_conv1d_silu(x, weight_fwd, bias_fwd, weight_rev, bias_rev)
    # Parameters follow the activations' dtype (as autocast would), so bf16 activations work without autocast.
    weight_fwd, bias_fwd, weight_rev, bias_rev = (
        None if p is None else p.to(x.dtype) for p in (weight_fwd, bias_fwd, weight_rev, bias_rev))
    # A conv2d over (B, E, 1, L) viewed with channels-last strides: the (B, L, E) tokens are that layout already,
    # so nothing is transposed into a copy on the way in or out (on a 2-core CPU 2-4x faster than conv1d over
    # the transposed tokens, and the outputs come out token-major for the projections that read them).
    tokens = x.transpose(1, 2).unsqueeze(2)
    length = x.shape[1]
    y_fwd = F.conv2d(tokens, weight_fwd[:, None, None], bias_fwd, padding=(0, width - 1), groups=channels)
    y_rev = F.conv2d(tokens, weight_rev.flip(-1)[:, None, None], bias_rev, padding=(0, width - 1), groups=channels)
    return (F.silu(y_fwd[:, :, 0, :length].transpose(1, 2)),
            F.silu(y_rev[:, :, 0, width - 1:].transpose(1, 2)))


def scan_redone_share(device):
    """The running share of the Triton scan's reconstructing backward passes that had to be redone exactly on
    `device` (docs/kernel_design.md section 4.6), or None where it has not run (CPU, the PyTorch path, fp32). Reading
    it waits for the GPU: for logs, not for every step."""
    if not triton_available():
        return None
    from vlonghorn.kernels import recon_share
    return recon_share(device)
