"""Launchers of the Triton kernels: buffers, grids and launch parameters (no autograd, no torch.library).

    scan_forward(x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, k_rev, q_rev, dt_bias_rev, D_rev,
                 z, reverse, save) -> (out, y_pre, checkpoints, records)
    scan_backward(grad, x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z, y_pre,
                  checkpoints, records, reverse, k_dtype, q_dtype, n_state) -> 13 gradients
    conv_forward(x, w_fwd, bias_fwd, w_rev, bias_rev) -> (x_fwd, x_rev)
    conv_backward(dy_fwd, dy_rev, x, w_fwd, bias_fwd, w_rev, bias_rev) -> (dx, dw_fwd, dbias_fwd, dw_rev, dbias_rev)
    norm_forward(x, delta, weight, eps, out_dtype) -> (r, y, rstd)
    norm_backward(dy, dres, r, rstd, weight, x_dtype, delta_dtype) -> (dx, ddelta, dweight)

A single-direction scan passes None for every `_rev` argument and runs in the `fwd` slot, walked from the last
token when `reverse`. The buffers a forward returns have the shapes `forward_buffer_shapes` gives, which is also
what the ops' fake implementations use.
"""
import math
import os
import threading

import torch
import triton

from .config import CONFIG
from .conv import _conv_backward_kernel, _conv_forward_kernel, _conv_wsum_kernel
from .norm import _norm_backward_kernel, _norm_forward_kernel
from .scan_backward import _grad_sums_kernel, _recon_stats_kernel, _scan_backward_kernel
from .scan_chunk import _adjoint_chunk_kernel, _scan_chunk_kernel, _scan_combine_kernel
from .scan_common import PAD, REC, _prep_kernel
from .scan_forward import _scan_forward_kernel

__all__ = ["scan_forward", "scan_backward", "conv_forward", "conv_backward", "norm_forward", "norm_backward",
           "forward_buffer_shapes", "forward_layout", "supports_scan", "supports_norm", "CONV_WIDTH", "NORM_MAX_WIDTH",
           "recon_share", "RECON_FLAGS", "chunk_len", "segment_windows"]

# Under TRITON_INTERPRET=1 (CPU tests) the kernels take their plain-Triton paths; on the GPU they use
# single-instruction reciprocals and warp-shuffle reductions written in inline PTX.
_FAST = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

CONV_WIDTH = 4      # the conv kernels' taps
NORM_MAX_WIDTH = 16384  # the widest row the norm kernels take (one program holds whole rows in registers)


def supports_scan(n_state, dtype):
    """Whether the scan kernels take a state of `n_state` and inputs of `dtype`: the packed per-token record holds
    3 N + 1 words of REC, N a power of two; fp64 stays on the PyTorch path (accumulated in fp64 there)."""
    return (n_state & (n_state - 1)) == 0 and 3 * n_state + 1 <= REC and dtype != torch.float64


def supports_norm(width, dtype):
    """Whether the norm kernels take rows of `width` in `dtype` (fp64 stays on the PyTorch path)."""
    return 1 <= width <= NORM_MAX_WIDTH and dtype in (torch.float16, torch.bfloat16, torch.float32)


