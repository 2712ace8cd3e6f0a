"""Triton kernels of the Longhorn scan: forward (one or both directions) and exact backward.

Layout (kernels.md section 6): x, dt, z and the output are token-major (B, L, E) tensors taken by stride (unit
channel stride); each program owns one batch element and a block of channels and walks the tokens in scan
order: t = s, or t = L-1-s for a reversed direction (no flips). The forward holds the state as one [N, BD]
tensor (the state index n in each thread's registers, R channels per thread across lanes); the backward, which
needs cross-channel reductions of per-n terms, holds it as a tuple of N row vectors [BD] with one channel per
thread, so that every operation there is elementwise and no 2-D layout (hence no layout conversion through
shared memory) exists.

Per-token data shared by all channels (k, q, kappa and the exact decay complement kappa - k^2) are packed once
per call into an fp32 record (`_prep_kernel`), so every step loads them with a few aligned vector loads.

Backward: the forward stores the state entering every window of CK steps (sparse fp32 checkpoints). For each
window, taken in reverse, the backward re-runs the window from its checkpoint and writes the state at every
tile start (every TT steps) to a small program-private scratch; then, for each tile in reverse, it recomputes the
TT + 1 states in registers and walks them backwards carrying the adjoint. dk/dq are reduced over each warp's
channels (one reduce-scatter of the 2N per-channel terms) and written as per-warp partials, summed afterwards
(deterministic, no atomics).

Reconstructing backward (bf16 / fp16 inputs, the default there): the recurrence runs backwards exactly in real
arithmetic, S_{t-1} = (S_t - c_t) / f_t, so each window can be walked back from its end state with the states
reconstructed on the way (no sweep, no tiles, no scratch). Its error grows as the product of 1/f going back; the
state it reaches at each window start is checked against the checkpoint, and the programs that drifted are redone
by the exact backward (a second launch that skips the others).

Small batch (too few programs to fill the GPU): the state recurrence is affine in the state, S_out = A S_in + Z
over any run of steps, and so is the backward's adjoint carry. The sequence is then cut into chunks: one pass
computes every chunk's (A, Z) from zero, a short sequential combine gives every chunk its entry state (in training:
the checkpoints), and the chunks run in parallel; the backward does the same over segments of windows with the
adjoint carry.
"""
import triton
import triton.language as tl

