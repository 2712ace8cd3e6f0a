"""The backward pass of the Longhorn scan (docs/gradients.md, docs/kernel_design.md section 4).

The backward holds the state as a tuple of N row vectors [BD] with one channel per thread, so that every
per-element operation is elementwise and no 2-D layout (hence no layout conversion through shared memory) exists.

Exact backward: the forward stored the state entering every window of CK steps. For each window, taken in reverse,
the backward re-runs the window from its checkpoint and writes the state at every tile start (every TT steps) to a
small program-private scratch; then, for each tile in reverse, it recomputes the TT + 1 states in registers and
walks them backwards carrying the adjoint. dk/dq are reduced over each warp's channels (one reduce-scatter of the
2N per-channel terms) and written as per-warp partials, summed afterwards (deterministic, no atomics).

Reconstructing backward (bf16 / fp16 inputs): the recurrence runs backwards exactly in real arithmetic,
S_{t-1} = (S_t - c_t) / f_t, so each window can be walked back from its end state with the states reconstructed on
the way (no sweep, no tiles, no scratch). Its error grows as the product of 1/f going back; the state it reaches at
each window start is checked against the checkpoint, and the programs that drifted are redone by the exact
backward (a second launch that skips the others).
"""
import triton
import triton.language as tl

from .scan_common import _coefs, _ld, _prefetch, _rcp, _sigmoid, _walk


# ------------------------------------------------------------------------------------------------- backward
# The backward holds the state as a tuple of N row vectors [BD] (one channel per thread, channels across lanes):
# every per-element operation is a plain elementwise op on [BD] vectors (no 2-D layouts, hence no layout
# conversions through shared memory), sums over n are FFMA chains, and the per-token records arrive as scalars
# from 16-byte vector loads.

@triton.jit
def _ld4(p, FAST: tl.constexpr):
    """Four consecutive fp32 scalars at p (16-byte aligned): one vector load on the GPU."""
    if FAST:
        return tl.inline_asm_elementwise("ld.global.v4.f32 {$0, $1, $2, $3}, [$4];", "=f,=f,=f,=f,l", [p],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
                                         pack=1)
    else:
        return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)


@triton.jit
def _ld_row(p, N: tl.constexpr):
    """p[0 .. N-1] as a tuple of N fp32 scalars (rows too short for vector loads)."""
    out = ()
    for i in tl.static_range(N):
        out = out + (tl.load(p + i),)
    return out


