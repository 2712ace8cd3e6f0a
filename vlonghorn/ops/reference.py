"""Float64 sequential reference of the Longhorn scan: the truth that every backend is tested against.

Slow on purpose (a Python loop over tokens, autograd through it); use it only in tests.
"""
import torch
import torch.nn.functional as F

__all__ = ["longhorn_scan_ref", "bidirectional_conv1d_silu_ref"]


def longhorn_scan_ref(x, dt, k, q, dt_bias, D=None, z=None, reverse=False):
    """One direction of the Longhorn recurrence (longhorn.md section 1), computed step by step in float64.

    x, dt, z: (B, L, E); k, q: (B, L, N); dt_bias, D: (E,). Returns y (B, L, E) in float64.
    Differentiable through autograd in every tensor argument.
    """
    x, dt, k, q, dt_bias = (t.double() for t in (x, dt, k, q, dt_bias))
    batch, length, channels = x.shape
    state = x.new_zeros(batch, channels, k.shape[-1])
    steps = range(length - 1, -1, -1) if reverse else range(length)
    ys = [None] * length
    for t in steps:
        beta = torch.sigmoid(dt[:, t] + dt_bias)                      # (B, E)
        kappa = (k[:, t] ** 2).sum(-1, keepdim=True)                   # (B, 1)
        eps = beta / (1 + beta * kappa)                                # (B, E)
        decay = 1 - eps[:, :, None] * k[:, t, None, :] ** 2            # (B, E, N)
        state = decay * state + (eps * x[:, t])[:, :, None] * k[:, t, None, :]
        ys[t] = (state * q[:, t, None, :]).sum(-1)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.double() * x
    if z is not None:
        y = y * F.silu(z.double())
    return y


def bidirectional_conv1d_silu_ref(x, weight_fwd, bias_fwd, weight_rev, bias_rev):
    """Depthwise conv1d (kernel W) + SiLU in both scan directions, in float64.

    x: (B, L, E); weight_*: (E, W); bias_*: (E,) or None. The forward output is causal
    (out[t] sees x[t-W+1..t]); the rev output is what a causal conv gives on the time-reversed
    sequence, reversed back (out[t] sees x[t..t+W-1], taps in reverse order).
    """
    x = x.double()
    width = weight_fwd.shape[-1]
    xt = x.transpose(1, 2)
    xr = xt.flip(-1)
    out = []
    for inp, weight, bias in ((xt, weight_fwd, bias_fwd), (xr, weight_rev, bias_rev)):
        w = weight.double()[:, None, :]
        b = None if bias is None else bias.double()
        out.append(F.conv1d(F.pad(inp, (width - 1, 0)), w, b, groups=x.shape[-1]))
    y_fwd = F.silu(out[0]).transpose(1, 2)
    y_rev = F.silu(out[1].flip(-1)).transpose(1, 2)
    return y_fwd, y_rev