REC = 64   # fp32 words per token in the packed record: k [N], q [N], kappa - k^2 [N], kappa (N <= 16)
PAD = 8    # zero records before and after each sequence: the backward's last tile may overrun by TT - 1 <= 7


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x for the positive, normal x of these kernels (denominators >= 1, decays in (0, 1]): one MUFU.RCP on
    the GPU instead of a full division."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def _prefetch(ptrs, FAST: tl.constexpr):
    """Bring the lines of `ptrs` into L1 (GPU only), a step or a tile before they are loaded: the per-token
    records are needed in full by every thread right at the start of a step, and holding them in registers
    one step ahead would cost 49 registers per direction."""
    if FAST:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _exp(x, FAST: tl.constexpr):
    """e^x; on the GPU one MUFU.EX2 (flushing subnormal results to zero) without the range fix-up of tl.exp."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _store_own(ptrs, vals, FAST: tl.constexpr):
    """Store `vals` from the registers that hold them (GPU: one st.global per element in inline PTX, which the
    coalescing pass cannot re-layout; a plain tl.store of the [N, BD] checkpoint was converted to a vectorised
    layout through shared memory with a barrier, and cost the training forward 96 us at B=128, L=197)."""
    if FAST:
        tl.inline_asm_elementwise("st.global.f32 [$1], $2; mov.u32 $0, 0;", "=r,l,f", [ptrs.to(tl.int64), vals],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptrs, vals)


@triton.jit
def _load_own(ptrs, FAST: tl.constexpr):
    """Load fp32 values straight into the layout of `ptrs` (GPU: one ld.global per element in inline PTX, for the
    same reason as _store_own: a plain tl.load of an [N, BD] block may be given another layout)."""
    if FAST:
        return tl.inline_asm_elementwise("ld.global.f32 $0, [$1];", "=f,l", [ptrs.to(tl.int64)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(ptrs)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    return _rcp(1.0 + _exp(-x, FAST), FAST)


@triton.jit
def _prep_rows(k_ptr, q_ptr, rec_ptr, skb, skt, skn, sqb, sqt, sqn, L, NROW,
               N: tl.constexpr, BT: tl.constexpr, REC_W: tl.constexpr, PADT: tl.constexpr):
    tok = tl.program_id(0) * BT + tl.arange(0, BT)          # row of the padded [B, L + 2 PADT] record
    tmask = tok < NROW
    b = tok // (L + 2 * PADT)
    t = tok - b * (L + 2 * PADT) - PADT
    n = tl.arange(0, N)
    m2 = (tmask & (t >= 0) & (t < L))[:, None]
    k = tl.load(k_ptr + b[:, None] * skb + t[:, None] * skt + n[None, :] * skn, mask=m2, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b[:, None] * sqb + t[:, None] * sqt + n[None, :] * sqn, mask=m2, other=0.0).to(tl.float32)
    k2 = k * k
    kappa = tl.sum(k2, axis=1)
    # kappa - k[n]^2 as a sum over m != n: exact even when one k[n] carries all of kappa (strong writes)
    off = (n[:, None] != n[None, :]).to(tl.float32)                      # [N(n), N(m)]
    kmk2 = tl.sum(k2[:, None, :] * off[None, :, :], axis=2)
    base = rec_ptr + tok[:, None] * REC_W + n[None, :]
    tl.store(base, k, mask=tmask[:, None])
    tl.store(base + N, q, mask=tmask[:, None])
    tl.store(base + 2 * N, kmk2, mask=tmask[:, None])
    tl.store(rec_ptr + tok * REC_W + 3 * N, kappa, mask=tmask)


@triton.jit
def _prep_kernel(ka_ptr, qa_ptr, kb_ptr, qb_ptr, rec_ptr, skab, skat, skan, sqab, sqat, sqan,
                 skbb, skbt, skbn, sqbb, sqbt, sqbn, L, NROW,
                 N: tl.constexpr, BT: tl.constexpr, REC_W: tl.constexpr, PADT: tl.constexpr):
    """rec[dir, b, PADT + t] = [k, q, kappa - k^2 (summed without cancellation), kappa] in fp32, zero pad rows;
    program_id(1) is the direction (a: k_a, q_a; b: k_b, q_b), both packed by one launch."""
    if tl.program_id(1) == 0:
        _prep_rows(ka_ptr, qa_ptr, rec_ptr, skab, skat, skan, sqab, sqat, sqan, L, NROW, N, BT, REC_W, PADT)
    else:
        _prep_rows(kb_ptr, qb_ptr, rec_ptr + NROW * REC_W, skbb, skbt, skbn, sqbb, sqbt, sqbn, L, NROW,
                   N, BT, REC_W, PADT)


@triton.jit
def _load_rec(rec_b, t, offs_n, N: tl.constexpr, REC_W: tl.constexpr):
    # rec_b points at token 0 of a padded sequence: rows -PAD .. L + PAD - 1 exist (zeros outside 0 .. L-1),
    # so the loads need no mask and a step on a padded row leaves the state unchanged (k = 0: f = 1, c = 0)
    # (issue order k, kappa - k^2, kappa, q: with q first ptxas kept 228 registers instead of 168)
    p = rec_b + t * REC_W
    k = tl.load(p + offs_n)
    km = tl.load(p + 2 * N + offs_n)
    kappa = tl.load(p + 3 * N)
    q = tl.load(p + N + offs_n)
    return k, q, km, kappa


@triton.jit
def _channels(pid, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    """Memory channel of each logical index of a block. Triton's default layout gives logical index i to lane
    i % 32 of warp (i // 32) % W, register i // (32 W); mapping it to channel (i % 32W) * R + i // 32W gives
    each thread R adjacent channels while hiding the contiguity from the coalescing pass, which would otherwise
    pick another layout for the loads and stores and convert between the two at every step."""
    i = tl.arange(0, BD)
    return pid * BD + (i % (32 * W)) * R + i // (32 * W)


@triton.jit
def _block(pid, E, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, EVEN: tl.constexpr):
    """Channels of block pid (see _channels) and their mask (constant when E % BD == 0: EVEN, so that the masks
    fold away)."""
    offs_d = _channels(pid, BD, R, W)
    if EVEN:
        return offs_d, tl.full([BD], 1, tl.int1)
    else:
        return offs_d, offs_d < E


@triton.jit
def _priv_off(offs_n, BD: tl.constexpr):
    """Offsets of a program-private [N, BD] fp32 block (checkpoints, scratch), with no contiguous run along the
    channels so that coalescing keeps the compute layout (each row is still one dense run of BD words)."""
    i = tl.arange(0, BD)
    return offs_n[:, None] * BD + ((i % 2) * (BD // 2) + i // 2)[None, :]


@triton.jit
def _ck_col(ch, N: tl.constexpr, BDF: tl.constexpr, RF: tl.constexpr, WF: tl.constexpr):
    """Offset of channel ch's row-0 entry in a checkpoint of the forward (blocks of BDF channels launched with RF
    channels per thread over WF warps, in the layouts of _channels and _priv_off); row n is n * BDF further."""
    cf = ch % BDF
    j = (cf % RF) * (32 * WF) + cf // RF
    return (ch // BDF) * (N * BDF) + ((j % 2) * (BDF // 2) + j // 2)


@triton.jit
def _coefs(dt, bias, kappa, FAST: tl.constexpr):
    """beta = sigmoid(a), rden = 1 / (1 + beta kappa), eps = beta rden, and 1 - beta = e^-a beta (exact even
    when beta is close to 1, where 1 - beta would cancel)."""
    e = _exp(-(dt + bias), FAST)
    beta = _rcp(1.0 + e, FAST)
    rden = _rcp(1.0 + beta * kappa, FAST)
    eps = beta * rden
    omb = tl.where(e > 1.0, 1.0 - beta, e * beta)          # e = inf (a -> -inf): 1 - beta = 1, not inf * 0
    return omb, rden, eps


@triton.jit
def _decay(eps, rden, km):
    # f = 1 - eps k^2 = (1 + beta (kappa - k^2)) / den, exact when k^2 carries all of kappa; [N, BD]
    return rden[None, :] + eps[None, :] * km[:, None]


@triton.jit
def _advance(S, x, eps, rden, k, km):
    # S_t = f S_{t-1} + c with c = eps x k
    return _decay(eps, rden, km) * S + (eps * x)[None, :] * k[:, None]


@triton.jit
def _ldc(base, t, stride, L, dmask, EVEN: tl.constexpr):
    """Like _ld, for the forward's look-ahead loads whose values are never used outside 0 <= t < L: the index is
    clamped instead of masked, so that with every channel of the block in range (EVEN) no predicate is needed."""
    tc = tl.minimum(tl.maximum(t, 0), L - 1)
    if EVEN:
        return tl.load(base + tc * stride).to(tl.float32)
    else:
        return tl.load(base + tc * stride, mask=dmask, other=0.0).to(tl.float32)


@triton.jit
def _ld(base, t, stride, L, dmask):
    """One token's [BD] slice of a (B, L, E) tensor in fp32; zeros outside 0 <= t < L."""
    return tl.load(base + t * stride, mask=dmask & (t >= 0) & (t < L), other=0.0).to(tl.float32)


