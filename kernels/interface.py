"""Launchers, autograd and torch.library registration of the Triton kernels.

Each op is a `torch.library.custom_op` (opaque to torch.compile, so the mixer compiles without graph breaks)
with a fake implementation for tracing and an autograd formula that calls the backward op. In plain eager mode
the entry points call the same launchers through `torch.autograd.Function`s instead (same saved tensors, same
gradients): torch.library's wrapping cost about 1.2 ms of host time per scan forward + backward and 0.85 ms per
conv (benchmarks/bench_host.py), which made training host-bound below batch 256 at 224 px. Public entry points
(called by vlonghorn.ops when the backend is "triton"):

    longhorn_scan_triton(x, dt, k, q, dt_bias, D, z, reverse) -> y
    bidirectional_longhorn_scan_triton(x_fwd, x_bwd, dt_fwd, dt_bwd, k_fwd, q_fwd, k_bwd, q_bwd,
                                       dt_bias_fwd, dt_bias_bwd, D_fwd, D_bwd, z) -> (y_fwd + y_bwd) / 2 * silu(z)
    bidirectional_conv1d_silu_triton(x, weight_fwd, bias_fwd, weight_bwd, bias_bwd) -> (x_fwd, x_bwd)

and, for recomputing everything of a region but the scan in the backward, `ScanOutputs` / `keep_scan_outputs`.
"""
import contextlib
import os
import threading
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .conv import _conv_bwd_kernel, _conv_fwd_kernel, _conv_wsum_kernel
from .scan import (PAD, REC, _adjoint_chunk_kernel, _grad_sums_kernel, _prep_kernel, _recon_stats_kernel,
                   _scan_bwd_kernel, _scan_chunk_kernel, _scan_combine_kernel, _scan_fwd_kernel)

__all__ = ["longhorn_scan_triton", "bidirectional_longhorn_scan_triton", "bidirectional_conv1d_silu_triton",
           "CONFIG", "ScanOutputs", "keep_scan_outputs"]

# Launch parameters, chosen by the sweep in benchmarks/bench_kernels.py on an H100 (benchmarks/NOTES_kernels.md).
# BD: channels per program (BD / (32 warps) channels per thread); CK: steps between the forward's fp32
# checkpoints (= the backward's window); TT: steps per register tile in the backward.
CONFIG = {
    "fwd_bd": 64, "fwd_warps": 1,
    "bwd_bd": 32, "bwd_warps": 1, "bwd_tt": 2, "ck": 64,
    "conv_bd": 128, "conv_warps": 1, "conv_ch": 64,
    # L1 prefetch of the next step's per-token records (GPU only): halves the forward on an H100 (613 -> 322 us
    # at B=128, L=197)
    "fwd_prefetch": True,
    # Chunked forward (two-level scan) for too few programs to fill the GPU (small batch, high resolution).
    # fwd_chunk: tokens per chunk; 0 chooses: chunk only if batch x channel blocks x fwd_chunk_split <= SMs x
    # fwd_resident (the forward's resident programs per SM at 168 registers), into about fwd_chunk_waves x that
    # many programs, at least fwd_chunk_min tokens each (shorter chunks lose to the launches' host time); tests
    # set a number to force it. chunk_bd / chunk_warps: the launch of the first passes (it divides fwd_bd).
    # H100 sweeps: NOTES_kernels.md items 27, 29.
    "fwd_chunk": 0, "fwd_resident": 12, "fwd_chunk_split": 3, "fwd_chunk_waves": 2, "fwd_chunk_min": 256,
    "chunk_bd": 64, "chunk_warps": 1,
    # Segmented backward, the same idea: bwd_seg checkpoint windows per segment (0: segments only if batch x
    # channel blocks x directions <= bwd_seg_cap x SMs x bwd_resident (the exact backward's resident programs at
    # 227 registers), into about bwd_seg_waves x that many programs of at least bwd_seg_min windows; a number
    # forces it). The segments run the exact backward; since the unsegmented one reconstructs (below) the cap is 1
    # (H100, bf16: B=32, L=1025 (1536 programs) 2.76 ms unsegmented vs 3.91 segmented; B=16, L=4097 (768) 9.34
    # vs 7.12 ms; NOTES_kernels.md item 34).
    "bwd_seg": 0, "bwd_resident": 8, "bwd_seg_cap": 1, "bwd_seg_waves": 8, "bwd_seg_min": 4,
    # bwd_recon: for bf16 / fp16 inputs the backward reconstructs the states against the scan order instead of
    # recomputing them (no sweep, no tiles, no scratch traffic; 1.76x the exact backward on an H100), checked
    # against every checkpoint: programs whose reconstruction drifted by more than bwd_recon_tol (relative) are
    # redone exactly by a second launch. Its speed depends on the weights (strong writes make it drift);
    # NOTES_kernels.md item 34.
    # bwd_recon_maxnreg: a register cap for that launch (0: none; 168 gives 12 warps per SM without spills). The
    # running share of redone programs (per device, over calls, weight bwd_recon_decay per call) decides: at or
    # above bwd_recon_share the reconstruction steps aside (it pays while fewer than ~44% of the programs are
    # redone on an H100) except every bwd_recon_probe-th call, which measures again.
    "bwd_recon": True, "bwd_recon_tol": 1e-4, "bwd_recon_maxnreg": 168,
    "bwd_recon_share": 0.4, "bwd_recon_probe": 64, "bwd_recon_decay": 0.05,
}
if os.environ.get("VLONGHORN_KERNEL_CONFIG"):  # e.g. the launch configuration a benchmark sweep chose
    import json
    CONFIG.update(json.loads(os.environ["VLONGHORN_KERNEL_CONFIG"]))


