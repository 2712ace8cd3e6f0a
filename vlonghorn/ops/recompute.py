"""Recompute everything of a branch but the scan: training memory without a second scan.

`recompute_except_scan(fn, x, params)` returns fn(x) and, where the scan runs on the Triton kernels, keeps for the
backward pass only x and the scans' own outputs: the rest of fn (norms, projections, conv) runs again in the
backward. Elsewhere (the PyTorch path, no grad, scripting, FX tracing) it is a plain call. The model never needs to
know which backend runs.

`residual_branch(fn, x, delta, weight, eps, params)` is a pre-norm block's step on the residual stream: the
pending update delta is added and the sum normalised in one pass (`add_rms_norm`), and fn runs on the norm; with
recompute it keeps the same as `recompute_except_scan` would for fn(rms_norm(r)): the stream r and the scans'
outputs (docs/kernel_design.md section 12).
"""
from functools import partial

import torch

from .longhorn import uses_triton
from .norm import add_rms_norm, rms_norm, uses_triton_norm

__all__ = ["recompute_except_scan", "residual_branch"]


def _tracing(x):
    return torch.jit.is_scripting() or isinstance(x, torch.fx.Proxy)


def recompute_except_scan(fn, x, params, d_state=16):
    """fn(x), recomputed in the backward except for its scans (see the module docstring).

    fn must be a pure function of x and of `params` (an iterable of the parameters it reads, consumed only when
    recomputing: their gradients are returned through this call) with no randomness; d_state: the scans' state
    size (it decides the backend)."""
    if _tracing(x) or not torch.is_grad_enabled() or not uses_triton(x, d_state=d_state):
        return fn(x)
    if torch.compiler.is_compiling():
        # traced once into the graph: a selective-checkpoint policy costs nothing per step there
        return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False, context_fn=_keep_scan_outputs)
    # eager: the same policy would put a Python dispatch mode under every op of every step, and
    # torch.utils.checkpoint's per-tensor hooks cost about as much host time as the branch itself
    return _RecomputeExceptScan.apply(fn, x, *params)


def _keep_scan_outputs():
    # the selective-checkpoint policy under torch.compile: the scan's outputs (its result, y_pre, checkpoints,
    # records) are kept, every other op of the branch runs again in the backward (a module-level function:
    # dynamo traces no closures as a context_fn)
    from vlonghorn.kernels import SCAN_OP
    return torch.utils.checkpoint.create_selective_checkpoint_contexts([SCAN_OP])


