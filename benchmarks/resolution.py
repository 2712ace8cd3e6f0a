"""Accuracy when the image grows past the training size (issue 19): train each model with one recipe, then evaluate
its best weights at several multiples of the training size, without fine-tuning, with evaluation-time ablations.

    python benchmarks/resolution.py --data-dir data/cifar10 [--epochs 12] [--scales 1 1.5 2 3]
        [--models vlonghorn_tiny deit_tiny_patch16_224 alternate=vlonghorn_tiny:scan_order=alternate]
        [--jobs N] [--train-timeout S] [--runs output/resolution] [--tag TAG] [--no-ablations]
        [-- more train.py arguments]

A model is `[label=]name[:key=value,...]`: the keys are model kwargs for training and evaluation (over the recipe's
patch_size 4). Training is `train.py --config configs/cifar10.yaml --resume auto` (a killed run continues where it
stopped; a finished one is reused), `--jobs` runs at a time, each stopped after `--train-timeout` seconds (SIGTERM:
train.py checkpoints and exits); its best weights are then evaluated with the number of epochs it finished.

Evaluation builds each model as `train.py --eval-only --initial-checkpoint <run>/best --img-size <size>` does (the
checkpoint filter resamples the position embedding, bicubic; the test images resized to the size by the recipe's
eval transform) and measures top-1 on the whole test split. Ablations on Vision Longhorn (issue 19's diagnosis):
  step 1, step 1/s       every step size beta as trained, or times 1/s on a grid s times finer, in place of the
                         model's step_scale (default 'auto': times 1/s^2, the ratio of the grids' token counts)
  pos nearest            the position embedding resampled by nearest neighbour instead of bicubic
Writes resolution_<device>_<date>[_<tag>].{json,md} into benchmarks/results.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from harness import environment, md_table, write_result

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "cifar10.yaml"
TRAIN_SIZE = 32
PATCH = 4


def parse_spec(spec):
    """'[label=]name[:k=v,...]' -> (label, name, kwargs); values parsed as YAML scalars, as train.py does."""
    head, _, args = spec.partition(":")
    label, _, name = head.rpartition("=")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--models {spec}: expected key=value after ':', got {item!r}")
        kwargs[key] = yaml.safe_load(value)
    return label or name, name, kwargs


def train_command(label, name, kwargs, args, extra):
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(RECIPE), "--data-dir", args.data_dir,
           "--model", name, "--epochs", str(args.epochs), "--output", args.runs, "--experiment", f"train-{label}",
           "--resume", "auto", "--no-progress", *extra]
    if kwargs:
        cmd += ["--model-kwargs", *(f"{k}={v}" for k, v in kwargs.items())]
    return cmd


def train_all(specs, args, extra):
    """Train the runs that have no finished best weights, `--jobs` at a time; returns {label: epochs done}."""
    pending = [s for s in specs if not _finished(s[0], args)]
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            label, name, kwargs = pending.pop(0)
            log = open(Path(args.runs) / f"train-{label}.log", "a")
            cmd = train_command(label, name, kwargs, args, extra)
            print(" ".join(cmd), flush=True)
            running.append((label, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log))
        time.sleep(2)
        for item in list(running):
            label, proc, start, log = item
            if proc.poll() is None and args.train_timeout and time.time() - start > args.train_timeout:
                print(f"{label}: past --train-timeout, stopping it (SIGTERM: it checkpoints and exits)", flush=True)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if proc.poll() is not None:
                running.remove(item)
                log.close()
                print(f"{label}: training exited with {proc.returncode} after {time.time() - start:.0f} s", flush=True)
    return {label: _epochs_done(label, args) for label, _, _ in specs}


def _run_dir(label, args):
    return Path(args.runs) / f"train-{label}"


def _epochs_done(label, args):
    summary = _run_dir(label, args) / "summary.csv"
    return max(0, len(summary.read_text().splitlines()) - 1) if summary.is_file() else 0


def _finished(label, args):
    return (_run_dir(label, args) / "best" / "model.safetensors").is_file() and _epochs_done(label, args) >= args.epochs


# ---------------------------------------------------------------------------------------------------- evaluation
def test_images(args, size, mean, std, interpolation, device):
    """The whole test split through the recipe's eval transform at `size`, as one tensor on `device`, and labels."""
    from torch.utils.data import DataLoader
    from vlonghorn.data import ImageFolderDataset, build_eval_transform, find_classes

    data = Path(args.data_dir)
    dataset = ImageFolderDataset(data, "test", class_to_idx=find_classes(data / "train"),
                                 transform=build_eval_transform(size, mean, std, crop_pct=1.0,
                                                                interpolation=interpolation))
    images, labels = [], []
    for x, y, skipped in DataLoader(dataset, batch_size=500, num_workers=args.workers):
        if skipped.any():
            raise SystemExit(f"{int((skipped > 0).sum())} unreadable test images: this benchmark needs all of them")
        images.append(x.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32))
        labels.append(y.to(device))
    return torch.cat(images), torch.cat(labels)


@torch.no_grad()
def top1(model, images, labels, batch=500):
    correct = 0
    for i in range(0, len(images), batch):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            logits = model(images[i:i + batch].float())
        correct += (logits.argmax(1) == labels[i:i + batch]).sum().item()
    return 100.0 * correct / len(images)


