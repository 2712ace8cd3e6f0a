"""Host time per call of the custom ops (GPU only): the Python and launch cost that decides small-batch speed.

    python benchmarks/bench_host.py [--out DIR] [--tag TAG] [--profile]

At a tiny shape (B=1, L=16, E=64: the GPU work is negligible) each op is called repeatedly without
synchronising, so the wall time per call is the host's: the torch.library op (dispatcher, custom-op wrapper, our
launcher) next to our launcher alone (`vlonghorn.kernels.launch`: tensor set-up and the Triton launches), and the
entry points as a training step calls them (forward and backward through autograd). Prints the tables and writes
host_<device>_<date>[_<tag>].{json,md} into --out (default benchmarks/results). --profile also prints where the
launchers spend their time (cProfile, the functions with the most time of their own).
"""
import argparse
import cProfile
import pstats

import torch

from harness import RESULTS, conv_inputs, env_line, environment, md_table, scan_inputs, wall_time, write_result
from vlonghorn import kernels
from vlonghorn.kernels import custom_ops, launch

B, L, E, N = 1, 16, 64, 16


def host_us(fn):
    return wall_time(fn, n=300, warmup=20, sync=False) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--profile", action="store_true", help="cProfile each launcher and print its top functions")
    opt = ap.parse_args()
    inp = scan_inputs(B, L, E, N)
    layout = launch.forward_layout()
    forward = inp.forward_args(save=True)
    y, *saved = launch.scan_forward(*forward, layout)
    backward = (*inp.backward_args(torch.randn_like(y), saved), layout)
    conv = conv_inputs(B, L, E)
    y_fwd, y_rev = launch.conv_forward(*conv)
    conv_backward = (torch.randn_like(y_fwd), torch.randn_like(y_rev), *conv)

    ops = [("scan_forward (training: saves)", custom_ops.scan_forward, launch.scan_forward, (*forward, layout)),
           ("scan_backward", custom_ops.scan_backward, launch.scan_backward, backward),
           ("conv_forward", custom_ops.conv_forward, launch.conv_forward, conv),
           ("conv_backward", custom_ops.conv_backward, launch.conv_backward, conv_backward)]
    rows = {name: {"torch.library op": host_us(lambda: op(*args)), "launcher": host_us(lambda: impl(*args))}
            for name, op, impl, args in ops}
    rows["torch.empty (for scale)"] = {"torch.library op": host_us(lambda: torch.empty(4, device="cuda"))}

    # the entry points with autograd, forward + backward, as the model's training step runs them
    scan_in = scan_inputs(B, L, E, N, requires_grad=True)
    conv_in = conv_inputs(B, L, E, requires_grad=True)

    def scan_step():
        kernels.bidirectional_longhorn_scan(*scan_in.op_args()).sum().backward()

    def conv_step():
        yf, yr = kernels.bidirectional_conv1d_silu(*conv_in)
        (yf.sum() + yr.sum()).backward()

    def loss_only():
        scan_in.x_fwd.sum().backward()

    steps = {"bidirectional_longhorn_scan": host_us(scan_step), "bidirectional_conv1d_silu": host_us(conv_step),
             "x.sum().backward() (for scale)": host_us(loss_only)}

    meta = environment(shape={"B": B, "L": L, "E": E, "N": N, "dtype": "bfloat16"})
    lines = ["# Host time per call of the custom ops", "",
             f"{env_line(meta)}; B={B}, L={L}, E={E}, N={N}, bf16; microseconds per call, no synchronisation between "
             "calls (`benchmarks/bench_host.py`).", ""]
    lines += md_table(["op", "torch.library op", "launcher alone"],
                      [[name, f"{r['torch.library op']:.0f}", f"{r['launcher']:.0f}" if "launcher" in r else ""]
                       for name, r in rows.items()])
    lines += [""] + md_table(["forward + backward through autograd (vlonghorn.kernels)", "us per call"],
                             [[name, f"{us:.0f}"] for name, us in steps.items()])
    md = "\n".join(lines) + "\n"
    stem = write_result("host", meta, {"ops_us": rows, "autograd_us": steps}, md, opt.tag, opt.out)
    print(md + f"\nwritten: {stem}.{{json,md}}")
    if opt.profile:
        for name, fn in (("scan_forward launcher", lambda: launch.scan_forward(*forward, layout)),
                         ("scan_backward launcher", lambda: launch.scan_backward(*backward)),
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