@triton.jit
def _rec_rows(rec_b, t, goff, N: tl.constexpr, REC_W: tl.constexpr, NEED_Q: tl.constexpr, FAST: tl.constexpr):
    """Token t's record as tuples of N values: k, q (if NEED_Q, else k again), kappa - k^2, and kappa. Group g
    of four consecutive entries of each tuple comes from record offset goff[g] (N >= 4): plain numbers keep the
    natural order, per-lane offsets give each lane its own order of the groups (see the reduce-scatter)."""
    p = rec_b + t * REC_W
    if N >= 4:
        k = ()
        km = ()
        q = ()
        for g in tl.static_range(N // 4):
            pg = p + goff[g]
            k = k + _ld4(pg, FAST)
            km = km + _ld4(pg + 2 * N, FAST)
            if NEED_Q:
                q = q + _ld4(pg + N, FAST)
    else:
        k = _ld_row(p, N)
        km = _ld_row(p + 2 * N, N)
        if NEED_Q:
            q = _ld_row(p + N, N)
    if not NEED_Q:
        q = k
    return k, q, km, tl.load(p + 3 * N)


@triton.jit
def _ck_rows(ck_b, w, CKS, ck_col, hi4, BDF, dmask, N: tl.constexpr):
    """The state entering checkpoint window w (checkpoint w - 1; zero for w = 0) as a tuple of N rows, row n read
    from the backward's lane-permuted position n ^ hi4 (see the reduce-scatter)."""
    S = ()
    for n in tl.static_range(N):
        S = S + (tl.load(ck_b + (w - 1) * CKS + ck_col + (n ^ hi4) * BDF, mask=dmask & (w > 0), other=0.0),)
    return S


@triton.jit
def _advance_rows(S, x, eps, rden, k, km, N: tl.constexpr):
    # S_t[n] = f[n] S_{t-1}[n] + c[n] with f = rden + eps (kappa - k^2) (exact form of 1 - eps k^2), c = eps x k
    ex = eps * x
    out = ()
    for n in tl.static_range(N):
        out = out + ((rden + eps * km[n]) * S[n] + ex * k[n],)
    return out


@triton.jit
def _bfly(x, M: tl.constexpr):
    """x of the lane whose id differs in bit M (GPU only; M becomes the instruction's immediate)."""
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=f,f,r",
                                     [x, tl.full(x.shape, M, tl.int32)], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _reduce_scatter(v, lane, M: tl.constexpr):
    """One level of a warp reduce-scatter over a tuple of 2M row vectors: lanes whose bit M is set keep (and
    receive the partner's) upper half, the others the lower half; returns M rows."""
    up = (lane & M) != 0
    out = ()
    for j in tl.static_range(M):
        out = out + (tl.where(up, v[j + M], v[j]) + _bfly(tl.where(up, v[j], v[j + M]), M),)
    return out





@triton.jit
def _backward_step(t, valid, m, x, G, zz, y, eps, rden, omb, k, q, km, S_prev, S_t, Wc, gscale, Dp, lane, dkq_w, dkq_b,
              dz_b, dx_b, ddt_b, dmask, E, dr, zero, N: tl.constexpr, BIDIR: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, SCATTER: tl.constexpr, FAST: tl.constexpr):
    """One step of the backward's walk against the scan order, at token t, from the states S_{t-1} (S_prev) and
    S_t and the carry Wc = f_{t+1} H_{t+1}: stores dz (the fwd direction's program; y is y_pre with two
    directions), the step's
    dk / dq partials, dx and ddt; returns the next carry f_t H_t, the step's dbias term and its dD term."""
    if HAS_Z:
        sz = _sigmoid(zz, FAST)
        g = G * (zz * sz) * gscale
        if dr == 0:
            if not BIDIR:
                y = zero
                for n in tl.static_range(N):
                    y += q[n] * S_t[n]
                if HAS_D:
                    y += Dp * x
            dz = G * y * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_b + t * E, dz.to(dz_b.dtype.element_ty), mask=m)
    else:
        g = G * gscale
    sum_hk = zero
    deps = zero
    dk = ()
    dq = ()
    Wn = ()
    for n in tl.static_range(N):
        H = g * q[n] + Wc[n]
        Hk = H * k[n]
        v = x - k[n] * S_prev[n]                       # x - k S_{t-1}
        sum_hk += Hk
        deps += Hk * v
        eH = eps * H
        dk = dk + (eH * (v - k[n] * S_prev[n]),)     # eps H (x - 2 k S_{t-1})
        dq = dq + (g * S_t[n],)
        Wn = Wn + (rden * H + km[n] * eH,)           # f H, f = rden + eps (kappa - k^2)
    # dk also carries -2 k[n] sum_d deps eps^2 (through kappa): folded in per channel
    a2 = -2.0 * deps * eps * eps
    if SCATTER:
        # reduce-scatter over the warp of 2N = 32 rows (dk, dq): lane bits 4 and 3 pair slots 8-15 and 4-7 with
        # the partner's copies of the same rows; then bit 2 splits dk / dq and bits 1, 0 the last two row bits
        hk = ()
        hq = ()
        for r in tl.static_range(8):
            hk = hk + (dk[r] + a2 * k[r] + _bfly(dk[r + 8] + a2 * k[r + 8], 16),)
            hq = hq + (dq[r] + _bfly(dq[r + 8], 16),)
        v8 = ()
        for r in tl.static_range(4):
            v8 = v8 + (hk[r] + _bfly(hk[r + 4], 8),)
        for r in tl.static_range(4):
            v8 = v8 + (hq[r] + _bfly(hq[r + 4], 8),)
        v4 = _reduce_scatter(v8, lane, 4)
        v2 = _reduce_scatter(v4, lane, 2)
        v1 = _reduce_scatter(v2, lane, 1)
        tl.store(dkq_w + t * (2 * N), v1[0], mask=valid)
    else:
        for n in tl.static_range(N):
            tl.store(dkq_b + t * (2 * N) + n, tl.sum(tl.where(dmask, dk[n] + a2 * k[n], 0.0), axis=0), mask=valid)
            tl.store(dkq_b + t * (2 * N) + N + n, tl.sum(tl.where(dmask, dq[n], 0.0), axis=0), mask=valid)
    dx = eps * sum_hk
    if HAS_D:
        dx += Dp * g
        dD = g * x
    else:
        dD = zero
    ddt = deps * eps * omb * rden                  # deps / den^2 * beta (1 - beta)
    tl.store(dx_b + t * E, dx.to(dx_b.dtype.element_ty), mask=m)
    tl.store(ddt_b + t * E, ddt.to(ddt_b.dtype.element_ty), mask=m)
    return Wn, tl.where(m, ddt, 0.0), dD


