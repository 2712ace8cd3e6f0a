"""What the benchmark scripts share: random inputs in the model's layouts, timers, the environment record and the
result writer.

The scripts run as `python benchmarks/<script>.py`, which puts this folder first on sys.path, so they import it as
`from harness import ...`.

Every result goes to `benchmarks/results/<kind>_<device>_<YYYY-MM-DD>[_<tag>].<ext>`: kind says what was measured
(model, kernels, host, cpu_latency, backends, scaling, profile, gpu_tests, cifar10, tune), device is
`device_slug` (h100, h200, h200-x2 for a two-GPU run, cpu-amd-epyc), the date is the run's.

    python benchmarks/harness.py KIND [TAG] [--out DIR] [--gpus N]    # prints the stem of that result's files
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# the mixer of vlonghorn_small: channels (d_inner), state size, rank of dt's projection
E_SMALL, N_STATE, DT_RANK = 768, 16, 24


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass
class ScanInputs:
    """Inputs of both scan directions, in the order of `vlonghorn.ops.bidirectional_longhorn_scan`. `leaves` are
    the tensors gradients are taken for: in_proj's output (z is its second half), then for each direction x, dt,
    x_proj's output (k and q are slices of it), dt_bias and D."""

    x_fwd: torch.Tensor
    x_rev: torch.Tensor
    dt_fwd: torch.Tensor
    dt_rev: torch.Tensor
    k_fwd: torch.Tensor
    q_fwd: torch.Tensor
    k_rev: torch.Tensor
    q_rev: torch.Tensor
    dt_bias_fwd: torch.Tensor
    dt_bias_rev: torch.Tensor
    D_fwd: torch.Tensor
    D_rev: torch.Tensor
    z: torch.Tensor
    leaves: list = field(default_factory=list)

    def op_args(self):
        """Positional arguments of vlonghorn.ops.bidirectional_longhorn_scan (and of the kernels' entry point)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "leaves")

    def direction(self, d):
        """(x, dt, k, q, dt_bias, D) of direction `d` ("fwd" or "rev"): the arguments of one-direction scans."""
        return tuple(getattr(self, f"{n}_{d}") for n in ("x", "dt", "k", "q", "dt_bias", "D"))

    def forward_args(self, save=True):
        """Positional arguments of vlonghorn.kernels.launch.scan_forward (both directions, `save`: training)."""
        return (*self.direction("fwd"), *self.direction("rev"), self.z, False, save)

    def backward_args(self, grad, saved):
        """Positional arguments of vlonghorn.kernels.launch.scan_backward; saved: scan_forward's (y_pre,
        checkpoints, records)."""
        return (grad, self.x_fwd, self.dt_fwd, self.dt_bias_fwd, self.D_fwd, self.x_rev, self.dt_rev,
                self.dt_bias_rev, self.D_rev, self.z, *saved, False, self.k_fwd.dtype, self.q_fwd.dtype,
                self.k_fwd.shape[-1])


def scan_inputs(B, L, E=E_SMALL, N=N_STATE, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=False):
    """Random scan inputs with the model's layouts: x and dt dense (conv and dt_proj outputs), z the strided second
    half of in_proj's output, k and q strided slices of x_proj's output [dt_low | k | q]; dt_bias and D fp32. The
    same seed gives the same values with and without `requires_grad`."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, device=device, generator=g) * scale + shift).to(dt).requires_grad_(requires_grad)

    xz = rnd(B, L, 2 * E)
    kw, leaves = {"z": xz[..., E:]}, [xz]
    for d in ("fwd", "rev"):
        x_dbl = rnd(B, L, DT_RANK + 2 * N, scale=0.5)
        kw.update({f"x_{d}": rnd(B, L, E), f"dt_{d}": rnd(B, L, E, shift=-2.0),
                   f"k_{d}": x_dbl[..., DT_RANK:DT_RANK + N], f"q_{d}": x_dbl[..., DT_RANK + N:],
                   f"dt_bias_{d}": rnd(E, scale=0.5, dt=torch.float32), f"D_{d}": rnd(E, dt=torch.float32)})
        leaves += [kw[f"x_{d}"], kw[f"dt_{d}"], x_dbl, kw[f"dt_bias_{d}"], kw[f"D_{d}"]]
    return ScanInputs(**kw, leaves=leaves if requires_grad else [])