def _unit_channel_stride(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _param(t):
    """A 1-D parameter (dt_bias, D, conv bias) or the (E, W) conv weight as the kernels read it: dense rows (a
    strided or expanded view is copied; E values at most)."""
    return None if t is None else t.contiguous()


def _per_thread(bd, warps):
    return bd // (32 * warps)


def _empty(like):
    return like.new_empty(0)


# ------------------------------------------------------------------------------------------------ residency
_RESIDENT = {}          # (kernel name, device, warps, compile key) -> programs resident per SM
_LAST_RESIDENT = {}     # (kernel name, device) -> the residency of its last launch configuration
_MOST_RESIDENT = 32     # programs per SM on any GPU these kernels run on


def _resident(kernel, device, key, grid, make_args, num_warps):
    """Programs of `kernel` resident per SM, from the register and shared-memory use of its compiled form for
    `make_args()` (compiled once per `key`: what decides the compilation, cheap to build per call)."""
    key = (kernel.fn.__name__, device, num_warps, key)
    hit = _RESIDENT.get(key)
    if hit is None:
        compiled = kernel.warmup(grid=grid, num_warps=num_warps, **make_args())
        compiled._init_handles()
        props = torch.cuda.get_device_properties(device)
        regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256        # allocated per warp in units of 256
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps)
        by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
        shared = compiled.metadata.shared
        by_shared = (props.shared_memory_per_multiprocessor // shared) if shared else 32
        hit = _RESIDENT[key] = max(1, min(by_regs, by_threads, by_shared, _MOST_RESIDENT))
    _LAST_RESIDENT[(kernel.fn.__name__, device)] = hit
    return hit


def _may_split(device, progs, limit):
    """Whether `progs` programs could be few enough to split at any residency (else no compile is needed to
    know that they are not)."""
    return progs <= limit * torch.cuda.get_device_properties(device).multi_processor_count * _MOST_RESIDENT


def _auto_parts(x, progs, resident, limit, waves, most):
    """Parts to cut every sequence into when `progs` programs (`resident` per SM) cannot fill the GPU: none (1)
    above limit x SMs x resident programs, else about `waves` times that many programs, at most `most` parts."""
    cap = torch.cuda.get_device_properties(x.device).multi_processor_count * resident
    return 1 if progs > limit * cap else max(1, min(waves * cap // progs, most))


def chunk_len(x, B, L, nblk, resident=None):
    """Tokens per chunk of the two-level forward, or L (one chunk: the plain sequential scan). resident: the
    forward's resident programs per SM (the last launch's when None)."""
    if CONFIG.chunk_len:
        return max(1, min(CONFIG.chunk_len, L))
    resident = resident or _LAST_RESIDENT.get(("_scan_forward_kernel", x.device))
    if x.device.type != "cuda" or resident is None:
        return L
    nch = _auto_parts(x, B * nblk, resident, 1 / CONFIG.chunk_split, CONFIG.chunk_waves, L // CONFIG.chunk_min)
    return triton.cdiv(L, nch)


def segment_windows(x, progs, nw, resident=None):
    """Checkpoint windows per segment of the segmented backward (nw: one segment)."""
    if CONFIG.segment_windows:
        return max(1, min(CONFIG.segment_windows, nw))
    resident = resident or _LAST_RESIDENT.get(("_scan_backward_kernel", x.device))
    if x.device.type != "cuda" or resident is None:
        return nw
    nseg = _auto_parts(x, progs, resident, CONFIG.segment_cap, CONFIG.segment_waves, nw // CONFIG.segment_min)
    return triton.cdiv(nw, nseg)


# ----------------------------------------------------------------------------------------------------- scan
def forward_buffer_shapes(B, L, E, N, ndir, save, gated_pair, forward_bd, checkpoint_every):
    """Shapes of scan_forward's four outputs: out, y_pre (gated two-direction training only), the fp32 checkpoints
    [ndir, B, windows - 1, blocks x N x forward_bd] and the fp32 records [ndir, B, PAD + L + PAD, REC]."""
    if not save:
        return (B, L, E), (0,), (0,), (0,)
    nck = max((L - 1) // checkpoint_every, 1)
    nblk = triton.cdiv(E, forward_bd)
    return ((B, L, E), (B, L, E) if gated_pair else (0,), (ndir, B, nck, nblk * N * forward_bd),
            (ndir, B, L + 2 * PAD, REC))


def _prep(pairs, L):
    """Pack k, q of each direction into the fp32 per-token record [ndir, B, PAD + L + PAD, REC] (one launch)."""
    B, _, N = pairs[0][0].shape
    rec = torch.empty(len(pairs), B, L + 2 * PAD, REC, device=pairs[0][0].device, dtype=torch.float32)
    nrow = B * (L + 2 * PAD)
    bt = 32
    (k_fwd, q_fwd), (k_rev, q_rev) = pairs[0], pairs[-1]
    _prep_kernel[(triton.cdiv(nrow, bt), len(pairs))](
        k_fwd_ptr=k_fwd, q_fwd_ptr=q_fwd, k_rev_ptr=k_rev, q_rev_ptr=q_rev, rec_ptr=rec,
        sk_fwd_b=k_fwd.stride(0), sk_fwd_t=k_fwd.stride(1), sk_fwd_n=k_fwd.stride(2),
        sq_fwd_b=q_fwd.stride(0), sq_fwd_t=q_fwd.stride(1), sq_fwd_n=q_fwd.stride(2),
        sk_rev_b=k_rev.stride(0), sk_rev_t=k_rev.stride(1), sk_rev_n=k_rev.stride(2),
        sq_rev_b=q_rev.stride(0), sq_rev_t=q_rev.stride(1), sq_rev_n=q_rev.stride(2),
        L=L, NROW=nrow, N=N, BT=bt, REC_W=REC, PADT=PAD)
    return rec


def _bt_strides(prefix, t):
    return {f"s{prefix}_b": t.stride(0), f"s{prefix}_t": t.stride(1)}


def forward_layout():
    """(forward_bd, forward_warps, checkpoint_every): what decides the layout of the forward's saved buffers."""
    return [CONFIG.forward_bd, CONFIG.forward_warps, CONFIG.checkpoint_every]


def scan_forward(x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, k_rev, q_rev, dt_bias_rev, D_rev,
                 z, reverse, save, layout=None):
    """The scan's forward pass: returns (out, y_pre, checkpoints, records); the last three are empty unless
    `save` (training). layout: `forward_layout()` (the configuration's when None)."""
    bidir = x_rev is not None
    B, L, E = x_fwd.shape
    N = k_fwd.shape[-1]
    bd, warps, ck_every = layout or forward_layout()
    x_fwd, dt_fwd, x_rev, dt_rev, z = (_unit_channel_stride(t) for t in (x_fwd, dt_fwd, x_rev, dt_rev, z))
    dt_bias_fwd, D_fwd, dt_bias_rev, D_rev = (_param(t) for t in (dt_bias_fwd, D_fwd, dt_bias_rev, D_rev))
    rec = _prep([(k_fwd, q_fwd)] + ([(k_rev, q_rev)] if bidir else []), L)
    ndir = 2 if bidir else 1
    dev = x_fwd.device
    s_out, s_ypre, s_ck, _ = forward_buffer_shapes(B, L, E, N, ndir, save, bidir and z is not None, bd, ck_every)
    out = torch.empty(s_out, device=dev, dtype=x_fwd.dtype)
    ypre = torch.empty(s_ypre, device=dev, dtype=x_fwd.dtype)
    ck = torch.empty(s_ck, device=dev, dtype=torch.float32)
    nck = max((L - 1) // ck_every, 1)
    nblk = triton.cdiv(E, bd)
    ep = nblk * bd
    # a single direction fills the `rev` slots with its own tensors: never read (BIDIR is off)
    x_r, dt_r, bias_r = (x_rev, dt_rev, dt_bias_rev) if bidir else (x_fwd, dt_fwd, dt_bias_fwd)
    D_r = D_rev if bidir else D_fwd
    zz = z if z is not None else x_fwd
    common = dict(N=N, BD=bd, R=_per_thread(bd, warps), W=warps, REC_W=REC, PADT=PAD, BIDIR=bidir,
                  REVERSE=bool(reverse), FAST=_FAST, PREFETCH=CONFIG.forward_prefetch and _FAST, EVEN=E % bd == 0)
    args = dict(x_fwd_ptr=x_fwd, dt_fwd_ptr=dt_fwd, x_rev_ptr=x_r, dt_rev_ptr=dt_r, z_ptr=zz, out_ptr=out,
                ypre_ptr=ypre if ypre.numel() else out, rec_ptr=rec, ck_ptr=ck if ck.numel() else rec,
                bias_fwd_ptr=dt_bias_fwd, bias_rev_ptr=bias_r,
                D_fwd_ptr=D_fwd if D_fwd is not None else dt_bias_fwd,
                D_rev_ptr=D_r if D_r is not None else dt_bias_fwd,
                **_bt_strides("x_fwd", x_fwd), **_bt_strides("dt_fwd", dt_fwd), **_bt_strides("x_rev", x_r),
                **_bt_strides("dt_rev", dt_r), sz_b=zz.stride(0), sz_t=zz.stride(1),
                L=L, E=E, B=B, NCK=nck, EP=ep, **common, CK=ck_every, HAS_D=D_fwd is not None, HAS_Z=z is not None,
                SAVE=bool(save))
    # (training chunks two directions only: its window entry for a single reversed direction is not written; a
    # single direction with grad runs sequentially, its backward is still segmented)
    if (bidir or not save) and dev.type == "cuda" and not CONFIG.chunk_len and _may_split(dev, B * nblk,
                                                                                          1 / CONFIG.chunk_split):
        key = (x_fwd.dtype, z is not None, D_fwd is not None, bool(save), bidir, bool(reverse), N, bd, E % bd == 0,
               ck_every, CONFIG.forward_prefetch)
        resident = _resident(_scan_forward_kernel, dev, key, (nblk, B, 1),
                             lambda: dict(args, h0_ptr=rec, TC=L, NCH=1, CHUNKED=False, WIN=False), warps)
        tc = chunk_len(x_fwd, B, L, nblk, resident)
    elif bidir or not save:
        tc = chunk_len(x_fwd, B, L, nblk, _MOST_RESIDENT if dev.type == "cuda" else None)
    else:
        tc = L
    if save and tc < L:
        tc = triton.cdiv(tc, ck_every) * ck_every     # training: chunks of whole checkpoint windows
    nch = triton.cdiv(L, tc)
    win = save and nch > 1
    if nch > 1:
        # two-level scan: each chunk's affine map of the state, the entry state of every chunk, then the chunks.
        # Training: the summaries are per checkpoint window of each direction, and the combine writes the
        # checkpoints; the chunks then start from their windows' entry states.
        nsum, tsum = (triton.cdiv(L, ck_every), ck_every) if win else (nch, tc)
        cbd, cwarps = min(CONFIG.chunk_bd, bd), CONFIG.chunk_warps
        if bd % cbd:
            raise ValueError(f"chunked forward: forward_bd ({bd}) must be a multiple of chunk_bd ({cbd})")
        h0 = torch.empty(ndir, B, nsum, 2, N * ep, device=dev, dtype=torch.float32)
        _scan_chunk_kernel[(ep // cbd, B, nsum)](
            x_fwd_ptr=x_fwd, dt_fwd_ptr=dt_fwd, x_rev_ptr=x_r, dt_rev_ptr=dt_r, rec_ptr=rec, sum_ptr=h0,
            bias_fwd_ptr=dt_bias_fwd, bias_rev_ptr=bias_r,
            **_bt_strides("x_fwd", x_fwd), **_bt_strides("dt_fwd", dt_fwd), **_bt_strides("x_rev", x_r),
            **_bt_strides("dt_rev", dt_r), L=L, E=E, EP=ep, B=B, TC=tsum, NCH=nsum,
            **dict(common, BD=cbd, R=_per_thread(cbd, cwarps), W=cwarps, EVEN=E % cbd == 0), WIN=win,
            num_warps=cwarps)
        _combine(h0, ck if win else h0, nsum, ep, E, N, B, ndir, back_fwd=bool(reverse) and not win,
                 back_rev=not win, ckout=win, bd=bd, warps=warps)
    else:
        h0, nsum = rec, 1
    _scan_forward_kernel[(nblk, B, nch)](h0_ptr=h0, TC=tc, NCH=nsum, CHUNKED=nch > 1, WIN=win, num_warps=warps,
                                         **args)
    if not save:
        rec = rec.new_empty(0)
    return out, ypre, ck, rec


def _combine(sums, ck, nch, ep, E, N, B, ndir, back_fwd, back_rev, ckout, bd, warps):
    blk = 128
    _scan_combine_kernel[(triton.cdiv(N * ep, blk), B, ndir)](
        sum_ptr=sums, ck_ptr=ck, NCH=nch, EP=ep, E=E, N=N, BLK=blk, U=8, BACK_FWD=back_fwd, BACK_REV=back_rev,
        CKOUT=ckout, BDF=bd, RF=_per_thread(bd, warps), WF=warps, num_warps=1)


# Set RECON_FLAGS["record"] to keep the flags of each reconstructing backward in RECON_FLAGS["last"] (one int32 per
# program: 1 where it was redone exactly; None after a backward that did not reconstruct): for tests and
# benchmarks. Off by default: a kept tensor allocated inside a CUDA graph's memory pool would break the graph.
RECON_FLAGS = {"record": False, "last": None}
# Per device: [running share of programs redone exactly, calls modulo 1024] (fp32, kept on the device so that
# no call waits for the GPU and CUDA graphs replay the bookkeeping).
RECON_STATE = {}


def _recon_state(dev):
    st = RECON_STATE.get(dev)
    if st is None:
        if dev.type == "cuda":
            # allocated from another thread: torch.compile's CUDA graphs route this thread's allocations into
            # their private pool while they warm up, and a tensor kept from there would break the graph
            box = []
            th = threading.Thread(target=lambda: box.append(torch.zeros(2, device=dev, dtype=torch.float32)))
            th.start()
            th.join()
            torch.cuda.synchronize(dev)
            st = box[0]
        else:
            st = torch.zeros(2, device=dev, dtype=torch.float32)
        RECON_STATE[dev] = st
    return st


def recon_share(device):
    """The running share of the reconstructing backward's programs that had to be redone exactly on `device` (0:
    none; at recon_share or above the reconstruction steps aside), or None if it has not run there. Reading it
    waits for the GPU: for logs, not for every step."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    st = RECON_STATE.get(device)
    return None if st is None else float(st[0])


def scan_backward(grad, x_fwd, dt_fwd, dt_bias_fwd, D_fwd, x_rev, dt_rev, dt_bias_rev, D_rev, z, ypre, ck, rec,
                  reverse, k_dtype, q_dtype, n_state, layout=None):
    """The scan's backward pass from the forward's saved buffers (layout: the `forward_layout()` they were written
    in). Returns (dx, ddt, dk, dq, dbias, dD) of the fwd slot, the same of the rev slot (empty for a
    single direction; dD empty without D), then dz (empty without z)."""
    bidir = x_rev is not None
    B, L, E = x_fwd.shape
    N = n_state
    ndir = 2 if bidir else 1
    grad, x_fwd, dt_fwd, x_rev, dt_rev, z = (_unit_channel_stride(t) for t in (grad, x_fwd, dt_fwd, x_rev, dt_rev, z))
    dt_bias_fwd, D_fwd, dt_bias_rev, D_rev = (_param(t) for t in (dt_bias_fwd, D_fwd, dt_bias_rev, D_rev))
    bdf, wf, ck_every = layout or forward_layout()
    bd, warps = CONFIG.backward_bd, CONFIG.backward_warps
    tt = math.gcd(CONFIG.backward_tile, ck_every)      # (the forward may have run under another configuration)
    nblk = triton.cdiv(E, bd)
    nck = ck.shape[2]
    dev = x_fwd.device
    dx_fwd = torch.empty(B, L, E, device=dev, dtype=x_fwd.dtype)
    ddt_fwd = torch.empty(B, L, E, device=dev, dtype=dt_fwd.dtype)
    dx_rev = torch.empty(B, L, E, device=dev, dtype=x_rev.dtype) if bidir else dx_fwd      # single: unused pointers
    ddt_rev = torch.empty(B, L, E, device=dev, dtype=dt_rev.dtype) if bidir else ddt_fwd
    dz = torch.empty(B, L, E, device=dev, dtype=z.dtype) if z is not None else None
    scatter = _FAST and N == 16
    nparts = nblk * warps if scatter else nblk
    nw = triton.cdiv(L, ck_every)
    x_r, dt_r, bias_r = (x_rev, dt_rev, dt_bias_rev) if bidir else (x_fwd, dt_fwd, dt_bias_fwd)
    D_r = D_rev if bidir else D_fwd
    zz = z if z is not None else x_fwd
    consts = dict(N=N, BD=bd, W=warps, CK=ck_every, TT=tt, REC_W=REC, PADT=PAD, BDF=bdf, RF=_per_thread(bdf, wf),
                  WF=wf, BIDIR=bidir, REVERSE=bool(reverse), HAS_D=D_fwd is not None, HAS_Z=z is not None,
                  FAST=_FAST, SCATTER=scatter)
    tensors = dict(g_ptr=grad, z_ptr=zz, ypre_ptr=ypre if ypre.numel() else grad, rec_ptr=rec, ck_ptr=ck,
                   x_fwd_ptr=x_fwd, dt_fwd_ptr=dt_fwd, x_rev_ptr=x_r, dt_rev_ptr=dt_r, bias_fwd_ptr=dt_bias_fwd,
                   bias_rev_ptr=bias_r, D_fwd_ptr=D_fwd if D_fwd is not None else dt_bias_fwd,
                   D_rev_ptr=D_r if D_r is not None else dt_bias_fwd, dx_fwd_ptr=dx_fwd, ddt_fwd_ptr=ddt_fwd,
                   dx_rev_ptr=dx_rev, ddt_rev_ptr=ddt_rev, dz_ptr=dz if dz is not None else dx_fwd,
                   sg_b=grad.stride(0), sg_t=grad.stride(1), sz_b=zz.stride(0), sz_t=zz.stride(1),
                   **_bt_strides("x_fwd", x_fwd), **_bt_strides("dt_fwd", dt_fwd), **_bt_strides("x_rev", x_r),
                   **_bt_strides("dt_rev", dt_r), L=L, E=E, B=B, NCK=nck, NBLKF=triton.cdiv(E, bdf))
    if dev.type == "cuda" and not CONFIG.segment_windows and _may_split(dev, B * nblk * ndir, CONFIG.segment_cap):
        def probe():
            f32 = torch.empty(1, device=dev, dtype=torch.float32)
            return dict(tensors, scr_ptr=f32, dkq_ptr=f32, dpar_ptr=f32, csum_ptr=f32, NSEG=1, SW=nw, EP=E,
                        flag_ptr=torch.empty(1, device=dev, dtype=torch.int32), TOL=1.0, st_ptr=f32, THR=1.0,
                        PROBE=CONFIG.recon_probe, **consts, SEG=False)

        key = (x_fwd.dtype, grad.dtype, tuple(sorted(consts.items())))
        sw = segment_windows(x_fwd, B * nblk * ndir, nw, _resident(_scan_backward_kernel, dev, key, (nblk, B, ndir),
                                                                    probe, warps))
    else:
        sw = segment_windows(x_fwd, B * nblk * ndir, nw, _MOST_RESIDENT if dev.type == "cuda" else None)
    nseg = triton.cdiv(nw, sw)
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    # (a CUDA graph keeps the running share that eager calls before it set up; it allocates none of its own)
    recon = (CONFIG.recon and nseg == 1 and x_fwd.dtype in (torch.bfloat16, torch.float16)
             and not (capturing and dev not in RECON_STATE))
    npar = 2 * B if recon else B * nseg     # with recon: the reconstructing and the exact launch's rows
    dkq = torch.empty(ndir, nparts, B, L, 2 * N, device=dev, dtype=torch.float32)
    dpar = torch.zeros(ndir, npar, 2, E, device=dev, dtype=torch.float32)
    flags = torch.empty(ndir * B * nblk if recon else 1, device=dev, dtype=torch.int32)
    if RECON_FLAGS["record"]:
        RECON_FLAGS["last"] = flags if recon else None
    st = _recon_state(dev) if recon else flags
    thr, probe_every = float(CONFIG.recon_share), CONFIG.recon_probe
    scratch = torch.empty(ndir * B * nseg * nblk * (ck_every // tt) * N * bd, device=dev, dtype=torch.float32)
    cbd, cwarps = CONFIG.chunk_bd, CONFIG.chunk_warps
    ep = triton.cdiv(E, max(cbd, bd)) * max(cbd, bd)
    if nseg > 1:
        # the adjoint carry entering every segment: per-segment maps, then a combine against the scan order
        csum = torch.empty(ndir, B, nseg, 2, N * ep, device=dev, dtype=torch.float32)
        _adjoint_chunk_kernel[(ep // cbd, B, ndir * nseg)](
            g_ptr=grad, z_ptr=zz, dt_fwd_ptr=dt_fwd, dt_rev_ptr=dt_r, rec_ptr=rec, sum_ptr=csum,
            bias_fwd_ptr=dt_bias_fwd, bias_rev_ptr=bias_r, sg_b=grad.stride(0), sg_t=grad.stride(1),
            sz_b=zz.stride(0), sz_t=zz.stride(1), **_bt_strides("dt_fwd", dt_fwd), **_bt_strides("dt_rev", dt_r),
            L=L, E=E, EP=ep, B=B, TC=sw * ck_every, NCH=nseg, N=N, BD=cbd, R=_per_thread(cbd, cwarps), W=cwarps,
            REC_W=REC, PADT=PAD, BIDIR=bidir, REVERSE=bool(reverse), HAS_Z=z is not None, FAST=_FAST,
            EVEN=E % cbd == 0, num_warps=cwarps)
        _combine(csum, csum, nseg, ep, E, N, B, ndir, back_fwd=True, back_rev=True, ckout=False, bd=bdf, warps=wf)
    else:
        csum = dpar
    cap = {"maxnreg": CONFIG.recon_maxnreg} if CONFIG.recon_maxnreg else {}
    for mode in ((dict(RECON=True, **cap), dict(FALLBACK=True)) if recon else (dict(),)):
        _scan_backward_kernel[(nblk, B, ndir * nseg)](
            **tensors, scr_ptr=scratch, dkq_ptr=dkq, dpar_ptr=dpar, csum_ptr=csum, NSEG=nseg, SW=sw, EP=ep,
            flag_ptr=flags, TOL=float(CONFIG.recon_tol), st_ptr=st, THR=thr, PROBE=probe_every, **consts,
            SEG=nseg > 1, **mode, num_warps=warps)
    if recon:
        _recon_stats_kernel[(1,)](flag_ptr=flags, st_ptr=st, NF=flags.numel(), THR=thr, PROBE=probe_every,
                                  DECAY=float(CONFIG.recon_decay), BLK=1024, num_warps=4)
    # dk, dq, dbias, dD of each direction: deterministic sums of the partials (one launch); every returned tensor
    # is its own allocation
    sums = [[torch.empty(B, L, N, device=dev, dtype=k_dtype), torch.empty(B, L, N, device=dev, dtype=q_dtype),
             torch.empty(E, device=dev, dtype=bias.dtype), torch.empty(E, device=dev, dtype=D.dtype) if D is not None
             else _empty(x_fwd)] for bias, D in ((dt_bias_fwd, D_fwd), (dt_bias_rev, D_rev))[:ndir]]
    s_f, s_r = sums[0], sums[-1]          # one direction: the rev slots repeat fwd's and are never written
    has_d_fwd, has_d_rev = D_fwd is not None, (D_rev if bidir else D_fwd) is not None
    bt, be = 64, 128
    ntp = triton.cdiv(B * L, bt)
    _grad_sums_kernel[(ntp + triton.cdiv(E, be), ndir)](
        dkq_ptr=dkq, dpar_ptr=dpar, dk_fwd_ptr=s_f[0], dq_fwd_ptr=s_f[1], dbias_fwd_ptr=s_f[2],
        dD_fwd_ptr=s_f[3] if has_d_fwd else s_f[2], dk_rev_ptr=s_r[0], dq_rev_ptr=s_r[1], dbias_rev_ptr=s_r[2],
        dD_rev_ptr=s_r[3] if has_d_rev else s_r[2], NPART=nparts, NROW=B * L, NPAR=npar, E=E, NTP=ntp,
        N=N, BT=bt, BE=be, RB=32, HAS_D_FWD=has_d_fwd, HAS_D_REV=has_d_rev, num_warps=4)
    res = [t for dx, ddt, s in zip((dx_fwd, dx_rev), (ddt_fwd, ddt_rev), sums) for t in (dx, ddt, *s)]
    res += [_empty(x_fwd) for _ in range(6 * (2 - ndir))]
    res.append(dz if dz is not None else _empty(x_fwd))
    return tuple(res)


# ----------------------------------------------------------------------------------------------------- conv
def conv_forward(x, w_fwd, bias_fwd, w_rev, bias_rev):
    """Depthwise conv1d (CONV_WIDTH taps) + SiLU of both directions from one read of x: (x_fwd, x_rev)."""
    B, L, E = x.shape
    x = _unit_channel_stride(x)
    w_fwd, bias_fwd, w_rev, bias_rev = (_param(t) for t in (w_fwd, bias_fwd, w_rev, bias_rev))
    y_fwd = torch.empty(B, L, E, device=x.device, dtype=x.dtype)
    y_rev = torch.empty_like(y_fwd)
    bd, ch = CONFIG.conv_bd, CONFIG.conv_chunk
    _conv_forward_kernel[(triton.cdiv(E, bd), B, triton.cdiv(L, ch))](
        x_ptr=x, w_fwd_ptr=w_fwd, bias_fwd_ptr=bias_fwd if bias_fwd is not None else w_fwd, w_rev_ptr=w_rev,
        bias_rev_ptr=bias_rev if bias_rev is not None else w_rev, y_fwd_ptr=y_fwd, y_rev_ptr=y_rev,
        sx_b=x.stride(0), sx_t=x.stride(1), L=L, E=E, CH=ch, BD=bd, HAS_BIAS_FWD=bias_fwd is not None,
        HAS_BIAS_REV=bias_rev is not None, FAST=_FAST, num_warps=CONFIG.conv_warps)
    return y_fwd, y_rev


def conv_backward(dy_fwd, dy_rev, x, w_fwd, bias_fwd, w_rev, bias_rev):
    """Gradients of conv_forward: (dx, dw_fwd, dbias_fwd, dw_rev, dbias_rev), dense, in the inputs' dtypes (the
    bias gradients empty where a bias is None)."""
    B, L, E = x.shape
    x, dy_fwd, dy_rev = (_unit_channel_stride(t) for t in (x, dy_fwd, dy_rev))
    w_fwd, bias_fwd, w_rev, bias_rev = (_param(t) for t in (w_fwd, bias_fwd, w_rev, bias_rev))
    bd, ch = CONFIG.conv_bd, CONFIG.conv_chunk
    nch = triton.cdiv(L, ch)
    dev = x.device
    dx = torch.empty(B, L, E, device=dev, dtype=x.dtype)
    dw = torch.empty(B * nch, 10, E, device=dev, dtype=torch.float32)
    has_bf, has_br = bias_fwd is not None, bias_rev is not None
    _conv_backward_kernel[(triton.cdiv(E, bd), B, nch)](
        x_ptr=x, dy_fwd_ptr=dy_fwd, dy_rev_ptr=dy_rev, w_fwd_ptr=w_fwd,
        bias_fwd_ptr=bias_fwd if has_bf else w_fwd, w_rev_ptr=w_rev, bias_rev_ptr=bias_rev if has_br else w_rev,
        dx_ptr=dx, dw_ptr=dw, sx_b=x.stride(0), sx_t=x.stride(1), sdy_fwd_b=dy_fwd.stride(0),
        sdy_fwd_t=dy_fwd.stride(1), sdy_rev_b=dy_rev.stride(0), sdy_rev_t=dy_rev.stride(1), L=L, E=E, CH=ch,
        BD=bd, HAS_BIAS_FWD=has_bf, HAS_BIAS_REV=has_br, FAST=_FAST, num_warps=CONFIG.conv_warps)
    # the partials' sum (one launch) into dense (E, W) / (E,) gradients, as the fake implementation promises
    dw_fwd = torch.empty(E, CONV_WIDTH, device=dev, dtype=w_fwd.dtype)
    dw_rev = torch.empty(E, CONV_WIDTH, device=dev, dtype=w_rev.dtype)
    dbias_fwd = torch.empty(E, device=dev, dtype=bias_fwd.dtype) if has_bf else _empty(x)
    dbias_rev = torch.empty(E, device=dev, dtype=bias_rev.dtype) if has_br else _empty(x)
    bc = 32   # narrow column blocks: enough programs to stream B x chunks partial rows at long sequences
    _conv_wsum_kernel[(triton.cdiv(10 * E, bc),)](
        dw_ptr=dw, dw_fwd_ptr=dw_fwd, dbias_fwd_ptr=dbias_fwd if has_bf else dw_fwd, dw_rev_ptr=dw_rev,
        dbias_rev_ptr=dbias_rev if has_br else dw_rev, NPAR=B * nch, E=E, BC=bc, RB=64, HAS_BIAS_FWD=has_bf,
        HAS_BIAS_REV=has_br, num_warps=4)
    return dx, dw_fwd, dbias_fwd, dw_rev, dbias_rev


# ----------------------------------------------------------------------------------------------------- norm
def _rows(t):
    """t (..., D) as (B, L, D) rows with a unit stride along D: a view where the leading dims allow it."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 3:
        return t
    return t.reshape(1, -1, t.shape[-1]) if t.dim() != 2 else t[None]


def _norm_rows_per_program(D):
    return max(1, CONFIG.norm_elems // triton.next_power_of_2(D))


def norm_forward(x, delta, weight, eps, out_dtype):
    """r = x + delta (empty when delta is None: r is x), y = r * rsqrt(mean(r^2) + eps) * weight in out_dtype,
    and rstd (x.shape[:-1], fp32) for the backward. r is in the dtype x + delta has in PyTorch."""
    D = x.shape[-1]
    xr = _rows(x)
    B, L, _ = xr.shape
    M = B * L
    dev = x.device
    dr = _rows(delta) if delta is not None else xr
    r = (torch.empty(x.shape, device=dev, dtype=torch.promote_types(x.dtype, delta.dtype)) if delta is not None
         else _empty(x))
    y = torch.empty(x.shape, device=dev, dtype=out_dtype)
    rstd = torch.empty(x.shape[:-1], device=dev, dtype=torch.float32)
    if M == 0:
        return r, y, rstd
    rows = _norm_rows_per_program(D)
    _norm_forward_kernel[(triton.cdiv(M, rows),)](
        x_ptr=xr, delta_ptr=dr, w_ptr=_param(weight), r_ptr=r if delta is not None else y, y_ptr=y, rstd_ptr=rstd,
        sx_b=xr.stride(0), sx_t=xr.stride(1), sd_b=dr.stride(0), sd_t=dr.stride(1), M=M, L=L, D=D, eps=float(eps),
        ROWS=rows, BLOCK_D=triton.next_power_of_2(D), HAS_DELTA=delta is not None, num_warps=CONFIG.norm_warps)
    return r, y, rstd


def norm_backward(dy, dres, r, rstd, weight, x_dtype, delta_dtype):
    """Gradients of norm_forward: (dx, ddelta, dweight); dx = ddelta = dr (in x_dtype / delta_dtype, ddelta empty
    when delta_dtype is None), dres (r's gradient from its other uses, or None) added in. r: the norm's input (x
    when there was no delta)."""
    D = r.shape[-1]
    rr, dyr = _rows(r), _rows(dy)
    B, L, _ = rr.shape
    M = B * L
    dev = r.device
    resr = _rows(dres) if dres is not None else rr
    dx = torch.empty(r.shape, device=dev, dtype=x_dtype)
    ddelta = torch.empty(r.shape, device=dev, dtype=delta_dtype) if delta_dtype is not None else _empty(r)
    if M == 0:
        return dx, ddelta, torch.zeros_like(weight)
    rows = _norm_rows_per_program(D)
    blocks = triton.cdiv(M, rows)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    progs = max(1, min(blocks, sms * CONFIG.norm_backward_per_sm))
    per_prog = triton.cdiv(blocks, progs) * rows
    progs = triton.cdiv(M, per_prog)
    dw = torch.empty(progs, D, device=dev, dtype=torch.float32)
    _norm_backward_kernel[(progs,)](
        dy_ptr=dyr, dres_ptr=resr, r_ptr=rr, rstd_ptr=rstd.contiguous(), w_ptr=_param(weight), dx_ptr=dx,
        ddelta_ptr=ddelta if delta_dtype is not None else dx, dw_ptr=dw, sdy_b=dyr.stride(0), sdy_t=dyr.stride(1),
        sres_b=resr.stride(0), sres_t=resr.stride(1), sr_b=rr.stride(0), sr_t=rr.stride(1), M=M, L=L, D=D,
        ROWS_PER_PROG=per_prog, ROWS=rows, BLOCK_D=triton.next_power_of_2(D), HAS_DRES=dres is not None,
        HAS_DDELTA=delta_dtype is not None, num_warps=CONFIG.norm_warps)
    # the partials' sum: (programs, D) with programs a few per SM, one small reduction
    return dx, ddelta, dw.sum(0).to(weight.dtype)
