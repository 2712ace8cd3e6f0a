"""Time the Triton kernels against their floors and against the PyTorch path, in one process on one GPU.

    python benchmarks/bench_kernels.py [--out DIR] [--lengths 197 4097] [--sweep] [--tag TAG]

Shapes: B=128, E=768 (d_inner of vlonghorn_small), N=16, both scan directions, bf16 inputs. For each kernel
and L it prints the median time (triton.testing.do_bench, L2 flushed between runs), the floor from
kernels.md section 4 (max of bytes / measured copy bandwidth and fp32 instructions / measured FMA issue rate,
both measured in this run), the ratio to the floor, the target where one exists, and the PyTorch path. Then,
at small batch and long sequences (SMALL_BATCH), the chunked forward and segmented backward that the launcher
chooses there against the sequential kernels. Writes kernels_<device>_<date>[_<tag>].{json,md} into --out
(default benchmarks/results).
"""
import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from harness import (E_SMALL as E, N_STATE as N, RESULTS, conv_inputs, env_line, environment, kernel_time_us,
                     md_table, scan_inputs, write_result)
from vlonghorn import ops
from vlonghorn.kernels import CONFIG, launch
from vlonghorn.ops.reference import longhorn_scan_ref

B = 128
TARGETS_US = {("scan forward", 197): 150.0, ("scan forward+backward", 197): 700.0}
# fp32 instructions per (b, t, channel, state) element and direction (kernels.md section 4)
INSTR_FORWARD, INSTR_BACKWARD = 4, 16


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


def floors(L, bw, issue, batch=B):
    ble, bln = batch * L * E, batch * L * N
    elems = 2 * ble * N
    f_bytes = 12 * ble + 8 * bln
    b_bytes = 24 * ble + 24 * bln
    res = {
        "scan forward": (f_bytes / bw, INSTR_FORWARD * elems / issue, f_bytes),
        "scan backward": (b_bytes / bw, INSTR_BACKWARD * elems / issue, b_bytes),
        "conv forward": (6 * ble / bw, 0.0, 6 * ble),
        "conv forward+backward": (14 * ble / bw, 0.0, 14 * ble),
    }
    res["scan forward+backward"] = tuple(a + b for a, b in zip(res["scan forward"], res["scan backward"]))
    return {k: {"mem_us": v[0] * 1e6, "instr_us": v[1] * 1e6, "floor_us": max(v[0], v[1]) * 1e6, "bytes": v[2]}
            for k, v in res.items()}


