"""The chunked (two-level) scan for too few programs to fill the GPU (small batch, long sequences;
docs/kernel_design.md section 5, docs/gradients.md section 7). The state recurrence is affine in the state,
S_out = A S_in + Z over any run of steps, and so is the backward's adjoint carry: one pass computes every chunk's
(A, Z) from zero, a short sequential combine gives every chunk its entry state (in training: the checkpoints), and
the chunks then run in parallel from those states.
"""
import triton
import triton.language as tl

from .scan_common import (_block, _load_rec, _coefs, _decay, _ldc, _ld, _prefetch, _store_own, _sigmoid, _ck_col, _walk)


@triton.jit
def _summary_step(S, A, x, dt, bias, k, km, kappa, FAST: tl.constexpr):
    """One step of a chunk's affine map: S from zero (as _advance) and A, the product of the decays."""
    _, rden, eps = _coefs(dt, bias, kappa, FAST)
    f = _decay(eps, rden, km)
    return f * S + (eps * x)[None, :] * k[:, None], f * A


@triton.jit
def _scan_chunk_kernel(
        x_fwd_ptr, dt_fwd_ptr, x_rev_ptr, dt_rev_ptr, rec_ptr, sum_ptr, bias_fwd_ptr, bias_rev_ptr,
        sx_fwd_b, sx_fwd_t, sdt_fwd_b, sdt_fwd_t, sx_rev_b, sx_rev_t, sdt_rev_b, sdt_rev_t,
        L, E, EP, B, TC, NCH,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, REC_W: tl.constexpr,
        PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, FAST: tl.constexpr,
        PREFETCH: tl.constexpr, EVEN: tl.constexpr, WIN: tl.constexpr):
    """Pass 1 of the chunked forward (for too few programs to fill the GPU: small batch, long sequences). For chunk
    c = program_id(2) of each direction, the chunk's affine map of the state, S_out = A * S_in + Z, with A the
    product of the decays f and Z the state reached from zero. Written to sum[ndir, B, NCH, 2, N, EP] (slot 0: A,
    slot 1: Z; EP >= E a multiple of every block size). Chunk c is the tokens [c0, c1) = [c TC, c TC + TC) for
    every direction (inference), or, with WIN, steps [c0, c1) of each direction's own scan order (checkpoint
    windows of the training forward: the rev direction's step s is token L-1-s)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    c = tl.program_id(2)
    offs_d, dmask = _block(pid_d, E, BD, R, W, EVEN)
    offs_n = tl.arange(0, N)
    CKS = N * EP
    c0 = c * TC
    c1 = tl.minimum(c0 + TC, L)
    out_fwd = sum_ptr + (b * NCH + c) * (2 * CKS) + offs_n[:, None] * EP + offs_d[None, :]
    LP = L + 2 * PADT
    lane2 = tl.arange(0, 32) * (REC_W // 32)
    if WIN:
        t_rev0 = L - 1 - c0       # first token of a direction walking backwards
    else:
        t_rev0 = c1 - 1
    if REVERSE:
        t_fwd0 = t_rev0
        step_fwd = -1
    else:
        t_fwd0 = c0
        step_fwd = 1
    bias_fwd = tl.load(bias_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    x_fwd_b = x_fwd_ptr + b * sx_fwd_b + offs_d
    dt_fwd_b = dt_fwd_ptr + b * sdt_fwd_b + offs_d
    rec_fwd = rec_ptr + (b * LP + PADT) * REC_W
    S_fwd = tl.zeros([N, BD], tl.float32)
    A_fwd = tl.full([N, BD], 1.0, tl.float32)
    x_fwd1 = _ldc(x_fwd_b, t_fwd0, sx_fwd_t, L, dmask, EVEN)
    dt_fwd1 = _ldc(dt_fwd_b, t_fwd0, sdt_fwd_t, L, dmask, EVEN)
    if BIDIR:
        bias_rev = tl.load(bias_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        x_rev_b = x_rev_ptr + b * sx_rev_b + offs_d
        dt_rev_b = dt_rev_ptr + b * sdt_rev_b + offs_d
        rec_rev = rec_ptr + ((B + b) * LP + PADT) * REC_W
        S_rev = tl.zeros([N, BD], tl.float32)
        A_rev = tl.full([N, BD], 1.0, tl.float32)
        x_rev1 = _ldc(x_rev_b, t_rev0, sx_rev_t, L, dmask, EVEN)
        dt_rev1 = _ldc(dt_rev_b, t_rev0, sdt_rev_t, L, dmask, EVEN)
    for i in range(0, c1 - c0):
        t_fwd = t_fwd0 + step_fwd * i
        x_fwd = x_fwd1
        dt_fwd = dt_fwd1
        x_fwd1 = _ldc(x_fwd_b, t_fwd + step_fwd, sx_fwd_t, L, dmask, EVEN)
        dt_fwd1 = _ldc(dt_fwd_b, t_fwd + step_fwd, sdt_fwd_t, L, dmask, EVEN)
        k_fwd, _, km_fwd, kappa_fwd = _load_rec(rec_fwd, t_fwd, offs_n, N, REC_W)
        if PREFETCH:
            _prefetch(rec_fwd + (t_fwd + step_fwd) * REC_W + lane2, FAST)
        S_fwd, A_fwd = _summary_step(S_fwd, A_fwd, x_fwd, dt_fwd, bias_fwd, k_fwd, km_fwd, kappa_fwd, FAST)
        if BIDIR:
            t_rev = t_rev0 - i
            x_rev = x_rev1
            dt_rev = dt_rev1
            x_rev1 = _ldc(x_rev_b, t_rev - 1, sx_rev_t, L, dmask, EVEN)
            dt_rev1 = _ldc(dt_rev_b, t_rev - 1, sdt_rev_t, L, dmask, EVEN)
            k_rev, _, km_rev, kappa_rev = _load_rec(rec_rev, t_rev, offs_n, N, REC_W)
            if PREFETCH:
                _prefetch(rec_rev + (t_rev - 1) * REC_W + lane2, FAST)
            S_rev, A_rev = _summary_step(S_rev, A_rev, x_rev, dt_rev, bias_rev, k_rev, km_rev, kappa_rev, FAST)
    _store_own(out_fwd, A_fwd, FAST)
    _store_own(out_fwd + CKS, S_fwd, FAST)
    if BIDIR:
        out_rev = out_fwd + B * NCH * (2 * CKS)
        _store_own(out_rev, A_rev, FAST)
        _store_own(out_rev + CKS, S_rev, FAST)


@triton.jit
def _scan_combine_kernel(sum_ptr, ck_ptr, NCH, EP, E, N: tl.constexpr, BLK: tl.constexpr, U: tl.constexpr,
                         BACK_FWD: tl.constexpr, BACK_REV: tl.constexpr, CKOUT: tl.constexpr, BDF: tl.constexpr,
                         RF: tl.constexpr, WF: tl.constexpr):
    """Pass 2 of a chunked scan: the state entering every chunk, sequentially over the chunks in scan order
    (entering the first: zero; entering the next: A * S_in + Z), written over Z. The fwd / rev direction walks the
    chunks from the last if BACK_FWD / BACK_REV (inference: the rev direction's chunks are in token order; the adjoint
    carry of the backward runs against the scan). The loads of U chunks are issued together (the walk is
    latency-bound). With CKOUT (checkpoint windows of the training forward), the entry state of chunk c >= 1 is
    also written as checkpoint c - 1 in the forward's private block layout (BDF, RF, WF: its launch).
    Grid: (state blocks, B, ndir)."""
    CKS = N * EP
    e = tl.program_id(0) * BLK + tl.arange(0, BLK)
    m = e < CKS
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    d = tl.program_id(2)
    nb = tl.num_programs(1)
    base = sum_ptr + (d * nb + b) * NCH * (2 * CKS) + e
    if d == 0:
        back = BACK_FWD
    else:
        back = BACK_REV
    if CKOUT:
        # element e = (n, channel) -> the forward's checkpoint offset
        n = e // EP
        ck_rev = ck_ptr + (d * nb + b) * (NCH - 1) * CKS + _ck_col(e - n * EP, N, BDF, RF, WF) + n * BDF
    s = tl.zeros([BLK], tl.float32)
    for j0 in range(0, NCH, U):
        ps = ()
        az = ()
        for u in tl.static_range(U):
            ok = j0 + u < NCH
            p = base + tl.where(back, NCH - 1 - j0 - u, j0 + u) * (2 * CKS)
            ps = ps + (p,)
            az = az + (tl.load(p, mask=m & ok, other=0.0), tl.load(p + CKS, mask=m & ok, other=0.0))
        for u in tl.static_range(U):
            ok = j0 + u < NCH
            tl.store(ps[u] + CKS, s, mask=m & ok)
            if CKOUT:
                tl.store(ck_rev + (j0 + u - 1) * CKS, s, mask=m & ok & (j0 + u > 0))
            s = az[2 * u] * s + az[2 * u + 1]



@triton.jit
def _adjoint_chunk_kernel(
        g_ptr, z_ptr, dt_fwd_ptr, dt_rev_ptr, rec_ptr, sum_ptr, bias_fwd_ptr, bias_rev_ptr,
        sg_b, sg_t, sz_b, sz_t, sdt_fwd_b, sdt_fwd_t, sdt_rev_b, sdt_rev_t,
        L, E, EP, B, TC, NCH,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, REC_W: tl.constexpr,
        PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, HAS_Z: tl.constexpr, FAST: tl.constexpr,
        EVEN: tl.constexpr):
    """Pass 1 of the segmented backward (small batch): the backward carries C_s = f_s H_s against the scan order,
    C_s = f_s (g_s q_s + C_{s+1}), an affine recurrence like the state's. For the steps [c0, c1) of segment c of
    direction dr (program_id(2) = dr NCH + c), its map C_out = A C_in + Z (A: the product of the decays, Z: the
    carry reached from zero) into sum[ndir, B, NCH, 2, N, EP], as _scan_chunk_kernel does for the state."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    dr = tl.program_id(2) // NCH
    c = tl.program_id(2) % NCH
    offs_d, dmask = _block(pid_d, E, BD, R, W, EVEN)
    offs_n = tl.arange(0, N)
    c0 = c * TC
    c1 = tl.minimum(c0 + TC, L)
    if dr == 0:
        dt_b = dt_fwd_ptr + b * sdt_fwd_b + offs_d
        sdt_t = sdt_fwd_t
        bias = tl.load(bias_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        dt_b = dt_rev_ptr + b * sdt_rev_b + offs_d
        sdt_t = sdt_rev_t
        bias = tl.load(bias_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    rev, gscale = _walk(dr, BIDIR, REVERSE)
    g_b = g_ptr + b * sg_b + offs_d
    z_b = z_ptr + b * sz_b + offs_d
    rec_b = rec_ptr + ((dr * B + b) * (L + 2 * PADT) + PADT) * REC_W
    C = tl.zeros([N, BD], tl.float32)
    A = tl.full([N, BD], 1.0, tl.float32)
    for i in range(0, c1 - c0):
        s = c1 - 1 - i
        t = s + rev * (L - 1 - 2 * s)
        k, q, km, kappa = _load_rec(rec_b, t, offs_n, N, REC_W)
        _, rden, eps = _coefs(_ld(dt_b, t, sdt_t, L, dmask), bias, kappa, FAST)
        g = _ld(g_b, t, sg_t, L, dmask) * gscale
        if HAS_Z:
            zz = _ld(z_b, t, sz_t, L, dmask)
            g = g * zz * _sigmoid(zz, FAST)
        f = _decay(eps, rden, km)
        C = f * (C + g[None, :] * q[:, None])
        A = f * A
    out = sum_ptr + ((dr * B + b) * NCH + c) * (2 * N * EP) + offs_n[:, None] * EP + offs_d[None, :]
    _store_own(out, A, FAST)
    _store_own(out + N * EP, C, FAST)