@triton.jit
def _scan_fwd_kernel(
        xa_ptr, dta_ptr, xb_ptr, dtb_ptr, z_ptr, out_ptr, ypre_ptr, rec_ptr, ck_ptr, h0_ptr,
        bias_a_ptr, bias_b_ptr, Da_ptr, Db_ptr,
        sxa_b, sxa_t, sdta_b, sdta_t, sxb_b, sxb_t, sdtb_b, sdtb_t, sz_b, sz_t,
        L, E, B, NCK, EP, TC, NCH,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, CK: tl.constexpr,
        REC_W: tl.constexpr, PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE: tl.constexpr, FAST: tl.constexpr,
        PREFETCH: tl.constexpr, EVEN: tl.constexpr, CHUNKED: tl.constexpr, WIN: tl.constexpr):
    """One program: batch element b, channels [pid*BD, pid*BD + BD), one direction or both interleaved, over all
    tokens or (CHUNKED) over the tokens [c0, c1) of chunk program_id(2), starting from the chunk's entry states
    (`_scan_combine_kernel`'s output in h0_ptr). With WIN (training, both directions) the entry states are those
    of the checkpoint windows (TC is a multiple of CK): the forward direction enters at a window start, the
    backward one runs from the start of its window up to token c1 first.

    Both directions: step i advances the forward scan at token c0 + i and the backward scan at token c1-1-i.
    While the two have not met, each writes its ungated y into `out` as a partial; once past the middle, each step
    reads the other direction's partial back, gates the sum and writes the final value (same thread, same
    address: no barrier needed). out / y_pre are contiguous (B, L, E). SAVE also writes y_pre and, unless CHUNKED
    (then the combine writes them), the state entering every window of CK steps (checkpoints).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
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
            ja = c0 // CK
            jb = (L - c1) // CK
        else:
            ja = tl.program_id(2)
            jb = ja
        # chunk entry states: slot 1 of [ndir, B, NCH, 2, N, EP] (see _scan_chunk_kernel)
        h0_n = offs_n[:, None] * EP + offs_d[None, :]
        h0_a = h0_ptr + ((b * NCH + ja) * 2 + 1) * (N * EP) + h0_n
        h0_b = h0_ptr + (((B + b) * NCH + jb) * 2 + 1) * (N * EP) + h0_n
    else:
        c0 = 0
        c1 = L

    bias_a = tl.load(bias_a_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_D:
        Da = tl.load(Da_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    xa_b = xa_ptr + b * sxa_b + offs_d
    dta_b = dta_ptr + b * sdta_b + offs_d
    out_b = out_ptr + b * L * E + offs_d
    ypre_b = ypre_ptr + b * L * E + offs_d
    z_b = z_ptr + b * sz_b + offs_d
    LP = L + 2 * PADT
    rec_a = rec_ptr + (b * LP + PADT) * REC_W
    lane2 = tl.arange(0, 32) * (REC_W // 32)          # one address per lane covers a record row
    ck_a = ck_ptr + b * NCK * CKS
    if CHUNKED:
        Sa = _load_own(h0_a, FAST)
    else:
        Sa = tl.zeros([N, BD], tl.float32)

    if BIDIR:
        bias_b = tl.load(bias_b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        if HAS_D:
            Db = tl.load(Db_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        xb_b = xb_ptr + b * sxb_b + offs_d
        dtb_b = dtb_ptr + b * sdtb_b + offs_d
        rec_b = rec_ptr + ((B + b) * LP + PADT) * REC_W
        ck_b = ck_ptr + (B + b) * NCK * CKS
        if CHUNKED:
            Sb = _load_own(h0_b, FAST)
            if WIN:
                # from the start of the backward direction's window (token L-1-jb CK) to token c1, exclusive
                for u in range(0, (L - c1) - jb * CK):
                    tw = L - 1 - jb * CK - u
                    kw, _, kmw, kappa_w = _load_rec(rec_b, tw, offs_n, N, REC_W)
                    _, rden_w, eps_w = _coefs(_ld(dtb_b, tw, sdtb_t, L, dmask), bias_b, kappa_w, FAST)
                    Sb = _advance(Sb, _ld(xb_b, tw, sxb_t, L, dmask), eps_w, rden_w, kw, kmw)
        else:
            Sb = tl.zeros([N, BD], tl.float32)
        TB0 = c0 + c1 - 1      # step i: forward token i, backward token TB0 - i
        # x and dt come from HBM: prefetch them two steps ahead (the per-token records are L2 hits and the
        # partials were written by this thread, so those are loaded at the top of their own step)
        xa1 = _ldc(xa_b, c0, sxa_t, L, dmask, EVEN)
        dta1 = _ldc(dta_b, c0, sdta_t, L, dmask, EVEN)
        xb1 = _ldc(xb_b, TB0 - c0, sxb_t, L, dmask, EVEN)
        dtb1 = _ldc(dtb_b, TB0 - c0, sdtb_t, L, dmask, EVEN)
        xa2 = _ldc(xa_b, c0 + 1, sxa_t, L, dmask, EVEN)
        dta2 = _ldc(dta_b, c0 + 1, sdta_t, L, dmask, EVEN)
        xb2 = _ldc(xb_b, TB0 - c0 - 1, sxb_t, L, dmask, EVEN)
        dtb2 = _ldc(dtb_b, TB0 - c0 - 1, sdtb_t, L, dmask, EVEN)
        for w0 in range(c0, c1, CK):
            if SAVE:
                if not CHUNKED:     # chunked: the combine wrote the checkpoints
                    if w0 > 0:
                        _store_own(ck_a + (w0 // CK - 1) * CKS + ck_off, Sa, FAST)
                        _store_own(ck_b + (w0 // CK - 1) * CKS + ck_off, Sb, FAST)
            for i in range(w0, tl.minimum(w0 + CK, c1)):
                tf = i
                tb = TB0 - i
                # tf < tb: both partial; tf == tb: both here; tf > tb: both finals, partner partials read back
                second = tf > tb
                mid = tf == tb
                final_f = tf >= tb
                xa = xa1
                dta = dta1
                xb = xb1
                dtb = dtb1
                xa1 = xa2
                dta1 = dta2
                xb1 = xb2
                dtb1 = dtb2
                xa2 = _ldc(xa_b, i + 2, sxa_t, L, dmask, EVEN)
                dta2 = _ldc(dta_b, i + 2, sdta_t, L, dmask, EVEN)
                xb2 = _ldc(xb_b, TB0 - 2 - i, sxb_t, L, dmask, EVEN)
                dtb2 = _ldc(dtb_b, TB0 - 2 - i, sdtb_t, L, dmask, EVEN)
                ka, qa, kma, kappa_a = _load_rec(rec_a, tf, offs_n, N, REC_W)
                kb, qb, kmb, kappa_b = _load_rec(rec_b, tb, offs_n, N, REC_W)
                if PREFETCH:
                    _prefetch(rec_a + (tf + 1) * REC_W + lane2, FAST)
                    _prefetch(rec_b + (tb - 1) * REC_W + lane2, FAST)
                    _prefetch(out_b + tl.minimum(tf + 1, L - 1) * E, FAST)
                    _prefetch(out_b + tl.maximum(tb - 1, 0) * E, FAST)
                    if HAS_Z:
                        _prefetch(z_b + tl.minimum(tf + 1, L - 1) * sz_t, FAST)
                        _prefetch(z_b + tl.maximum(tb - 1, 0) * sz_t, FAST)
                pf = tl.load(out_b + tf * E, mask=dmask & second, other=0.0).to(tl.float32)
                pb = tl.load(out_b + tb * E, mask=dmask & second, other=0.0).to(tl.float32)
                if HAS_Z:
                    zf = tl.load(z_b + tf * sz_t, mask=dmask & final_f, other=0.0).to(tl.float32)
                    zb = tl.load(z_b + tb * sz_t, mask=dmask & final_f, other=0.0).to(tl.float32)
                _, rden_a, eps_a = _coefs(dta, bias_a, kappa_a, FAST)
                _, rden_b, eps_b = _coefs(dtb, bias_b, kappa_b, FAST)
                Sa = _advance(Sa, xa, eps_a, rden_a, ka, kma)
                Sb = _advance(Sb, xb, eps_b, rden_b, kb, kmb)
                ya = tl.sum(Sa * qa[:, None], axis=0)
                yb = tl.sum(Sb * qb[:, None], axis=0)
                if HAS_D:
                    ya += Da * xa
                    yb += Db * xb
                vf = ya + pf
                if mid:
                    vf += yb
                vb = yb + pb
                of = vf
                ob = vb
                if final_f:
                    vf = vf * 0.5
                    vb = vb * 0.5
                    if HAS_Z:
                        of = vf * zf * _sigmoid(zf, FAST)
                        ob = vb * zb * _sigmoid(zb, FAST)
                    else:
                        of = vf
                        ob = vb
                    if SAVE:
                        tl.store(ypre_b + tf * E, vf.to(ypre_ptr.dtype.element_ty), mask=dmask)
                        tl.store(ypre_b + tb * E, vb.to(ypre_ptr.dtype.element_ty), mask=dmask & second)
                tl.store(out_b + tf * E, of.to(out_ptr.dtype.element_ty), mask=dmask)
                tl.store(out_b + tb * E, ob.to(out_ptr.dtype.element_ty), mask=dmask & (tf != tb))
    else:
        if REVERSE:
            t0 = c1 - 1
            dts = -1
        else:
            t0 = c0
            dts = 1
        xa1 = _ldc(xa_b, t0, sxa_t, L, dmask, EVEN)
        dta1 = _ldc(dta_b, t0, sdta_t, L, dmask, EVEN)
        xa2 = _ldc(xa_b, t0 + dts, sxa_t, L, dmask, EVEN)
        dta2 = _ldc(dta_b, t0 + dts, sdta_t, L, dmask, EVEN)
        for w0 in range(0, c1 - c0, CK):
            if SAVE:
                if w0 > 0:
                    _store_own(ck_a + (w0 // CK - 1) * CKS + ck_off, Sa, FAST)
            for i in range(w0, tl.minimum(w0 + CK, c1 - c0)):
                t = t0 + dts * i
                xa = xa1
                dta = dta1
                xa1 = xa2
                dta1 = dta2
                xa2 = _ldc(xa_b, t + 2 * dts, sxa_t, L, dmask, EVEN)
                dta2 = _ldc(dta_b, t + 2 * dts, sdta_t, L, dmask, EVEN)
                ka, qa, kma, kappa_a = _load_rec(rec_a, t, offs_n, N, REC_W)
                if PREFETCH:
                    _prefetch(rec_a + (t + dts) * REC_W + lane2, FAST)
                    if HAS_Z:
                        _prefetch(z_b + tl.minimum(tl.maximum(t + dts, 0), L - 1) * sz_t, FAST)
                if HAS_Z:
                    zf = tl.load(z_b + t * sz_t, mask=dmask, other=0.0).to(tl.float32)
                _, rden_a, eps_a = _coefs(dta, bias_a, kappa_a, FAST)
                Sa = _advance(Sa, xa, eps_a, rden_a, ka, kma)
                ya = tl.sum(Sa * qa[:, None], axis=0)
                if HAS_D:
                    ya += Da * xa
                if HAS_Z:
                    ya = ya * zf * _sigmoid(zf, FAST)
                tl.store(out_b + t * E, ya.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _summary_step(S, A, x, dt, bias, k, km, kappa, FAST: tl.constexpr):
    """One step of a chunk's affine map: S from zero (as _advance) and A, the product of the decays."""
    _, rden, eps = _coefs(dt, bias, kappa, FAST)
    f = _decay(eps, rden, km)
    return f * S + (eps * x)[None, :] * k[:, None], f * A