@triton.jit
def _prefetch_token(t, rec_b, lane_rec, x_b, dt_b, g_b, z_b, ypre_b, sx_t, sdt_t, sg_t, sz_t, E,
                    REC_W: tl.constexpr, HAS_Z: tl.constexpr, BIDIR: tl.constexpr, FAST: tl.constexpr):
    """L1 prefetches of everything the backward's walk loads at token t: its record and per-channel inputs."""
    _prefetch(rec_b + t * REC_W + lane_rec, FAST)
    _prefetch(x_b + t * sx_t, FAST)
    _prefetch(dt_b + t * sdt_t, FAST)
    _prefetch(g_b + t * sg_t, FAST)
    if HAS_Z:
        _prefetch(z_b + t * sz_t, FAST)
        if BIDIR:
            _prefetch(ypre_b + t * E, FAST)


@triton.jit
def _recon_go(st_ptr, THR, PROBE):
    """Whether the reconstructing backward runs on this call: the running share of programs it had to hand to the
    exact backward (st[0]) is below THR, or this is a probing call (every PROBE-th, counted in st[1])."""
    calls = tl.load(st_ptr + 1).to(tl.int32)
    return (tl.load(st_ptr) < THR) | (calls % PROBE == 0)


@triton.jit
def _recon_stats_kernel(flag_ptr, st_ptr, NF, THR, PROBE, DECAY, BLK: tl.constexpr):
    """After a reconstructing backward: fold the share of its programs that were redone exactly into the running
    share st[0] (only when the reconstruction ran: `_recon_go`, read before the update) and count the call in
    st[1] (modulo 1024, a multiple of PROBE, so the fp32 count stays exact)."""
    go = _recon_go(st_ptr, THR, PROBE)
    acc = tl.zeros([BLK], tl.int32)
    for i in range(0, NF, BLK):
        o = i + tl.arange(0, BLK)
        acc += tl.load(flag_ptr + o, mask=o < NF, other=0)
    share = tl.sum(acc, axis=0).to(tl.float32) / NF
    ema = tl.load(st_ptr)
    tl.store(st_ptr, tl.where(go, ema + DECAY * (share - ema), ema))
    tl.store(st_ptr + 1, ((tl.load(st_ptr + 1).to(tl.int32) + 1) % 1024).to(tl.float32))




@triton.jit
def _row_max(S, mag, N: tl.constexpr):
    """The largest |S[n]| of every channel, at least mag."""
    for n in tl.static_range(N):
        mag = tl.maximum(mag, tl.abs(S[n]))
    return mag


@triton.jit
def _drifted(S, C, mag, TOL, N: tl.constexpr):
    """Channels whose reconstructed state S is off its checkpoint C by more than TOL x mag (NaN or inf count)."""
    bad = mag != mag
    for n in tl.static_range(N):
        bad = bad | ~(tl.abs(S[n] - C[n]) <= TOL * mag)
    return bad


@triton.jit
def _window_end_state(w, NW, s0, nst, ck_b, CKS, ck_col, hi4, BDF, rec_b, io, strides, bias, rev, goff, L, dmask,
                      N: tl.constexpr, REC_W: tl.constexpr, FAST: tl.constexpr):
    """The state leaving checkpoint window w (steps [s0, s0 + nst)): the next window's checkpoint, or, for the
    last window, a sweep from its own checkpoint to its end."""
    x_b = io[0]
    dt_b = io[1]
    sx_t = strides[0]
    sdt_t = strides[1]
    last = w == NW - 1
    cidx = tl.where(last, w - 1, w)
    S = _ck_rows(ck_b, cidx + 1, CKS, ck_col, hi4, BDF, dmask, N)
    for u in range(tl.where(last, nst, 0)):
        s = s0 + u
        t = s + rev * (L - 1 - 2 * s)
        k, _, km, kappa = _rec_rows(rec_b, t, goff, N, REC_W, False, FAST)
        _, rden, eps = _coefs(_ld(dt_b, t, sdt_t, L, dmask), bias, kappa, FAST)
        S = _advance_rows(S, _ld(x_b, t, sx_t, L, dmask), eps, rden, k, km, N)
    return S


