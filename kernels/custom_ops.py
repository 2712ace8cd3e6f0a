"""The kernels as torch.library ops (with fake implementations and autograd formulas), and the entry points that
call them.

Each op is a `torch.library.custom_op` (opaque to torch.compile, so the mixer compiles without graph breaks) with a
fake implementation for tracing and an autograd formula that calls the backward op. In plain eager mode the entry
points call the same launchers through `torch.autograd.Function`s instead (the same saved tensors and backward):
torch.library's wrapping costs host time per call that made eager training host-bound at small batches
(docs/kernel_design.md section 7).

The shape-deciding configuration (`launch.forward_layout()`) is read by the entry points, where torch.compile
traces and guards it, and passed to the ops as an argument: a changed configuration recompiles.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import launch
from .config import CONFIG
from .recompute import current_region

__all__ = ["scan_forward", "scan_backward", "conv_forward", "conv_backward", "norm_forward", "norm_backward",
           "longhorn_scan", "bidirectional_longhorn_scan", "bidirectional_conv1d_silu", "add_rms_norm", "SCAN_OP"]


def _empty(like):
    return like.new_empty(0)


def _needs_grad(*ts):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _traced(t):
    """True when a call must go through the torch.library op: under torch.compile / export, for tensor subclasses
    (fake or functional tensors) and under a dispatch mode (e.g. a FLOP counter). Otherwise (plain eager mode)
    the launchers are called directly."""
    return (torch.compiler.is_compiling() or type(t) is not torch.Tensor
            or _get_current_dispatch_mode() is not None)


# ----------------------------------------------------------------------------------------------------- scan
@torch.library.custom_op("vlonghorn::scan_forward", mutates_args=())
def scan_forward(x_fwd: Tensor, dt_fwd: Tensor, k_fwd: Tensor, q_fwd: Tensor, dt_bias_fwd: Tensor,
                 D_fwd: Optional[Tensor], x_rev: Optional[Tensor], dt_rev: Optional[Tensor], k_rev: Optional[Tensor],
                 q_rev: Optional[Tensor], dt_bias_rev: Optional[Tensor], D_rev: Optional[Tensor], z: Optional[Tensor],
                 reverse: bool, save: bool, layout: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y_pre, checkpoints, records); the last three are empty unless `save`."""
    return launch.scan_forward(x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, k_rev, q_rev,
                               dt_bias_rev, D_rev, z, reverse, save, layout)


@scan_forward.register_fake
def _(x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, k_rev, q_rev, dt_bias_rev, D_rev, z, reverse,
      save, layout):
    B, L, E = x_fwd.shape
    ndir = 2 if x_rev is not None else 1
    shapes = launch.forward_buffer_shapes(B, L, E, k_fwd.shape[-1], ndir, save, x_rev is not None and z is not None,
                                          layout[0], layout[2])
    return tuple(x_fwd.new_empty(s, dtype=dtype) for s, dtype in
                 zip(shapes, (x_fwd.dtype, x_fwd.dtype, torch.float32, torch.float32)))


@torch.library.custom_op("vlonghorn::scan_backward", mutates_args=())
def scan_backward(grad: Tensor, x_fwd: Tensor, dt_fwd: Tensor, dt_bias_fwd: Tensor, D_fwd: Optional[Tensor],
                  x_rev: Optional[Tensor], dt_rev: Optional[Tensor], dt_bias_rev: Optional[Tensor],
                  D_rev: Optional[Tensor], z: Optional[Tensor], ypre: Tensor, ck: Tensor, rec: Tensor, reverse: bool,
                  k_dtype: torch.dtype, q_dtype: torch.dtype, n_state: int, layout: List[int]) -> List[Tensor]:
    """Gradients (dx, ddt, dk, dq, dbias, dD) of the fwd slot, the same of the rev slot, then dz (empty if absent)."""
    return list(launch.scan_backward(grad, x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z,
                                     ypre, ck, rec, reverse, k_dtype, q_dtype, n_state, layout))


