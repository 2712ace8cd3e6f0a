"""Triton kernels of the fused residual add + RMSNorm, forward and backward (docs/kernel_design.md section 12).

Rows of width D, indexed m = b * L + t and taken by two strides (b, t) with unit stride along D. Forward, per row:
    r = x + delta                     (fp32; stored, in r's dtype, only when there is a delta)
    rstd = 1 / sqrt(mean(r^2) + eps)  (fp32, stored: one value per row)
    y = r * rstd * w                  (stored once, in the dtype the next layer reads)
Backward, with g = dy * w and n = r * rstd:
    dr = rstd * (g - n * mean(g * n)) + dres     (dres: the gradient reaching r from its other uses)
    dx = dr, ddelta = dr (each in its input's dtype), dw = sum over rows of dy * n
A backward program walks a contiguous range of rows and writes its own dw partial row (summed afterwards in a
fixed order: deterministic, and no reduction over all rows of a (rows, D) product).
"""
import triton
import triton.language as tl


@triton.jit
def _row_offsets(rows, L, s_b, s_t):
    """Element offsets of rows m = b * L + t (int64: rows x strides pass 2^31 at large batches)."""
    rows = rows.to(tl.int64)
    b = rows // L
    return b * s_b + (rows - b * L) * s_t


@triton.jit
def _norm_forward_kernel(x_ptr, delta_ptr, w_ptr, r_ptr, y_ptr, rstd_ptr,
                         sx_b, sx_t, sd_b, sd_t, M, L, D, eps,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DELTA: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r = tl.load(x_ptr + _row_offsets(rows, L, sx_b, sx_t)[:, None] + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    dense = rows.to(tl.int64)[:, None] * D + cols[None, :]
    if HAS_DELTA:
        d = tl.load(delta_ptr + _row_offsets(rows, L, sd_b, sd_t)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        r_out = (r + d).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + dense, r_out, mask=mask)
        # the norm reads r as stored (a no-op for an fp32 stream; a bf16 stream is rounded first, as unfused)
        r = r_out.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(r * r, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    y = r * rstd[:, None] * w[None, :]
    tl.store(y_ptr + dense, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(dy_ptr, dres_ptr, r_ptr, rstd_ptr, w_ptr, dx_ptr, ddelta_ptr, dw_ptr,
                          sdy_b, sdy_t, sres_b, sres_t, sr_b, sr_t, M, L, D, ROWS_PER_PROG,
                          ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DRES: tl.constexpr,
                          HAS_DDELTA: tl.constexpr):
    """Rows [pid * ROWS_PER_PROG, +ROWS_PER_PROG) in blocks of ROWS; dw partial row pid of dw [programs, D]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    start = pid * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, M)
    dw = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        dy = tl.load(dy_ptr + _row_offsets(rows, L, sdy_b, sdy_t)[:, None] + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        r = tl.load(r_ptr + _row_offsets(rows, L, sr_b, sr_t)[:, None] + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        n = r * rstd[:, None]
        dw += dy * n
        g = dy * w[None, :]
        c = tl.sum(g * n, axis=1) / D
        dr = (g - n * c[:, None]) * rstd[:, None]
        if HAS_DRES:
            dr += tl.load(dres_ptr + _row_offsets(rows, L, sres_b, sres_t)[:, None] + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        dense = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(dx_ptr + dense, dr.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DDELTA:
            tl.store(ddelta_ptr + dense, dr.to(ddelta_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid.to(tl.int64) * D + cols, tl.sum(dw, axis=0), mask=cmask)