@triton.jit
def _recon_walk(S, Wc, acc_db, acc_dD, s0, nst, rec_b, lane_rec, io, strides, bias, Dp, gscale, rev, goff, red, L, E,
                dr, dmask, zero, N: tl.constexpr, REC_W: tl.constexpr, BIDIR: tl.constexpr, HAS_D: tl.constexpr,
                HAS_Z: tl.constexpr, SCATTER: tl.constexpr, FAST: tl.constexpr):
    """The reconstructing backward over the steps [s0, s0 + nst) of a window, walked back from the state S that
    leaves it: each step reconstructs S_{t-1} = (S_t - c_t) / f_t, then takes the step's gradients. Returns the
    state reconstructed entering the window, the adjoint carry and the dbias / dD sums."""
    x_b, dt_b, g_b, z_b, ypre_b, dz_b, dx_b, ddt_b = io
    sx_t, sdt_t, sg_t, sz_t = strides
    lane, dkq_w, dkq_b = red
    for i in range(nst):
        s = s0 + nst - 1 - i
        t = s + rev * (L - 1 - 2 * s)
        if FAST:
            sn = tl.maximum(s - 1, 0)
            tn = sn + rev * (L - 1 - 2 * sn)
            _prefetch_token(tn, rec_b, lane_rec, x_b, dt_b, g_b, z_b, ypre_b, sx_t, sdt_t, sg_t, sz_t, E,
                            REC_W, HAS_Z, BIDIR, FAST)
        x = _ld(x_b, t, sx_t, L, dmask)
        G = _ld(g_b, t, sg_t, L, dmask)
        if HAS_Z:
            zz = _ld(z_b, t, sz_t, L, dmask)
            if BIDIR:
                y = tl.load(ypre_b + t * E, mask=dmask & (dr == 0), other=0.0).to(tl.float32)
            else:
                y = zero
        else:
            zz = zero
            y = zero
        k, q, km, kappa = _rec_rows(rec_b, t, goff, N, REC_W, True, FAST)
        omb, rden, eps = _coefs(_ld(dt_b, t, sdt_t, L, dmask), bias, kappa, FAST)
        ex = eps * x
        S_prev = ()
        for n in tl.static_range(N):
            S_prev = S_prev + ((S[n] - ex * k[n]) * _rcp(rden + eps * km[n], FAST),)
        Wc, ddt_m, dD_t = _backward_step(t, s < L, dmask, x, G, zz, y, eps, rden, omb, k, q, km, S_prev, S, Wc,
                                         gscale, Dp, lane, dkq_w, dkq_b, dz_b, dx_b, ddt_b, dmask, E, dr, zero,
                                         N, BIDIR, HAS_D, HAS_Z, SCATTER, FAST)
        acc_db += ddt_m
        if HAS_D:
            acc_dD += dD_t
        S = S_prev
    return S, Wc, acc_db, acc_dD


@triton.jit
def _sweep_window(S, s0, ntile, scr_b, rec_b, lane_rec, io, strides, bias, rev, goff, L, dmask,
                  N: tl.constexpr, BD: tl.constexpr, TT: tl.constexpr, REC_W: tl.constexpr, FAST: tl.constexpr):
    """Step 1 of a window of the exact backward: run the window forward from its entry state S, storing the state
    at every tile start (every TT steps) to the program's scratch; x and dt are loaded one tile ahead."""
    x_b = io[0]
    dt_b = io[1]
    sx_t = strides[0]
    sdt_t = strides[1]
    nx = ()
    ndt = ()
    for jj in tl.static_range(TT):
        sj = s0 + jj
        tj = sj + rev * (L - 1 - 2 * sj)
        nx = nx + (_ld(x_b, tj, sx_t, L, dmask),)
        ndt = ndt + (_ld(dt_b, tj, sdt_t, L, dmask),)
    for jt in range(ntile):
        scr_t = scr_b + jt * (N * BD)
        for n in tl.static_range(N):
            tl.store(scr_t + n * BD, S[n])
        if jt < ntile - 1:
            X = nx
            DT = ndt
            nx = ()
            ndt = ()
            for jj in tl.static_range(TT):
                sj = s0 + (jt + 1) * TT + jj
                tj = sj + rev * (L - 1 - 2 * sj)
                nx = nx + (_ld(x_b, tj, sx_t, L, dmask),)
                ndt = ndt + (_ld(dt_b, tj, sdt_t, L, dmask),)
                _prefetch(rec_b + tj * REC_W + lane_rec, FAST)
            for jj in tl.static_range(TT):
                sj = s0 + jt * TT + jj
                tj = sj + rev * (L - 1 - 2 * sj)
                k, _, km, kappa = _rec_rows(rec_b, tj, goff, N, REC_W, False, FAST)
                _, rden, eps = _coefs(DT[jj], bias, kappa, FAST)
                S = _advance_rows(S, X[jj], eps, rden, k, km, N)


