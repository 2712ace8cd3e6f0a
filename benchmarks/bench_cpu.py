"""CPU inference latency of vlonghorn models next to timm's DeiT of the same size, in one process.

    python benchmarks/bench_cpu.py [--models vlonghorn_small] [--batches 1 8] [--repeats 10] [--tag TAG]

Eval mode, torch.inference_mode(), fp32, random inputs; median of --repeats after a warm-up. Writes
cpu_latency_cpu-<model>_<date>[_<tag>].{json,md} into --out (default benchmarks/results) with the machine, versions,
date and malloc settings.

On virtual machines where a page fault is expensive, glibc returning large freed blocks to the kernel makes every
big allocation fault its pages in again; both models pay it. Running with
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
keeps freed memory in the process; the settings in force are recorded with the results.
"""
import argparse
import os

import timm
import torch

import vlonghorn  # noqa: F401  (registers the models with timm)
from harness import RESULTS, cpu_time, environment, md_table, write_result

PEERS = {"vlonghorn_tiny": "deit_tiny_patch16_224", "vlonghorn_small": "deit_small_patch16_224",
         "vlonghorn_base": "deit_base_patch16_224"}
RESOLUTION = 224


def latency(model, batch, repeats):
    """(median, min) seconds of one forward."""
    x = torch.randn(batch, 3, RESOLUTION, RESOLUTION)
    with torch.inference_mode():
        return cpu_time(lambda: model(x), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vlonghorn_small"], choices=sorted(PEERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    for name in args.models:
        ours = timm.create_model(name).eval()
        peer = timm.create_model(PEERS[name]).eval()
        for batch in args.batches:
            ours_median, ours_min = latency(ours, batch, args.repeats)
            peer_median, peer_min = latency(peer, batch, args.repeats)
            rows.append(dict(model=name, peer=PEERS[name], batch=batch,
                             ms=round(ours_median * 1e3, 1), ms_min=round(ours_min * 1e3, 1),
                             peer_ms=round(peer_median * 1e3, 1), peer_ms_min=round(peer_min * 1e3, 1),
                             ratio=round(ours_median / peer_median, 2)))
            print(rows[-1], flush=True)

    meta = environment("cpu", threads=torch.get_num_threads(), repeats=args.repeats, resolution=RESOLUTION,
                       malloc={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    lines = [f"# CPU inference latency, {RESOLUTION} px, fp32 ({meta['date'][:10]})", "",
             f"{meta['cpu']}, {meta['cores']} cores, {meta['threads']} torch threads; torch {meta['torch']}, "
             f"timm {meta['timm']}. Median of {args.repeats} runs after a warm-up (min in brackets). "
             f"malloc settings: {meta['malloc'] or 'glibc defaults'}.", ""]
    lines += md_table(["model", "batch", "ms", "peer", "peer ms", "ratio (ours / peer)"],
                      [[r["model"], r["batch"], f"{r['ms']} ({r['ms_min']})", r["peer"],
                        f"{r['peer_ms']} ({r['peer_ms_min']})", r["ratio"]] for r in rows])
    md = "\n".join(lines) + "\n"
    stem = write_result("cpu_latency", meta, {"rows": rows}, md, args.tag, args.out)
    print(md + f"\nwritten: {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
