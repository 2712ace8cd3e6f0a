"""Recompute everything of a branch but the scan: training memory without a second scan.

`recompute_except_scan(fn, x, params)` returns fn(x) and, where the scan runs on the Triton kernels, keeps for the
backward pass only x and the scans' own outputs: the rest of fn (norms, projections, conv) runs again in the
backward. Elsewhere (the PyTorch path, no grad, scripting, FX tracing) it is a plain call. The model never needs to
know which backend runs.
"""
import torch

from .longhorn import uses_triton

__all__ = ["recompute_except_scan"]


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
