"""CPU inference latency of vlonghorn models next to timm's DeiT of the same size, in one process.

    python benchmarks/bench_cpu.py [--models vlonghorn_small] [--batches 1 8] [--repeats 10]

Eval mode, torch.inference_mode(), fp32, random inputs; median of --repeats after a warm-up. Writes
benchmarks/results/cpu_latency_<date>[_<tag>].{json,md} with the machine, versions, date and malloc settings.

On virtual machines where a page fault is expensive, glibc returning large freed blocks to the kernel makes every
big allocation fault its pages in again; both models pay it. Running with
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
keeps freed memory in the process; the settings in force are recorded with the results.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

import vlonghorn  # noqa: F401

PEERS = {"vlonghorn_tiny": "deit_tiny_patch16_224", "vlonghorn_small": "deit_small_patch16_224",
         "vlonghorn_base": "deit_base_patch16_224"}


def latency(model, batch, repeats, size=224):
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vlonghorn_small"], choices=sorted(PEERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
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

    date = datetime.date.today().isoformat()
    meta = dict(date=date, cpu=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                repeats=args.repeats, resolution=224,
                malloc={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu_latency_{date}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [f"# CPU inference latency, 224 px, fp32 ({date})", "",
             f"{meta['cpu']}, {meta['cores']} cores, {meta['threads']} torch threads; torch {meta['torch']}, "
             f"timm {meta['timm']}. Median of {args.repeats} runs after a warm-up (min in brackets). "
             f"malloc settings: {meta['malloc'] or 'glibc defaults'}.", "",
             "| model | batch | ms | peer | peer ms | ratio (ours / peer) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['ms']} ({r['ms_min']}) | {r['peer']} | "
                     f"{r['peer_ms']} ({r['peer_ms_min']}) | {r['ratio']} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