@scan_backward.register_fake
def _(grad, x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z, ypre, ck, rec, reverse, k_dtype,
      q_dtype, n_state, layout):
    B, L, E = x_fwd.shape
    N = n_state

    def one(x, dt, bias, D):
        return [x.new_empty(B, L, E), dt.new_empty(B, L, E), x_fwd.new_empty(B, L, N, dtype=k_dtype),
                x_fwd.new_empty(B, L, N, dtype=q_dtype), bias.new_empty(E),
                D.new_empty(E) if D is not None else _empty(x_fwd)]

    res = one(x_fwd, dt_fwd, dt_bias_fwd, D_fwd)
    res += one(x_rev, dt_rev, dt_bias_rev, D_rev) if x_rev is not None else [_empty(x_fwd) for _ in range(6)]
    res.append(z.new_empty(B, L, E) if z is not None else _empty(x_fwd))
    return res


def _scan_setup(ctx, inputs, output):
    (x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, k_rev, q_rev, dt_bias_rev, D_rev, z, reverse,
     save, layout) = inputs
    _, ypre, ck, rec = output
    ctx.save_for_backward(x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z, ypre, ck, rec)
    ctx.reverse = reverse
    ctx.layout = list(layout)
    ctx.dtypes = (k_fwd.dtype, q_fwd.dtype, k_rev.dtype if k_rev is not None else k_fwd.dtype,
                  q_rev.dtype if q_rev is not None else q_fwd.dtype)
    ctx.bidir = x_rev is not None
    ctx.n_state = k_fwd.shape[-1]
    ctx.has = (D_fwd is not None, D_rev is not None, z is not None)


def _scan_backward(ctx, g_out, g_ypre, g_ck, g_rec):
    x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z, ypre, ck, rec = ctx.saved_tensors
    if rec.numel() == 0:
        raise RuntimeError("vlonghorn::scan_forward was run with save=False; it cannot be differentiated")
    k_dt, q_dt, k_rev_dt, q_rev_dt = ctx.dtypes
    grads = (scan_backward if _traced(g_out) else launch.scan_backward)(
        g_out, x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z, ypre, ck, rec, ctx.reverse,
        k_dt, q_dt, ctx.n_state, ctx.layout)
    dx_f, ddt_f, dk_f, dq_f, db_f, dD_f, dx_r, ddt_r, dk_r, dq_r, db_r, dD_r, dz = grads
    has_d_fwd, has_d_rev, has_z = ctx.has
    if ctx.bidir:
        dk_r, dq_r = dk_r.to(k_rev_dt), dq_r.to(q_rev_dt)
    else:
        dx_r = ddt_r = dk_r = dq_r = db_r = dD_r = None
    return (dx_f, ddt_f, dk_f, dq_f, db_f, dD_f if has_d_fwd else None, dx_r, ddt_r, dk_r, dq_r, db_r,
            dD_r if (ctx.bidir and has_d_rev) else None, dz if has_z else None, None, None, None)


scan_forward.register_autograd(_scan_backward, setup_context=_scan_setup)
SCAN_OP = torch.ops.vlonghorn.scan_forward.default


class _ScanFn(torch.autograd.Function):
    """scan_forward with autograd in eager mode: the launcher called directly, the same saved tensors and
    backward as the op's autograd formula."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = launch.scan_forward(*inputs)
        _scan_setup(ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, g_out):
        return _scan_backward(ctx, g_out, None, None, None)


class _ScanReplay(torch.autograd.Function):
    """scan_forward's autograd node (the same saved tensors, the same backward) over recomputed inputs, with the
    outputs a recompute region's first run kept."""

    @staticmethod
    def forward(ctx, kept, *inputs):
        _scan_setup(ctx, inputs, kept)
        out, ypre = kept[0], kept[1]
        if out.numel() == 0 and ypre.numel() != 0:      # not kept: rebuilt from y_pre and the recomputed z
            z = inputs[12]
            out = (ypre.float() * F.silu(z.float())).to(ypre.dtype)
        return out.detach()

    @staticmethod
    def backward(ctx, g_out):
        return (None,) + _scan_backward(ctx, g_out, None, None, None)


