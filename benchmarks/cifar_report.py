"""CIFAR-10 comparison report from train.py run folders, plus a synthetic train-step throughput probe.

    python benchmarks/cifar_report.py throughput --model vlonghorn_tiny --out t.json     # model-only img/s
    python benchmarks/cifar_report.py report RUN_DIR [RUN_DIR ...] --out-dir benchmarks/results

`report` reads each run's summary.csv, args.yaml and the wall_clock.json written by train_cifar_gpu.sh, and
writes cifar10_<device>_<date>[_<tag>].{md,csv,json,png} (device: the GPUs of the host, e.g. h200-x2): per-epoch
top-1 curves, wall clock and images/s of every model.
"""
import argparse
import csv
import json
from pathlib import Path

import torch
import yaml

from harness import environment, result_stem, wall_time, write_result

VERSIONS = ("python", "torch", "cuda", "triton", "timm", "accelerate", "albumentations")


def _environment() -> dict:
    import accelerate
    import albumentations
    return environment(accelerate=accelerate.__version__, albumentations=albumentations.__version__)


def _devices(meta) -> str:
    return f"{meta['gpus']} x {meta['device']}" if meta["device_type"] == "cuda" else meta["device"]


def throughput(model_name: str, model_kwargs: dict, batch_size: int, steps: int, warmup: int) -> dict:
    """Images/s of forward + backward + AdamW step in bf16 autocast on synthetic 32 px data (no data loading)."""
    import timm

    import vlonghorn  # noqa: F401

    device = torch.device("cuda")
    model = timm.create_model(model_name, num_classes=10, **model_kwargs).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = wall_time(step, n=steps, warmup=warmup)
    return {"model": model_name, "model_kwargs": model_kwargs, "batch_size": batch_size, "steps": steps,
            "img_per_s": batch_size / seconds, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "device": _devices(environment())}


def _read_run(run_dir: Path) -> dict:
    with open(run_dir / "summary.csv") as f:
        rows = [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)]
    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    wall = json.loads((run_dir / "wall_clock.json").read_text()) if (run_dir / "wall_clock.json").exists() else {}
    steady = [r["train_img_s"] for r in rows[1:]] or [r["train_img_s"] for r in rows]
    processes = wall.get("processes", 1)
    name = args["model"] + (f" ({processes} processes, accelerate launch)" if processes > 1 else "")
    return {"name": name, "model": args["model"], "run_dir": str(run_dir), "args": args, "rows": rows,
            "epochs": len(rows), "final_top1": rows[-1]["eval_top1"] if rows else None,
            "best_top1": max((r["eval_top1"] for r in rows), default=None),
            "train_time_s": sum(r["epoch_time_s"] for r in rows),
            "train_img_s_mean_after_epoch0": sum(steady) / len(steady) if steady else None,
            "wall_clock_s": wall.get("wall_clock_s"), "processes": processes}