@triton.jit
def _walk_tile(jt, s0, Wc, acc_db, acc_dD, scr_b, rec_b, lane_rec, io, strides, bias, Dp, gscale, rev, goff, red, L, E,
               dr, dmask, zero, N: tl.constexpr, BD: tl.constexpr, TT: tl.constexpr, REC_W: tl.constexpr,
               BIDIR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SCATTER: tl.constexpr,
               FAST: tl.constexpr):
    """Step 2 of a window of the exact backward, for tile jt (tiles are taken in reverse): from the tile's start
    state in scratch, recompute its TT + 1 states in registers (coefficients kept), then walk them back carrying
    the adjoint. The next tile's start state and per-channel inputs are prefetched into L1 one tile ahead (register
    copies would cost registers at the peak of the tile, where spills start). Returns the carry and the dbias / dD
    sums."""
    x_b, dt_b, g_b, z_b, ypre_b, dz_b, dx_b, ddt_b = io
    sx_t, sdt_t, sg_t, sz_t = strides
    lane, dkq_w, dkq_b = red
    S = ()
    for n in tl.static_range(N):
        S = S + (tl.load(scr_b + jt * (N * BD) + n * BD),)
    if FAST:
        nxt = scr_b + tl.maximum(jt - 1, 0) * (N * BD)
        for n in tl.static_range(N):
            _prefetch(nxt + n * BD, FAST)
        for jj in tl.static_range(TT):
            sj = s0 + (jt - 1) * TT + jj
            tj = tl.minimum(tl.maximum(sj + rev * (L - 1 - 2 * sj), 0), L - 1)
            _prefetch_token(tj, rec_b, lane_rec, x_b, dt_b, g_b, z_b, ypre_b, sx_t, sdt_t, sg_t, sz_t,
                            E, REC_W, HAS_Z, BIDIR, FAST)
    # the walk-back's per-channel inputs, loaded before the recompute so that it hides their latency
    GS = ()
    ZS = ()
    YS = ()
    for jj in tl.static_range(TT):
        s = s0 + jt * TT + jj
        t = s + rev * (L - 1 - 2 * s)
        GS = GS + (_ld(g_b, t, sg_t, L, dmask),)
        if HAS_Z:
            ZS = ZS + (_ld(z_b, t, sz_t, L, dmask),)
            if BIDIR:
                YS = YS + (tl.load(ypre_b + t * E, mask=dmask & (s < L) & (dr == 0),
                                   other=0.0).to(tl.float32),)
    # recompute the tile: states[jj] = S_{t-1} of step jj, states[jj + 1] = S_t; coefficients kept
    states = (S,)
    X = ()
    co_omb = ()
    co_rden = ()
    co_eps = ()
    for jj in tl.static_range(TT):
        s = s0 + jt * TT + jj
        t = s + rev * (L - 1 - 2 * s)
        x = _ld(x_b, t, sx_t, L, dmask)
        k, _, km, kappa = _rec_rows(rec_b, t, goff, N, REC_W, False, FAST)
        omb, rden, eps = _coefs(_ld(dt_b, t, sdt_t, L, dmask), bias, kappa, FAST)
        X = X + (x,)
        co_omb = co_omb + (omb,)
        co_rden = co_rden + (rden,)
        co_eps = co_eps + (eps,)
        S = _advance_rows(S, x, eps, rden, k, km, N)
        states = states + (S,)
    for jj in tl.static_range(TT - 1, -1, -1):
        s = s0 + jt * TT + jj
        valid = s < L
        m = dmask & valid
        t = s + rev * (L - 1 - 2 * s)
        x = X[jj]
        G = GS[jj]
        eps = co_eps[jj]
        rden = co_rden[jj]
        k, q, km, kappa = _rec_rows(rec_b, t, goff, N, REC_W, True, FAST)
        if HAS_Z:
            zz = ZS[jj]
            if BIDIR:
                y = YS[jj]
            else:
                y = zero
        else:
            zz = zero
            y = zero
        Wc, ddt_m, dD_t = _backward_step(t, valid, m, x, G, zz, y, eps, rden, co_omb[jj], k, q, km, states[jj],
                                         states[jj + 1], Wc, gscale, Dp, lane, dkq_w, dkq_b, dz_b, dx_b, ddt_b,
                                         dmask, E, dr, zero, N, BIDIR, HAS_D, HAS_Z, SCATTER, FAST)
        acc_db += ddt_m
        if HAS_D:
            acc_dD += dD_t
    return Wc, acc_db, acc_dD