def build(name, run, size, device):
    """The run's model at `size` with its best weights (architecture kwargs from the weights' config.json)."""
    import timm
    best = Path(run) / "best"
    arch = dict(json.loads((best / "config.json").read_text())["model_args"], img_size=size)
    model = timm.create_model(name, pretrained=True, num_classes=10, **arch,
                              pretrained_cfg_overlay=dict(file=str(best / "model.safetensors"), num_classes=10))
    return model.to(device).eval()


def nearest_pos_embed(model, run, size):
    """The checkpoint's position embedding resampled to the model's grid by nearest neighbour."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed
    pos = load_file(str(Path(run) / "best" / "model.safetensors"))["pos_embed"]
    old = TRAIN_SIZE // PATCH
    new = resample_abs_pos_embed(pos, new_size=(size // PATCH, size // PATCH), old_size=(old, old),
                                 num_prefix_tokens=1, interpolation="nearest", antialias=False)
    model.pos_embed.data.copy_(new.to(model.pos_embed.device))


def evaluate_all(specs, sizes, args):
    import timm
    import vlonghorn  # noqa: F401  (registers the models)
    from timm.data import resolve_data_config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {label: {"model": name, "kwargs": kwargs, "run": str(_run_dir(label, args)), "top1": {},
                       "ablations": {}} for label, name, kwargs in specs}
    # every model compared shares timm's ImageNet mean / std and bicubic resizing: the first one's data config
    cfg = resolve_data_config({}, model=timm.create_model(specs[0][1], pretrained=False, num_classes=10))
    for size in sizes:
        scale = size / TRAIN_SIZE
        images, labels = test_images(args, size, cfg["mean"], cfg["std"], cfg["interpolation"], device)
        for label, name, kwargs in specs:
            run = _run_dir(label, args)
            model = build(name, run, size, device)
            acc = results[label]["top1"][size] = top1(model, images, labels)
            print(f"{label} at {size} px: top-1 {acc:.2f}", flush=True)
            if args.no_ablations or not hasattr(model, "set_step_scale") or size == TRAIN_SIZE:
                continue
            ablations = results[label]["ablations"].setdefault(size, {})
            built = model.step_scale
            for tag, factor in (("step 1", 1.0), ("step 1/s", 1 / scale)):
                model.set_step_scale(factor)
                ablations[tag] = top1(model, images, labels)
            model.set_step_scale(built)
            nearest_pos_embed(model, run, size)
            ablations["pos nearest"] = top1(model, images, labels)
            print(f"{label} at {size} px, ablations: " + ", ".join(f"{k} {v:.2f}" for k, v in ablations.items()),
                  flush=True)
    return results


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models", nargs="+", default=["vlonghorn_tiny", "deit_tiny_patch16_224"])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0])
    ap.add_argument("--runs", default="output/resolution", help="parent folder of the training runs")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    ap.add_argument("--train-timeout", type=float, default=0, help="stop a training run after this many seconds")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="test-split loader workers")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--skip-training", action="store_true", help="evaluate the runs' best weights as they are")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    specs = [parse_spec(s) for s in args.models]
    if len({s[0] for s in specs}) != len(specs):
        ap.error("--models: two runs with one label; name them label=model:...")
    sizes = [round(s * TRAIN_SIZE) for s in args.scales]
    if any(s % PATCH for s in sizes):
        ap.error(f"--scales: every size must be a multiple of the patch ({PATCH} px); got {sizes}")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    epochs = ({label: _epochs_done(label, args) for label, _, _ in specs} if args.skip_training
              else train_all(specs, args, extra))
    missing = [label for label, _, _ in specs if not (_run_dir(label, args) / "best" / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(f"no best weights for {', '.join(missing)} (see {args.runs}/train-<label>.log)")
    results = evaluate_all(specs, sizes, args)
    for label in results:
        results[label]["epochs"] = epochs[label]

    head = ["model", "epochs"] + [f"{s} px ({x:g}x)" for s, x in zip(sizes, args.scales)]
    rows = []
    for label, r in results.items():
        base = r["top1"].get(TRAIN_SIZE)
        rows.append([label, str(r["epochs"])] + [
            f"{r['top1'][s]:.2f}" + (f" ({r['top1'][s] - base:+.2f})" if base is not None and s != TRAIN_SIZE else "")
            for s in sizes])
    lines = [*md_table(head, rows)]
    ablated = {label: r for label, r in results.items() if r["ablations"]}
    if ablated:
        tags = list(next(iter(next(iter(ablated.values()))["ablations"].values())))
        head = ["model", "size", "as built"] + tags
        rows = [[label, f"{s} px", f"{r['top1'][s]:.2f}"] + [f"{r['ablations'][s][t]:.2f}" for t in tags]
                for label, r in ablated.items() for s in r["ablations"]]
        lines += ["", "Evaluation-time ablations (top-1, same weights):", "", *md_table(head, rows)]
    meta = environment(epochs=args.epochs, recipe="configs/cifar10.yaml", extra_train_args=extra,
                       models=args.models)
    setup = (f"{meta['device']}, {meta['date'][:10]}; configs/cifar10.yaml, {args.epochs} epochs asked (column "
             "`epochs`: finished); best weights evaluated without fine-tuning on the whole test split, "
             "position embedding resampled bicubic. In brackets: the change from the training size. "
             f"`python benchmarks/resolution.py {' '.join(sys.argv[1:])}`")
    markdown = "\n".join([f"# Top-1 past the training size ({TRAIN_SIZE} px), CIFAR-10", "", setup, "", *lines])
    stem = write_result("resolution", meta, {"results": results, "sizes": sizes}, markdown, tag=args.tag)
    print(markdown)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
