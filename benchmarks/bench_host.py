"""Host time per call of the custom ops (GPU only): the Python and launch cost that decides small-batch speed.

    python benchmarks/bench_host.py [--out DIR] [--profile]

At a tiny shape (B=1, L=16, E=64: the GPU work is negligible) each op is called repeatedly without
synchronising, so the wall time per call is the host's: the torch.library op (dispatcher, custom-op wrapper, our
launcher) next to our launcher alone (`_*_impl`: tensor set-up and the Triton launches), and the public entry
points as a training step calls them (forward and backward through autograd). Prints the table and writes it to
host_<device>.md in --out (default benchmarks/results). --profile also prints where the launchers spend their
time (cProfile, the functions with the most time of their own).
"""
import argparse
import cProfile
import datetime
import os
import pstats
import time

import triton

import torch

from vlonghorn.kernels import interface as ops


def per_call_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    end = time.perf_counter()
    torch.cuda.synchronize()
    return (end - start) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--profile", action="store_true", help="cProfile each launcher and print its top functions")
    opt = ap.parse_args()
    B, L, E, N = 1, 16, 64, 16

    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    def p(*shape):
        return torch.randn(*shape, device="cuda")

    fwd = (t(B, L, E), t(B, L, E), t(B, L, N), t(B, L, N), p(E), p(E),
           t(B, L, E), t(B, L, E), t(B, L, N), t(B, L, N), p(E), p(E), t(B, L, E), False, True)
    y, ypre, ck, rec = ops.scan_fwd(*fwd)
    bwd = (torch.randn_like(y), fwd[0], fwd[1], fwd[4], fwd[5], fwd[6], fwd[7], fwd[10], fwd[11], fwd[12], ypre, ck,
           rec, False, torch.bfloat16, torch.bfloat16, N)
    x, w = t(B, L, E), [p(E, 4), p(E)] * 2
    xf, xb = ops.conv_fwd(x, *w)
    cbwd = (torch.randn_like(xf), torch.randn_like(xb), x, *w)
    dev = torch.cuda.get_device_name()
    lines = [f"# Host time per call of the custom ops ({dev})", "",
             f"torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}; B=1, L=16, E=64, N=16, bf16; microseconds per "
             "call, no synchronisation between calls (`benchmarks/bench_host.py`).", "",
             "| op | torch.library op | launcher alone |", "|---|---|---|"]
    for name, op, impl, args in (("scan_fwd (training: saves)", ops.scan_fwd, ops._scan_fwd_impl, fwd),
                                 ("scan_bwd", ops.scan_bwd, ops._scan_bwd_impl, bwd),
                                 ("conv1d_silu_fwd", ops.conv_fwd, ops._conv_fwd_impl, (x, *w)),
                                 ("conv1d_silu_bwd", ops.conv_bwd, ops._conv_bwd_impl, cbwd)):
        lines.append(f"| {name} | {per_call_us(lambda: op(*args)):.0f} | {per_call_us(lambda: impl(*args)):.0f} |")
    lines.append(f"| torch.empty (for scale) | {per_call_us(lambda: torch.empty(4, device='cuda')):.0f} | |")

    # the public entry points with autograd, forward + backward, as the model's training step runs them
    scan_in = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in fwd[:13]]
    sargs = [scan_in[i] for i in (0, 6, 1, 7, 2, 3, 8, 9, 4, 10, 5, 11, 12)]
    conv_in = [a.clone().requires_grad_() for a in (x, *w)]

    def scan_step():
        ops.bidirectional_longhorn_scan_triton(*sargs).sum().backward()

    def conv_step():
        yf, yb = ops.bidirectional_conv1d_silu_triton(*conv_in)
        (yf.sum() + yb.sum()).backward()

    def loss_only():
        scan_in[0].sum().backward()

    lines += ["", "| forward + backward through autograd | us per call |", "|---|---|",
              f"| bidirectional_longhorn_scan_triton | {per_call_us(scan_step):.0f} |",
              f"| bidirectional_conv1d_silu_triton | {per_call_us(conv_step):.0f} |",
              f"| x.sum().backward() (for scale) | {per_call_us(loss_only):.0f} |"]
    md = "\n".join(lines) + "\n"
    print(md)
    os.makedirs(opt.out, exist_ok=True)
    with open(os.path.join(opt.out, f"host_{dev.replace(' ', '_').replace('/', '_')}.md"), "w") as fh:
        fh.write(md)
    if opt.profile:
        for name, fn in (("scan_fwd launcher", lambda: ops._scan_fwd_impl(*fwd)),
                         ("scan_bwd launcher", lambda: ops._scan_bwd_impl(*bwd)),
                         ("scan forward + backward through autograd", scan_step),
                         ("conv forward + backward through autograd", conv_step)):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            print(f"## {name}: 200 calls")
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
