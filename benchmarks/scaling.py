"""Data-parallel scaling of train.py: images/s on 1..N GPUs of one host through `accelerate launch`.

    python benchmarks/scaling.py --data-dir data/cifar10 --gpus 1 2 [--model vlonghorn_small] [--kind KIND]
                                 [--out DIR] [--tag TAG]

Real input: CIFAR-10 JPEGs decoded and upscaled by the training transforms to --img-size (224), bf16, the same
per-GPU batch at every GPU count. Throughput is taken between two logged steps (after --warmup-steps), so
start-up and kernel compilation stay out of it. Also measures the data pipeline alone (the model removed), to
show it is not the bottleneck. Writes scaling_<device>_<date>[_<tag>].{json,md} (device with the host's GPU count,
e.g. h200-x4) and a log of each run next to them into --out (default benchmarks/results).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import RESULTS, ROOT, environment, md_table, result_stem, write_result

LINE = re.compile(r"train \d+ \[(\d+)/\d+\] .* (\d+) img/s")


def data_pipeline_rate(args) -> float:
    """Images/s of the training loader alone (decode, augment, collate) with the workers one process gets."""
    from vlonghorn.data import ImageFolderDataset, build_train_transform, worker_init
    dataset = ImageFolderDataset(args.data_dir, "train")
    dataset.transform = build_train_transform(args.img_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                              scale=(0.35, 1.0), reprob=0.25)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, worker_init_fn=worker_init)
    batches = 0
    for i, _ in enumerate(loader):
        if i == 10:
            start = time.perf_counter()
        if i >= 10:
            batches += 1
        if batches == args.data_batches:
            break
    return batches * args.batch_size / (time.perf_counter() - start)


def train_rate(args, gpus: int, log: Path) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
    launcher = [sys.executable] if gpus == 1 else [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(gpus), "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    command = launcher + [
        str(ROOT / "train.py"), "--config", str(ROOT / "configs/cifar10.yaml"), "--data-dir", args.data_dir,
        "--model", args.model, "--model-kwargs", "patch_size=16", "--img-size", str(args.img_size),
        "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--epochs", "1",
        "--stop-after-steps", str(args.steps), "--log-interval", "1", "--no-progress", "--mixed-precision", "bf16",
        "--output", tempfile.mkdtemp(), "--experiment", f"scaling-{gpus}gpu", "--checkpoint-steps", "0"]
    with open(log, "w") as f:
        rc = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    points = [(int(m.group(1)), float(m.group(2))) for m in LINE.finditer(log.read_text())]
    points = {step: rate for step, rate in points}  # train.py logs the cumulative img/s of all processes
    first, last = args.warmup_steps, max(points) if points else 0
    if rc != 0 or first not in points or last <= first:
        raise RuntimeError(f"{gpus}-GPU run failed (rc {rc}); see {log}")
    global_batch = args.batch_size * gpus
    elapsed = {s: s * global_batch / points[s] for s in (first, last)}
    total = (last - first) * global_batch / (elapsed[last] - elapsed[first])
    return dict(gpus=gpus, per_gpu_img_s=round(total / gpus, 1), total_img_s=round(total, 1),
                steps_timed=last - first)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--model", default="vlonghorn_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="per GPU")
    parser.add_argument("--workers", type=int, default=6, help="loader workers per process")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--data-batches", type=int, default=60)
    parser.add_argument("--kind", default=None, help="machine kind (e.g. nvidia-h200-x4), recorded with the results")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    host_gpus = torch.cuda.device_count()
    meta = environment(kind=args.kind, model=args.model, img_size=args.img_size, per_gpu_batch=args.batch_size,
                       workers_per_process=args.workers, precision="bf16")
    stem = result_stem("scaling", meta, args.tag, args.out, host_gpus)
    stem.parent.mkdir(parents=True, exist_ok=True)

    rows = []
    data_rate = data_pipeline_rate(args)
    print(f"data pipeline alone: {data_rate:.0f} img/s with {args.workers} workers", flush=True)
    for gpus in args.gpus:
        if gpus > host_gpus:
            print(f"{gpus} GPUs: not on this machine ({host_gpus})")
            continue
        rows.append(train_rate(args, gpus, Path(f"{stem}_{gpus}gpu.log")))
        print(rows[-1], flush=True)
    for row in rows:
        row["efficiency"] = round(row["total_img_s"] / (row["gpus"] * rows[0]["per_gpu_img_s"]), 3)

    meta["data_pipeline_img_s_per_process"] = round(data_rate, 1)
    lines = [f"# Data-parallel scaling of train.py, {args.model} at {args.img_size} px ({meta['date'][:10]})", "",
             f"{host_gpus} x {meta['device']}; torch {meta['torch']}, triton {meta['triton']}, timm {meta['timm']}. "
             f"bf16, per-GPU batch {args.batch_size}, CIFAR-10 JPEGs upscaled by the training transforms, "
             f"{args.workers} loader workers per process; timed between logged steps {args.warmup_steps} and "
             f"{args.steps}. The data pipeline alone gives {data_rate:.0f} img/s per process.", ""]
    lines += md_table(["GPUs", "img/s per GPU", "img/s total", "efficiency"],
                      [[r["gpus"], r["per_gpu_img_s"], r["total_img_s"], r["efficiency"]] for r in rows])
    md = "\n".join(lines) + "\n"
    write_result("scaling", meta, {"rows": rows}, md, args.tag, args.out, host_gpus)
    print(md + f"\nwritten: {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