def _scan(args, grad):
    """The scan's output for scan_forward's arguments up to `reverse` (`grad`: differentiable), on the op or
    (eager) the launcher. Inside a recompute region the first run, without grad, keeps the training outputs, and
    the second run hands them back."""
    store = current_region()
    if store is not None:
        if store.recorded:
            store.next += 1
            kept = store.kept[store.next - 1]
            return _ScanReplay.apply(kept[0], *args, True, kept[1])
        if grad:
            raise RuntimeError("keep_scan_outputs: the first run of a region must run without grad (the region "
                               "is differentiated when it runs again)")
    layout = launch.forward_layout()
    save = grad or store is not None
    traced = _traced(args[0])
    if grad and not traced:
        return _ScanFn.apply(*args, True, layout)
    outputs = (scan_forward if traced else launch.scan_forward)(*args, save, layout)
    if store is not None:
        kept = tuple(t.detach() for t in outputs)
        if not CONFIG.keep_gated_output and kept[1].numel() != 0:
            kept = (_empty(kept[0]),) + kept[1:]     # y_pre is there (two directions, gated): rebuilt at replay
        store.kept.append((kept, layout))
    return outputs[0]


def longhorn_scan(x, dt, k, q, dt_bias, D=None, z=None, reverse=False):
    """One direction of the scan on the Triton kernels (the contract of vlonghorn.ops.longhorn_scan, for inputs
    `launch.supports_scan` accepts)."""
    grad = _needs_grad(x, dt, k, q, dt_bias, D, z)
    return _scan((x, dt, k, q, dt_bias, D, None, None, None, None, None, None, z, bool(reverse)), grad)


def bidirectional_longhorn_scan(x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev, dt_bias_fwd, dt_bias_rev,
                                D_fwd=None, D_rev=None, z=None):
    """(y_fwd + y_rev) / 2 * silu(z) in one fused launch (both directions; z optional)."""
    ts = (x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev, dt_bias_fwd, dt_bias_rev, D_fwd, D_rev, z)
    grad = _needs_grad(*ts)
    if (D_fwd is None) != (D_rev is None):
        # the kernel takes D for both directions or for neither
        D_fwd = D_fwd if D_fwd is not None else torch.zeros_like(D_rev)
        D_rev = D_rev if D_rev is not None else torch.zeros_like(D_fwd)
    if x_rev.dtype != x_fwd.dtype:
        x_rev = x_rev.to(x_fwd.dtype)
    if dt_rev.dtype != dt_fwd.dtype:
        dt_rev = dt_rev.to(dt_fwd.dtype)
    return _scan((x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, k_rev, q_rev, dt_bias_rev, D_rev,
                  z, False), grad)


# ----------------------------------------------------------------------------------------------------- conv
@torch.library.custom_op("vlonghorn::conv1d_silu_forward", mutates_args=())
def conv_forward(x: Tensor, w_fwd: Tensor, bias_fwd: Optional[Tensor], w_rev: Tensor,
                 bias_rev: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return launch.conv_forward(x, w_fwd, bias_fwd, w_rev, bias_rev)


@conv_forward.register_fake
def _(x, w_fwd, bias_fwd, w_rev, bias_rev):
    B, L, E = x.shape
    return x.new_empty(B, L, E), x.new_empty(B, L, E)


@torch.library.custom_op("vlonghorn::conv1d_silu_backward", mutates_args=())
def conv_backward(dy_fwd: Tensor, dy_rev: Tensor, x: Tensor, w_fwd: Tensor, bias_fwd: Optional[Tensor], w_rev: Tensor,
                  bias_rev: Optional[Tensor]) -> List[Tensor]:
    return list(launch.conv_backward(dy_fwd, dy_rev, x, w_fwd, bias_fwd, w_rev, bias_rev))


@conv_backward.register_fake
def _(dy_fwd, dy_rev, x, w_fwd, bias_fwd, w_rev, bias_rev):
    B, L, E = x.shape
    return [x.new_empty(B, L, E), w_fwd.new_empty(w_fwd.shape),
            bias_fwd.new_empty(bias_fwd.shape) if bias_fwd is not None else _empty(x),
            w_rev.new_empty(w_rev.shape), bias_rev.new_empty(bias_rev.shape) if bias_rev is not None else _empty(x)]


def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, dy_fwd, dy_rev):
    x, w_fwd, bias_fwd, w_rev, bias_rev = ctx.saved_tensors
    if dy_fwd is None:
        dy_fwd = torch.zeros_like(x)
    if dy_rev is None:
        dy_rev = torch.zeros_like(x)
    dx, dw_f, db_f, dw_r, db_r = (conv_backward if _traced(x) else launch.conv_backward)(
        dy_fwd, dy_rev, x, w_fwd, bias_fwd, w_rev, bias_rev)
    return dx, dw_f, db_f if bias_fwd is not None else None, dw_r, db_r if bias_rev is not None else None


