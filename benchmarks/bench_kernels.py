"""Time the Triton kernels against their floors and against the PyTorch path, in one process on one GPU.

    python benchmarks/bench_kernels.py [--out DIR] [--lengths 197 4097] [--sweep]

Shapes: B=128, E=768 (d_inner of vlonghorn_small), N=16, both scan directions, bf16 inputs. For each kernel
and L it prints the median time (triton.testing.do_bench, L2 flushed between runs), the floor from
kernels.md section 4 (max of bytes / measured copy bandwidth and fp32 instructions / measured FMA issue rate,
both measured in this run), the ratio to the floor, the target where one exists, and the PyTorch path. Then,
at small batch and long sequences (SMALL_BATCH), the chunked forward and segmented backward that the launcher
chooses there against the sequential kernels. Writes kernels_<device>.json and kernels_<device>.md into --out
(default benchmarks/results).
"""
import argparse
import datetime
import json
import os
import platform

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


from vlonghorn import ops  # noqa: E402
from vlonghorn.kernels import CONFIG  # noqa: E402
from vlonghorn.kernels.interface import conv_bwd, conv_fwd, scan_bwd, scan_fwd  # noqa: E402
from vlonghorn.ops.reference import longhorn_scan_ref  # noqa: E402

B, E, N, R_LOW = 128, 768, 16, 24
TARGETS_US = {("scan fwd", 197): 150.0, ("scan fwd+bwd", 197): 700.0}
# fp32 instructions per (b, t, channel, state) element and direction (kernels.md section 4)
INSTR_FWD, INSTR_BWD = 4, 16