@triton.jit
def _scan_backward_kernel(
        g_ptr, z_ptr, ypre_ptr, rec_ptr, ck_ptr, scr_ptr,
        x_fwd_ptr, dt_fwd_ptr, x_rev_ptr, dt_rev_ptr, bias_fwd_ptr, bias_rev_ptr, D_fwd_ptr, D_rev_ptr,
        dx_fwd_ptr, ddt_fwd_ptr, dx_rev_ptr, ddt_rev_ptr, dz_ptr, dkq_ptr, dpar_ptr,
        sg_b, sg_t, sz_b, sz_t, sx_fwd_b, sx_fwd_t, sdt_fwd_b, sdt_fwd_t, sx_rev_b, sx_rev_t, sdt_rev_b, sdt_rev_t,
        L, E, B, NCK, NBLKF, csum_ptr, NSEG, SW, EP, flag_ptr, TOL, st_ptr, THR, PROBE,
        N: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, CK: tl.constexpr,
        TT: tl.constexpr, REC_W: tl.constexpr, PADT: tl.constexpr, BDF: tl.constexpr, RF: tl.constexpr,
        WF: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, FAST: tl.constexpr, SCATTER: tl.constexpr, SEG: tl.constexpr,
        RECON: tl.constexpr = False, FALLBACK: tl.constexpr = False):
    """Exact backward of one direction per program (grid axis 2 = direction), one channel per thread.

    g_t = dLoss/dout_t * silu(z_t) (halved for two directions); adjoint H_t = g_t q_t + f_{t+1} H_{t+1}.
    Per window of CK steps (checkpoint from the forward), taken in reverse:
      1. sweep forward from the checkpoint, storing the state at each tile start (every TT steps) to scratch;
      2. tiles in reverse: recompute the TT + 1 states of the tile in registers (coefficients kept), then walk
         back carrying the adjoint: dx, ddt, dz (fwd direction), dk and dq (one reduce-scatter of their 2N
         per-channel terms over the warp), and the dbias, dD sums.
    Writes dx, ddt (dense, contiguous), dz, per-warp partials of dk, dq [.., L, 2N] and of dbias, dD [.., 2, E].
    SEG (small batch): program_id(2) = dr NSEG + seg, and the program takes only the SW windows of segment seg,
    starting from the adjoint carry that enters it (`_adjoint_chunk_kernel`, then the combine, in csum_ptr);
    dbias, dD partials per segment.
    RECON (bf16 / fp16 inputs, CONFIG.recon): no sweep and no tiles; each window is walked back from its end
    state (the next window's checkpoint; the last window sweeps to its end once) with the states reconstructed on
    the way, S_{t-1} = (S_t - c_t) / f_t. The error of that grows as the product of 1/f going back, so the state it
    reconstructs entering each window is compared with the window's checkpoint: a program with any channel off by
    more than TOL x that channel's largest end-state entry writes flag 1 and zero dbias / dD partials, and the
    FALLBACK launch (this kernel, exact) redoes exactly the flagged programs, overwriting all their outputs.
    dbias / dD partials: rows [ndir, 2B, 2, E], RECON's in the first B of each direction, FALLBACK's in the second.
    When the running share of redone programs (st_ptr[0], kept by `_recon_stats_kernel`) reaches THR, RECON steps
    aside (flags every program without reconstructing) except on every PROBE-th call (st_ptr[1] counts calls).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    if SEG:
        dr = tl.program_id(2) // NSEG
        seg = tl.program_id(2) % NSEG
    else:
        dr = tl.program_id(2)
    nblk = tl.num_programs(0)
    loc = tl.arange(0, BD)
    offs_d = pid_d * BD + loc
    dmask = offs_d < E
    if dr == 0:
        x_b = x_fwd_ptr + b * sx_fwd_b + offs_d
        dt_b = dt_fwd_ptr + b * sdt_fwd_b + offs_d
        sx_t = sx_fwd_t
        sdt_t = sdt_fwd_t
        bias = tl.load(bias_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        dx_b = dx_fwd_ptr + b * L * E + offs_d
        ddt_b = ddt_fwd_ptr + b * L * E + offs_d
    else:
        x_b = x_rev_ptr + b * sx_rev_b + offs_d
        dt_b = dt_rev_ptr + b * sdt_rev_b + offs_d
        sx_t = sx_rev_t
        sdt_t = sdt_rev_t
        bias = tl.load(bias_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        dx_b = dx_rev_ptr + b * L * E + offs_d
        ddt_b = ddt_rev_ptr + b * L * E + offs_d
    if HAS_D:
        if dr == 0:
            Dp = tl.load(D_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        else:
            Dp = tl.load(D_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        Dp = bias       # unused
    rev, gscale = _walk(dr, BIDIR, REVERSE)
    g_b = g_ptr + b * sg_b + offs_d
    z_b = z_ptr + b * sz_b + offs_d
    ypre_b = ypre_ptr + b * L * E + offs_d
    dz_b = dz_ptr + b * L * E + offs_d
    rec_b = rec_ptr + ((dr * B + b) * (L + 2 * PADT) + PADT) * REC_W
    CKS = NBLKF * (N * BDF)
    ck_b = ck_ptr + (dr * B + b) * NCK * CKS
    # the forward wrote its checkpoints in its own blocks of BDF channels: _ck_col's mapping, written out here
    # because the helper call alone (its inlining labels in the PTX) changes ptxas's schedule of this kernel
    cf = offs_d % BDF
    j = (cf % RF) * (32 * WF) + cf // RF
    ck_col = (offs_d // BDF) * (N * BDF) + ((j % 2) * (BDF // 2) + j // 2)
    if SCATTER:
        # Lane l holds state row n in slot n ^ 4 hi(l), hi(l) = bits 3-4 of l: the first two levels of the dk/dq
        # reduce-scatter (lane bits 4 and 3 <-> row bits 3 and 2) then pair fixed slots, with no selects; each
        # lane loads the records' groups of four in its own order (goff). Per-warp partials [ndir, nblk * W, B,
        # L, 2N]: lane l ends up with entry `row` (dk rows, then dq rows).
        lane = loc % 32
        hi = (lane >> 3) & 3
        row = ((lane >> 2) & 1) * N + hi * 4 + (lane & 3)
        dkq_w = dkq_ptr + (((dr * nblk + pid_d) * W + loc // 32) * B + b) * L * (2 * N) + row
        dkq_b = dkq_ptr     # unused
        goff = ()
        for gi in tl.static_range(N // 4):
            goff = goff + (4 * (gi ^ hi),)
        hi4 = 4 * hi
    else:
        dkq_b = dkq_ptr + ((dr * nblk + pid_d) * B + b) * L * (2 * N)
        lane = loc      # unused
        dkq_w = dkq_b   # unused
        goff = ()
        for gi in tl.static_range(max(N // 4, 1)):
            goff = goff + (4 * gi,)
        hi4 = 0
    lane_rec = (loc % 32) * (REC_W // 32)       # one 8-byte slice of a record row per lane (L1 prefetches)
    NTILE: tl.constexpr = CK // TT
    if SEG:
        scr_b = scr_ptr + (((dr * B + b) * NSEG + seg) * nblk + pid_d) * (NTILE * N * BD) + loc
    else:
        scr_b = scr_ptr + ((dr * B + b) * nblk + pid_d) * (NTILE * N * BD) + loc

    zero = tl.zeros([BD], tl.float32)
    Wc = ()                                   # f_{s+1} * H_{s+1}, carried against the scan order
    if SEG:
        # the carry entering the segment from the right (slot 1 of csum[ndir, B, NSEG, 2, N, EP])
        cs_b = csum_ptr + (((dr * B + b) * NSEG + seg) * 2 + 1) * (N * EP) + offs_d
        for n in tl.static_range(N):
            Wc = Wc + (tl.load(cs_b + (n ^ hi4) * EP, mask=dmask, other=0.0),)
    else:
        for n in tl.static_range(N):
            Wc = Wc + (zero,)
    acc_db = zero
    acc_dD = zero
    NW = (L + CK - 1) // CK
    if SEG:
        w_hi = tl.minimum(seg * SW + SW, NW)
        nwin = w_hi - seg * SW
    else:
        w_hi = NW
        nwin = NW
    if FALLBACK:
        nwin = tl.where(tl.load(flag_ptr + (dr * B + b) * nblk + pid_d) != 0, nwin, 0)
    io = (x_b, dt_b, g_b, z_b, ypre_b, dz_b, dx_b, ddt_b)
    strides = (sx_t, sdt_t, sg_t, sz_t)
    red = (lane, dkq_w, dkq_b)
    if RECON:
        go = _recon_go(st_ptr, THR, PROBE)
        nwin = tl.where(go, nwin, 0)
        bad = zero != zero
        for wi in range(nwin):
            w = w_hi - 1 - wi
            s0 = w * CK
            nst = tl.minimum(CK, L - s0)
            S = _window_end_state(w, NW, s0, nst, ck_b, CKS, ck_col, hi4, BDF, rec_b, io, strides, bias, rev, goff,
                                  L, dmask, N, REC_W, FAST)
            mag = _row_max(S, zero, N)
            S, Wc, acc_db, acc_dD = _recon_walk(S, Wc, acc_db, acc_dD, s0, nst, rec_b, lane_rec, io, strides, bias,
                                                Dp, gscale, rev, goff, red, L, E, dr, dmask, zero,
                                                N, REC_W, BIDIR, HAS_D, HAS_Z, SCATTER, FAST)
            # S is now the reconstructed state entering the window: against its checkpoint (zero for window 0)
            C = _ck_rows(ck_b, w, CKS, ck_col, hi4, BDF, dmask, N)
            bad = bad | _drifted(S, C, _row_max(C, mag, N), TOL, N)
        flagged = tl.where(go, tl.max(bad.to(tl.int32), axis=0), 1)
        tl.store(flag_ptr + (dr * B + b) * nblk + pid_d, flagged)
        acc_db = tl.where(flagged != 0, 0.0, acc_db)
        acc_dD = tl.where(flagged != 0, 0.0, acc_dD)
    else:
        for wi in range(nwin):
            w = w_hi - 1 - wi
            s0 = w * CK
            ntile = (tl.minimum(CK, L - s0) + TT - 1) // TT
            _sweep_window(_ck_rows(ck_b, w, CKS, ck_col, hi4, BDF, dmask, N), s0, ntile, scr_b, rec_b, lane_rec, io,
                          strides, bias, rev, goff, L, dmask, N, BD, TT, REC_W, FAST)
            for jti in range(ntile):
                Wc, acc_db, acc_dD = _walk_tile(ntile - 1 - jti, s0, Wc, acc_db, acc_dD, scr_b, rec_b, lane_rec, io,
                                                strides, bias, Dp, gscale, rev, goff, red, L, E, dr, dmask, zero,
                                                N, BD, TT, REC_W, BIDIR, HAS_D, HAS_Z, SCATTER, FAST)
    if SEG:
        dpar_b = dpar_ptr + ((dr * B + b) * NSEG + seg) * 2 * E + offs_d
    elif RECON:
        dpar_b = dpar_ptr + (dr * 2 * B + b) * 2 * E + offs_d
    elif FALLBACK:
        dpar_b = dpar_ptr + ((dr * 2 + 1) * B + b) * 2 * E + offs_d
    else:
        dpar_b = dpar_ptr + (dr * B + b) * 2 * E + offs_d
    tl.store(dpar_b, acc_db, mask=dmask)
    if HAS_D:
        tl.store(dpar_b + E, acc_dD, mask=dmask)


@triton.jit
def _grad_sums_kernel(dkq_ptr, dpar_ptr, dk_fwd_ptr, dq_fwd_ptr, dbias_fwd_ptr, dD_fwd_ptr, dk_rev_ptr, dq_rev_ptr,
                      dbias_rev_ptr, dD_rev_ptr,
                      NPART, NROW, NPAR, E, NTP,
                      N: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, RB: tl.constexpr,
                      HAS_D_FWD: tl.constexpr, HAS_D_REV: tl.constexpr):
    """The backward's deterministic sums, cast to the gradients' dtypes, in one launch: dk, dq of every token over
    the NPART channel-block partials of dkq [ndir, NPART, NROW, 2N] (programs 0 .. NTP-1, BT tokens each), dbias
    and dD over the NPAR rows of dpar [ndir, NPAR, 2, E] (the other programs, BE channels each); program_id(1)
    is the direction. Partials are added in a fixed order."""
    pid = tl.program_id(0)
    dr = tl.program_id(1).to(tl.int64)
    if pid < NTP:
        rows = pid.to(tl.int64) * BT + tl.arange(0, BT)
        n = tl.arange(0, N)
        m = (rows < NROW)[:, None]
        off = rows[:, None] * (2 * N) + n[None, :]
        part = tl.cast(NROW, tl.int64) * (2 * N)   # words per [NROW, 2N] partial (int64: NPART of them can pass 2^31)
        base = dkq_ptr + dr * NPART * part
        acc_k = tl.zeros([BT, N], tl.float32)
        acc_q = tl.zeros([BT, N], tl.float32)
        for p in range(NPART):
            pp = base + p * part + off
            acc_k += tl.load(pp, mask=m, other=0.0)
            acc_q += tl.load(pp + N, mask=m, other=0.0)
        out = rows[:, None] * N + n[None, :]
        if dr == 0:
            tl.store(dk_fwd_ptr + out, acc_k.to(dk_fwd_ptr.dtype.element_ty), mask=m)
            tl.store(dq_fwd_ptr + out, acc_q.to(dq_fwd_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(dk_rev_ptr + out, acc_k.to(dk_rev_ptr.dtype.element_ty), mask=m)
            tl.store(dq_rev_ptr + out, acc_q.to(dq_rev_ptr.dtype.element_ty), mask=m)
    else:
        c = (pid - NTP) * BE + tl.arange(0, BE)
        cm = c < E
        r = tl.arange(0, RB)
        base = dpar_ptr + dr * NPAR * (2 * E)
        acc_b = tl.zeros([RB, BE], tl.float32)
        acc_d = tl.zeros([RB, BE], tl.float32)
        for r0 in range(0, NPAR, RB):
            rr = r0 + r
            mm = (rr < NPAR)[:, None] & cm[None, :]
            pp = base + rr[:, None] * (2 * E) + c[None, :]
            acc_b += tl.load(pp, mask=mm, other=0.0)
            acc_d += tl.load(pp + E, mask=mm, other=0.0)
        db = tl.sum(acc_b, axis=0)
        dD = tl.sum(acc_d, axis=0)
        if dr == 0:
            tl.store(dbias_fwd_ptr + c, db.to(dbias_fwd_ptr.dtype.element_ty), mask=cm)
            if HAS_D_FWD:
                tl.store(dD_fwd_ptr + c, dD.to(dD_fwd_ptr.dtype.element_ty), mask=cm)
        else:
            tl.store(dbias_rev_ptr + c, db.to(dbias_rev_ptr.dtype.element_ty), mask=cm)
            if HAS_D_REV:
                tl.store(dD_rev_ptr + c, dD.to(dD_rev_ptr.dtype.element_ty), mask=cm)
