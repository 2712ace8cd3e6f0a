"""Time variants of the scan kernels' launch configuration side by side (GPU only), one compile each:

    python benchmarks/tune_kernels.py '{}' '{"forward_prefetch": false}' '{"checkpoint_every": 32}' [--L 197]
                                      [--B 128] [--forward-only] [--json OUT.json]

Each argument is a JSON dict of overrides of vlonghorn.kernels.CONFIG, applied on top of its values at start (an
unknown key is an error). For each variant: the inference forward, the training forward (checkpoints, y_pre) and
the backward alone (unless --forward-only), at B=128 (or --B), E=768, N=16, bf16 (the benchmarks' inputs), and the
largest difference of every output and gradient to the first variant's (a variant must compute the same thing;
only rounding may differ). The figures to report come from bench_kernels.py; this is the quick A/B loop.
"""
import argparse
import json

import torch

from harness import environment, kernel_time_us, scan_inputs
from vlonghorn import ops
from vlonghorn.kernels import CONFIG, launch


def run_variant(L, overrides, B=128, forward_only=False):
    with CONFIG.override(**overrides):
        inp = scan_inputs(B, L)
        a = inp.op_args()
        res = {}
        with torch.no_grad():
            y_inf = ops.bidirectional_longhorn_scan(*a, backend="triton")
            res["forward_us"] = kernel_time_us(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
            if forward_only:
                return res, [y_inf.float()]
            forward = inp.forward_args(save=True)
            y, *saved = launch.scan_forward(*forward)
            res["forward_saving_us"] = kernel_time_us(lambda: launch.scan_forward(*forward))
            g = torch.randn(y.shape, device=y.device, generator=torch.Generator(device="cuda").manual_seed(1))
            backward = inp.backward_args(g.to(y.dtype), saved)
            grads = launch.scan_backward(*backward)
            res["backward_us"] = kernel_time_us(lambda: launch.scan_backward(*backward))
    res["forward_saving+backward_us"] = res["forward_saving_us"] + res["backward_us"]
    outs = [y_inf, y] + [t for t in grads if t.numel()]
    return res, [t.float() for t in outs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="JSON dicts of CONFIG overrides; the first is the reference")
    ap.add_argument("--L", type=int, default=197)
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--forward-only", "--fwd-only", action="store_true", help="time only the inference forward")
    ap.add_argument("--json", default=None, help="also write the results here")
    opt = ap.parse_args()
    variants = [json.loads(v) for v in opt.variants]
    # warm-up: the first timed variant ran slow otherwise
    run_variant(opt.L, variants[0], opt.B, opt.forward_only)
    table, ref = [], None
    for over in variants:
        try:
            res, outs = run_variant(opt.L, over, opt.B, opt.forward_only)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            res, outs = {"error": f"{type(e).__name__}: {e}"[:300]}, None
        if outs is not None:
            if ref is None:
                ref = outs
            res["max_rel_diff_vs_first"] = max(
                ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for o, r in zip(outs, ref))
        table.append({"variant": over, **res})
        print(json.dumps(table[-1]), flush=True)
    meta = environment(shape={"B": opt.B, "L": opt.L, "E": 768, "N": 16, "dtype": "bfloat16"})
    print(f"\nL={opt.L}, B={opt.B}, E=768, N=16, bf16, {meta['device']}")
    print(f"{'variant':40s} {'forward':>9s} {'forward (saving)':>17s} {'backward':>9s} {'saving+backward':>16s} "
          f"{'diff':>8s}")
    for r in table:
        if "error" in r:
            print(f"{json.dumps(r['variant']):40s} {r['error']}")
        elif opt.forward_only:
            print(f"{json.dumps(r['variant']):40s} {r['forward_us']:9.1f} {'':>17s} {'':>9s} {'':>16s} "
                  f"{r['max_rel_diff_vs_first']:8.1e}")
        else:
            print(f"{json.dumps(r['variant']):40s} {r['forward_us']:9.1f} {r['forward_saving_us']:17.1f} "
                  f"{r['backward_us']:9.1f} {r['forward_saving+backward_us']:16.1f} "
                  f"{r['max_rel_diff_vs_first']:8.1e}")
    if opt.json:
        with open(opt.json, "w") as fh:
            json.dump({"meta": meta, "results": table}, fh, indent=1)


if __name__ == "__main__":
    main()