def report(run_dirs: list[Path], out_dir: Path, throughput_files: list[Path], tag: str = "") -> None:
    failed = [d for d in run_dirs if not (d / "summary.csv").is_file()]
    runs = [_read_run(d) for d in run_dirs if d not in failed]
    if not runs:
        raise SystemExit(f"no finished run among {[str(d) for d in run_dirs]}; see their logs")
    probes = [json.loads(p.read_text()) for p in throughput_files if p.exists()]
    meta = _environment()
    gpus = max(meta["gpus"], 1) if meta["device_type"] == "cuda" else 1
    stem = result_stem("cifar10", meta, tag, out_dir, gpus)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "epoch_time_s",
                         "train_img_s"])
        for r in runs:
            for row in r["rows"]:
                writer.writerow([r["name"], int(row["epoch"]), row["train_loss"], row["eval_loss"], row["eval_top1"],
                                 row["eval_top5"], row["lr"], row["epoch_time_s"], row["train_img_s"]])

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    single = [r for r in runs if r["processes"] == 1]  # the short multi-process check is not a curve to compare
    for r in single:
        ax.plot([row["epoch"] + 1 for row in r["rows"]], [row["eval_top1"] for row in r["rows"]], "o-", ms=3,
                label=f"{r['name']} (best {r['best_top1']:.2f}%)")
    ax.set(xlabel="epoch", ylabel="CIFAR-10 test top-1 (%)", title=f"CIFAR-10, 32 px, patch 4 — {_devices(meta)}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)

    a = runs[0]["args"]
    lines = [
        "# CIFAR-10 from scratch: vlonghorn_tiny vs deit_tiny (same recipe)", "",
        f"- date: {meta['date']}",
        f"- device: {_devices(meta)}",
        "- versions: " + ", ".join(f"{k} {meta[k]}" for k in VERSIONS),
        f"- recipe: `configs/cifar10.yaml`, model kwargs {a['model_kwargs']}, img {a['img_size']} px, "
        f"{a['epochs']} epochs, batch {a['batch_size']}, AdamW lr_base {a['lr_base']} @ {a['lr_base_size']}, "
        f"wd {a['weight_decay']}, warmup {a['warmup_epochs']}, drop-path {a['drop_path']}, mixup {a['mixup']}, "
        f"cutmix {a['cutmix']}, smoothing {a['smoothing']}, reprob {a['reprob']}, mixed precision "
        f"{a['mixed_precision']} (bf16 on GPU)",
        "- data: `../shared/data/cifar10-jpeg.tar.gz` (JPEG q~75 re-encode of CIFAR-10; 50k train / 10k test)", "",
        "| model | params (M) | epochs | best top-1 | final top-1 | train wall clock | whole run wall clock | "
        "train img/s (mean, epochs ≥ 2) | synthetic train-step img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        probe = next((p for p in probes if p["model"] == r["model"]), {})
        lines.append(
            f"| {r['name']} | {probe.get('params_m', float('nan')):.2f} | {r['epochs']} | {r['best_top1']:.2f} | "
            f"{r['final_top1']:.2f} | {r['train_time_s']:.0f} s | "
            f"{r['wall_clock_s'] if r['wall_clock_s'] is None else round(r['wall_clock_s'])} s | "
            f"{r['train_img_s_mean_after_epoch0']:.0f} | {probe.get('img_per_s', float('nan')):.0f} |")
    for d in failed:
        lines.append(f"| {d.name} | | | failed: no summary.csv (see {d.name}.log) | | | | | |")
    lines += ["", "Top-1 per epoch (test split):", "",
              "| epoch | " + " | ".join(r["name"] for r in single) + " |",
              "|---|" + "---|" * len(single)]
    for e in range(max(r["epochs"] for r in single)):
        cells = [f"{r['rows'][e]['eval_top1']:.2f}" if e < r["epochs"] else "" for r in single]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Train wall clock = sum of epoch training times (data loading included, evaluation excluded); "
                  "whole-run wall clock includes start-up, evaluation, checkpointing and plotting. "
                  "Synthetic img/s: forward + backward + AdamW in bf16 on random 32 px batches of 256, "
                  "no data loading.", ""]
    md = "\n".join(lines)
    summary = {"runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
               "failed_runs": [str(d) for d in failed], "synthetic_throughput": probes}
    write_result("cifar10", meta, summary, md, tag, out_dir, gpus)
    print(md + f"\nwritten: {stem}.{{json,md,csv,png}}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="synthetic train-step images/s of one model on the GPU")
    t.add_argument("--model", required=True)
    t.add_argument("--model-kwargs", default='{"patch_size": 4, "img_size": 32}', help="JSON dict")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--warmup", type=int, default=10)
    t.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("report", help="write cifar10_<device>_<date>.{md,csv,json,png} from run folders")
    r.add_argument("run_dirs", nargs="+", type=Path)
    r.add_argument("--throughput", nargs="*", type=Path, default=[])
    r.add_argument("--out-dir", type=Path, required=True)
    r.add_argument("--tag", default="", help="suffix for the result files")
    args = parser.parse_args()
    if args.cmd == "throughput":
        result = throughput(args.model, json.loads(args.model_kwargs), args.batch_size, args.steps, args.warmup)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    else:
        report(args.run_dirs, args.out_dir, args.throughput, args.tag)


if __name__ == "__main__":
    main()
