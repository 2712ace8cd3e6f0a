"""Triton kernels of the Longhorn scan: forward (one or both directions) and exact backward.

Layout (kernels.md section 6): x, dt, z and the output are token-major (B, L, E) tensors taken by stride (unit
channel stride); each program owns one batch element and a block of BD channels, with the state S [N, BD] in
registers (the state index n lives in each thread's registers, channels across lanes), and walks the tokens
in scan order: t = s, or t = L-1-s for a reversed direction (no flips).

Per-token data shared by all channels (k, q, kappa and the exact decay complement kappa - k^2) are packed once
per call into an fp32 record (`_prep_kernel`), so every step loads them with a few aligned vector loads.

Backward: the forward stores the state entering every window of CK steps (sparse fp32 checkpoints). For each
window, taken in reverse, the backward re-runs the window from its checkpoint and writes the state at every
tile start (every TT steps) to a small program-private scratch; then, for each tile in reverse, it recomputes the
TT states in registers and walks them backwards carrying the adjoint. dk/dq are reduced over the program's
channels and written as per-block partials, summed afterwards (deterministic, no atomics).
"""
import triton
import triton.language as tl

REC = 64   # fp32 words per token in the packed record: k [N], q [N], kappa - k^2 [N], kappa (N <= 16)
PAD = 8    # zero records before and after each sequence: the backward's last tile may overrun by TT - 1 <= 7


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1 / x for x >= 1 (all our denominators): one MUFU.RCP on the GPU instead of a full division."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


# One level of a warp reduce-scatter: lanes whose bit `m` is clear keep the low half of their values and send
# the high half to the partner lane (lane ^ m), which does the opposite; both add what they receive.

@triton.jit
def _rs8(lo, hi):
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 l; .reg .f32 s, k, r; mov.u32 l, %laneid; and.b32 l, l, 8; " \
    "setp.ne.u32 p, l, 0; selp.f32 s, $1, $2, p; selp.f32 k, $2, $1, p; " \
    "shfl.sync.bfly.b32 r, s, 8, 0x1f, 0xffffffff; add.f32 $0, k, r; }",
        "=f,f,f", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rs4(lo, hi):
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 l; .reg .f32 s, k, r; mov.u32 l, %laneid; and.b32 l, l, 4; " \
    "setp.ne.u32 p, l, 0; selp.f32 s, $1, $2, p; selp.f32 k, $2, $1, p; " \
    "shfl.sync.bfly.b32 r, s, 4, 0x1f, 0xffffffff; add.f32 $0, k, r; }",
        "=f,f,f", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rs2(lo, hi):
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 l; .reg .f32 s, k, r; mov.u32 l, %laneid; and.b32 l, l, 2; " \
    "setp.ne.u32 p, l, 0; selp.f32 s, $1, $2, p; selp.f32 k, $2, $1, p; " \
    "shfl.sync.bfly.b32 r, s, 2, 0x1f, 0xffffffff; add.f32 $0, k, r; }",
        "=f,f,f", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rs1(lo, hi):
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 l; .reg .f32 s, k, r; mov.u32 l, %laneid; and.b32 l, l, 1; " \
    "setp.ne.u32 p, l, 0; selp.f32 s, $1, $2, p; selp.f32 k, $2, $1, p; " \
    "shfl.sync.bfly.b32 r, s, 1, 0x1f, 0xffffffff; add.f32 $0, k, r; }",
        "=f,f,f", [lo, hi], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _halve(x, HALF: tl.constexpr, C: tl.constexpr):
    y = tl.permute(tl.reshape(x, [2, HALF, C]), [1, 2, 0])
    return tl.split(y)


