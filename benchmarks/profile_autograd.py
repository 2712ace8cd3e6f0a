"""Where the time of one autograd forward+backward of the conv and of the scan goes (GPU only): torch.profiler
tables of the CUDA kernels and the host-side ops, at the benchmark shape (B=128, L=197, E=768, bf16).

    python benchmarks/profile_autograd.py

Used to tell kernel time from host overhead: e.g. bench_kernels.py's "conv forward+backward" (about 0.97 ms per
call) is host-bound at this size; its kernels take 0.21 ms of GPU time.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from harness import E_SMALL as E, conv_inputs, scan_inputs
from vlonghorn import ops

B, L = 128, 197


def main():
    conv_in = conv_inputs(B, L, E, requires_grad=True)
    gy = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)

    def conv():
        with torch.autocast("cuda", torch.bfloat16):
            y_fwd, y_rev = ops.bidirectional_conv1d_silu(*conv_in, backend="triton")
        return torch.autograd.grad((y_fwd, y_rev), conv_in, (gy, gy))

    scan_in = scan_inputs(B, L, E, requires_grad=True)
    g = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)

    def scan():
        y = ops.bidirectional_longhorn_scan(*scan_in.op_args(), backend="triton")
        return torch.autograd.grad(y, scan_in.leaves, g)

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
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
