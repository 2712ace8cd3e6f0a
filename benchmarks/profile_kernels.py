"""One launch of each kernel at the benchmark shape, for Nsight Compute (GPU only):

    ncu --clock-control none -k regex:'_scan|_conv' --launch-skip 5 --launch-count 5 \
        --section WarpStateStats --section SchedulerStats ... python benchmarks/profile_kernels.py

Runs everything once untimed (compilation, warm-up), then once more: the second round is what to profile
(5 launches: conv fwd, scan prep, scan fwd (saving), scan bwd, conv bwd).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import E, N, scan_inputs  # noqa: E402
from vlonghorn.kernels.interface import conv_bwd, conv_fwd, scan_bwd, scan_fwd  # noqa: E402


def once(L):
    args, z = scan_inputs(L)
    f, b = args["fwd"], args["bwd"]
    x = torch.randn(f["x"].shape[0], L, E, device="cuda", dtype=torch.bfloat16)
    w = [torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda"),
         torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda")]
    yf, yb = conv_fwd(x, *w)
    y, ypre, ck, rec = scan_fwd(f["x"], f["dt"], f["k"], f["q"], f["dt_bias"], f["D"], b["x"], b["dt"], b["k"],
                                b["q"], b["dt_bias"], b["D"], z, False, True)
    g = torch.randn_like(y)
    scan_bwd(g, f["x"], f["dt"], f["dt_bias"], f["D"], b["x"], b["dt"], b["dt_bias"], b["D"], z, ypre, ck, rec,
             False, f["k"].dtype, f["q"].dtype, N)
    conv_bwd(yf, yb, x, *w)
    torch.cuda.synchronize()


if __name__ == "__main__":
    L = int(sys.argv[1]) if len(sys.argv) > 1 else 197
    once(L)
    once(L)