def conv_inputs(B, L, E=E_SMALL, width=4, dtype=torch.bfloat16, device="cuda", seed=0, requires_grad=False):
    """(x, weight_fwd, bias_fwd, weight_rev, bias_rev) for vlonghorn.ops.bidirectional_conv1d_silu: x the strided
    first half of in_proj's output (with `requires_grad` a leaf of that layout), fp32 weights and biases."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, L, 2 * E, device=device, generator=g).to(dtype)[..., :E]
    params = [torch.randn(E, width, device=device, generator=g) * 0.3, torch.randn(E, device=device, generator=g),
              torch.randn(E, width, device=device, generator=g) * 0.3, torch.randn(E, device=device, generator=g)]
    return tuple(t.detach().requires_grad_(requires_grad) for t in (x, *params))


# ---------------------------------------------------------------------------------------------------- timing
def gpu_time(fn, reps=10, warmup=3):
    """Median seconds of `fn` over `reps` calls timed with CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def training_step(run, parameters, x, target):
    """One training step of `run` (a model, or its compiled form) in bf16 autocast with fused AdamW over
    `parameters`: cross-entropy against `target`, backward, step. A closure for the timers."""
    opt = torch.optim.AdamW(parameters, lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(run(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def kernel_time_us(fn, rep_ms=200):
    """Median microseconds of `fn` from triton.testing.do_bench (L2 flushed between calls; warm-up first)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=max(rep_ms // 4, 10), rep=rep_ms, return_mode="median") * 1e3


def wall_time(fn, n=10, warmup=3, sync=True):
    """Mean wall seconds per call over `n` back-to-back calls after `warmup`. sync=True waits for the GPU before
    stopping the clock (throughput); sync=False stops it when the last call returns (the host's time per call)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda and sync:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    return elapsed / n


def host_time(fn, n=10, warmup=3):
    """Median seconds from a call of `fn` on an idle GPU until it returns: the host's time for one step, exact as
    long as one step's launches fit the launch queue (a fuller queue makes the host wait for the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times)


def cpu_time(fn, reps=10, warmup=1):
    """(median, min) seconds of `fn` on the CPU over `reps` calls, each timed alone, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


# ------------------------------------------------------------------------------------------------ environment
def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device=None, **extra):
    """The record every result carries: date, device (the GPU's name, or the CPU's with device="cpu"), versions and
    the kernels' launch configuration where they import; `extra` is added."""
    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if on_gpu else cpu_name(),
            "device_type": "cuda" if on_gpu else "cpu",
            "gpus": torch.cuda.device_count(), "cpu": cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "timm"):
        try:
            meta[name] = __import__(name).__version__
        except ImportError:
            meta[name] = None
    try:
        from vlonghorn.kernels import CONFIG
        meta["kernel_config"] = CONFIG.as_dict()
    except ImportError:
        meta["kernel_config"] = None
    meta.update(extra)
    return meta


def env_line(meta):
    """One line for a markdown header: device, versions, date."""
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "timm") if meta.get(k))
    return f"{meta['device']}; {versions}; {meta['date']}"


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(meta, gpus=1):
    """File-name form of meta's device: 'NVIDIA H100 80GB HBM3' -> h100, 'NVIDIA H200' on 2 GPUs -> h200-x2,
    'AMD EPYC 7B13' -> cpu-amd-epyc-7b13."""
    name = meta["device"].lower()
    if meta.get("device_type") == "cpu":
        name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*|\d+-core processor", " ", name)
        return "cpu-" + _slug(name)
    words = [w for w in _slug(name).split("-") if w not in ("nvidia", "geforce", "tesla", "amd", "instinct")]
    model = next((w for w in words if re.search(r"[a-z]", w) and re.search(r"\d", w)), "-".join(words[:2]))
    return model + (f"-x{gpus}" if gpus > 1 else "")


# ----------------------------------------------------------------------------------------------------- results
def result_stem(kind, meta, tag="", out=None, gpus=1):
    """out/<kind>_<device>_<date>[_<tag>] (no extension); out defaults to benchmarks/results."""
    tag = re.sub(r"[\s/]+", "-", tag.strip())
    name = f"{kind}_{device_slug(meta, gpus)}_{meta['date'][:10]}" + (f"_{tag}" if tag else "")
    return Path(out or RESULTS) / name


def write_result(kind, meta, data, markdown=None, tag="", out=None, gpus=1):
    """Write {"meta": meta, **data} to <stem>.json and `markdown` (when given) to <stem>.md; returns the stem."""
    stem = result_stem(kind, meta, tag, out, gpus)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, **data}, indent=1, default=str) + "\n")
    if markdown is not None:
        Path(f"{stem}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return stem


def md_table(head, rows):
    """Markdown table lines: a header (list of str) and rows (lists of cells)."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print the stem of a result's files on this machine")
    ap.add_argument("kind")
    ap.add_argument("tag", nargs="?", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--gpus", type=int, default=1)
    opt = ap.parse_args()
    print(result_stem(opt.kind, environment(), opt.tag, opt.out, opt.gpus))
