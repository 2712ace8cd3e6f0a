"""Accuracy when the image grows past the training size (issue 19): train each model with one recipe, then evaluate
its best weights at several multiples of the training size, without fine-tuning.

    python benchmarks/resolution.py --data-dir data/cifar10 [--epochs 12] [--scales 1 1.5 2 3]
        [--models vlonghorn_tiny deit_tiny_patch16_224] [--runs output/resolution] [--tag TAG]
        [--checkpoints RUN_DIR ...] [-- more train.py arguments]

Training is `train.py --config configs/cifar10.yaml` (32 px, patch 4) with the given epochs; evaluation is
`train.py --eval-only --initial-checkpoint <run>/best --img-size <scale x 32>` (the position embedding is resampled
by the model's checkpoint filter, the val images resized to the new size). `--checkpoints` evaluates existing run
folders instead of training (one per model, same order). Writes resolution_<device>_<date>[_<tag>].{json,md} into
benchmarks/results: top-1 at each scale and its drop from the training size.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import environment, md_table, write_result

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "cifar10.yaml"
TRAIN_SIZE = 32


def train(model, args, extra):
    run = Path(args.runs) / f"train-{model}"
    if (run / "best" / "model.safetensors").is_file():
        print(f"{model}: using the finished run {run}", flush=True)
        return run
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(RECIPE), "--data-dir", args.data_dir,
           "--model", model, "--epochs", str(args.epochs), "--output", args.runs, "--experiment", run.name,
           "--resume", "auto", "--no-progress", *extra]     # (a killed run continues where it stopped)
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run


def evaluate(model, run, size, args, extra):
    name = f"eval-{model}-{size}px"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(RECIPE), "--data-dir", args.data_dir,
           "--model", model, "--eval-only", "--initial-checkpoint", str(Path(run) / "best"), "--img-size", str(size),
           "--output", args.runs, "--experiment", name, "--no-progress", *extra]
    out = Path(args.runs) / name / "eval_results.json"
    out.unlink(missing_ok=True)
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())["model"]["top1"]


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", nargs="+", default=["vlonghorn_tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--runs", default="output/resolution", help="parent folder of the training and eval runs")
    ap.add_argument("--checkpoints", nargs="+", default=None, help="existing run folders, one per model")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if args.checkpoints and len(args.checkpoints) != len(args.models):
        ap.error(f"--checkpoints: {len(args.checkpoints)} run folders for {len(args.models)} models")
    sizes = [round(s * TRAIN_SIZE) for s in args.scales]
    if any(s % 4 for s in sizes):
        ap.error(f"--scales: every size must be a multiple of the patch (4 px); got {sizes}")
    results = {}
    for i, model in enumerate(args.models):
        run = args.checkpoints[i] if args.checkpoints else train(model, args, extra)
        results[model] = {"run": str(run), "top1": {}}
        for size in sizes:
            top1 = evaluate(model, run, size, args, extra)
            results[model]["top1"][size] = top1
            print(f"{model} at {size} px: top-1 {top1:.2f}", flush=True)
    head = ["model"] + [f"{s} px ({x:g}x)" for s, x in zip(sizes, args.scales)]
    rows = []
    for model, r in results.items():
        base = r["top1"][sizes[0]]
        rows.append([model] + [f"{r['top1'][s]:.2f}" + (f" ({r['top1'][s] - base:+.2f})" if s != sizes[0] else "")
                               for s in sizes])
    meta = environment(epochs=args.epochs, recipe="configs/cifar10.yaml", extra_train_args=extra)
    setup = (f"{meta['device']}, {meta['date'][:10]}; configs/cifar10.yaml, {args.epochs} epochs; evaluated "
             "without fine-tuning (`train.py --eval-only --img-size`). In brackets: the change from the training size.")
    markdown = "\n".join([f"# Top-1 past the training size ({TRAIN_SIZE} px), CIFAR-10", "", setup, "",
                          *md_table(head, rows)])
    stem = write_result("resolution", meta, {"results": results, "sizes": sizes}, markdown, tag=args.tag)
    print(markdown)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
