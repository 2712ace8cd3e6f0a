"""GPU time per kernel of one vlonghorn model forward (inference, bf16 autocast), from torch.profiler (GPU only):

    python benchmarks/profile_model.py [--model vlonghorn_small] [--res 1024 2048] [--batch 16 2] [--rows 14]
                                       [--train [--cprofile]] [--kwargs '{"recompute_mixer": false}']

Prints, per resolution, the kernels sorted by total GPU time over the forward (all layers): where the time of
the end-to-end figures of bench_model.py goes, and the scan's kernels against everything else. With --train: one
training step (forward and backward under bf16 autocast), its wall time (without and under the profiler) next to
the GPU's busy time (kernels and copies; a gap means the host does not keep up), the host-side ops with the most
self CPU time and the synchronising runtime calls; --cprofile adds a Python-level profile (cProfile) of three
training steps, the functions with the most own time and the most cumulative time: where the host time of the
step goes.
"""
import argparse
import cProfile
import functools
import json
import pstats
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vlonghorn  # noqa: F401  (registers the models with timm)
from harness import env_line, environment, wall_time


def _split(events):
    """(scan, everything else) GPU time in ms: the scan's forward, backward, chunk and combine kernels against the
    rest (issue 16's grouping: record preparation and partial sums count as the rest)."""
    scan = rest = 0.0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key.lstrip("_")
        if name.startswith(("scan_", "adjoint_chunk")):
            scan += e.self_device_time_total
        else:
            rest += e.self_device_time_total
    return scan / 1e3, rest / 1e3


def _train_step(model, x):
    with torch.autocast("cuda", torch.bfloat16):
        loss = model(x).float().square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vlonghorn_small")
    ap.add_argument("--res", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--train", action="store_true", help="profile a training step instead of a forward")
    ap.add_argument("--kwargs", default="{}", help="JSON keyword arguments for timm.create_model")
    ap.add_argument("--cprofile", action="store_true", help="with --train: cProfile three training steps")
    opt = ap.parse_args()
    kwargs = json.loads(opt.kwargs)
    print(env_line(environment()))
    for res, batch in zip(opt.res, opt.batch):
        model = timm.create_model(opt.model, img_size=res, **kwargs).cuda()
        x = torch.randn(batch, 3, res, res, device="cuda")
        print(f"{opt.model} {kwargs}, {res} px, batch {batch}")
        if opt.train:
            model.train()
            wall = wall_time(functools.partial(_train_step, model, x), n=5, warmup=3)   # the warm-up compiles
            print(f"step wall {wall * 1e3:.1f} ms (5 steps, no profiler)")
            if opt.cprofile:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(3):
                    _train_step(model, x)
                torch.cuda.synchronize()
                prof.disable()
                stats = pstats.Stats(prof)
                stats.sort_stats("tottime").print_stats(opt.rows)
                stats.sort_stats("cumtime").print_stats(opt.rows)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                _train_step(model, x)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            events = prof.key_averages()
            gpu = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"step wall {wall * 1e3:.1f} ms (under the profiler), GPU busy {gpu / 1e3:.1f} ms")
            print("GPU time: scan {:.2f} ms, everything else {:.2f} ms".format(*_split(events)))
            syncs = [e for e in events if any(s in e.key for s in ("Synchronize", "cudaMemcpy", "item"))]
            for e in syncs:
                print(f"  {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.1f} ms")
            print(events.table(sort_by="self_cpu_time_total", row_limit=opt.rows, max_name_column_width=60))
        else:
            model.eval()
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                for _ in range(3):   # compile and warm up
                    model(x)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model(x)
                    torch.cuda.synchronize()
            print("GPU time: scan {:.2f} ms, everything else {:.2f} ms".format(*_split(prof.key_averages())))
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=opt.rows, max_name_column_width=60))
        del model, x


if __name__ == "__main__":
    main()
