"""Where the time of one autograd forward+backward of the conv and of the scan goes (GPU only): torch.profiler
tables of the CUDA kernels and the host-side ops, at the benchmark shape (B=128, L=197, E=768, bf16).

    python benchmarks/profile_autograd.py

Used to tell kernel time from host overhead: e.g. bench_kernels.py's "conv fwd+bwd" (about 0.97 ms per call)
is host-bound at this size; its kernels take 0.21 ms of GPU time.
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
from vlonghorn import ops  # noqa: E402


def main():
    B, L, E = bk.B, 197, bk.E
    x = torch.randn(B, L, 2 * E, device="cuda", dtype=torch.bfloat16)[..., :E]
    w = [torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda"),
         torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda")]
    xg = x.detach().clone().requires_grad_()
    wg = [p.clone().requires_grad_() for p in w]
    gy = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)

    def conv():
        with torch.autocast("cuda", torch.bfloat16):
            yf, yb = ops.bidirectional_conv1d_silu(xg, *wg, backend="triton")
        return torch.autograd.grad((yf, yb), [xg] + wg, (gy, gy))

    args, z = bk.scan_inputs(L)
    ga, gz, leaves = bk.with_grad(args, z)
    ag = bk.bidir_args(ga, gz)
    g = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)

    def scan():
        y = ops.bidirectional_longhorn_scan(*ag, backend="triton")
        return torch.autograd.grad(y, leaves, g)

    for fn in (conv, scan):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"===== {fn.__name__}: forward + backward, 5 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