# ------------------------------------------------------------------------------------------- ceilings
def copy_bandwidth():
    x = torch.empty(2 ** 28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


@triton.jit
def _fma_kernel(out_ptr, n_iter, a, b):
    i = tl.program_id(0) * 128 + tl.arange(0, 128)
    x0 = i.to(tl.float32)
    x1 = x0 + 1.0
    x2 = x0 + 2.0
    x3 = x0 + 3.0
    x4 = x0 + 4.0
    x5 = x0 + 5.0
    x6 = x0 + 6.0
    x7 = x0 + 7.0
    for _ in range(n_iter):
        x0 = x0 * a + b
        x1 = x1 * a + b
        x2 = x2 * a + b
        x3 = x3 * a + b
        x4 = x4 * a + b
        x5 = x5 * a + b
        x6 = x6 * a + b
        x7 = x7 * a + b
    tl.store(out_ptr + i, x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7)


def fma_issue_rate():
    """Thread-level FFMA instructions per second (8 independent chains, 4 warps per program)."""
    progs, n_iter = 132 * 64, 4096
    out = torch.empty(progs * 128, device="cuda")
    ms = do_bench(lambda: _fma_kernel[(progs,)](out, n_iter, 0.999, 0.001, num_warps=4), warmup=20, rep=200,
                  return_mode="median")
    return progs * 128 * 8 * n_iter / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------- inputs
def scan_inputs(L, dtype=torch.bfloat16, seed=0, B=B):
    """Both directions' inputs with the model's layouts: x_f/x_b dense (conv outputs), z a strided half of
    in_proj's output, dt dense (dt_proj output), k/q strided slices of x_proj's output."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dtype)

    xz = rnd(B, L, 2 * E)
    z = xz[..., E:]
    args = {}
    for d in ("fwd", "bwd"):
        dbl = rnd(B, L, R_LOW + 2 * N, scale=0.5)
        args[d] = dict(x=rnd(B, L, E), dt=rnd(B, L, E, shift=-2.0), k=dbl[..., R_LOW:R_LOW + N],
                       q=dbl[..., R_LOW + N:], dt_bias=torch.randn(E, device="cuda", generator=g) * 0.5,
                       D=torch.randn(E, device="cuda", generator=g))
    return args, z


def bidir_args(args, z):
    f, b = args["fwd"], args["bwd"]
    return (f["x"], b["x"], f["dt"], b["dt"], f["k"], f["q"], b["k"], b["q"], f["dt_bias"], b["dt_bias"],
            f["D"], b["D"], z)


def leaves_of(args, z):
    out = [z]
    for d in ("fwd", "bwd"):
        out += [args[d][n] for n in ("x", "dt", "k", "q", "dt_bias", "D")]
    return out


def with_grad(args, z):
    """Leaf copies that require grad (k, q stay strided slices of a leaf x_dbl)."""
    new = {}
    for d in ("fwd", "bwd"):
        a = args[d]
        dbl = torch.cat([torch.zeros_like(a["k"][..., :1]).expand(-1, -1, R_LOW), a["k"], a["q"]], -1)
        dbl = dbl.detach().requires_grad_()
        new[d] = dict(x=a["x"].detach().clone().requires_grad_(), dt=a["dt"].detach().clone().requires_grad_(),
                      k=dbl[..., R_LOW:R_LOW + N], q=dbl[..., R_LOW + N:],
                      dt_bias=a["dt_bias"].clone().requires_grad_(), D=a["D"].clone().requires_grad_())
        new[d]["_dbl"] = dbl
    xz = torch.cat([torch.zeros_like(z), z], -1).detach().requires_grad_()
    return new, xz[..., E:], [xz] + [new[d][n] for d in ("fwd", "bwd") for n in ("x", "dt", "_dbl", "dt_bias", "D")]


# ------------------------------------------------------------------------------------------------ timing
def bench(fn, rep_ms=200):
    return do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, return_mode="median") * 1e3  # us


def floors(L, bw, issue, batch=B):
    ble, bln = batch * L * E, batch * L * N
    elems = 2 * ble * N
    f_bytes = 12 * ble + 8 * bln
    b_bytes = 24 * ble + 24 * bln
    res = {
        "scan fwd": (f_bytes / bw, INSTR_FWD * elems / issue, f_bytes),
        "scan bwd": (b_bytes / bw, INSTR_BWD * elems / issue, b_bytes),
        "conv fwd": (6 * ble / bw, 0.0, 6 * ble),
        "conv fwd+bwd": (14 * ble / bw, 0.0, 14 * ble),
    }
    res["scan fwd+bwd"] = tuple(a + b for a, b in zip(res["scan fwd"], res["scan bwd"]))
    return {k: {"mem_us": v[0] * 1e6, "instr_us": v[1] * 1e6, "floor_us": max(v[0], v[1]) * 1e6, "bytes": v[2]}
            for k, v in res.items()}


def time_scan(L, torch_path=True):
    args, z = scan_inputs(L)
    a = bidir_args(args, z)
    out = {}
    with torch.no_grad():
        out["scan fwd"] = bench(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
    # training forward (saves checkpoints and y_pre) and the backward op alone, on saved tensors
    f, b = args["fwd"], args["bwd"]
    fwd_args = (f["x"], f["dt"], f["k"], f["q"], f["dt_bias"], f["D"], b["x"], b["dt"], b["k"], b["q"],
                b["dt_bias"], b["D"], z, False, True)
    out["scan fwd (saving)"] = bench(lambda: scan_fwd(*fwd_args))
    y, ypre, ck, rec = scan_fwd(*fwd_args)
    g = torch.randn_like(y)
    bwd_args = (g, f["x"], f["dt"], f["dt_bias"], f["D"], b["x"], b["dt"], b["dt_bias"], b["D"], z, ypre, ck,
                rec, False, f["k"].dtype, f["q"].dtype, N)
    out["scan bwd"] = bench(lambda: scan_bwd(*bwd_args))
    ga, gz, leaves = with_grad(args, z)
    ag = bidir_args(ga, gz)

    def fwd_bwd(backend):
        yy = ops.bidirectional_longhorn_scan(*ag, backend=backend)
        return torch.autograd.grad(yy, leaves, g)

    out["scan fwd+bwd"] = bench(lambda: fwd_bwd("triton"))
    if torch_path:
        with torch.no_grad():
            out["torch: scan fwd"] = bench(lambda: ops.bidirectional_longhorn_scan(*a, backend="torch"), 100)
        out["torch: scan fwd+bwd"] = bench(lambda: fwd_bwd("torch"), 100)
    del args, a, ga, ag, leaves, y, ypre, ck, rec
    return out


def time_conv(L, torch_path=True):
    x = torch.randn(B, L, 2 * E, device="cuda", dtype=torch.bfloat16)[..., :E]
    w = [torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda"),
         torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda")]
    out = {}
    # both paths under bf16 autocast, as in the model (the PyTorch conv needs one dtype for x and weights)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        out["conv fwd"] = bench(lambda: conv_fwd(x, *w))
    xg = x.detach().clone().requires_grad_()
    wg = [p.clone().requires_grad_() for p in w]
    gy = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)

    def fb(backend):
        with torch.autocast("cuda", torch.bfloat16):
            yf, yb = ops.bidirectional_conv1d_silu(xg, *wg, backend=backend)
        return torch.autograd.grad((yf, yb), [xg] + wg, (gy, gy))

    out["conv fwd+bwd"] = bench(lambda: fb("triton"))
    if torch_path:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            out["torch: conv fwd"] = bench(lambda: ops.bidirectional_conv1d_silu(x, *w, backend="torch"))
        out["torch: conv fwd+bwd"] = bench(lambda: fb("torch"))
    return out


# small batch and long sequences (high resolution), where batch x channel blocks are too few programs to fill the
# GPU: the chunked forward and segmented backward against the plain sequential kernels, in the same run
SMALL_BATCH = [(2, 16385), (16, 4097), (32, 1025), (64, 1025)]


def time_small_batch(bw, issue):
    from vlonghorn.kernels.interface import _chunk_len, _seg_windows
    res = {}
    for b_, L in SMALL_BATCH:
        args, z = scan_inputs(L, B=b_)
        a = bidir_args(args, z)
        ga, gz, leaves = with_grad(args, z)
        ag = bidir_args(ga, gz)
        g = torch.randn(b_, L, E, device="cuda", dtype=torch.bfloat16)
        row, outs = {}, {}
        saved = dict(CONFIG)
        for key, over in (("chunked", {}), ("sequential", {"fwd_chunk": L, "bwd_seg": 10 ** 6})):
            CONFIG.update(over)
            with torch.no_grad():
                row[key] = bench(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
                y = ops.bidirectional_longhorn_scan(*a, backend="triton")

            def fwd_bwd():
                return torch.autograd.grad(ops.bidirectional_longhorn_scan(*ag, backend="triton"), leaves, g)

            row[key + " fwd+bwd"] = bench(fwd_bwd)
            outs[key] = [y] + list(fwd_bwd())
            CONFIG.clear()
            CONFIG.update(saved)
        nblk = triton.cdiv(E, CONFIG["fwd_bd"])
        row["tokens_per_chunk"] = _chunk_len(a[0], b_, L, nblk)
        row["windows_per_segment"] = _seg_windows(a[0], b_ * triton.cdiv(E, CONFIG["bwd_bd"]) * 2,
                                                  triton.cdiv(L, CONFIG["ck"]))
        row["max_rel_diff_vs_sequential"] = max(
            ((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
            for o, r in zip(outs["chunked"], outs["sequential"]))
        fl = floors(L, bw, issue, b_)
        row["floor_us"] = fl["scan fwd"]["floor_us"]
        row["floor_fwd+bwd_us"] = fl["scan fwd+bwd"]["floor_us"]
        res[f"B{b_}-L{L}"] = row
        print("small batch", b_, L, row, flush=True)
        del args, a, z, ga, gz, leaves, ag, outs
        torch.cuda.empty_cache()
    return res


def errors():
    """Relative errors of the bidirectional scan (output and every gradient) against the float64 reference,
    B=8, L=197, E=768, for fp32 and bf16 inputs."""
    import torch.nn.functional as F
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        if True:
            args, z = scan_inputs(197, dtype, seed=11, B=8)
            ga, gz, leaves = with_grad(args, z)
            a = bidir_args(ga, gz)
            y = ops.bidirectional_longhorn_scan(*a, backend="triton")
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, leaves, g)
            f, b = ga["fwd"], ga["bwd"]
            keys = ("x", "dt", "k", "q", "dt_bias", "D")
            y_ref = (longhorn_scan_ref(*(f[k] for k in keys)) + longhorn_scan_ref(*(b[k] for k in keys), reverse=True))
            y_ref = y_ref / 2 * F.silu(gz.double())
            ref = torch.autograd.grad(y_ref, leaves, g.double())
            names = ["xz"] + [f"{n}_{d}" for d in ("fwd", "bwd") for n in ("x", "dt", "x_dbl(k,q)", "dt_bias", "D")]
            errs = {"y": ((y.double() - y_ref).norm() / y_ref.norm()).item()}
            for n, a_, r_ in zip(names, got, ref):
                errs["d" + n] = ((a_.double() - r_).norm() / r_.norm()).item()
            errs["any_nan"] = bool(any(not torch.isfinite(t).all() for t in got) or not torch.isfinite(y).all())
            res[str(dtype).replace("torch.", "")] = errs
    return res


# ------------------------------------------------------------------------------------------------- sweep
# forward: (channels per program, warps, L1 prefetch of the next step's records);
# backward (one channel per thread): (channels per program, warps, steps per register tile, steps between
# checkpoints = the backward's window, whose tile-start scratch then fits L2 better)
FWD_VARIANTS = [(64, 1, True), (32, 1, True)]
BWD_VARIANTS = [(32, 1, 2, 64), (32, 1, 2, 16), (64, 2, 2, 64)]


def sweep(L):
    """Try a few launch configurations (each one is a compile): forward first, then the backward with the
    fastest forward. Leaves CONFIG at the fastest of each."""
    args, z = scan_inputs(L)
    a = bidir_args(args, z)
    f, b = args["fwd"], args["bwd"]
    fwd_args = (f["x"], f["dt"], f["k"], f["q"], f["dt_bias"], f["D"], b["x"], b["dt"], b["k"], b["q"],
                b["dt_bias"], b["D"], z, False, True)
    res = {"fwd": {}, "bwd": {}}
    for bd, w, pf in FWD_VARIANTS:
        key = f"bd{bd}-w{w}-pf{int(pf)}"
        CONFIG.update(fwd_bd=bd, fwd_warps=w, fwd_prefetch=pf)
        try:
            with torch.no_grad():
                res["fwd"][key] = bench(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
            res["fwd"][key + " (saving)"] = bench(lambda: scan_fwd(*fwd_args))
        except Exception as e:  # a configuration that does not compile or fit is reported, not fatal
            res["fwd"][key] = f"failed: {type(e).__name__}: {e}"[:200]
        print("fwd", key, res["fwd"][key], res["fwd"].get(key + " (saving)"), flush=True)
    # chosen by the training forward (saving), the one that training runs
    ok = [(res["fwd"][f"bd{bd}-w{w}-pf{int(pf)} (saving)"], bd, w, pf) for bd, w, pf in FWD_VARIANTS
          if isinstance(res["fwd"].get(f"bd{bd}-w{w}-pf{int(pf)} (saving)"), float)]
    _, bd, w, pf = min(ok)
    CONFIG.update(fwd_bd=bd, fwd_warps=w, fwd_prefetch=pf)
    g = None
    for bd, w, tt, ck_every in BWD_VARIANTS:
        key = f"bd{bd}-w{w}-tt{tt}-ck{ck_every}"
        CONFIG.update(bwd_bd=bd, bwd_warps=w, bwd_tt=tt, ck=ck_every)
        try:
            y, ypre, ck, rec = scan_fwd(*fwd_args)      # checkpoints at this interval
            g = torch.randn_like(y) if g is None else g
            bwd_args = (g, f["x"], f["dt"], f["dt_bias"], f["D"], b["x"], b["dt"], b["dt_bias"], b["D"], z, ypre,
                        ck, rec, False, f["k"].dtype, f["q"].dtype, N)
            res["bwd"][key] = bench(lambda: scan_bwd(*bwd_args))
            res["bwd"][key + " fwd(saving)"] = bench(lambda: scan_fwd(*fwd_args))
        except Exception as e:
            res["bwd"][key] = f"failed: {type(e).__name__}: {e}"[:200]
        print("bwd", key, res["bwd"][key], res["bwd"].get(key + " fwd(saving)"), flush=True)
    # chosen by the training forward + backward at this length
    ok = []
    for bd, w, tt, c in BWD_VARIANTS:
        key = f"bd{bd}-w{w}-tt{tt}-ck{c}"
        if isinstance(res["bwd"][key], float):
            ok.append((res["bwd"][key] + res["bwd"][key + " fwd(saving)"], bd, w, tt, c))
    _, bd, w, tt, c = min(ok, key=lambda r: r[0])
    CONFIG.update(bwd_bd=bd, bwd_warps=w, bwd_tt=tt, ck=c)
    res["chosen"] = dict(CONFIG)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[197, 4097])
    ap.add_argument("--sweep", action="store_true", help="try launch configurations first (compiles more)")
    ap.add_argument("--no-torch-long", action="store_true", help="skip the PyTorch path at L > 1000")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-configuration sweep at L=197")
    opt = ap.parse_args()
    if opt.sweep_only:
        print(json.dumps(sweep(197), indent=1))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "shape": {"B": B, "E": E, "N": N, "dtype": "bfloat16"}}
    bw, issue = copy_bandwidth(), fma_issue_rate()
    meta["copy_bandwidth_TBps"] = bw / 1e12
    meta["fp32_fma_issue_Tinstr_per_s"] = issue / 1e12
    print(f"{dev}: copy {bw / 1e12:.2f} TB/s, FFMA issue {issue / 1e12:.1f} T instr/s", flush=True)
    result = {"meta": meta, "runs": {}}
    if opt.sweep:
        result["sweep_L197"] = sweep(197)
    meta["config"] = dict(CONFIG)
    result["errors_B8_L197"] = errors()
    print(json.dumps(result["errors_B8_L197"], indent=1), flush=True)
    result["small_batch"] = time_small_batch(bw, issue)
    rows = []
    for L in opt.lengths:
        torch.cuda.empty_cache()
        times = time_scan(L, torch_path=not (opt.no_torch_long and L > 1000))
        times.update(time_conv(L))
        fl = floors(L, bw, issue)
        result["runs"][L] = {"times_us": times, "floors": fl}
        for name in ("scan fwd", "scan bwd", "scan fwd+bwd", "conv fwd", "conv fwd+bwd"):
            t = times[name]
            f = fl[name]
            torch_t = times.get("torch: " + name)
            rows.append((name, L, t, f["floor_us"], f["mem_us"], f["instr_us"], TARGETS_US.get((name, L)), torch_t))
        rows.append(("scan fwd (saving)", L, times["scan fwd (saving)"], fl["scan fwd"]["floor_us"],
                     fl["scan fwd"]["mem_us"], fl["scan fwd"]["instr_us"], None, None))
    head = ("| kernel (both directions) | L | time us | floor us (mem / instr) | x floor | target us | "
            "PyTorch path us | speed-up |")
    lines = [f"# Kernel benchmark: {dev}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, {meta['date']}; B={B}, E={E}, N={N}, bf16. "
             f"Measured ceilings: copy {bw / 1e12:.2f} TB/s, FFMA issue {issue / 1e12:.1f} T instr/s. "
             f"Launch config: {json.dumps(CONFIG)}", "", head, "|" + "---|" * 8]
    for name, L, t, fl_, mem, ins, tgt, tt in rows:
        lines.append(f"| {name} | {L} | {t:.1f} | {fl_:.1f} ({mem:.1f} / {ins:.1f}) | {t / fl_:.2f} | "
                     f"{'' if tgt is None else f'{tgt:.0f}'} | {'' if tt is None else f'{tt:.1f}'} | "
                     f"{'' if tt is None else f'{tt / t:.1f}x'} |")
    lines += ["", "Small batch, long sequences (both directions): the chunked forward and segmented backward (chosen "
              "from the GPU's size) vs the sequential kernels. Inference forward, and forward+backward (autograd):",
              "",
              "| B | L | tokens per chunk | windows per segment | fwd chunked us | sequential us | speed-up | "
              "x floor | fwd+bwd chunked us | sequential us | speed-up | x floor | max diff / max |",
              "|" + "---|" * 13]
    for key, r in result["small_batch"].items():
        b_, L = (int(v) for v in key[1:].split("-L"))
        lines.append(f"| {b_} | {L} | {r['tokens_per_chunk']} | {r['windows_per_segment']} | {r['chunked']:.1f} | "
                     f"{r['sequential']:.1f} | {r['sequential'] / r['chunked']:.2f}x | "
                     f"{r['chunked'] / r['floor_us']:.1f} | {r['chunked fwd+bwd']:.1f} | "
                     f"{r['sequential fwd+bwd']:.1f} | {r['sequential fwd+bwd'] / r['chunked fwd+bwd']:.2f}x | "
                     f"{r['chunked fwd+bwd'] / r['floor_fwd+bwd_us']:.1f} | {r['max_rel_diff_vs_sequential']:.1e} |")
    lines += ["", "Errors (RMS-relative vs float64 reference, B=8, L=197, E=768):", ""]
    for dt, errs in result["errors_B8_L197"].items():
        worst = max(v for k, v in errs.items() if k != "any_nan")
        lines.append(f"- {dt}: worst {worst:.2e}, NaN: {errs['any_nan']}; " +
                     ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if k != "any_nan"))
    md = "\n".join(lines) + "\n"
    print(md, flush=True)
    os.makedirs(opt.out, exist_ok=True)
    tag = dev.replace(" ", "_").replace("/", "_")
    with open(os.path.join(opt.out, f"kernels_{tag}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(opt.out, f"kernels_{tag}.md"), "w") as fh:
        fh.write(md)


if __name__ == "__main__":
    main()