# ------------------------------------------------------------------------------------------------ timing
def time_scan(L, torch_path=True):
    inp = scan_inputs(B, L, requires_grad=True)
    a = inp.op_args()
    out = {}
    with torch.no_grad():
        out["scan forward"] = kernel_time_us(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
        # the training forward (saves checkpoints and y_pre) and the backward alone, on its saved tensors
        forward = inp.forward_args(save=True)
        out["scan forward (saving)"] = kernel_time_us(lambda: launch.scan_forward(*forward))
        y, *saved = launch.scan_forward(*forward)
        g = torch.randn_like(y)
        backward = inp.backward_args(g, saved)
        out["scan backward"] = kernel_time_us(lambda: launch.scan_backward(*backward))

    def forward_backward(backend):
        return torch.autograd.grad(ops.bidirectional_longhorn_scan(*a, backend=backend), inp.leaves, g)

    out["scan forward+backward"] = kernel_time_us(lambda: forward_backward("triton"))
    if torch_path:
        with torch.no_grad():
            out["torch: scan forward"] = kernel_time_us(lambda: ops.bidirectional_longhorn_scan(*a, backend="torch"),
                                                        100)
        out["torch: scan forward+backward"] = kernel_time_us(lambda: forward_backward("torch"), 100)
    return out


def time_conv(L, torch_path=True):
    conv = conv_inputs(B, L, requires_grad=True)
    gy = torch.randn(B, L, E, device="cuda", dtype=torch.bfloat16)
    out = {}
    # both paths under bf16 autocast, as in the model (the PyTorch conv needs one dtype for x and weights)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        out["conv forward"] = kernel_time_us(lambda: launch.conv_forward(*conv))

    def forward_backward(backend):
        with torch.autocast("cuda", torch.bfloat16):
            y_fwd, y_rev = ops.bidirectional_conv1d_silu(*conv, backend=backend)
        return torch.autograd.grad((y_fwd, y_rev), conv, (gy, gy))

    out["conv forward+backward"] = kernel_time_us(lambda: forward_backward("triton"))
    if torch_path:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            out["torch: conv forward"] = kernel_time_us(lambda: ops.bidirectional_conv1d_silu(*conv, backend="torch"))
        out["torch: conv forward+backward"] = kernel_time_us(lambda: forward_backward("torch"))
    return out


def launcher_choice(name, fn):
    """What `launch.<name>` (chunk_len, segment_windows) returned while `fn` ran: the launcher's own choice."""
    choose, seen = getattr(launch, name), []

    def record(*args, **kwargs):
        seen.append(choose(*args, **kwargs))
        return seen[-1]

    setattr(launch, name, record)
    try:
        fn()
    finally:
        setattr(launch, name, choose)
    return seen[-1] if seen else None


# small batch and long sequences (high resolution), where batch x channel blocks are too few programs to fill the
# GPU: the chunked forward and segmented backward against the plain sequential kernels, in the same run
SMALL_BATCH = [(2, 16385), (16, 4097), (32, 1025), (64, 1025)]


def small_batch_row(b_, L, bw, issue):
    """The chunked forward and segmented backward at batch b_, length L against the sequential kernels."""
    inp = scan_inputs(b_, L, requires_grad=True)
    a = inp.op_args()
    g = torch.randn(b_, L, E, device="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad():
            return ops.bidirectional_longhorn_scan(*a, backend="triton")

    def forward_backward():
        return torch.autograd.grad(ops.bidirectional_longhorn_scan(*a, backend="triton"), inp.leaves, g)

    row, outs = {}, {}
    for key, over in (("chunked", {}), ("sequential", {"chunk_len": L, "segment_windows": 10 ** 6})):
        with CONFIG.override(**over):
            row[key] = kernel_time_us(forward)
            row[key + " forward+backward"] = kernel_time_us(forward_backward)
            outs[key] = [forward()] + list(forward_backward())
    row["tokens_per_chunk"] = launcher_choice("chunk_len", forward)
    row["windows_per_segment"] = launcher_choice("segment_windows", forward_backward)
    row["max_rel_diff_vs_sequential"] = max(
        ((o.float() - r.float()).abs().max() / r.float().abs().max()).item()
        for o, r in zip(outs["chunked"], outs["sequential"]))
    fl = floors(L, bw, issue, b_)
    row["floor_us"] = fl["scan forward"]["floor_us"]
    row["floor_forward+backward_us"] = fl["scan forward+backward"]["floor_us"]
    return row


def time_small_batch(bw, issue):
    res = {}
    for b_, L in SMALL_BATCH:
        res[f"B{b_}-L{L}"] = small_batch_row(b_, L, bw, issue)
        print("small batch", b_, L, res[f"B{b_}-L{L}"], flush=True)
        torch.cuda.empty_cache()
    return res


def errors():
    """Relative errors of the bidirectional scan (output and every gradient) against the float64 reference,
    B=8, L=197, E=768, for fp32 and bf16 inputs."""
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        inp = scan_inputs(8, 197, dtype=dtype, seed=11, requires_grad=True)
        y = ops.bidirectional_longhorn_scan(*inp.op_args(), backend="triton")
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, inp.leaves, g)
        y_ref = longhorn_scan_ref(*inp.direction("fwd")) + longhorn_scan_ref(*inp.direction("rev"), reverse=True)
        y_ref = y_ref / 2 * F.silu(inp.z.double())
        ref = torch.autograd.grad(y_ref, inp.leaves, g.double())
        names = ["xz"] + [f"{n}_{d}" for d in ("fwd", "rev") for n in ("x", "dt", "x_dbl(k,q)", "dt_bias", "D")]
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
FORWARD_VARIANTS = [(64, 1, True), (32, 1, True)]
BACKWARD_VARIANTS = [(32, 1, 2, 64), (32, 1, 2, 16), (64, 2, 2, 64)]


def sweep(L):
    """Try a few launch configurations (each one is a compile): forward first, then the backward with the
    fastest forward. Leaves CONFIG at the fastest of each."""
    inp = scan_inputs(B, L)
    a = inp.op_args()
    forward = inp.forward_args(save=True)
    res = {"forward": {}, "backward": {}}
    for bd, w, pf in FORWARD_VARIANTS:
        key = f"bd{bd}-w{w}-pf{int(pf)}"
        try:
            CONFIG.update(forward_bd=bd, forward_warps=w, forward_prefetch=pf)
            with torch.no_grad():
                res["forward"][key] = kernel_time_us(lambda: ops.bidirectional_longhorn_scan(*a, backend="triton"))
                res["forward"][key + " (saving)"] = kernel_time_us(lambda: launch.scan_forward(*forward))
        except Exception as e:  # a configuration that does not compile or fit is reported, not fatal
            res["forward"][key] = f"failed: {type(e).__name__}: {e}"[:200]
        print("forward", key, res["forward"][key], res["forward"].get(key + " (saving)"), flush=True)
    # chosen by the training forward (saving), the one that training runs
    ok = [(res["forward"][f"bd{bd}-w{w}-pf{int(pf)} (saving)"], bd, w, pf) for bd, w, pf in FORWARD_VARIANTS
          if isinstance(res["forward"].get(f"bd{bd}-w{w}-pf{int(pf)} (saving)"), float)]
    _, bd, w, pf = min(ok)
    CONFIG.update(forward_bd=bd, forward_warps=w, forward_prefetch=pf)
    g = None
    for bd, w, tile, every in BACKWARD_VARIANTS:
        key = f"bd{bd}-w{w}-tile{tile}-ck{every}"
        try:
            CONFIG.update(backward_bd=bd, backward_warps=w, backward_tile=tile, checkpoint_every=every)
            with torch.no_grad():
                y, *saved = launch.scan_forward(*forward)      # checkpoints at this interval
                g = torch.randn_like(y) if g is None else g
                backward = inp.backward_args(g, saved)
                res["backward"][key] = kernel_time_us(lambda: launch.scan_backward(*backward))
                res["backward"][key + " forward(saving)"] = kernel_time_us(lambda: launch.scan_forward(*forward))
        except Exception as e:
            res["backward"][key] = f"failed: {type(e).__name__}: {e}"[:200]
        print("backward", key, res["backward"][key], res["backward"].get(key + " forward(saving)"), flush=True)
    # chosen by the training forward + backward at this length
    ok = []
    for bd, w, tile, every in BACKWARD_VARIANTS:
        key = f"bd{bd}-w{w}-tile{tile}-ck{every}"
        if isinstance(res["backward"][key], float):
            ok.append((res["backward"][key] + res["backward"][key + " forward(saving)"], bd, w, tile, every))
    _, bd, w, tile, every = min(ok, key=lambda r: r[0])
    CONFIG.update(backward_bd=bd, backward_warps=w, backward_tile=tile, checkpoint_every=every)
    res["chosen"] = CONFIG.as_dict()
    return res


def report(result):
    meta = result["meta"]
    bw, issue = meta["copy_bandwidth_TBps"], meta["fp32_fma_issue_Tinstr_per_s"]
    rows = []
    for L, run in result["runs"].items():
        times, fl = run["times_us"], run["floors"]
        for name in ("scan forward", "scan backward", "scan forward+backward", "conv forward",
                     "conv forward+backward", "scan forward (saving)"):
            t, f = times[name], fl[name.replace(" (saving)", "")]
            tgt, tt = TARGETS_US.get((name, L)), times.get("torch: " + name)
            rows.append([name, L, f"{t:.1f}", f"{f['floor_us']:.1f} ({f['mem_us']:.1f} / {f['instr_us']:.1f})",
                         f"{t / f['floor_us']:.2f}", "" if tgt is None else f"{tgt:.0f}",
                         "" if tt is None else f"{tt:.1f}", "" if tt is None else f"{tt / t:.1f}x"])
    lines = ["# Kernel benchmark", "",
             f"{env_line(meta)}; B={B}, E={E}, N={N}, bf16. Measured ceilings: copy {bw:.2f} TB/s, FFMA issue "
             f"{issue:.1f} T instr/s. Launch config: {json.dumps(meta['kernel_config'])}", ""]
    lines += md_table(["kernel (both directions)", "L", "time us", "floor us (mem / instr)", "x floor", "target us",
                       "PyTorch path us", "speed-up"], rows)
    lines += ["", "Small batch, long sequences (both directions): the chunked forward and segmented backward (chosen "
              "from the GPU's size) vs the sequential kernels. Inference forward, and forward+backward (autograd):", ""]
    rows = []
    for key, r in result["small_batch"].items():
        b_, L = (int(v) for v in key[1:].split("-L"))
        rows.append([b_, L, r["tokens_per_chunk"], r["windows_per_segment"], f"{r['chunked']:.1f}",
                     f"{r['sequential']:.1f}", f"{r['sequential'] / r['chunked']:.2f}x",
                     f"{r['chunked'] / r['floor_us']:.1f}", f"{r['chunked forward+backward']:.1f}",
                     f"{r['sequential forward+backward']:.1f}",
                     f"{r['sequential forward+backward'] / r['chunked forward+backward']:.2f}x",
                     f"{r['chunked forward+backward'] / r['floor_forward+backward_us']:.1f}",
                     f"{r['max_rel_diff_vs_sequential']:.1e}"])
    lines += md_table(["B", "L", "tokens per chunk", "windows per segment", "forward chunked us", "sequential us",
                       "speed-up", "x floor", "forward+backward chunked us", "sequential us", "speed-up", "x floor",
                       "max diff / max"], rows)
    lines += ["", "Errors (RMS-relative vs float64 reference, B=8, L=197, E=768):", ""]
    for dt, errs in result["errors_B8_L197"].items():
        worst = max(v for k, v in errs.items() if k != "any_nan")
        lines.append(f"- {dt}: worst {worst:.2e}, NaN: {errs['any_nan']}; " +
                     ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if k != "any_nan"))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[197, 4097])
    ap.add_argument("--sweep", action="store_true", help="try launch configurations first (compiles more)")
    ap.add_argument("--no-torch-long", action="store_true", help="skip the PyTorch path at L > 1000")
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-configuration sweep at L=197")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    opt = ap.parse_args()
    if opt.sweep_only:
        print(json.dumps(sweep(197), indent=1))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    bw, issue = copy_bandwidth(), fma_issue_rate()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, FFMA issue {issue / 1e12:.1f} T instr/s",
          flush=True)
    result = {"sweep_L197": sweep(197)} if opt.sweep else {}
    # the environment after the sweep: the launch configuration measured below
    result["meta"] = environment(shape={"B": B, "E": E, "N": N, "dtype": "bfloat16"},
                                 copy_bandwidth_TBps=bw / 1e12, fp32_fma_issue_Tinstr_per_s=issue / 1e12)
    result["errors_B8_L197"] = errors()
    print(json.dumps(result["errors_B8_L197"], indent=1), flush=True)
    result["small_batch"] = time_small_batch(bw, issue)
    result["runs"] = {}
    for L in opt.lengths:
        torch.cuda.empty_cache()
        times = time_scan(L, torch_path=not (opt.no_torch_long and L > 1000))
        times.update(time_conv(L))
        result["runs"][L] = {"times_us": times, "floors": floors(L, bw, issue)}
    md = report(result)
    meta = result.pop("meta")
    stem = write_result("kernels", meta, result, md, opt.tag, opt.out)
    print(md + f"\nwritten: {stem}.{{json,md}}", flush=True)


if __name__ == "__main__":
    main()
