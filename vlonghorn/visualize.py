"""A picture of what a backbone sees: the PCA of its patch features as RGB, next to the image.

    python -m vlonghorn.visualize --checkpoint output/train/digits-vlonghorn_tiny/best --image photo.jpg \\
        --out features.png [--img-size 448] [--block -1]

The image is resized (aspect kept, shorter side `--img-size`, sides rounded to the patch) and normalized as the
checkpoint's data config says; the backbone's map of one block (`forward_intermediates`, final norm applied) is
reduced to its three principal components, each stretched over [0, 1] (its 1st to 99th percentile), and shown as
the red, green and blue of each patch. Patches that look alike to the backbone get alike colours.

`--checkpoint` takes what `train.py` writes (a run folder, whose best/ is used; a best/ or last/ folder; its
model.safetensors), a folder of timm's `save_for_hf`, or any weights file with `--model` (and `--model-kwargs`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

import timm
import timm.data

import vlonghorn  # noqa: F401  (registers the vlonghorn models with timm)

__all__ = ["load_backbone", "patch_features", "pca_rgb", "render", "main"]


def _model_kwargs(items: list[str] | None) -> dict[str, Any]:
    kwargs = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-kwargs expects key=value items, got {item!r}")
        kwargs[key.replace("-", "_")] = yaml.safe_load(value)
    return kwargs


def load_backbone(checkpoint: str | Path, model: str | None = None, model_kwargs: dict | None = None,
                  device: str = "cpu") -> torch.nn.Module:
    """The model of `checkpoint` with its weights, in eval mode, taking any image size where it can."""
    path = Path(checkpoint)
    if (path / "best" / "model.safetensors").is_file():     # a train.py run folder
        path = path / "best"
    extra = dict(model_kwargs or {})
    if path.is_dir() and (path / "config.json").is_file() and model is None:
        name, load = f"local-dir:{path}", {}
    else:
        weights = path / "model.safetensors" if path.is_dir() else path
        if not weights.is_file():
            raise SystemExit(f"--checkpoint {checkpoint}: no model.safetensors or config.json there")
        meta = {}
        if weights.suffix == ".safetensors":
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
        name = model or meta.get("architecture")
        if name is None:
            raise SystemExit(f"--checkpoint {checkpoint}: the weights do not name their model; pass --model")
        if meta.get("architecture") == name and "model_args" in meta:
            extra = {**json.loads(meta["model_args"]), **extra}
        overlay = dict(file=str(weights))
        if "num_classes" in meta:
            overlay["num_classes"] = extra["num_classes"] = int(meta["num_classes"])
        load = dict(pretrained_cfg_overlay=overlay)
    try:    # any image size: the position embedding is resampled to the patch grid
        net = timm.create_model(name, pretrained=True, dynamic_img_size=True, **extra, **load)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
        net = timm.create_model(name, pretrained=True, **extra, **load)
    return net.to(device).eval()


def _patch_size(model: torch.nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, (list, tuple)) else info.info[-1]
        return int(last["reduction"])
    return 16


def _input_size(model: torch.nn.Module, image: Image.Image, img_size: int | None) -> tuple[int, int]:
    """(height, width) for the model: the shorter side `img_size` (default: the model's), aspect kept, both
    multiples of the patch; the model's own size if it takes no other."""
    native = timm.data.resolve_data_config(model=model)["input_size"][1:]
    if not getattr(model, "dynamic_img_size", False):
        return tuple(native)
    patch = _patch_size(model)
    short = img_size or min(native)
    scale = short / min(image.height, image.width)
    return tuple(max(patch, round(side * scale / patch) * patch) for side in (image.height, image.width))


@torch.inference_mode()
def patch_features(model: torch.nn.Module, image: Image.Image, img_size: int | None = None,
                   block: int = -1) -> tuple[torch.Tensor, np.ndarray]:
    """(features (C, h, w) of `block`, the RGB uint8 image (H, W, 3) the model saw, before normalization)."""
    config = timm.data.resolve_data_config(model=model)
    height, width = _input_size(model, image, img_size)
    resized = np.array(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.uint8)
    x = torch.from_numpy(resized).permute(2, 0, 1).float().div(255.0)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    x = ((x - mean) / std).unsqueeze(0).to(next(model.parameters()).device)
    maps = model.forward_intermediates(x, indices=[block], norm=True, output_fmt="NCHW", intermediates_only=True)
    return maps[0][0].float().cpu(), resized


def pca_rgb(features: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """Features (C, h, w) -> (RGB uint8 (h, w, 3) of the first three principal components, each stretched from
    its 1st to its 99th percentile, and the share of the variance each explains)."""
    channels, h, w = features.shape
    flat = features.reshape(channels, h * w).T.double()
    flat = flat - flat.mean(0)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(3, vh.shape[0])
    comps = flat @ vh[:k].T
    # a component's sign is arbitrary: fix it so that its largest loading is positive (the same picture each run)
    signs = torch.sign(vh[:k].gather(1, vh[:k].abs().argmax(1, keepdim=True))).squeeze(1)
    comps = comps * torch.where(signs == 0, 1.0, signs)
    lo, hi = torch.quantile(comps, 0.01, dim=0), torch.quantile(comps, 0.99, dim=0)
    rgb = ((comps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    if k < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(h * w, 3 - k)], dim=1)
    total = float((s ** 2).sum())
    explained = [float(v) / total if total > 0 else 0.0 for v in s[:k] ** 2]
    return (rgb.reshape(h, w, 3).numpy() * 255).round().astype(np.uint8), explained


def render(image: np.ndarray, rgb: np.ndarray, out: str | Path, captions: tuple[str, str]) -> None:
    """The image and the PCA map (each patch a block of colour), side by side, at least 256 px tall, each with a
    caption beneath, as a PNG (PIL only: no plotting library needed)."""
    from PIL import ImageDraw, ImageFont

    scale = max(1, -(-256 // image.shape[0]))       # small inputs (e.g. 8 px digits) are enlarged, pixels kept
    height, width = image.shape[0] * scale, image.shape[1] * scale
    gap, band = 8, 24
    canvas = Image.new("RGB", (2 * width + gap, height + band), "white")
    canvas.paste(Image.fromarray(image).resize((width, height), Image.NEAREST), (0, 0))
    canvas.paste(Image.fromarray(rgb).resize((width, height), Image.NEAREST), (width + gap, 0))
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:       # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(canvas)
    for x, caption in zip((2, width + gap + 2), captions):
        draw.text((x, height + 5), caption, fill="black", font=font)
    canvas.save(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlonghorn.visualize",
                                description="Write a PNG of an image and the PCA of a backbone's patch features.")
    p.add_argument("--checkpoint", required=True,
                   help="train.py run folder, best/ or last/ folder, timm save_for_hf folder, or weights file")
    p.add_argument("--image", required=True, help="image file (anything PIL reads)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--model", default=None, help="timm model name, for weights that do not name theirs")
    p.add_argument("--model-kwargs", nargs="*", default=None, metavar="K=V",
                   help="extra timm.create_model kwargs for --model, e.g. depth=12 img_size=32")
    p.add_argument("--img-size", type=int, default=None,
                   help="shorter side of the model's input in pixels (default: the checkpoint's input size)")
    p.add_argument("--block", type=int, default=-1, help="block whose features are shown (negative: from the end)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    progress = tqdm(total=4, desc="loading checkpoint", bar_format="{desc}: {n}/{total} [{elapsed}]",
                    file=sys.stderr)
    model = load_backbone(args.checkpoint, args.model, _model_kwargs(args.model_kwargs), args.device)
    progress.update()
    progress.set_description_str(f"features of {args.image}")
    try:
        image = Image.open(args.image)
        image.load()
    except OSError as e:
        progress.close()
        raise SystemExit(f"--image {args.image}: cannot read it ({e})")
    features, seen = patch_features(model, image, args.img_size, args.block)
    progress.update()
    progress.set_description_str("PCA")
    rgb, explained = pca_rgb(features)
    progress.update()
    progress.set_description_str(f"writing {args.out}")
    block = args.block if args.block >= 0 else len(model.feature_info) + args.block
    channels, h, w = features.shape
    render(seen, rgb, args.out, (f"input {seen.shape[0]} x {seen.shape[1]}",
                                 f"block {block}, {h} x {w} x {channels}: PCA {100 * sum(explained):.0f}%"))
    progress.update()
    progress.close()
    print(f"wrote {args.out}: block {block} of {args.checkpoint} on a {seen.shape[0]} x {seen.shape[1]} input, "
          f"{h} x {w} patches x {channels} channels; the three components explain "
          f"{', '.join(f'{100 * e:.1f}%' for e in explained)} of their variance")
    return {"out": args.out, "block": block, "grid": (h, w), "channels": channels, "explained": explained,
            "input_size": seen.shape[:2]}


if __name__ == "__main__":
    main()
