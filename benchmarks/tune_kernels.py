"""Time variants of the scan kernels' launch configuration side by side (GPU only), one compile each:

    python benchmarks/tune_kernels.py '{}' '{"fwd_prefetch": false}' '{"ck": 32}' [--L 197] [--B 128] [--fwd-only]
                                      [--json OUT.json]

Each argument is a JSON dict of overrides of kernels.interface.CONFIG, applied on top of the defaults. For
each variant: the inference forward, the training forward (checkpoints, y_pre) and the backward op alone (unless
--fwd-only), at B=128 (or --B), E=768, N=16, bf16 (bench_kernels.py's inputs), and the largest difference of
every output and gradient to the first variant's (a variant must compute the same thing; only rounding may
differ). The figures to report come from bench_kernels.py; this is the quick A/B loop.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import N, bench, bidir_args, scan_inputs  # noqa: E402
from vlonghorn import ops  # noqa: E402
from vlonghorn.kernels import CONFIG  # noqa: E402
from vlonghorn.kernels.interface import scan_bwd, scan_fwd  # noqa: E402


def run_variant(L, overrides, base, B=128, fwd_only=False):
    CONFIG.clear()
    CONFIG.update(base)
    CONFIG.update(overrides)
    args, z = scan_inputs(L, B=B)
    f, b = args["fwd"], args["bwd"]
    a = bidir_args(args, z)
    fwd_args = (f["x"], f["dt"], f["k"], f["q"], f["dt_bias"], f["D"], b["x"], b["dt"], b["k"], b["q"],
                b["dt_bias"], b["D"], z, False, True)
    res = {}
    with torch.no_grad():
        y_inf = ops.bidirectional_longhorn_scan(*a, backend="triton")
        res["fwd_us"] = bench(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
    if fwd_only:
        return res, [y_inf.float()]
    y, ypre, ck, rec = scan_fwd(*fwd_args)
    res["fwd_saving_us"] = bench(lambda: scan_fwd(*fwd_args))
    g = torch.randn(y.shape, device=y.device, generator=torch.Generator(device="cuda").manual_seed(1)).to(y.dtype)
    bwd_args = (g, f["x"], f["dt"], f["dt_bias"], f["D"], b["x"], b["dt"], b["dt_bias"], b["D"], z, ypre, ck, rec,
                False, f["k"].dtype, f["q"].dtype, N)
    grads = scan_bwd(*bwd_args)
    res["bwd_us"] = bench(lambda: scan_bwd(*bwd_args))
    res["fwd_saving+bwd_us"] = res["fwd_saving_us"] + res["bwd_us"]
    outs = [y_inf, y] + [t for t in grads if t.numel()]
    return res, [t.float() for t in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help="JSON dicts of CONFIG overrides; the first is the reference")
    ap.add_argument("--L", type=int, default=197)
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--fwd-only", action="store_true", help="time only the inference forward")
    ap.add_argument("--json", default=None, help="also write the results here")
    opt = ap.parse_args()
    base = dict(CONFIG)
    # warm-up: the first timed variant ran slow otherwise
    run_variant(opt.L, json.loads(opt.variants[0]), base, opt.B, opt.fwd_only)
    table, ref = [], None
    for v in opt.variants:
        over = json.loads(v)
        try:
            res, outs = run_variant(opt.L, over, base, opt.B, opt.fwd_only)
        except Exception as e:  # a variant that does not compile is reported, not fatal
            res, outs = {"error": f"{type(e).__name__}: {e}"[:300]}, None
        if outs is not None:
            if ref is None:
                ref = outs
            res["max_rel_diff_vs_first"] = max(
                ((o - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for o, r in zip(outs, ref))
        table.append({"variant": over, **res})
        print(json.dumps(table[-1]), flush=True)
    print(f"\nL={opt.L}, B={opt.B}, E=768, N=16, bf16, {torch.cuda.get_device_name()}")
    print(f"{'variant':40s} {'fwd':>8s} {'fwd(save)':>10s} {'bwd':>8s} {'save+bwd':>9s} {'diff':>8s}")
    for r in table:
        if "error" in r:
            print(f"{json.dumps(r['variant']):40s} {r['error']}")
        elif opt.fwd_only:
            print(f"{json.dumps(r['variant']):40s} {r['fwd_us']:8.1f} {'':>10s} {'':>8s} {'':>9s} "
                  f"{r['max_rel_diff_vs_first']:8.1e}")
        else:
            print(f"{json.dumps(r['variant']):40s} {r['fwd_us']:8.1f} {r['fwd_saving_us']:10.1f} {r['bwd_us']:8.1f} "
                  f"{r['fwd_saving+bwd_us']:9.1f} {r['max_rel_diff_vs_first']:8.1e}")
    if opt.json:
        with open(opt.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "L": opt.L, "B": opt.B, "torch": torch.__version__,
                       "results": table}, fh, indent=1)


if __name__ == "__main__":
    main()
