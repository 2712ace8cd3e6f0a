"""The forward pass of the Longhorn scan: one direction, or both interleaved in one program with one gated
output (docs/kernel_design.md section 3). The forward holds the state as one [N, BD] tensor (the state index n in
each thread's registers, R channels per thread across lanes). In training it also writes the state entering every
window of CK steps (fp32 checkpoints, the backward's starting points) and y_pre, the gate's input.
"""
import triton
import triton.language as tl

from .scan_common import (_advance, _block, _coefs, _ld, _ldc, _load_own, _load_rec, _prefetch, _priv_off, _sigmoid,
                          _store_own)


@triton.jit
def _scan_forward_kernel(
        x_fwd_ptr, dt_fwd_ptr, x_rev_ptr, dt_rev_ptr, z_ptr, out_ptr, ypre_ptr, rec_ptr, ck_ptr, h0_ptr,
        bias_fwd_ptr, bias_rev_ptr, D_fwd_ptr, D_rev_ptr,
        sx_fwd_b, sx_fwd_t, sdt_fwd_b, sdt_fwd_t, sx_rev_b, sx_rev_t, sdt_rev_b, sdt_rev_t, sz_b, sz_t,
        L, E, B, NCK, EP, TC, NCH,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, CK: tl.constexpr,
        REC_W: tl.constexpr, PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE: tl.constexpr, FAST: tl.constexpr,
        PREFETCH: tl.constexpr, EVEN: tl.constexpr, CHUNKED: tl.constexpr, WIN: tl.constexpr):
    """One program: batch element b, channels [pid*BD, pid*BD + BD), one direction or both interleaved, over all
    tokens or (CHUNKED) over the tokens [c0, c1) of chunk program_id(2), starting from the chunk's entry states
    (`_scan_combine_kernel`'s output in h0_ptr). With WIN (training, both directions) the entry states are those
    of the checkpoint windows (TC is a multiple of CK): the fwd direction enters at a window start, the
    rev one runs from the start of its window up to token c1 first.

    Both directions: step i advances the fwd scan at token c0 + i and the rev scan at token c1-1-i.
    While the two have not met, each writes its ungated y into `out` as a partial; once past the middle, each step
    reads the other direction's partial back, gates the sum and writes the final value (same thread, same
    address: no barrier needed). out / y_pre are contiguous (B, L, E). SAVE also writes y_pre and, unless CHUNKED
    (then the combine writes them), the state entering every window of CK steps (checkpoints).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    offs_d, dmask = _block(pid_d, E, BD, R, W, EVEN)
    offs_n = tl.arange(0, N)
    nblk = tl.num_programs(0)
    # checkpoints: [ndir, B, NCK, nblk, N * BD], each block in the private layout of _priv_off
    ck_off = pid_d * (N * BD) + _priv_off(offs_n, BD)
    CKS = nblk * (N * BD)
    if CHUNKED:
        c0 = tl.program_id(2) * TC
        c1 = tl.minimum(c0 + TC, L)
        if WIN:
            j_fwd = c0 // CK
            j_rev = (L - c1) // CK
        else:
            j_fwd = tl.program_id(2)
            j_rev = j_fwd
        # chunk entry states: slot 1 of [ndir, B, NCH, 2, N, EP] (see _scan_chunk_kernel)
        h0_n = offs_n[:, None] * EP + offs_d[None, :]
        h0_fwd = h0_ptr + ((b * NCH + j_fwd) * 2 + 1) * (N * EP) + h0_n
        h0_rev = h0_ptr + (((B + b) * NCH + j_rev) * 2 + 1) * (N * EP) + h0_n
    else:
        c0 = 0
        c1 = L

    bias_fwd = tl.load(bias_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_D:
        D_fwd = tl.load(D_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    x_fwd_b = x_fwd_ptr + b * sx_fwd_b + offs_d
    dt_fwd_b = dt_fwd_ptr + b * sdt_fwd_b + offs_d
    out_b = out_ptr + b * L * E + offs_d
    ypre_b = ypre_ptr + b * L * E + offs_d
    z_b = z_ptr + b * sz_b + offs_d
    LP = L + 2 * PADT
    rec_fwd = rec_ptr + (b * LP + PADT) * REC_W
    lane2 = tl.arange(0, 32) * (REC_W // 32)          # one address per lane covers a record row
    ck_fwd = ck_ptr + b * NCK * CKS
    if CHUNKED:
        S_fwd = _load_own(h0_fwd, FAST)
    else:
        S_fwd = tl.zeros([N, BD], tl.float32)

    if BIDIR:
        bias_rev = tl.load(bias_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        if HAS_D:
            D_rev = tl.load(D_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        x_rev_b = x_rev_ptr + b * sx_rev_b + offs_d
        dt_rev_b = dt_rev_ptr + b * sdt_rev_b + offs_d
        rec_rev = rec_ptr + ((B + b) * LP + PADT) * REC_W
        ck_rev = ck_ptr + (B + b) * NCK * CKS
        if CHUNKED:
            S_rev = _load_own(h0_rev, FAST)
            if WIN:
                # from the start of the rev direction's window (token L-1-j_rev CK) to token c1, exclusive
                for u in range(0, (L - c1) - j_rev * CK):
                    tw = L - 1 - j_rev * CK - u
                    kw, _, kmw, kappa_w = _load_rec(rec_rev, tw, offs_n, N, REC_W)
                    _, rden_w, eps_w = _coefs(_ld(dt_rev_b, tw, sdt_rev_t, L, dmask), bias_rev, kappa_w, FAST)
                    S_rev = _advance(S_rev, _ld(x_rev_b, tw, sx_rev_t, L, dmask), eps_w, rden_w, kw, kmw)
        else:
            S_rev = tl.zeros([N, BD], tl.float32)
        TB0 = c0 + c1 - 1      # step i: fwd token i, rev token TB0 - i
        # x and dt come from HBM: prefetch them two steps ahead (the per-token records are L2 hits and the
        # partials were written by this thread, so those are loaded at the top of their own step)
        x_fwd1 = _ldc(x_fwd_b, c0, sx_fwd_t, L, dmask, EVEN)
        dt_fwd1 = _ldc(dt_fwd_b, c0, sdt_fwd_t, L, dmask, EVEN)
        x_rev1 = _ldc(x_rev_b, TB0 - c0, sx_rev_t, L, dmask, EVEN)
        dt_rev1 = _ldc(dt_rev_b, TB0 - c0, sdt_rev_t, L, dmask, EVEN)
        x_fwd2 = _ldc(x_fwd_b, c0 + 1, sx_fwd_t, L, dmask, EVEN)
        dt_fwd2 = _ldc(dt_fwd_b, c0 + 1, sdt_fwd_t, L, dmask, EVEN)
        x_rev2 = _ldc(x_rev_b, TB0 - c0 - 1, sx_rev_t, L, dmask, EVEN)
        dt_rev2 = _ldc(dt_rev_b, TB0 - c0 - 1, sdt_rev_t, L, dmask, EVEN)
        for w0 in range(c0, c1, CK):
            if SAVE:
                if not CHUNKED:     # chunked: the combine wrote the checkpoints
                    if w0 > 0:
                        _store_own(ck_fwd + (w0 // CK - 1) * CKS + ck_off, S_fwd, FAST)
                        _store_own(ck_rev + (w0 // CK - 1) * CKS + ck_off, S_rev, FAST)
            for i in range(w0, tl.minimum(w0 + CK, c1)):
                t_fwd = i
                t_rev = TB0 - i
                # tf < tb: both partial; tf == tb: both here; tf > tb: both finals, partner partials read back
                second = t_fwd > t_rev
                mid = t_fwd == t_rev
                final = t_fwd >= t_rev
                x_fwd = x_fwd1
                dt_fwd = dt_fwd1
                x_rev = x_rev1
                dt_rev = dt_rev1
                x_fwd1 = x_fwd2
                dt_fwd1 = dt_fwd2
                x_rev1 = x_rev2
                dt_rev1 = dt_rev2
                x_fwd2 = _ldc(x_fwd_b, i + 2, sx_fwd_t, L, dmask, EVEN)
                dt_fwd2 = _ldc(dt_fwd_b, i + 2, sdt_fwd_t, L, dmask, EVEN)
                x_rev2 = _ldc(x_rev_b, TB0 - 2 - i, sx_rev_t, L, dmask, EVEN)
                dt_rev2 = _ldc(dt_rev_b, TB0 - 2 - i, sdt_rev_t, L, dmask, EVEN)
                k_fwd, q_fwd, km_fwd, kappa_fwd = _load_rec(rec_fwd, t_fwd, offs_n, N, REC_W)
                k_rev, q_rev, km_rev, kappa_rev = _load_rec(rec_rev, t_rev, offs_n, N, REC_W)
                if PREFETCH:
                    _prefetch(rec_fwd + (t_fwd + 1) * REC_W + lane2, FAST)
                    _prefetch(rec_rev + (t_rev - 1) * REC_W + lane2, FAST)
                    _prefetch(out_b + tl.minimum(t_fwd + 1, L - 1) * E, FAST)
                    _prefetch(out_b + tl.maximum(t_rev - 1, 0) * E, FAST)
                    if HAS_Z:
                        _prefetch(z_b + tl.minimum(t_fwd + 1, L - 1) * sz_t, FAST)
                        _prefetch(z_b + tl.maximum(t_rev - 1, 0) * sz_t, FAST)
                p_fwd = tl.load(out_b + t_fwd * E, mask=dmask & second, other=0.0).to(tl.float32)
                p_rev = tl.load(out_b + t_rev * E, mask=dmask & second, other=0.0).to(tl.float32)
                if HAS_Z:
                    z_fwd = tl.load(z_b + t_fwd * sz_t, mask=dmask & final, other=0.0).to(tl.float32)
                    z_rev = tl.load(z_b + t_rev * sz_t, mask=dmask & final, other=0.0).to(tl.float32)
                _, rden_fwd, eps_fwd = _coefs(dt_fwd, bias_fwd, kappa_fwd, FAST)
                _, rden_rev, eps_rev = _coefs(dt_rev, bias_rev, kappa_rev, FAST)
                S_fwd = _advance(S_fwd, x_fwd, eps_fwd, rden_fwd, k_fwd, km_fwd)
                S_rev = _advance(S_rev, x_rev, eps_rev, rden_rev, k_rev, km_rev)
                y_fwd = tl.sum(S_fwd * q_fwd[:, None], axis=0)
                y_rev = tl.sum(S_rev * q_rev[:, None], axis=0)
                if HAS_D:
                    y_fwd += D_fwd * x_fwd
                    y_rev += D_rev * x_rev
                v_fwd = y_fwd + p_fwd
                if mid:
                    v_fwd += y_rev
                v_rev = y_rev + p_rev
                o_fwd = v_fwd
                o_rev = v_rev
                if final:
                    v_fwd = v_fwd * 0.5
                    v_rev = v_rev * 0.5
                    if HAS_Z:
                        o_fwd = v_fwd * z_fwd * _sigmoid(z_fwd, FAST)
                        o_rev = v_rev * z_rev * _sigmoid(z_rev, FAST)
                    else:
                        o_fwd = v_fwd
                        o_rev = v_rev
                    if SAVE:
                        tl.store(ypre_b + t_fwd * E, v_fwd.to(ypre_ptr.dtype.element_ty), mask=dmask)
                        tl.store(ypre_b + t_rev * E, v_rev.to(ypre_ptr.dtype.element_ty), mask=dmask & second)
                tl.store(out_b + t_fwd * E, o_fwd.to(out_ptr.dtype.element_ty), mask=dmask)
                tl.store(out_b + t_rev * E, o_rev.to(out_ptr.dtype.element_ty), mask=dmask & (t_fwd != t_rev))
    else:
        if REVERSE:
            t0 = c1 - 1
            dts = -1
        else:
            t0 = c0
            dts = 1
        x_fwd1 = _ldc(x_fwd_b, t0, sx_fwd_t, L, dmask, EVEN)
        dt_fwd1 = _ldc(dt_fwd_b, t0, sdt_fwd_t, L, dmask, EVEN)
        x_fwd2 = _ldc(x_fwd_b, t0 + dts, sx_fwd_t, L, dmask, EVEN)
        dt_fwd2 = _ldc(dt_fwd_b, t0 + dts, sdt_fwd_t, L, dmask, EVEN)
        for w0 in range(0, c1 - c0, CK):
            if SAVE:
                if w0 > 0:
                    _store_own(ck_fwd + (w0 // CK - 1) * CKS + ck_off, S_fwd, FAST)
            for i in range(w0, tl.minimum(w0 + CK, c1 - c0)):
                t = t0 + dts * i
                x_fwd = x_fwd1
                dt_fwd = dt_fwd1
                x_fwd1 = x_fwd2
                dt_fwd1 = dt_fwd2
                x_fwd2 = _ldc(x_fwd_b, t + 2 * dts, sx_fwd_t, L, dmask, EVEN)
                dt_fwd2 = _ldc(dt_fwd_b, t + 2 * dts, sdt_fwd_t, L, dmask, EVEN)
                k_fwd, q_fwd, km_fwd, kappa_fwd = _load_rec(rec_fwd, t, offs_n, N, REC_W)
                if PREFETCH:
                    _prefetch(rec_fwd + (t + dts) * REC_W + lane2, FAST)
                    if HAS_Z:
                        _prefetch(z_b + tl.minimum(tl.maximum(t + dts, 0), L - 1) * sz_t, FAST)
                if HAS_Z:
                    z_fwd = tl.load(z_b + t * sz_t, mask=dmask, other=0.0).to(tl.float32)
                _, rden_fwd, eps_fwd = _coefs(dt_fwd, bias_fwd, kappa_fwd, FAST)
                S_fwd = _advance(S_fwd, x_fwd, eps_fwd, rden_fwd, k_fwd, km_fwd)
                y_fwd = tl.sum(S_fwd * q_fwd[:, None], axis=0)
                if HAS_D:
                    y_fwd += D_fwd * x_fwd
                if HAS_Z:
                    y_fwd = y_fwd * z_fwd * _sigmoid(z_fwd, FAST)
                tl.store(out_b + t * E, y_fwd.to(out_ptr.dtype.element_ty), mask=dmask)