class _RecomputeExceptScan(torch.autograd.Function):
    """y = fn(x) keeping only x and the scans' outputs: the forward runs without grad (no graph, nothing saved),
    the backward runs fn again with grad (the scans' outputs handed back, no scan launch) and differentiates it.
    The parameters are inputs so that their gradients are returned, not accumulated inside the backward
    (torch.autograd.grad and DDP hooks see them as usual)."""

    @staticmethod
    def forward(ctx, fn, x, *params):
        from vlonghorn.kernels import ScanOutputs, keep_scan_outputs
        ctx.fn, ctx.store = fn, ScanOutputs()
        dev = x.device.type
        ctx.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev),
                            dtype=torch.get_autocast_dtype(dev), cache_enabled=torch.is_autocast_cache_enabled())
        with keep_scan_outputs(ctx.store):
            y = fn(x)
        ctx.save_for_backward(x, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        from vlonghorn.kernels import keep_scan_outputs
        x, *params = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(**ctx.autocast), keep_scan_outputs(ctx.store):
            x_in = x.detach().requires_grad_(ctx.needs_input_grad[1])
            y = ctx.fn(x_in)
        wanted = [t for t, need in zip([x_in] + params, ctx.needs_input_grad[1:]) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
        return (None,) + tuple(next(grads) if need else None for need in ctx.needs_input_grad[1:])


# ------------------------------------------------------------------------------------------- residual branch
def _branch_dtype(x):
    """The dtype the branch's first linear layer reads: autocast's where it is on for x's device, else None (the
    norm's own dtype)."""
    dev = x.device.type
    # (cpu and cuda have autocast: dynamo cannot trace the availability check; meta tensors have none)
    if (dev in ("cpu", "cuda") or torch.amp.is_autocast_available(dev)) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _normed(fn, weight, eps, out_dtype, r):
    return fn(rms_norm(r, weight, eps, out_dtype))


def residual_branch(fn, x, delta, weight, eps, params, recompute=True, d_state=16):
    """(r, fn(rms_norm(r))) with r = x + delta (x itself when delta is None): the add and the norm in one pass, the
    norm written once in the dtype fn's first layer reads (autocast's under autocast).

    weight, eps: the RMSNorm's; fn: a pure function of the norm and of `params` (an iterable of the parameters it
    reads, consumed only when recomputing) with no randomness. With `recompute` (autograd recording, the scans on
    the Triton kernels) only r and the scans' outputs are kept for the backward pass, as in
    `recompute_except_scan`: the norm and the rest of fn run again there, and the norm's backward adds r's other
    gradient and writes x's and delta's in one pass."""
    if _tracing(x):
        # symbolic: the unfused ops, no dtype decisions (autocast, if any, casts at fn's first layer)
        r = x if delta is None else x + delta
        return r, fn(r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight)
    out_dtype = _branch_dtype(x)
    if recompute and torch.is_grad_enabled() and uses_triton(x, d_state=d_state):
        if torch.compiler.is_compiling() or not uses_triton_norm(x, weight, delta, out_dtype):
            r = x if delta is None else x + delta
            return r, recompute_except_scan(partial(_normed, fn, weight, eps, out_dtype), r,
                                            [weight, *params], d_state)
        out = _RecomputeNormBranch.apply(fn, float(eps), out_dtype, x, delta, weight, *params)
        return (x, out) if delta is None else out
    r, n = add_rms_norm(x, delta, weight, eps, out_dtype)
    return r, fn(n)


class _RecomputeNormBranch(torch.autograd.Function):
    """(r, fn(norm)) from one norm_forward launch, keeping only r and the scans' outputs (y alone when delta is
    None: r is x). The backward runs the norm (without the add) and fn again, differentiates fn, and hands fn's
    gradient of the norm and r's own gradient to one norm_backward launch, which writes x's and delta's
    gradients and the weight's."""

    @staticmethod
    def forward(ctx, fn, eps, out_dtype, x, delta, weight, *params):
        from vlonghorn.kernels import ScanOutputs, keep_scan_outputs, norm_forward
        if out_dtype is None:
            out_dtype = torch.promote_types(x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype),
                                            weight.dtype)
        r, n, _ = norm_forward(x, delta, weight, eps, out_dtype)
        if delta is None:
            r = x
        ctx.fn, ctx.store, ctx.eps, ctx.out_dtype = fn, ScanOutputs(), eps, out_dtype
        ctx.dtypes = (x.dtype, delta.dtype if delta is not None else None)
        dev = x.device.type
        ctx.autocast = dict(device_type=dev, enabled=torch.is_autocast_enabled(dev),
                            dtype=torch.get_autocast_dtype(dev), cache_enabled=torch.is_autocast_cache_enabled())
        with keep_scan_outputs(ctx.store):
            y = fn(n)
        ctx.save_for_backward(r, weight, *params)
        return y if delta is None else (r, y)

    @staticmethod
    def backward(ctx, *grads):
        from vlonghorn.kernels import keep_scan_outputs, norm_backward, norm_forward
        g_r, g_y = grads if len(grads) == 2 else (None, grads[0])
        r, weight, *params = ctx.saved_tensors
        _, n, rstd = norm_forward(r, None, weight, ctx.eps, ctx.out_dtype)
        need_params = ctx.needs_input_grad[6:]
        with torch.enable_grad(), torch.autocast(**ctx.autocast), keep_scan_outputs(ctx.store):
            n_in = n.requires_grad_()
            y = ctx.fn(n_in)
        wanted = [n_in] + [p for p, need in zip(params, need_params) if need]
        found = iter(torch.autograd.grad(y, wanted, g_y, allow_unused=True))
        dn = next(found)
        if dn is None:
            dn = torch.zeros_like(n)
        dx, ddelta, dweight = norm_backward(dn, g_r, r, rstd, weight, *ctx.dtypes)
        return (None, None, None, dx, ddelta if ctx.dtypes[1] is not None else None, dweight,
                *(next(found) if need else None for need in need_params))
