"""Compile the Triton kernels for an H100 (sm_90) without a GPU and report registers, spills and the SASS
instruction mix of each kernel: what a change does to register pressure and instruction counts, for free.

    python benchmarks/compile_report.py [--config '{"backward_tile": 2}'] [--only scan_backward] [--loops]
                                         [--backward-maxnreg 168] [--sass DIR]

ptxas -v gives registers and spills, cuobjdump (shipped with the triton wheel) the SASS; --loops prints the
instruction count and mix of every loop body (a backward branch), i.e. per step or per tile. Layout
conversions differ between Triton releases: for figures that match the device, run it with the device's
Triton (e.g. `pip install --no-deps --target /tmp/t36 triton==3.6.0` and PYTHONPATH=/tmp/t36).
"""
import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vlonghorn.kernels import CONFIG
from vlonghorn.kernels.conv import _conv_backward_kernel, _conv_forward_kernel
from vlonghorn.kernels.scan_backward import _scan_backward_kernel
from vlonghorn.kernels.scan_chunk import _adjoint_chunk_kernel, _scan_chunk_kernel, _scan_combine_kernel
from vlonghorn.kernels.scan_common import PAD, REC
from vlonghorn.kernels.scan_forward import _scan_forward_kernel

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _signature(fn, dtypes, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = dtypes.get(name, "*bf16")
        else:
            sig[name] = dtypes.get(name, "i32")
    return sig


def compile_one(fn, constexprs, dtypes, num_warps, maxnreg=None):
    # what the JIT specialises on at run time: 16-byte aligned pointers, strides and E divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in constexprs
             and (name.endswith("_ptr") or name == "E" or re.fullmatch(r"s[a-z]+(_fwd|_rev)?_[bt]", name))}
    src = ASTSource(fn, _signature(fn, dtypes, constexprs), constexprs, attrs)
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        out = subprocess.run([os.path.join(BIN, "ptxas"), "-arch=sm_90a", "-v", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
        info = out.stderr
        if "Used" not in info:
            raise RuntimeError(info[-3000:])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True).stdout
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", info).group(1))
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1).split(".")[0]] += 1
    return regs, spill_st, spill_ld, ops, sass


def loop_bodies(sass):
    """(start, end, instruction count, Counter of opcodes) of every loop body in a SASS listing."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r"BRA 0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            body = ins[index[int(m.group(1), 16)]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in body)
            loops.append((int(m.group(1), 16), a, len(body), ops))
    return loops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="{}", help="JSON overrides of vlonghorn.kernels.CONFIG")
    ap.add_argument("--sass", default=None, help="write each kernel's SASS into this folder")
    ap.add_argument("--only", default=None, help="compile only kernels whose name contains this")
    ap.add_argument("--loops", action="store_true", help="instruction counts of every loop body")
    ap.add_argument("--backward-maxnreg", "--bwd-maxnreg", type=int, default=None,
                    help="register cap for the backward kernels (ptxas spills past it); without it the "
                         "reconstructing backward gets its launch cap (CONFIG recon_maxnreg)")
    args = ap.parse_args()
    CONFIG.update(json.loads(args.config))
    cfg = CONFIG
    f32 = {n: "*fp32" for n in ("rec_ptr", "ck_ptr", "h0_ptr", "sum_ptr", "csum_ptr", "scr_ptr", "dkq_ptr", "dpar_ptr",
                                "st_ptr", "bias_fwd_ptr", "bias_rev_ptr", "D_fwd_ptr", "D_rev_ptr", "w_fwd_ptr",
                                "w_rev_ptr", "dw_ptr")}
    f32.update(flag_ptr="*i32", TOL="fp32", THR="fp32")
    common = dict(N=16, REC_W=REC, PADT=PAD, HAS_D=True, HAS_Z=True, FAST=True, WIN=False, SEG=False, RECON=False,
                  FALLBACK=False)
    fwd_r = cfg.forward_bd // (32 * cfg.forward_warps)
    forward = dict(common, BD=cfg.forward_bd, R=fwd_r, W=cfg.forward_warps, CK=cfg.checkpoint_every, BIDIR=True,
                   REVERSE=False, PREFETCH=cfg.forward_prefetch, EVEN=True)
    backward = dict(common, BD=cfg.backward_bd, W=cfg.backward_warps, CK=cfg.checkpoint_every, TT=cfg.backward_tile,
                    BDF=cfg.forward_bd, RF=fwd_r, WF=cfg.forward_warps, BIDIR=True, REVERSE=False, SCATTER=True)
    chunk = dict(common, BD=cfg.chunk_bd, R=cfg.chunk_bd // (32 * cfg.chunk_warps), W=cfg.chunk_warps, BIDIR=True,
                 REVERSE=False, PREFETCH=cfg.forward_prefetch, EVEN=True)
    conv = dict(BD=cfg.conv_bd, HAS_BIAS_FWD=True, HAS_BIAS_REV=True, FAST=True)
    jobs = [
        ("scan_forward_inference", _scan_forward_kernel, dict(forward, SAVE=False, CHUNKED=False),
         cfg.forward_warps),
        ("scan_forward_chunked", _scan_forward_kernel, dict(forward, SAVE=False, CHUNKED=True), cfg.forward_warps),
        ("scan_chunk", _scan_chunk_kernel, chunk, cfg.chunk_warps),
        ("scan_combine", _scan_combine_kernel, dict(N=16, BLK=128, U=8, BACK0=False, BACK1=True, CKOUT=False,
                                                    BDF=cfg.forward_bd, RF=fwd_r, WF=cfg.forward_warps), 1),
        ("scan_forward_training_chunked", _scan_forward_kernel, dict(forward, SAVE=True, CHUNKED=True, WIN=True),
         cfg.forward_warps),
        ("scan_forward_training", _scan_forward_kernel, dict(forward, SAVE=True, CHUNKED=False), cfg.forward_warps),
        ("scan_backward", _scan_backward_kernel, backward, cfg.backward_warps),
        ("scan_backward_recon", _scan_backward_kernel, dict(backward, RECON=True), cfg.backward_warps),
        ("scan_backward_segmented", _scan_backward_kernel, dict(backward, SEG=True), cfg.backward_warps),
        ("scan_adjoint_chunk", _adjoint_chunk_kernel, chunk, cfg.chunk_warps),
        ("conv_forward", _conv_forward_kernel, conv, cfg.conv_warps),
        ("conv_backward", _conv_backward_kernel, conv, cfg.conv_warps),
    ]
    for name, fn, cx, warps in jobs:
        if args.only and args.only not in name:
            continue
        cx = {k: v for k, v in cx.items() if k in fn.arg_names}
        cap = args.backward_maxnreg if name.startswith("scan_backward") else None
        if name == "scan_backward_recon" and not cap:
            cap = cfg.recon_maxnreg or None        # the launch's own cap
        regs, sst, sld, ops, sass = compile_one(fn, cx, f32, warps, cap)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(14))
        print(f"{name:29s} regs {regs:3d} spill st/ld {sst}/{sld} B  SASS {sum(ops.values())} instr: {top}")
        if args.loops:
            for start, end, count, ops in loop_bodies(sass):
                mix = ", ".join(f"{k} {v}" for k, v in ops.most_common(10))
                print(f"    loop {start:#x}-{end:#x}: {count} instr: {mix}")
        if args.sass:
            os.makedirs(args.sass, exist_ok=True)
            with open(os.path.join(args.sass, name + ".sass"), "w") as fh:
                fh.write(sass)


if __name__ == "__main__":
    main()