@triton.jit
def _scan_chunk_kernel(
        xa_ptr, dta_ptr, xb_ptr, dtb_ptr, rec_ptr, sum_ptr, bias_a_ptr, bias_b_ptr,
        sxa_b, sxa_t, sdta_b, sdta_t, sxb_b, sxb_t, sdtb_b, sdtb_t,
        L, E, EP, B, TC, NCH,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, REC_W: tl.constexpr,
        PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, FAST: tl.constexpr,
        PREFETCH: tl.constexpr, EVEN: tl.constexpr, WIN: tl.constexpr):
    """Pass 1 of the chunked forward (for too few programs to fill the GPU: small batch, long sequences). For chunk
    c = program_id(2) of each direction, the chunk's affine map of the state, S_out = A * S_in + Z, with A the
    product of the decays f and Z the state reached from zero. Written to sum[ndir, B, NCH, 2, N, EP] (slot 0: A,
    slot 1: Z; EP >= E a multiple of every block size). Chunk c is the tokens [c0, c1) = [c TC, c TC + TC) for
    every direction (inference), or, with WIN, steps [c0, c1) of each direction's own scan order (checkpoint
    windows of the training forward: the backward direction's step s is token L-1-s)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    offs_d, dmask = _block(pid_d, E, BD, R, W, EVEN)
    offs_n = tl.arange(0, N)
    CKS = N * EP
    c0 = c * TC
    c1 = tl.minimum(c0 + TC, L)
    out_a = sum_ptr + (b * NCH + c) * (2 * CKS) + offs_n[:, None] * EP + offs_d[None, :]
    LP = L + 2 * PADT
    lane2 = tl.arange(0, 32) * (REC_W // 32)
    if WIN:
        tr0 = L - 1 - c0       # first token of a direction walking backwards
    else:
        tr0 = c1 - 1
    if REVERSE:
        ta0 = tr0
        da = -1
    else:
        ta0 = c0
        da = 1
    bias_a = tl.load(bias_a_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    xa_b = xa_ptr + b * sxa_b + offs_d
    dta_b = dta_ptr + b * sdta_b + offs_d
    rec_a = rec_ptr + (b * LP + PADT) * REC_W
    Sa = tl.zeros([N, BD], tl.float32)
    Aa = tl.full([N, BD], 1.0, tl.float32)
    xa1 = _ldc(xa_b, ta0, sxa_t, L, dmask, EVEN)
    dta1 = _ldc(dta_b, ta0, sdta_t, L, dmask, EVEN)
    if BIDIR:
        bias_b = tl.load(bias_b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        xb_b = xb_ptr + b * sxb_b + offs_d
        dtb_b = dtb_ptr + b * sdtb_b + offs_d
        rec_b = rec_ptr + ((B + b) * LP + PADT) * REC_W
        Sb = tl.zeros([N, BD], tl.float32)
        Ab = tl.full([N, BD], 1.0, tl.float32)
        xb1 = _ldc(xb_b, tr0, sxb_t, L, dmask, EVEN)
        dtb1 = _ldc(dtb_b, tr0, sdtb_t, L, dmask, EVEN)
    for i in range(0, c1 - c0):
        ta = ta0 + da * i
        xa = xa1
        dta = dta1
        xa1 = _ldc(xa_b, ta + da, sxa_t, L, dmask, EVEN)
        dta1 = _ldc(dta_b, ta + da, sdta_t, L, dmask, EVEN)
        ka, _, kma, kappa_a = _load_rec(rec_a, ta, offs_n, N, REC_W)
        if PREFETCH:
            _prefetch(rec_a + (ta + da) * REC_W + lane2, FAST)
        Sa, Aa = _summary_step(Sa, Aa, xa, dta, bias_a, ka, kma, kappa_a, FAST)
        if BIDIR:
            tb = tr0 - i
            xb = xb1
            dtb = dtb1
            xb1 = _ldc(xb_b, tb - 1, sxb_t, L, dmask, EVEN)
            dtb1 = _ldc(dtb_b, tb - 1, sdtb_t, L, dmask, EVEN)
            kb, _, kmb, kappa_b = _load_rec(rec_b, tb, offs_n, N, REC_W)
            if PREFETCH:
                _prefetch(rec_b + (tb - 1) * REC_W + lane2, FAST)
            Sb, Ab = _summary_step(Sb, Ab, xb, dtb, bias_b, kb, kmb, kappa_b, FAST)
    _store_own(out_a, Aa, FAST)
    _store_own(out_a + CKS, Sa, FAST)
    if BIDIR:
        out_b = out_a + B * NCH * (2 * CKS)
        _store_own(out_b, Ab, FAST)
        _store_own(out_b + CKS, Sb, FAST)


@triton.jit
def _scan_combine_kernel(sum_ptr, ck_ptr, NCH, EP, E, N: tl.constexpr, BLK: tl.constexpr, U: tl.constexpr,
                         BACK0: tl.constexpr, BACK1: tl.constexpr, CKOUT: tl.constexpr, BDF: tl.constexpr,
                         RF: tl.constexpr, WF: tl.constexpr):
    """Pass 2 of a chunked scan: the state entering every chunk, sequentially over the chunks in scan order
    (entering the first: zero; entering the next: A * S_in + Z), written over Z. Direction 0 / 1 walks the chunks
    from the last if BACK0 / BACK1 (inference: the backward direction's chunks are in token order; the adjoint
    carry of the backward runs against the scan). The loads of U chunks are issued together (the walk is
    latency-bound). With CKOUT (checkpoint windows of the training forward), the entry state of chunk c >= 1 is
    also written as checkpoint c - 1 in the forward's private block layout (BDF, RF, WF: its launch).
    Grid: (state blocks, B, ndir)."""
    CKS = N * EP
    e = tl.program_id(0) * BLK + tl.arange(0, BLK)
    m = e < CKS
    b = tl.program_id(1)
    d = tl.program_id(2)
    nb = tl.num_programs(1)
    base = sum_ptr + (d * nb + b) * NCH * (2 * CKS) + e
    if d == 0:
        back = BACK0
    else:
        back = BACK1
    if CKOUT:
        # element e = (n, channel) -> the forward's checkpoint offset
        n = e // EP
        ck_b = ck_ptr + (d * nb + b) * (NCH - 1) * CKS + _ck_col(e - n * EP, N, BDF, RF, WF) + n * BDF
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
                tl.store(ck_b + (j0 + u - 1) * CKS, s, mask=m & ok & (j0 + u > 0))
            s = az[2 * u] * s + az[2 * u + 1]


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
def _walk(dr, BIDIR: tl.constexpr, REVERSE: tl.constexpr):
    """(rev, gscale) of direction dr in the backward: 1 if it walks the tokens from the last, and the factor of
    the output gradient (two directions are averaged)."""
    if BIDIR:
        return dr, 0.5
    elif REVERSE:
        return 1, 1.0
    else:
        return 0, 1.0


@triton.jit
def _bwd_step(t, valid, m, x, G, zz, y, eps, rden, omb, k, q, km, S_prev, S_t, Wc, gscale, Dp, lane, dkq_w, dkq_b,
              dz_b, dx_b, ddt_b, dmask, E, dr, zero, N: tl.constexpr, BIDIR: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, SCATTER: tl.constexpr, FAST: tl.constexpr):
    """One step of the backward's walk against the scan order, at token t, from the states S_{t-1} (S_prev) and
    S_t and the carry Wc = f_{t+1} H_{t+1}: stores dz (direction 0; y is y_pre with two directions), the step's
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
def _adjoint_chunk_kernel(
        g_ptr, z_ptr, dta_ptr, dtb_ptr, rec_ptr, sum_ptr, bias_a_ptr, bias_b_ptr,
        sg_b, sg_t, sz_b, sz_t, sdta_b, sdta_t, sdtb_b, sdtb_t,
        L, E, EP, B, TC, NCH,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, REC_W: tl.constexpr,
        PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, HAS_Z: tl.constexpr, FAST: tl.constexpr,
        EVEN: tl.constexpr):
    """Pass 1 of the segmented backward (small batch): the backward carries C_s = f_s H_s against the scan order,
    C_s = f_s (g_s q_s + C_{s+1}), an affine recurrence like the state's. For the steps [c0, c1) of segment c of
    direction dr (program_id(2) = dr NCH + c), its map C_out = A C_in + Z (A: the product of the decays, Z: the
    carry reached from zero) into sum[ndir, B, NCH, 2, N, EP], as _scan_chunk_kernel does for the state."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    dr = tl.program_id(2) // NCH
    c = tl.program_id(2) % NCH
    offs_d, dmask = _block(pid_d, E, BD, R, W, EVEN)
    offs_n = tl.arange(0, N)
    c0 = c * TC
    c1 = tl.minimum(c0 + TC, L)
    if dr == 0:
        dt_b = dta_ptr + b * sdta_b + offs_d
        sdt_t = sdta_t
        bias = tl.load(bias_a_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        dt_b = dtb_ptr + b * sdtb_b + offs_d
        sdt_t = sdtb_t
        bias = tl.load(bias_b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
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


@triton.jit
def _scan_bwd_kernel(
        g_ptr, z_ptr, ypre_ptr, rec_ptr, ck_ptr, scr_ptr,
        xa_ptr, dta_ptr, xb_ptr, dtb_ptr, bias_a_ptr, bias_b_ptr, Da_ptr, Db_ptr,
        dxa_ptr, ddta_ptr, dxb_ptr, ddtb_ptr, dz_ptr, dkq_ptr, dpar_ptr,
        sg_b, sg_t, sz_b, sz_t, sxa_b, sxa_t, sdta_b, sdta_t, sxb_b, sxb_t, sdtb_b, sdtb_t,
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
         back carrying the adjoint: dx, ddt, dz (direction 0), dk and dq (one reduce-scatter of their 2N
         per-channel terms over the warp), and the dbias, dD sums.
    Writes dx, ddt (dense, contiguous), dz, per-warp partials of dk, dq [.., L, 2N] and of dbias, dD [.., 2, E].
    SEG (small batch): program_id(2) = dr NSEG + seg, and the program takes only the SW windows of segment seg,
    starting from the adjoint carry that enters it (`_adjoint_chunk_kernel`, then the combine, in csum_ptr);
    dbias, dD partials per segment.
    RECON (bf16 / fp16 inputs, CONFIG bwd_recon): no sweep and no tiles; each window is walked back from its end
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
    b = tl.program_id(1)
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
        x_b = xa_ptr + b * sxa_b + offs_d
        dt_b = dta_ptr + b * sdta_b + offs_d
        sx_t = sxa_t
        sdt_t = sdta_t
        bias = tl.load(bias_a_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        dx_b = dxa_ptr + b * L * E + offs_d
        ddt_b = ddta_ptr + b * L * E + offs_d
    else:
        x_b = xb_ptr + b * sxb_b + offs_d
        dt_b = dtb_ptr + b * sdtb_b + offs_d
        sx_t = sxb_t
        sdt_t = sdtb_t
        bias = tl.load(bias_b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        dx_b = dxb_ptr + b * L * E + offs_d
        ddt_b = ddtb_ptr + b * L * E + offs_d
    if HAS_D:
        if dr == 0:
            Dp = tl.load(Da_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        else:
            Dp = tl.load(Db_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
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
    if RECON:
        go = _recon_go(st_ptr, THR, PROBE)
        nwin = tl.where(go, nwin, 0)
        bad = zero != zero
        for wi in range(nwin):
            w = w_hi - 1 - wi
            s0 = w * CK
            nst = tl.minimum(CK, L - s0)
            # the window's end state: the next window's checkpoint, or (last window) a sweep from its own
            last = w == NW - 1
            cidx = tl.where(last, w - 1, w)
            S = _ck_rows(ck_b, cidx + 1, CKS, ck_col, hi4, BDF, dmask, N)
            for u in range(tl.where(last, nst, 0)):
                s = s0 + u
                t = s + rev * (L - 1 - 2 * s)
                k, _, km, kappa = _rec_rows(rec_b, t, goff, N, REC_W, False, FAST)
                _, rden, eps = _coefs(_ld(dt_b, t, sdt_t, L, dmask), bias, kappa, FAST)
                S = _advance_rows(S, _ld(x_b, t, sx_t, L, dmask), eps, rden, k, km, N)
            mag = zero
            for n in tl.static_range(N):
                mag = tl.maximum(mag, tl.abs(S[n]))
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
                Wc, ddt_m, dD_t = _bwd_step(t, s < L, dmask, x, G, zz, y, eps, rden, omb, k, q, km, S_prev, S, Wc,
                                            gscale, Dp, lane, dkq_w, dkq_b, dz_b, dx_b, ddt_b, dmask, E, dr, zero,
                                            N, BIDIR, HAS_D, HAS_Z, SCATTER, FAST)
                acc_db += ddt_m
                if HAS_D:
                    acc_dD += dD_t
                S = S_prev
            # S is now the reconstructed state entering the window: against its checkpoint (zero for window 0)
            C = _ck_rows(ck_b, w, CKS, ck_col, hi4, BDF, dmask, N)
            for n in tl.static_range(N):
                mag = tl.maximum(mag, tl.abs(C[n]))
            for n in tl.static_range(N):
                bad = bad | ~(tl.abs(S[n] - C[n]) <= TOL * mag)       # NaN or inf count as off
        flagged = tl.where(go, tl.max(bad.to(tl.int32), axis=0), 1)
        tl.store(flag_ptr + (dr * B + b) * nblk + pid_d, flagged)
        acc_db = tl.where(flagged != 0, 0.0, acc_db)
        acc_dD = tl.where(flagged != 0, 0.0, acc_dD)
    else:
        for wi in range(nwin):
            w = w_hi - 1 - wi
            s0 = w * CK
            ntile = (tl.minimum(CK, L - s0) + TT - 1) // TT
            # 1. sweep the window from its checkpoint, storing each tile's start state; x and dt one tile ahead
            S = _ck_rows(ck_b, w, CKS, ck_col, hi4, BDF, dmask, N)
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
            # 2. tiles in reverse. The next tile's start state and per-channel inputs are prefetched into L1 one tile
            #    ahead (register copies would cost 36 registers at the peak of the tile, where spills start).
            for jti in range(ntile):
                jt = ntile - 1 - jti
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
                    Wc, ddt_m, dD_t = _bwd_step(t, valid, m, x, G, zz, y, eps, rden, co_omb[jj], k, q, km, states[jj],
                                                states[jj + 1], Wc, gscale, Dp, lane, dkq_w, dkq_b, dz_b, dx_b, ddt_b,
                                                dmask, E, dr, zero, N, BIDIR, HAS_D, HAS_Z, SCATTER, FAST)
                    acc_db += ddt_m
                    if HAS_D:
                        acc_dD += dD_t
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
def _grad_sums_kernel(dkq_ptr, dpar_ptr, dka_ptr, dqa_ptr, dba_ptr, dDa_ptr, dkb_ptr, dqb_ptr, dbb_ptr, dDb_ptr,
                      NPART, NROW, NPAR, E, NTP,
                      N: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, RB: tl.constexpr,
                      HAS_DA: tl.constexpr, HAS_DB: tl.constexpr):
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
            tl.store(dka_ptr + out, acc_k.to(dka_ptr.dtype.element_ty), mask=m)
            tl.store(dqa_ptr + out, acc_q.to(dqa_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(dkb_ptr + out, acc_k.to(dkb_ptr.dtype.element_ty), mask=m)
            tl.store(dqb_ptr + out, acc_q.to(dqb_ptr.dtype.element_ty), mask=m)
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
            tl.store(dba_ptr + c, db.to(dba_ptr.dtype.element_ty), mask=cm)
            if HAS_DA:
                tl.store(dDa_ptr + c, dD.to(dDa_ptr.dtype.element_ty), mask=cm)
        else:
            tl.store(dbb_ptr + c, db.to(dbb_ptr.dtype.element_ty), mask=cm)
            if HAS_DB:
                tl.store(dDb_ptr + c, dD.to(dDb_ptr.dtype.element_ty), mask=cm)