# Under TRITON_INTERPRET=1 (CPU tests) the kernels take their plain-Triton paths; on the GPU they use
# single-instruction reciprocals and warp-shuffle reductions written in inline PTX.
_FAST = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _unit_channel_stride(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _per_thread(bd, warps):
    r = bd // (32 * warps)
    if r not in (1, 2, 4) or r * 32 * warps != bd:
        raise ValueError(f"block of {bd} channels over {warps} warps: need 1, 2 or 4 channels per thread")
    return r


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
def _prep(pairs, L):
    """Pack k, q of each direction into the fp32 per-token record [ndir, B, PAD + L + PAD, REC] (one launch)."""
    B, _, N = pairs[0][0].shape
    rec = torch.empty(len(pairs), B, L + 2 * PAD, REC, device=pairs[0][0].device, dtype=torch.float32)
    nrow = B * (L + 2 * PAD)
    bt = 32
    (ka, qa), (kb, qb) = pairs[0], pairs[-1]
    _prep_kernel[(triton.cdiv(nrow, bt), len(pairs))](
        ka, qa, kb, qb, rec, *ka.stride(), *qa.stride(), *kb.stride(), *qb.stride(), L, nrow,
        N=N, BT=bt, REC_W=REC, PADT=PAD)
    return rec


def _auto_parts(x, progs, resident, limit, waves, most):
    """Parts to cut every sequence into when `progs` programs (one warp each, `resident` per SM) cannot fill the
    GPU: none (1) above limit x SMs x resident programs or off CUDA, else about `waves` times that many
    programs, at most `most` parts."""
    if x.device.type != "cuda":
        return 1
    cap = torch.cuda.get_device_properties(x.device).multi_processor_count * resident
    return 1 if progs > limit * cap else max(1, min(waves * cap // progs, most))


def _chunk_len(x, B, L, nblk):
    """Tokens per chunk of the two-level forward, or L (one chunk: the plain sequential scan)."""
    if CONFIG["fwd_chunk"]:
        return max(1, min(int(CONFIG["fwd_chunk"]), L))
    nch = _auto_parts(x, B * nblk, CONFIG["fwd_resident"], 1 / CONFIG["fwd_chunk_split"], CONFIG["fwd_chunk_waves"],
                      L // CONFIG["fwd_chunk_min"])
    return triton.cdiv(L, nch)


def _seg_windows(x, progs, nw):
    """Checkpoint windows per segment of the segmented backward (nw: one segment)."""
    if CONFIG["bwd_seg"]:
        return max(1, min(int(CONFIG["bwd_seg"]), nw))
    nseg = _auto_parts(x, progs, CONFIG["bwd_resident"], CONFIG["bwd_seg_cap"], CONFIG["bwd_seg_waves"],
                       nw // CONFIG["bwd_seg_min"])
    return triton.cdiv(nw, nseg)


def _scan_fwd_impl(xa, dta, ka, qa, bias_a, Da, xb, dtb, kb, qb, bias_b, Db, z, reverse, save):
    bidir = xb is not None
    B, L, E = xa.shape
    N = ka.shape[-1]
    xa, dta, xb, dtb, z = (_unit_channel_stride(t) for t in (xa, dta, xb, dtb, z))
    pairs = [(ka, qa)] + ([(kb, qb)] if bidir else [])
    rec = _prep(pairs, L)
    ck_every = CONFIG["ck"]
    nck = max((L - 1) // ck_every, 1)
    ndir = 2 if bidir else 1
    out = torch.empty(B, L, E, device=xa.device, dtype=xa.dtype)
    bd, warps = CONFIG["fwd_bd"], CONFIG["fwd_warps"]
    nblk = triton.cdiv(E, bd)
    if save:
        ck = torch.empty(ndir, B, nck, nblk * N * bd, device=xa.device, dtype=torch.float32)
        ypre = torch.empty(B, L, E, device=xa.device, dtype=xa.dtype) if (bidir and z is not None) else out.new_empty(0)
    else:
        ck = out.new_empty(0, dtype=torch.float32)
        ypre = out.new_empty(0)
    xb_, dtb_, bias_b_ = (xb, dtb, bias_b) if bidir else (xa, dta, bias_a)
    Db_ = Db if bidir else Da
    zz = z if z is not None else xa
    common = dict(N=N, BD=bd, R=_per_thread(bd, warps), W=warps, REC_W=REC, PADT=PAD, BIDIR=bidir,
                  REVERSE=bool(reverse), FAST=_FAST, PREFETCH=CONFIG["fwd_prefetch"] and _FAST, EVEN=E % bd == 0)
    # (the training forward chunks both directions only: its window entry for a single reversed direction is not
    # written; a single direction with grad runs sequentially, its backward is still segmented)
    tc = _chunk_len(xa, B, L, nblk) if (bidir or not save) else L
    if save and tc < L:
        tc = triton.cdiv(tc, ck_every) * ck_every     # training: chunks of whole checkpoint windows
    nch = triton.cdiv(L, tc)
    ep = nblk * bd
    win = save and nch > 1
    if nch > 1:
        # two-level scan: each chunk's affine map of the state, the entry state of every chunk, then the chunks.
        # Training: the summaries are per checkpoint window of each direction, and the combine writes the
        # checkpoints; the chunks then start from their windows' entry states.
        nsum, tsum = (triton.cdiv(L, ck_every), ck_every) if win else (nch, tc)
        cbd, cwarps = min(CONFIG["chunk_bd"], bd), CONFIG["chunk_warps"]
        if bd % cbd:
            raise ValueError(f"chunked forward: fwd_bd ({bd}) must be a multiple of chunk_bd ({cbd})")
        h0 = torch.empty(ndir, B, nsum, 2, N * ep, device=xa.device, dtype=torch.float32)
        _scan_chunk_kernel[(ep // cbd, B, nsum)](
            xa, dta, xb_, dtb_, rec, h0, bias_a, bias_b_,
            xa.stride(0), xa.stride(1), dta.stride(0), dta.stride(1), xb_.stride(0), xb_.stride(1),
            dtb_.stride(0), dtb_.stride(1), L, E, ep, B, tsum, nsum,
            **dict(common, BD=cbd, R=_per_thread(cbd, cwarps), W=cwarps, EVEN=E % cbd == 0), WIN=win,
            num_warps=cwarps)
        blk = 128
        _scan_combine_kernel[(triton.cdiv(N * ep, blk), B, ndir)](
            h0, ck if win else h0, nsum, ep, E, N=N, BLK=blk, U=8, BACK0=bool(reverse) and not win,
            BACK1=not win, CKOUT=win, BDF=bd, RF=_per_thread(bd, warps), WF=warps, num_warps=1)
    else:
        h0, nsum = rec, 1
    _scan_fwd_kernel[(nblk, B, nch)](
        xa, dta, xb_, dtb_, zz, out, ypre if ypre.numel() else out, rec, ck if ck.numel() else rec, h0,
        bias_a, bias_b_, Da if Da is not None else bias_a, Db_ if Db_ is not None else bias_a,
        xa.stride(0), xa.stride(1), dta.stride(0), dta.stride(1), xb_.stride(0), xb_.stride(1),
        dtb_.stride(0), dtb_.stride(1), zz.stride(0), zz.stride(1),
        L, E, B, nck, ep, tc, nsum, **common, CK=ck_every,
        HAS_D=Da is not None, HAS_Z=z is not None, SAVE=bool(save), CHUNKED=nch > 1, WIN=win,
        num_warps=warps)
    if not save:
        rec = rec.new_empty(0)
    return out, ypre, ck, rec


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
    none; at bwd_recon_share or above the reconstruction steps aside), or None if it has not run there. Reading it
    waits for the GPU: for logs, not for every step."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    st = RECON_STATE.get(device)
    return None if st is None else float(st[0])


def _scan_bwd_impl(grad, xa, dta, bias_a, Da, xb, dtb, bias_b, Db, z, ypre, ck, rec, reverse, k_dtype, q_dtype, N):
    bidir = xb is not None
    B, L, E = xa.shape
    ndir = 2 if bidir else 1
    grad, xa, dta, xb, dtb, z = (_unit_channel_stride(t) for t in (grad, xa, dta, xb, dtb, z))
    bd, tt, ck_every = CONFIG["bwd_bd"], CONFIG["bwd_tt"], CONFIG["ck"]
    if bd != 32 * CONFIG["bwd_warps"] or ck_every % tt:
        raise ValueError(f"backward launch config: need bwd_bd = 32 * bwd_warps (one channel per thread) and ck a "
                         f"multiple of bwd_tt, got {CONFIG}")
    nblk = triton.cdiv(E, bd)
    nck = ck.shape[2]
    bdf = CONFIG["fwd_bd"]
    rf = _per_thread(bdf, CONFIG["fwd_warps"])
    dev = xa.device
    dxa = torch.empty(B, L, E, device=dev, dtype=xa.dtype)
    ddta = torch.empty(B, L, E, device=dev, dtype=dta.dtype)
    dxb = torch.empty(B, L, E, device=dev, dtype=xb.dtype) if bidir else dxa      # single: unused pointers
    ddtb = torch.empty(B, L, E, device=dev, dtype=dtb.dtype) if bidir else ddta
    dz = torch.empty(B, L, E, device=dev, dtype=z.dtype) if z is not None else None
    scatter = _FAST and N == 16
    nparts = nblk * CONFIG["bwd_warps"] if scatter else nblk
    nw = triton.cdiv(L, ck_every)
    sw = _seg_windows(xa, B * nblk * ndir, nw)
    nseg = triton.cdiv(nw, sw)
    capturing = dev.type == "cuda" and torch.cuda.is_current_stream_capturing()
    # (a CUDA graph keeps the running share that eager calls before it set up; it allocates none of its own)
    recon = (bool(CONFIG["bwd_recon"]) and nseg == 1 and xa.dtype in (torch.bfloat16, torch.float16)
             and not (capturing and dev not in RECON_STATE))
    npar = 2 * B if recon else B * nseg     # with recon: the reconstructing and the exact launch's rows
    dkq = torch.empty(ndir, nparts, B, L, 2 * N, device=dev, dtype=torch.float32)
    dpar = torch.zeros(ndir, npar, 2, E, device=dev, dtype=torch.float32)
    flags = torch.empty(ndir * B * nblk if recon else 1, device=dev, dtype=torch.int32)
    if RECON_FLAGS["record"]:
        RECON_FLAGS["last"] = flags if recon else None
    st = _recon_state(dev) if recon else flags
    thr, probe = float(CONFIG["bwd_recon_share"]), int(CONFIG["bwd_recon_probe"])
    scratch = torch.empty(ndir * B * nseg * nblk * (ck_every // tt) * N * bd, device=dev, dtype=torch.float32)
    xb_, dtb_, bias_b_ = (xb, dtb, bias_b) if bidir else (xa, dta, bias_a)
    Db_ = Db if bidir else Da
    zz = z if z is not None else xa
    cbd, cwarps = CONFIG["chunk_bd"], CONFIG["chunk_warps"]
    ep = triton.cdiv(E, max(cbd, bd)) * max(cbd, bd)
    if nseg > 1:
        # the adjoint carry entering every segment: per-segment maps, then a combine against the scan order
        csum = torch.empty(ndir, B, nseg, 2, N * ep, device=dev, dtype=torch.float32)
        _adjoint_chunk_kernel[(ep // cbd, B, ndir * nseg)](
            grad, zz, dta, dtb_, rec, csum, bias_a, bias_b_, grad.stride(0), grad.stride(1), zz.stride(0),
            zz.stride(1), dta.stride(0), dta.stride(1), dtb_.stride(0), dtb_.stride(1), L, E, ep, B,
            sw * ck_every, nseg, N=N, BD=cbd, R=_per_thread(cbd, cwarps), W=cwarps, REC_W=REC, PADT=PAD,
            BIDIR=bidir, REVERSE=bool(reverse), HAS_Z=z is not None, FAST=_FAST, EVEN=E % cbd == 0,
            num_warps=cwarps)
        blk = 128
        _scan_combine_kernel[(triton.cdiv(N * ep, blk), B, ndir)](
            csum, csum, nseg, ep, E, N=N, BLK=blk, U=8, BACK0=True, BACK1=True, CKOUT=False, BDF=bdf, RF=rf,
            WF=CONFIG["fwd_warps"], num_warps=1)
    else:
        csum = dpar
    cap = {"maxnreg": int(CONFIG["bwd_recon_maxnreg"])} if CONFIG["bwd_recon_maxnreg"] else {}
    for mode in ((dict(RECON=True, **cap), dict(FALLBACK=True)) if recon else (dict(),)):
        _scan_bwd_kernel[(nblk, B, ndir * nseg)](
            grad, zz, ypre if ypre.numel() else grad, rec, ck, scratch,
            xa, dta, xb_, dtb_, bias_a, bias_b_, Da if Da is not None else bias_a,
            Db_ if Db_ is not None else bias_a, dxa, ddta, dxb, ddtb, dz if dz is not None else dxa, dkq, dpar,
            grad.stride(0), grad.stride(1), zz.stride(0), zz.stride(1), xa.stride(0), xa.stride(1),
            dta.stride(0), dta.stride(1), xb_.stride(0), xb_.stride(1), dtb_.stride(0), dtb_.stride(1),
            L, E, B, nck, triton.cdiv(E, bdf), csum, nseg, sw, ep, flags, float(CONFIG["bwd_recon_tol"]), st, thr,
            probe,
            N=N, BD=bd, W=CONFIG["bwd_warps"], CK=ck_every, TT=tt,
            REC_W=REC, PADT=PAD, BDF=bdf, RF=rf, WF=CONFIG["fwd_warps"],
            BIDIR=bidir, REVERSE=bool(reverse),
            HAS_D=Da is not None, HAS_Z=z is not None, FAST=_FAST, SCATTER=scatter, SEG=nseg > 1, **mode,
            num_warps=CONFIG["bwd_warps"])
    if recon:
        _recon_stats_kernel[(1,)](flags, st, flags.numel(), thr, probe, float(CONFIG["bwd_recon_decay"]), BLK=1024,
                                  num_warps=4)
    # dk, dq, dbias, dD of each direction: deterministic sums of the partials (one launch); every returned tensor
    # is its own allocation
    sums = [[torch.empty(B, L, N, device=dev, dtype=k_dtype), torch.empty(B, L, N, device=dev, dtype=q_dtype),
             torch.empty(E, device=dev, dtype=bias.dtype), torch.empty(E, device=dev, dtype=D.dtype) if D is not None
             else _empty(xa)] for bias, D in ((bias_a, Da), (bias_b, Db))[:ndir]]
    sa, sb = sums[0], sums[-1]          # one direction: the b slots repeat a's and are never written
    has_da, has_db = Da is not None, (Db if bidir else Da) is not None
    bt, be = 64, 128
    ntp = triton.cdiv(B * L, bt)
    _grad_sums_kernel[(ntp + triton.cdiv(E, be), ndir)](
        dkq, dpar, *sa[:3], sa[3] if has_da else sa[2], *sb[:3], sb[3] if has_db else sb[2], nparts, B * L,
        npar, E, ntp, N=N, BT=bt, BE=be, RB=32, HAS_DA=has_da, HAS_DB=has_db, num_warps=4)
    res = [t for dx, ddt, s in zip((dxa, dxb), (ddta, ddtb), sums) for t in (dx, ddt, *s)]
    res += [_empty(xa) for _ in range(6 * (2 - ndir))]
    res.append(dz if dz is not None else _empty(xa))
    return tuple(res)


@torch.library.custom_op("vlonghorn::scan_fwd", mutates_args=())
def scan_fwd(xa: Tensor, dta: Tensor, ka: Tensor, qa: Tensor, bias_a: Tensor, Da: Optional[Tensor],
             xb: Optional[Tensor], dtb: Optional[Tensor], kb: Optional[Tensor], qb: Optional[Tensor],
             bias_b: Optional[Tensor], Db: Optional[Tensor], z: Optional[Tensor], reverse: bool,
             save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (out, y_pre, checkpoints, record); the last three are empty unless `save`."""
    return _scan_fwd_impl(xa, dta, ka, qa, bias_a, Da, xb, dtb, kb, qb, bias_b, Db, z, reverse, save)


@scan_fwd.register_fake
def _(xa, dta, ka, qa, bias_a, Da, xb, dtb, kb, qb, bias_b, Db, z, reverse, save):
    B, L, E = xa.shape
    N = ka.shape[-1]
    ndir = 2 if xb is not None else 1
    out = xa.new_empty(B, L, E)
    if not save:
        return out, xa.new_empty(0), xa.new_empty(0, dtype=torch.float32), xa.new_empty(0, dtype=torch.float32)
    nck = max((L - 1) // CONFIG["ck"], 1)
    ypre = xa.new_empty(B, L, E) if (xb is not None and z is not None) else xa.new_empty(0)
    nblk = triton.cdiv(E, CONFIG["fwd_bd"])
    return (out, ypre, xa.new_empty(ndir, B, nck, nblk * N * CONFIG["fwd_bd"], dtype=torch.float32),
            xa.new_empty(ndir, B, L + 2 * PAD, REC, dtype=torch.float32))


@torch.library.custom_op("vlonghorn::scan_bwd", mutates_args=())
def scan_bwd(grad: Tensor, xa: Tensor, dta: Tensor, bias_a: Tensor, Da: Optional[Tensor], xb: Optional[Tensor],
             dtb: Optional[Tensor], bias_b: Optional[Tensor], Db: Optional[Tensor], z: Optional[Tensor],
             ypre: Tensor, ck: Tensor, rec: Tensor, reverse: bool, k_dtype: torch.dtype,
             q_dtype: torch.dtype, n_state: int) -> List[Tensor]:
    """Gradients (dx, ddt, dk, dq, dbias, dD) of direction a, the same of direction b, then dz (empty if absent)."""
    return list(_scan_bwd_impl(grad, xa, dta, bias_a, Da, xb, dtb, bias_b, Db, z, ypre, ck, rec, reverse,
                               k_dtype, q_dtype, n_state))


@scan_bwd.register_fake
def _(grad, xa, dta, bias_a, Da, xb, dtb, bias_b, Db, z, ypre, ck, rec, reverse, k_dtype, q_dtype, n_state):
    B, L, E = xa.shape
    N = n_state

    def one(x, dt, bias, D):
        return [x.new_empty(B, L, E), dt.new_empty(B, L, E), xa.new_empty(B, L, N, dtype=k_dtype),
                xa.new_empty(B, L, N, dtype=q_dtype), bias.new_empty(E),
                D.new_empty(E) if D is not None else _empty(xa)]

    res = one(xa, dta, bias_a, Da)
    res += one(xb, dtb, bias_b, Db) if xb is not None else [_empty(xa) for _ in range(6)]
    res.append(z.new_empty(B, L, E) if z is not None else _empty(xa))
    return res


def _scan_setup(ctx, inputs, output):
    xa, dta, ka, qa, bias_a, Da, xb, dtb, kb, qb, bias_b, Db, z, reverse, save = inputs
    _, ypre, ck, rec = output
    ctx.save_for_backward(xa, dta, bias_a, Da, xb, dtb, bias_b, Db, z, ypre, ck, rec)
    ctx.reverse = reverse
    ctx.dtypes = (ka.dtype, qa.dtype, kb.dtype if kb is not None else ka.dtype,
                  qb.dtype if qb is not None else qa.dtype)
    ctx.bidir = xb is not None
    ctx.n_state = ka.shape[-1]
    ctx.has = (Da is not None, Db is not None, z is not None)


def _scan_backward(ctx, g_out, g_ypre, g_ck, g_rec):
    xa, dta, bias_a, Da, xb, dtb, bias_b, Db, z, ypre, ck, rec = ctx.saved_tensors
    if rec.numel() == 0:
        raise RuntimeError("vlonghorn::scan_fwd was run with save=False; it cannot be differentiated")
    kd, qd, kbd, qbd = ctx.dtypes
    grads = (scan_bwd if _traced(g_out) else _scan_bwd_impl)(
        g_out, xa, dta, bias_a, Da, xb, dtb, bias_b, Db, z, ypre, ck, rec, ctx.reverse, kd, qd, ctx.n_state)
    dxa, ddta, dka, dqa, dba, dDa, dxb, ddtb, dkb, dqb, dbb, dDb, dz = grads
    has_da, has_db, has_z = ctx.has
    if ctx.bidir:
        dkb, dqb = dkb.to(kbd), dqb.to(qbd)
    else:
        dxb = ddtb = dkb = dqb = dbb = dDb = None
    return (dxa, ddta, dka, dqa, dba, dDa if has_da else None, dxb, ddtb, dkb, dqb, dbb,
            dDb if (ctx.bidir and has_db) else None, dz if has_z else None, None, None)


scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


class _ScanFn(torch.autograd.Function):
    """scan_fwd with autograd in eager mode: the launcher called directly, the same saved tensors and backward as
    the op's autograd formula."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = _scan_fwd_impl(*inputs)
        _scan_setup(ctx, inputs, outputs)
        return outputs[0]

    @staticmethod
    def backward(ctx, g_out):
        return _scan_backward(ctx, g_out, None, None, None)


def _scan(args, grad):
    """The scan's output for scan_fwd's arguments (without `save`; `grad`: differentiable), on the op or (eager)
    the launcher. Inside a recompute region (keep_scan_outputs) the first run, without grad, keeps the training
    outputs, and the second run hands them back."""
    store = _REGIONS.stack[-1] if _REGIONS.stack else None
    if store is not None:
        if store.recorded:
            store.next += 1
            return _ScanReplay.apply(store.kept[store.next - 1], *args)
        if grad:
            raise RuntimeError("keep_scan_outputs: the first run of a region must run without grad (the region "
                               "is differentiated when it runs again)")
    traced = _traced(args[0])
    if grad and not traced:
        return _ScanFn.apply(*args, True)
    outputs = (scan_fwd if traced else _scan_fwd_impl)(*args, grad or store is not None)
    if store is not None:
        store.kept.append(tuple(t.detach() for t in outputs))
    return outputs[0]


def _torch_fallback(k, *ts):
    """fp64 (accumulated in fp64 by the PyTorch path) and state sizes the packed record cannot hold."""
    N = k.shape[-1]
    return (N & (N - 1)) != 0 or 3 * N + 1 > REC or any(t is not None and t.dtype == torch.float64 for t in ts)


def longhorn_scan_triton(x, dt, k, q, dt_bias, D=None, z=None, reverse=False):
    """One direction of the scan on the Triton kernels (same contract as vlonghorn.ops.longhorn_scan)."""
    if _torch_fallback(k, x, dt, k, q, z):
        from vlonghorn.ops.scan_torch import longhorn_scan_torch
        return longhorn_scan_torch(x, dt, k, q, dt_bias, D, z, reverse)
    save = _needs_grad(x, dt, k, q, dt_bias, D, z)
    return _scan((x, dt, k, q, dt_bias, D, None, None, None, None, None, None, z, bool(reverse)), save)


def bidirectional_longhorn_scan_triton(x_fwd, x_bwd, dt_fwd, dt_bwd, k_fwd, q_fwd, k_bwd, q_bwd,
                                       dt_bias_fwd, dt_bias_bwd, D_fwd=None, D_bwd=None, z=None):
    """(y_fwd + y_bwd) / 2 * silu(z) in one fused launch (both directions; z optional)."""
    ts = (x_fwd, x_bwd, dt_fwd, dt_bwd, k_fwd, q_fwd, k_bwd, q_bwd, dt_bias_fwd, dt_bias_bwd, D_fwd, D_bwd, z)
    if _torch_fallback(k_fwd, *ts):
        from vlonghorn.ops.scan_torch import longhorn_scan_torch
        y = (longhorn_scan_torch(x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, None, False)
             + longhorn_scan_torch(x_bwd, dt_bwd, k_bwd, q_bwd, dt_bias_bwd, D_bwd, None, True)) * 0.5
        return y if z is None else y * torch.nn.functional.silu(z)
    if (D_fwd is None) != (D_bwd is None):
        # the kernel takes D for both directions or for neither
        D_fwd = D_fwd if D_fwd is not None else torch.zeros_like(D_bwd)
        D_bwd = D_bwd if D_bwd is not None else torch.zeros_like(D_fwd)
    if x_bwd.dtype != x_fwd.dtype:
        x_bwd = x_bwd.to(x_fwd.dtype)
    if dt_bwd.dtype != dt_fwd.dtype:
        dt_bwd = dt_bwd.to(dt_fwd.dtype)
    args = (x_fwd, dt_fwd, k_fwd, q_fwd, dt_bias_fwd, D_fwd, x_bwd, dt_bwd, k_bwd, q_bwd, dt_bias_bwd, D_bwd, z, False)
    return _scan(args, _needs_grad(*ts))


# ------------------------------------------------------------------------------------ recompute around the scan
class ScanOutputs:
    """The outputs of the scans run inside one recompute region (`keep_scan_outputs`), in call order."""

    def __init__(self):
        self.kept = []
        self.recorded = False   # the region has run once: its scans now hand back what they kept
        self.next = 0


class _Regions(threading.local):
    def __init__(self):
        self.stack = []     # the ScanOutputs of the regions being run on this thread, innermost last


_REGIONS = _Regions()


@contextlib.contextmanager
def keep_scan_outputs(store: ScanOutputs):
    """Run a region whose forward is run again, with grad, in the backward: the first time (without grad) every
    scan keeps its training outputs (output, y_pre, checkpoints, records) in `store`; when the region runs again,
    each scan returns what it kept (no kernel launch) through an autograd node over the recomputed inputs, so that
    only the scan's outputs live between forward and backward while its inputs are recomputed."""
    store.next = 0
    _REGIONS.stack.append(store)
    try:
        yield store
    finally:
        _REGIONS.stack.pop()
        store.recorded = True


class _ScanReplay(torch.autograd.Function):
    """scan_fwd's autograd node (the same saved tensors, the same backward) over recomputed inputs, with the
    outputs of the first run."""

    @staticmethod
    def forward(ctx, kept, *inputs):
        _scan_setup(ctx, inputs + (True,), kept)
        return kept[0].detach()

    @staticmethod
    def backward(ctx, g_out):
        return (None,) + _scan_backward(ctx, g_out, None, None, None)[:-1]


# ----------------------------------------------------------------------------------------------------- conv
def _conv_fwd_impl(x, wf, bf, wb, bb):
    B, L, E = x.shape
    x = _unit_channel_stride(x)
    wf, wb = wf.contiguous(), wb.contiguous()
    yf = torch.empty(B, L, E, device=x.device, dtype=x.dtype)
    yb = torch.empty_like(yf)
    bd, ch = CONFIG["conv_bd"], CONFIG["conv_ch"]
    _conv_fwd_kernel[(triton.cdiv(E, bd), B, triton.cdiv(L, ch))](
        x, wf, bf if bf is not None else wf, wb, bb if bb is not None else wb, yf, yb,
        x.stride(0), x.stride(1), L, E, ch, BD=bd, HAS_BF=bf is not None, HAS_BB=bb is not None, FAST=_FAST,
        num_warps=CONFIG["conv_warps"])
    return yf, yb


def _conv_bwd_impl(dyf, dyb, x, wf, bf, wb, bb):
    B, L, E = x.shape
    x, dyf, dyb = (_unit_channel_stride(t) for t in (x, dyf, dyb))
    wf, wb = wf.contiguous(), wb.contiguous()
    bd, ch = CONFIG["conv_bd"], CONFIG["conv_ch"]
    nch = triton.cdiv(L, ch)
    dx = torch.empty(B, L, E, device=x.device, dtype=x.dtype)
    dw = torch.empty(B * nch, 10, E, device=x.device, dtype=torch.float32)
    _conv_bwd_kernel[(triton.cdiv(E, bd), B, nch)](
        x, dyf, dyb, wf, bf if bf is not None else wf, wb, bb if bb is not None else wb, dx, dw,
        x.stride(0), x.stride(1), dyf.stride(0), dyf.stride(1), dyb.stride(0), dyb.stride(1), L, E, ch,
        BD=bd, HAS_BF=bf is not None, HAS_BB=bb is not None, FAST=_FAST, num_warps=CONFIG["conv_warps"])
    # the partials' sum (one launch) into contiguous (E, W) / (E,) gradients, as the fake implementation promises
    dwf, dwb = torch.empty(E, 4, device=x.device, dtype=wf.dtype), torch.empty(E, 4, device=x.device, dtype=wb.dtype)
    dbf = torch.empty(E, device=x.device, dtype=bf.dtype) if bf is not None else _empty(x)
    dbb = torch.empty(E, device=x.device, dtype=bb.dtype) if bb is not None else _empty(x)
    bc = 32   # narrow column blocks: enough programs to stream B x chunks partial rows at long sequences
    _conv_wsum_kernel[(triton.cdiv(10 * E, bc),)](dw, dwf, dbf if bf is not None else dwf, dwb,
                                                  dbb if bb is not None else dwb, B * nch, E, BC=bc, RB=64,
                                                  HAS_BF=bf is not None, HAS_BB=bb is not None, num_warps=4)
    return dx, dwf, dbf, dwb, dbb


@torch.library.custom_op("vlonghorn::conv1d_silu_fwd", mutates_args=())
def conv_fwd(x: Tensor, wf: Tensor, bf: Optional[Tensor], wb: Tensor, bb: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _conv_fwd_impl(x, wf, bf, wb, bb)


@conv_fwd.register_fake
def _(x, wf, bf, wb, bb):
    B, L, E = x.shape
    return x.new_empty(B, L, E), x.new_empty(B, L, E)


@torch.library.custom_op("vlonghorn::conv1d_silu_bwd", mutates_args=())
def conv_bwd(dyf: Tensor, dyb: Tensor, x: Tensor, wf: Tensor, bf: Optional[Tensor], wb: Tensor,
             bb: Optional[Tensor]) -> List[Tensor]:
    return list(_conv_bwd_impl(dyf, dyb, x, wf, bf, wb, bb))


@conv_bwd.register_fake
def _(dyf, dyb, x, wf, bf, wb, bb):
    B, L, E = x.shape
    return [x.new_empty(B, L, E), wf.new_empty(wf.shape), bf.new_empty(bf.shape) if bf is not None else _empty(x),
            wb.new_empty(wb.shape), bb.new_empty(bb.shape) if bb is not None else _empty(x)]


def _conv_setup(ctx, inputs, output):
    x, wf, bf, wb, bb = inputs
    ctx.save_for_backward(x, wf, bf, wb, bb)


def _conv_backward(ctx, dyf, dyb):
    x, wf, bf, wb, bb = ctx.saved_tensors
    if dyf is None:
        dyf = torch.zeros_like(x)
    if dyb is None:
        dyb = torch.zeros_like(x)
    dx, dwf, dbf, dwb, dbb = (conv_bwd if _traced(x) else _conv_bwd_impl)(dyf, dyb, x, wf, bf, wb, bb)
    return dx, dwf, dbf if bf is not None else None, dwb, dbb if bb is not None else None


conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup)


class _ConvFn(torch.autograd.Function):
    """conv1d_silu_fwd with autograd in eager mode (the launchers called directly; see the module docstring)."""

    @staticmethod
    def forward(ctx, x, wf, bf, wb, bb):
        ctx.save_for_backward(x, wf, bf, wb, bb)
        return _conv_fwd_impl(x, wf, bf, wb, bb)

    @staticmethod
    def backward(ctx, dyf, dyb):
        return _conv_backward(ctx, dyf, dyb)


def bidirectional_conv1d_silu_triton(x, weight_fwd, bias_fwd, weight_bwd, bias_bwd):
    """Depthwise conv1d (kernel 4) + SiLU of both directions from one read of x: returns (x_fwd, x_bwd)."""
    if weight_fwd.shape[-1] != 4 or x.dtype == torch.float64:
        import torch.nn.functional as F  # other widths and fp64: the plain PyTorch formulation
        width, channels = weight_fwd.shape[-1], x.shape[-1]
        xt = x.transpose(1, 2)
        y_fwd = F.conv1d(xt, weight_fwd[:, None], bias_fwd, padding=width - 1, groups=channels)[..., :-(width - 1)]
        y_bwd = F.conv1d(xt, weight_bwd.flip(-1)[:, None], bias_bwd, padding=width - 1,
                         groups=channels)[..., width - 1:]
        return F.silu(y_fwd).transpose(1, 2), F.silu(y_bwd).transpose(1, 2)
    args = (x, weight_fwd, bias_fwd, weight_bwd, bias_bwd)
    if _traced(x):
        return conv_fwd(*args)
    return _ConvFn.apply(*args) if _needs_grad(*args) else _conv_fwd_impl(*args)
