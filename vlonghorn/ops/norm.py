"""The fused residual add + RMSNorm op, its PyTorch path and its backend dispatch.

`add_rms_norm(x, delta, weight)` gives the residual stream r = x + delta and its normalised form
y = r / sqrt(mean(r^2) + eps) * weight in one pass (the Triton kernels on CUDA; PyTorch elsewhere, with the same
maths: the PyTorch path is the reference of the tests). y is written once in `out_dtype`, the dtype the next layer
reads, so no cast copy follows it.
"""
import numbers

import torch

from .longhorn import _check_tensor, _resolve_backend

__all__ = ["add_rms_norm", "rms_norm", "add_rms_norm_torch", "uses_triton_norm"]

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def add_rms_norm_torch(x, delta, weight, eps=1e-6, out_dtype=None):
    """The PyTorch path of `add_rms_norm` (same contract): the unfused computation, the norm in fp32 at least."""
    r = x if delta is None else x + delta
    v = r.to(torch.promote_types(r.dtype, torch.float32))
    y = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight
    return r, y.to(out_dtype if out_dtype is not None else torch.promote_types(r.dtype, weight.dtype))


def _norm_backend(backend, x, *tensors, out_dtype=None):
    if _resolve_backend(backend, x) != "triton":
        return "torch"
    from vlonghorn.kernels import supports_norm
    dtypes = [t.dtype for t in (x, *tensors) if t is not None] + [out_dtype or x.dtype]
    return "triton" if all(supports_norm(x.shape[-1], d) for d in dtypes) else "torch"


def uses_triton_norm(x, weight, delta=None, out_dtype=None, backend="auto"):
    """True when `add_rms_norm` called with these arguments runs the Triton kernels."""
    return _norm_backend(backend, x, delta, weight, out_dtype=out_dtype) == "triton"


def _check_norm_inputs(x, delta, weight, eps, out_dtype):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (..., D), got a 0-dim tensor")
    _check_tensor("x", x, x.dim())
    _check_tensor("weight", weight, 1, (x.shape[-1],))
    if delta is not None:
        _check_tensor("delta", delta, x.dim(), x.shape)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be None, float16, bfloat16, float32 or float64, got {out_dtype!r}")
    devices = {t.device for t in (x, delta, weight) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, delta and weight must be on one device, got {sorted(map(str, devices))}")


def add_rms_norm(x, delta, weight, eps=1e-6, out_dtype=None, backend="auto"):
    """The residual add and RMSNorm of a pre-norm block in one pass.

    x: (..., D), the residual stream (fp32 in the models, also under autocast); delta: x's shape, any float dtype
    (the previous branch's output, e.g. bf16), or None; weight: (D,). Returns (r, y):
        r = x + delta  (x itself when delta is None; in the dtype PyTorch gives x + delta)
        y = r * rsqrt(mean(r^2, -1) + eps) * weight, in out_dtype (None: r's dtype promoted with weight's, as the
            unfused norm gives), computed in fp32 (fp64 for fp64 inputs).
    Differentiable in x, delta and weight.
    """
    _check_norm_inputs(x, delta, weight, eps, out_dtype)
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype),
                                        weight.dtype)
    if _norm_backend(backend, x, delta, weight, out_dtype=out_dtype) == "triton":
        from vlonghorn import kernels
        return kernels.add_rms_norm(x, delta, weight, eps, out_dtype)
    return add_rms_norm_torch(x, delta, weight, eps, out_dtype)


def rms_norm(x, weight, eps=1e-6, out_dtype=None, backend="auto"):
    """RMSNorm of x (..., D) with weight (D,): `add_rms_norm` without a delta, returning y only."""
    return add_rms_norm(x, None, weight, eps, out_dtype, backend)[1]