conv_forward.register_autograd(_conv_backward, setup_context=_conv_setup)


class _ConvFn(torch.autograd.Function):
    """conv1d_silu_forward with autograd in eager mode (the launchers called directly)."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return launch.conv_forward(*inputs)

    @staticmethod
    def backward(ctx, dy_fwd, dy_rev):
        return _conv_backward(ctx, dy_fwd, dy_rev)


def bidirectional_conv1d_silu(x, weight_fwd, bias_fwd, weight_rev, bias_rev):
    """Depthwise conv1d (`launch.CONV_WIDTH` taps) + SiLU of both directions from one read of x: (x_fwd, x_rev)."""
    args = (x, weight_fwd, bias_fwd, weight_rev, bias_rev)
    if _traced(x):
        return conv_forward(*args)
    return _ConvFn.apply(*args) if _needs_grad(*args) else launch.conv_forward(*args)


# ----------------------------------------------------------------------------------------------------- norm
@torch.library.custom_op("vlonghorn::add_rms_norm_forward", mutates_args=())
def norm_forward(x: Tensor, delta: Optional[Tensor], weight: Tensor, eps: float,
                 out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (r, y, rstd); r is empty when delta is None (r is x)."""
    return launch.norm_forward(x, delta, weight, eps, out_dtype)


@norm_forward.register_fake
def _(x, delta, weight, eps, out_dtype):
    r = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype)) if delta is not None else _empty(x)
    return r, x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("vlonghorn::add_rms_norm_backward", mutates_args=())
def norm_backward(dy: Tensor, dres: Optional[Tensor], r: Tensor, rstd: Tensor, weight: Tensor, x_dtype: torch.dtype,
                  delta_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, ddelta, dweight); ddelta is empty when delta_dtype is None."""
    return launch.norm_backward(dy, dres, r, rstd, weight, x_dtype, delta_dtype)


@norm_backward.register_fake
def _(dy, dres, r, rstd, weight, x_dtype, delta_dtype):
    ddelta = r.new_empty(r.shape, dtype=delta_dtype) if delta_dtype is not None else _empty(r)
    return r.new_empty(r.shape, dtype=x_dtype), ddelta, weight.new_empty(weight.shape)


def _norm_setup(ctx, inputs, output):
    x, delta, weight, eps, out_dtype = inputs
    r, _, rstd = output
    ctx.save_for_backward(r if delta is not None else x, rstd, weight)
    ctx.dtypes = (x.dtype, delta.dtype if delta is not None else None)


def _norm_backward(ctx, g_r, g_y, g_rstd=None):
    r, rstd, weight = ctx.saved_tensors
    x_dtype, delta_dtype = ctx.dtypes
    if g_y is None:
        g_y = torch.zeros_like(r)
    dres = g_r if delta_dtype is not None else None     # without a delta, r is x itself: its gradient is x's
    dx, ddelta, dweight = (norm_backward if _traced(g_y) else launch.norm_backward)(
        g_y, dres, r, rstd, weight, x_dtype, delta_dtype)
    return dx, ddelta if delta_dtype is not None else None, dweight, None, None


norm_forward.register_autograd(_norm_backward, setup_context=_norm_setup)


class _NormFn(torch.autograd.Function):
    """add_rms_norm_forward with autograd in eager mode (the launchers called directly): (r, y), r empty without
    a delta."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = launch.norm_forward(*inputs)
        _norm_setup(ctx, inputs, outputs)
        return outputs[:2]

    @staticmethod
    def backward(ctx, g_r, g_y):
        return _norm_backward(ctx, g_r, g_y)


def add_rms_norm(x, delta, weight, eps, out_dtype):
    """(r, y): r = x + delta (x itself when delta is None), y = r * rsqrt(mean(r^2) + eps) * weight in out_dtype,
    in one pass; differentiable in x, delta and weight."""
    args = (x, delta, weight, float(eps), out_dtype)
    if _traced(x):
        r, y, _ = norm_forward(*args)
    elif _needs_grad(x, delta, weight):
        r, y = _NormFn.apply(*args)
    else:
        r, y, _ = launch.norm_forward(*args)
    return (x if delta is None else r), y