@triton.jit
def _bfly16(x):
    return tl.inline_asm_elementwise(
        "{ .reg .f32 r; shfl.sync.bfly.b32 r, $1, 16, 0x1f, 0xffffffff; add.f32 $0, $1, r; }",
        "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _lane_sum16(x, R: tl.constexpr, W: tl.constexpr, SCATTER: tl.constexpr):
    """Sum over the channels of a block of an [16, BD] tensor (the state index in registers).

    SCATTER (GPU, N = 16): returns [1, 32 W], lane l of each warp holding entry l % 16 summed over the warp's
    channels (one partial per warp): the R channels of a thread first, then a reduce-scatter over 16 lanes
    (15 shuffles) and one butterfly step. Otherwise a plain tl.sum over the block: [16]."""
    if SCATTER:
        C: tl.constexpr = 32 * W
        if R > 1:
            x = tl.sum(tl.reshape(x, [16, R, C]), axis=1)
        lo, hi = _halve(x, 8, C)
        x = _rs8(lo, hi)
        lo, hi = _halve(x, 4, C)
        x = _rs4(lo, hi)
        lo, hi = _halve(x, 2, C)
        x = _rs2(lo, hi)
        lo, hi = _halve(x, 1, C)
        return _bfly16(_rs1(lo, hi))
    else:
        return tl.sum(x, axis=1)


@triton.jit
def _prefetch(ptrs, FAST: tl.constexpr):
    """Bring the lines of `ptrs` into L1 (GPU only), a step or a tile before they are loaded: the per-token
    records are needed in full by every thread right at the start of a step, and holding them in registers
    one step ahead would cost 49 registers per direction."""
    if FAST:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    return _rcp(1.0 + tl.exp(-x), FAST)


@triton.jit
def _prep_kernel(k_ptr, q_ptr, rec_ptr, skb, skt, skn, sqb, sqt, sqn, L, NROW,
                 N: tl.constexpr, BT: tl.constexpr, REC_W: tl.constexpr, PADT: tl.constexpr):
    """rec[b, PADT + t] = [k, q, kappa - k^2 (summed without cancellation), kappa] in fp32; zero pad rows."""
    pid = tl.program_id(0)
    tok = pid * BT + tl.arange(0, BT)          # row of the padded [B, L + 2 PADT] record
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
def _load_rec(rec_b, t, offs_n, N: tl.constexpr, REC_W: tl.constexpr, NEED_Q: tl.constexpr):
    # rec_b points at token 0 of a padded sequence: rows -PAD .. L + PAD - 1 exist (zeros outside 0 .. L-1),
    # so the loads need no mask and a step on a padded row leaves the state unchanged (k = 0: f = 1, c = 0)
    p = rec_b + t * REC_W
    k = tl.load(p + offs_n)
    km = tl.load(p + 2 * N + offs_n)
    kappa = tl.load(p + 3 * N)
    if NEED_Q:
        q = tl.load(p + N + offs_n)
    else:
        q = k
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
def _priv_off(offs_n, BD: tl.constexpr):
    """Offsets of a program-private [N, BD] fp32 block (checkpoints, scratch), with no contiguous run along the
    channels so that coalescing keeps the compute layout (each row is still one dense run of BD words)."""
    i = tl.arange(0, BD)
    return offs_n[:, None] * BD + ((i % 2) * (BD // 2) + i // 2)[None, :]


@triton.jit
def _coefs(dt, bias, kappa, FAST: tl.constexpr):
    """beta = sigmoid(a), rden = 1 / (1 + beta kappa), eps = beta rden, and 1 - beta = e^-a beta (exact even
    when beta is close to 1, where 1 - beta would cancel)."""
    e = tl.exp(-(dt + bias))
    beta = _rcp(1.0 + e, FAST)
    rden = _rcp(1.0 + beta * kappa, FAST)
    eps = beta * rden
    omb = tl.where(e > 1.0, 1.0 - beta, e * beta)          # e = inf (a -> -inf): 1 - beta = 1, not inf * 0
    return omb, rden, eps


@triton.jit
def _advance(S, x, eps, rden, k, km):
    # S_t = f S_{t-1} + c with f = 1 - eps k^2 = (1 + beta (kappa - k^2)) / den, c = eps x k
    f = rden[None, :] + eps[None, :] * km[:, None]
    return f * S + (eps * x)[None, :] * k[:, None]


@triton.jit
def _ld(base, t, stride, L, dmask):
    """One token's [BD] slice of a (B, L, E) tensor in fp32; zeros outside 0 <= t < L."""
    return tl.load(base + t * stride, mask=dmask & (t >= 0) & (t < L), other=0.0).to(tl.float32)


@triton.jit
def _scan_fwd_kernel(
        xa_ptr, dta_ptr, xb_ptr, dtb_ptr, z_ptr, out_ptr, ypre_ptr, rec_ptr, ck_ptr,
        bias_a_ptr, bias_b_ptr, Da_ptr, Db_ptr,
        sxa_b, sxa_t, sdta_b, sdta_t, sxb_b, sxb_t, sdtb_b, sdtb_t, sz_b, sz_t,
        L, E, B, NCK,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, CK: tl.constexpr,
        REC_W: tl.constexpr, PADT: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE: tl.constexpr, FAST: tl.constexpr,
        PREFETCH: tl.constexpr):
    """One program: batch element b, channels [pid*BD, pid*BD + BD), one direction or both interleaved.

    Both directions: step i advances the forward scan at token i and the backward scan at token L-1-i. While
    the two have not met, each writes its ungated y into `out` as a partial; once past the middle, each step
    reads the other direction's partial back, gates the sum and writes the final value (same thread, same
    address: no barrier needed). out / y_pre are contiguous (B, L, E).
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    offs_d = _channels(pid_d, BD, R, W)
    dmask = offs_d < E
    offs_n = tl.arange(0, N)
    nblk = tl.num_programs(0)
    # checkpoints: [ndir, B, NCK, nblk, N * BD], each block in the private layout of _priv_off
    ck_off = pid_d * (N * BD) + _priv_off(offs_n, BD)
    CKS = nblk * (N * BD)

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
    Sa = tl.zeros([N, BD], tl.float32)

    if BIDIR:
        bias_b = tl.load(bias_b_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        if HAS_D:
            Db = tl.load(Db_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
        xb_b = xb_ptr + b * sxb_b + offs_d
        dtb_b = dtb_ptr + b * sdtb_b + offs_d
        rec_b = rec_ptr + ((B + b) * LP + PADT) * REC_W
        ck_b = ck_ptr + (B + b) * NCK * CKS
        Sb = tl.zeros([N, BD], tl.float32)
        # x and dt come from HBM: prefetch them two steps ahead (the per-token records are L2 hits and the
        # partials were written by this thread, so those are loaded at the top of their own step)
        xa1 = _ld(xa_b, 0, sxa_t, L, dmask)
        dta1 = _ld(dta_b, 0, sdta_t, L, dmask)
        xb1 = _ld(xb_b, L - 1, sxb_t, L, dmask)
        dtb1 = _ld(dtb_b, L - 1, sdtb_t, L, dmask)
        xa2 = _ld(xa_b, 1, sxa_t, L, dmask)
        dta2 = _ld(dta_b, 1, sdta_t, L, dmask)
        xb2 = _ld(xb_b, L - 2, sxb_t, L, dmask)
        dtb2 = _ld(dtb_b, L - 2, sdtb_t, L, dmask)
        for i in range(L):
            tf = i
            tb = L - 1 - i
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
            xa2 = _ld(xa_b, i + 2, sxa_t, L, dmask)
            dta2 = _ld(dta_b, i + 2, sdta_t, L, dmask)
            xb2 = _ld(xb_b, L - 3 - i, sxb_t, L, dmask)
            dtb2 = _ld(dtb_b, L - 3 - i, sdtb_t, L, dmask)
            ka, qa, kma, kappa_a = _load_rec(rec_a, tf, offs_n, N, REC_W, True)
            kb, qb, kmb, kappa_b = _load_rec(rec_b, tb, offs_n, N, REC_W, True)
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
            if SAVE:
                if (i % CK == 0) & (i > 0):
                    c = i // CK - 1
                    tl.store(ck_a + c * CKS + ck_off, Sa)
                    tl.store(ck_b + c * CKS + ck_off, Sb)
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
            t0 = L - 1
            dts = -1
        else:
            t0 = 0
            dts = 1
        xa1 = _ld(xa_b, t0, sxa_t, L, dmask)
        dta1 = _ld(dta_b, t0, sdta_t, L, dmask)
        xa2 = _ld(xa_b, t0 + dts, sxa_t, L, dmask)
        dta2 = _ld(dta_b, t0 + dts, sdta_t, L, dmask)
        for i in range(L):
            t = t0 + dts * i
            xa = xa1
            dta = dta1
            xa1 = xa2
            dta1 = dta2
            xa2 = _ld(xa_b, t + 2 * dts, sxa_t, L, dmask)
            dta2 = _ld(dta_b, t + 2 * dts, sdta_t, L, dmask)
            ka, qa, kma, kappa_a = _load_rec(rec_a, t, offs_n, N, REC_W, True)
            if PREFETCH:
                _prefetch(rec_a + (t + dts) * REC_W + lane2, FAST)
                if HAS_Z:
                    _prefetch(z_b + tl.minimum(tl.maximum(t + dts, 0), L - 1) * sz_t, FAST)
            if HAS_Z:
                zf = tl.load(z_b + t * sz_t, mask=dmask, other=0.0).to(tl.float32)
            if SAVE:
                if (i % CK == 0) & (i > 0):
                    tl.store(ck_a + (i // CK - 1) * CKS + ck_off, Sa)
            _, rden_a, eps_a = _coefs(dta, bias_a, kappa_a, FAST)
            Sa = _advance(Sa, xa, eps_a, rden_a, ka, kma)
            ya = tl.sum(Sa * qa[:, None], axis=0)
            if HAS_D:
                ya += Da * xa
            if HAS_Z:
                ya = ya * zf * _sigmoid(zf, FAST)
            tl.store(out_b + t * E, ya.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _scan_bwd_kernel(
        g_ptr, z_ptr, ypre_ptr, rec_ptr, ck_ptr, scr_ptr,
        xa_ptr, dta_ptr, xb_ptr, dtb_ptr, bias_a_ptr, bias_b_ptr, Da_ptr, Db_ptr,
        dxa_ptr, ddta_ptr, dxb_ptr, ddtb_ptr, dz_ptr, dkq_ptr, dpar_ptr,
        sg_b, sg_t, sz_b, sz_t, sxa_b, sxa_t, sdta_b, sdta_t, sxb_b, sxb_t, sdtb_b, sdtb_t,
        L, E, B, NCK, NBLKF,
        N: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, W: tl.constexpr, CK: tl.constexpr,
        TT: tl.constexpr, REC_W: tl.constexpr, PADT: tl.constexpr, BDF: tl.constexpr, RF: tl.constexpr,
        WF: tl.constexpr, BIDIR: tl.constexpr, REVERSE: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, FAST: tl.constexpr, SCATTER: tl.constexpr, PREFETCH: tl.constexpr):
    """Exact backward of one direction per program (grid axis 2 = direction).

    g_t = dLoss/dout_t * silu(z_t) (halved for two directions); adjoint H_t = g_t q_t + f_{t+1} H_{t+1}.
    Per window of CK steps (checkpoint from the forward), taken in reverse:
      1. sweep forward from the checkpoint: store each tile start to scratch; dq_t = sum_d g_t S_t and dz_t
         (direction 0) need only forward quantities, so they are produced here;
      2. tiles in reverse: recompute the TT pre-update states S_{t-1} in registers, then walk back carrying
         the adjoint: dx, ddt, dk (and the dbias, dD sums).
    Writes dx, ddt (dense, contiguous), dz, per-block partials of dk, dq [.., L, 2N] and of dbias, dD [.., 2, E].
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    dr = tl.program_id(2)
    nblk = tl.num_programs(0)
    offs_d = _channels(pid_d, BD, R, W)
    dmask = offs_d < E
    offs_n = tl.arange(0, N)
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
    if BIDIR:
        rev = dr
        gscale = 0.5
    elif REVERSE:
        rev = 1
        gscale = 1.0
    else:
        rev = 0
        gscale = 1.0
    g_b = g_ptr + b * sg_b + offs_d
    z_b = z_ptr + b * sz_b + offs_d
    ypre_b = ypre_ptr + b * L * E + offs_d
    dz_b = dz_ptr + b * L * E + offs_d
    rec_b = rec_ptr + ((dr * B + b) * (L + 2 * PADT) + PADT) * REC_W
    lane2 = tl.arange(0, 32) * (REC_W // 32)
    CKS = NBLKF * (N * BDF)
    ck_b = ck_ptr + (dr * B + b) * NCK * CKS
    if SCATTER:
        # per-warp partials [ndir, nblk * W, B, L, 2N]; lanes 0-15 of each warp write the 16 entries
        lane_j = tl.arange(0, 32 * W)[None, :]
        lane_v = lane_j % 32
        lane_n = lane_v % 16
        lane_st = lane_v < 16
        dkq_w = dkq_ptr + (((dr * nblk + pid_d) * W + lane_j // 32) * B + b) * L * (2 * N) + lane_n
    else:
        dkq_b = dkq_ptr + ((dr * nblk + pid_d) * B + b) * L * (2 * N) + offs_n
    NTILE: tl.constexpr = CK // TT
    scr_b = scr_ptr + ((dr * B + b) * nblk + pid_d) * (NTILE * N * BD)
    scr_off = _priv_off(offs_n, BD)
    # the forward wrote its checkpoints in its own blocks of BDF channels: invert its channel map
    cf = offs_d % BDF
    j = (cf % RF) * (32 * WF) + cf // RF
    ck_off = (offs_d // BDF) * (N * BDF) + offs_n[:, None] * BDF + ((j % 2) * (BDF // 2) + j // 2)[None, :]

    Wc = tl.zeros([N, BD], tl.float32)      # f_{s+1} * H_{s+1}, carried against the scan order
    acc_db = tl.zeros([BD], tl.float32)
    acc_dD = tl.zeros([BD], tl.float32)
    NW = (L + CK - 1) // CK
    for wi in range(NW):
        w = NW - 1 - wi
        s0 = w * CK
        S = tl.load(ck_b + (w - 1) * CKS + ck_off, mask=dmask[None, :] & (w > 0), other=0.0)
        ntile = (tl.minimum(CK, L - s0) + TT - 1) // TT
        # 1. sweep the window forward from its checkpoint; the per-channel inputs (HBM) two steps ahead
        t_a = s0 + rev * (L - 1 - 2 * s0)
        t_b = (s0 + 1) + rev * (L - 1 - 2 * (s0 + 1))
        x1 = _ld(x_b, t_a, sx_t, L, dmask)
        dt1 = _ld(dt_b, t_a, sdt_t, L, dmask)
        G1 = _ld(g_b, t_a, sg_t, L, dmask)
        x2 = _ld(x_b, t_b, sx_t, L, dmask)
        dt2 = _ld(dt_b, t_b, sdt_t, L, dmask)
        G2 = _ld(g_b, t_b, sg_t, L, dmask)
        if HAS_Z:
            z1 = _ld(z_b, t_a, sz_t, L, dmask)
            z2 = _ld(z_b, t_b, sz_t, L, dmask)
        for s in range(s0, s0 + ntile * TT):
            t = s + rev * (L - 1 - 2 * s)
            valid = (s < L)
            m = dmask & valid
            x = x1
            dt = dt1
            G = G1
            x1 = x2
            dt1 = dt2
            G1 = G2
            t2 = (s + 2) + rev * (L - 1 - 2 * (s + 2))
            x2 = _ld(x_b, t2, sx_t, L, dmask)
            dt2 = _ld(dt_b, t2, sdt_t, L, dmask)
            G2 = _ld(g_b, t2, sg_t, L, dmask)
            if HAS_Z:
                zz = z1
                z1 = z2
                z2 = _ld(z_b, t2, sz_t, L, dmask)
            k, q, km, kappa = _load_rec(rec_b, t, offs_n, N, REC_W, True)
            if PREFETCH:
                _prefetch(rec_b + t2 * REC_W + lane2, FAST)
                if HAS_Z:
                    if BIDIR:
                        _prefetch(ypre_b + tl.minimum(tl.maximum(t2, 0), L - 1) * E, FAST)
            if HAS_Z:
                if BIDIR:
                    y = tl.load(ypre_b + t * E, mask=m & (dr == 0), other=0.0).to(tl.float32)
            if (s - s0) % TT == 0:
                tl.store(scr_b + ((s - s0) // TT) * (N * BD) + scr_off, S)
            _, rden, eps = _coefs(dt, bias, kappa, FAST)
            S = _advance(S, x, eps, rden, k, km)
            if HAS_Z:
                sz = _sigmoid(zz, FAST)
                g = G * (zz * sz) * gscale
                if dr == 0:
                    if not BIDIR:
                        y = tl.sum(S * q[:, None], axis=0)
                        if HAS_D:
                            y += Dp * x
                    dz = G * y * sz * (1.0 + zz * (1.0 - sz))
                    tl.store(dz_b + t * E, dz.to(dz_ptr.dtype.element_ty), mask=m)
            else:
                g = G * gscale
            dq = _lane_sum16(g[None, :] * S, R, W, SCATTER)
            if SCATTER:
                tl.store(dkq_w + t * (2 * N) + N, dq, mask=lane_st & valid)
            else:
                tl.store(dkq_b + t * (2 * N) + N, dq, mask=valid)
        # 2. tiles in reverse: recompute the TT pre-update states in registers, then walk them backwards.
        #    The next tile's start state and per-channel inputs are loaded one tile ahead.
        jt = ntile - 1
        S_next = tl.load(scr_b + jt * (N * BD) + scr_off)
        px = ()
        pdt = ()
        pg = ()
        pz = ()
        for jj in tl.static_range(TT):
            sj = s0 + jt * TT + jj
            tj = sj + rev * (L - 1 - 2 * sj)
            px = px + (_ld(x_b, tj, sx_t, L, dmask),)
            pdt = pdt + (_ld(dt_b, tj, sdt_t, L, dmask),)
            pg = pg + (_ld(g_b, tj, sg_t, L, dmask),)
            if HAS_Z:
                pz = pz + (_ld(z_b, tj, sz_t, L, dmask),)
            else:
                pz = pz + (pg[jj],)
        for jti in range(ntile):
            jt = ntile - 1 - jti
            S = S_next
            X = px
            DT = pdt
            GG = pg
            ZZ = pz
            # prefetch tile jt - 1 (masked off below the window's first tile); its records into L1
            if PREFETCH:
                for jj in tl.static_range(TT):
                    sj = s0 + (jt - 1) * TT + jj
                    _prefetch(rec_b + (sj + rev * (L - 1 - 2 * sj)) * REC_W + lane2, FAST)
            S_next = tl.load(scr_b + (jt - 1) * (N * BD) + scr_off, mask=(jt > 0) & (offs_n[:, None] >= 0),
                             other=0.0)
            px = ()
            pdt = ()
            pg = ()
            pz = ()
            for jj in tl.static_range(TT):
                sj = s0 + (jt - 1) * TT + jj
                tj = sj + rev * (L - 1 - 2 * sj)
                px = px + (_ld(x_b, tj, sx_t, L, dmask),)
                pdt = pdt + (_ld(dt_b, tj, sdt_t, L, dmask),)
                pg = pg + (_ld(g_b, tj, sg_t, L, dmask),)
                if HAS_Z:
                    pz = pz + (_ld(z_b, tj, sz_t, L, dmask),)
                else:
                    pz = pz + (pg[jj],)
            states = (S,)
            for jj in tl.static_range(TT - 1):
                s = s0 + jt * TT + jj
                t = s + rev * (L - 1 - 2 * s)
                k, _, km, kappa = _load_rec(rec_b, t, offs_n, N, REC_W, False)
                _, rden, eps = _coefs(DT[jj], bias, kappa, FAST)
                S = _advance(S, X[jj], eps, rden, k, km)
                states = states + (S,)
            for jj in tl.static_range(TT - 1, -1, -1):
                s = s0 + jt * TT + jj
                valid = s < L
                m = dmask & valid
                t = s + rev * (L - 1 - 2 * s)
                x = X[jj]
                G = GG[jj]
                k, q, km, kappa = _load_rec(rec_b, t, offs_n, N, REC_W, True)
                omb, rden, eps = _coefs(DT[jj], bias, kappa, FAST)
                S_prev = states[jj]
                if HAS_Z:
                    zz = ZZ[jj]
                    g = G * (zz * _sigmoid(zz, FAST)) * gscale
                else:
                    g = G * gscale
                H = g[None, :] * q[:, None] + Wc
                Hk = H * k[:, None]
                v = x[None, :] - k[:, None] * S_prev                    # x - k S_{t-1}
                sum_hk = tl.sum(Hk, axis=0)
                deps = tl.sum(Hk * v, axis=0)
                eH = eps[None, :] * H
                dk = _lane_sum16(eH * (v - k[:, None] * S_prev), R, W, SCATTER)   # eps H (x - 2 k S_{t-1})
                dkap = tl.sum(deps * eps * eps, axis=0)                 # -sum_d dkappa
                if SCATTER:
                    kn = tl.load(rec_b + t * REC_W + lane_n)
                    tl.store(dkq_w + t * (2 * N), dk - 2.0 * dkap * kn, mask=lane_st & valid)
                else:
                    tl.store(dkq_b + t * (2 * N), dk - 2.0 * dkap * k, mask=valid)
                dx = eps * sum_hk
                if HAS_D:
                    dx += Dp * g
                    acc_dD += g * x
                ddt = deps * eps * omb * rden                     # deps / den^2 * beta (1 - beta)
                acc_db += ddt
                Wc = rden[None, :] * H + km[:, None] * eH               # f H, f = (1 + beta (kappa - k^2)) / den
                tl.store(dx_b + t * E, dx.to(dxa_ptr.dtype.element_ty), mask=m)
                tl.store(ddt_b + t * E, ddt.to(ddta_ptr.dtype.element_ty), mask=m)
    dpar_b = dpar_ptr + (dr * B + b) * 2 * E + offs_d
    tl.store(dpar_b, acc_db, mask=dmask)
    if HAS_D:
        tl.store(dpar_b + E, acc_dD, mask=dmask)
