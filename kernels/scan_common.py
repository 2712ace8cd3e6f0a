"""Shared pieces of the Longhorn scan kernels: fast math, the packed per-token record and its preparation, the
channel-to-lane mapping of a block, the coefficients of a step and the step itself, and guarded loads.

Layout (docs/kernel_design.md section 2): x, dt, z and the output are token-major (B, L, E) tensors taken by
stride (unit channel stride); each program owns one batch element and a block of channels and walks the tokens in
scan order: t = s for the `fwd` direction, t = L-1-s for the `rev` direction (no flips). A single-direction call
uses the `fwd` slot of every kernel, walked from the last token when REVERSE is set.

Per-token data shared by all channels (k, q, kappa and the exact decay complement kappa - k^2) are packed once per
call into an fp32 record (`_prep_kernel`), so every step loads them with a few aligned vector loads.
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
    records are needed in full by every thread right at the start of a step, and holding them in registers one
    step ahead would cost about 49 more per direction (docs/kernel_design.md section 3)."""
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
    layout through shared memory with a barrier on every store (docs/kernel_design.md section 3))."""
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
    tok = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)          # row of the padded [B, L + 2 PADT] record
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
def _prep_kernel(k_fwd_ptr, q_fwd_ptr, k_rev_ptr, q_rev_ptr, rec_ptr, sk_fwd_b, sk_fwd_t, sk_fwd_n,
                 sq_fwd_b, sq_fwd_t, sq_fwd_n,
                 sk_rev_b, sk_rev_t, sk_rev_n, sq_rev_b, sq_rev_t, sq_rev_n, L, NROW,
                 N: tl.constexpr, BT: tl.constexpr, REC_W: tl.constexpr, PADT: tl.constexpr):
    """rec[dir, b, PADT + t] = [k, q, kappa - k^2 (summed without cancellation), kappa] in fp32, zero pad rows;
    program_id(1) is the direction (fwd, rev), both packed by one launch."""
    if tl.program_id(1) == 0:
        _prep_rows(k_fwd_ptr, q_fwd_ptr, rec_ptr, sk_fwd_b, sk_fwd_t, sk_fwd_n, sq_fwd_b, sq_fwd_t, sq_fwd_n, L, NROW,
                   N, BT, REC_W, PADT)
    else:
        _prep_rows(k_rev_ptr, q_rev_ptr, rec_ptr + tl.cast(NROW, tl.int64) * REC_W, sk_rev_b, sk_rev_t, sk_rev_n,
                   sq_rev_b, sq_rev_t, sq_rev_n, L, NROW,
                   N, BT, REC_W, PADT)


@triton.jit
def _load_rec(rec_b, t, offs_n, N: tl.constexpr, REC_W: tl.constexpr):
    # rec_b points at token 0 of a padded sequence: rows -PAD .. L + PAD - 1 exist (zeros outside 0 .. L-1),
    # so the loads need no mask and a step on a padded row leaves the state unchanged (k = 0: f = 1, c = 0)
    # (issue order k, kappa - k^2, kappa, q: with q first ptxas kept far more registers live)
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
def _walk(dr, BIDIR: tl.constexpr, REVERSE: tl.constexpr):
    """(rev, gscale) of direction dr in the backward: 1 if it walks the tokens from the last, and the factor of
    the output gradient (two directions are averaged)."""
    if BIDIR:
        return dr, 0.5
    elif REVERSE:
        return 1, 1.0
    else:
        return 0, 1.0

