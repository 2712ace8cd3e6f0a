"""One launch of each kernel at the benchmark shape, for Nsight Compute (GPU only):

    ncu --clock-control none -k regex:'_scan|_conv' --launch-skip 6 --launch-count 6 \
        --section WarpStateStats --section SchedulerStats ... python benchmarks/profile_kernels.py [L]

Runs everything once untimed (compilation, warm-up), then once more: the second round is what to profile. Through
`vlonghorn.kernels.launch`, a round is 6 launches that the regex matches: conv forward, scan forward (saving), scan
backward (the reconstructing launch, then its exact fallback), conv backward and its weight-gradient sum (the
record packing, the reconstruction's bookkeeping and the gradient sums are other launches). B=128, E=768, N=16,
bf16; L defaults to 197.
"""
import argparse

import torch

from harness import conv_inputs, scan_inputs
from vlonghorn.kernels import launch

B = 128


def once(L):
    inp = scan_inputs(B, L)
    conv = conv_inputs(B, L)
    y_fwd, y_rev = launch.conv_forward(*conv)
    y, *saved = launch.scan_forward(*inp.forward_args(save=True))
    launch.scan_backward(*inp.backward_args(torch.randn_like(y), saved))
    launch.conv_backward(y_fwd, y_rev, *conv)
    torch.cuda.synchronize()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("L", nargs="?", type=int, default=197, help="sequence length")
    L = ap.parse_args().L
    once(L)
    once(L)
