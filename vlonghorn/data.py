"""Image classification data for `train.py`: ImageFolder splits, albumentations transforms and a resumable sampler.

Layout on disk is the usual ImageNet one, `<root>/<split>/<class>/<image>`. Images are decoded with PIL into
HWC uint8 RGB arrays, augmented per image with albumentations, and normalized into CHW float tensors. Batch-level
mixup/cutmix is not here: it runs on the device in `train.py` (timm's `Mixup`).

Reproducibility contract: the sampler hands every sample a seed derived from (seed, epoch, index), and the
transform re-seeds its random state from it, so the augmented image depends on neither the number of loader
workers nor where a resumed run restarted. That is what makes a resumed run match an uninterrupted one.

Run `python -m vlonghorn.data digits <dir>` to write scikit-learn's 8x8 digits as a tiny ImageFolder (quickstart/CI).
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import signal
from pathlib import Path
from typing import Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import Dataset, Sampler

__all__ = [
    "IMG_EXTENSIONS", "SplitError", "ImageFolderDataset", "find_classes", "SeededTransform", "ShardedBatchSampler",
    "build_train_transform", "build_eval_transform", "export_digits_imagefolder", "worker_init",
]

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

_INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

# Per-process cap on warnings naming individual unreadable files; the training loop reports the full count.
_MAX_FILE_WARNINGS = 20


class SplitError(ValueError):
    """A dataset split is missing, empty, or its classes do not match the training split."""


def find_classes(split_dir: str | os.PathLike) -> dict[str, int]:
    """Class-name -> label map of a split folder: its sub-folder names, sorted (no image is opened or listed)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise SplitError(f"split folder {split_dir} does not exist (expected <data-dir>/<split>/<class>/<image>)")
    class_dirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise SplitError(f"split folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    return {name: i for i, name in enumerate(class_dirs)}


def _scan_split(split_dir: Path, class_to_idx: dict[str, int] | None) -> tuple[list[tuple[str, int]], dict[str, int]]:
    class_dirs = list(find_classes(split_dir))
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(class_dirs)}
    else:
        unknown = sorted(set(class_dirs) - set(class_to_idx))
        if unknown:
            raise SplitError(f"split folder {split_dir} has classes the training split lacks: {unknown[:10]}"
                             f"{' ...' if len(unknown) > 10 else ''}")
    samples = []
    for name in class_dirs:
        target = class_to_idx[name]
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=True):
            dirnames.sort()
            samples.extend((os.path.join(dirpath, f), target) for f in sorted(filenames)
                           if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    if not samples:
        raise SplitError(f"split folder {split_dir} holds no images (extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples, class_to_idx


class ImageFolderDataset(Dataset):
    """`<root>/<split>/<class>/<image>` as (image tensor, target, skipped) triples.

    Unreadable or corrupt images never raise mid-epoch: the next readable image in the split takes the sample's
    place, and `skipped` (an int per sample) counts how many files had to be passed over to fill it. It is nonzero
    exactly when the sample's own file is unreadable, so counting the nonzero ones counts the unreadable images
    (across workers and processes), and leaving those samples out sees every readable image once (evaluation).

    Args:
        root: dataset root folder.
        split: sub-folder name, e.g. "train" or "val".
        transform: called as `transform(image, seed)` on an HWC uint8 RGB array; None returns the array.
        class_to_idx: class-name -> label map to use (pass the training split's for evaluation splits).
        max_consecutive_failures: how many unreadable files in a row are tolerated before giving up.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform=None,
                 class_to_idx: dict[str, int] | None = None, max_consecutive_failures: int = 64):
        self.root = Path(root)
        self.split = split
        self.samples, self.class_to_idx = _scan_split(self.root / split, class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.get)
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> np.ndarray:
        """Decode sample `index` into an HWC uint8 RGB array (raises if the file is unreadable)."""
        path = self.samples[index][0]
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        skipped = 0
        for offset in range(min(len(self), self.max_consecutive_failures + 1)):
            i = (index + offset) % len(self)
            if i in self._bad:
                skipped += 1
                continue
            try:
                image = self.load(i)
                break
            except Exception as e:  # any decoder failure: truncated file, wrong format, I/O error
                self._bad.add(i)
                skipped += 1
                if len(self._bad) <= _MAX_FILE_WARNINGS:
                    _logger.warning("skipping unreadable image %s (%s: %s)", self.samples[i][0], type(e).__name__, e)
                    if len(self._bad) == _MAX_FILE_WARNINGS:
                        _logger.warning("further unreadable-image warnings are silenced in this worker; "
                                        "the per-epoch total is still reported")
        else:
            raise RuntimeError(f"{skipped} images in a row from {self.samples[index][0]} onwards in split "
                               f"'{self.split}' cannot be read; the dataset looks broken")
        if self.transform is not None:
            image = self.transform(image, seed)
        return image, self.samples[i][1], skipped


class SeededTransform:
    """An albumentations pipeline on HWC uint8 arrays whose randomness is re-seeded per sample.

    albumentations 2.x keeps a numpy Generator and a `random.Random` on every transform. `Compose.set_random_seed`
    seeds each with the same value, which correlates their decisions (e.g. flip and erasing fire together); here
    all transforms share one freshly seeded pair instead, drawing from a single stream in a fixed order.
    """

    def __init__(self, compose: A.BaseCompose):
        self.compose = compose
        self._nodes = list(_walk_transforms(compose))

    def __call__(self, image: np.ndarray, seed: int | None = None):
        if seed is not None:
            rng, py_rng = np.random.default_rng(seed), random.Random(seed)
            for node in self._nodes:
                node.random_generator = rng
                node.py_random = py_rng
        return self.compose(image=image)["image"]

    def __repr__(self) -> str:
        return f"SeededTransform({self.compose})"


def _walk_transforms(node):
    yield node
    for child in getattr(node, "transforms", ()):
        yield from _walk_transforms(child)


def _interpolation(name: str) -> int:
    if name not in _INTERPOLATIONS:
        raise ValueError(f"interpolation {name!r} is not one of {sorted(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name]


def _size_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    if len(img_size) == 3:  # timm's (C, H, W) input_size
        img_size = img_size[1:]
    return int(img_size[0]), int(img_size[1])


def _rand_augment_ops(magnitude: float) -> list[A.BasicTransform]:
    """RandAugment-style op pool (Cubuk et al., 2020) at magnitude 0..10, built from albumentations ops."""
    m = max(0.0, min(magnitude, 10.0)) / 10.0
    return [
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0), p=1.0),
        A.Posterize(num_bits=(max(1, round(8 - 4 * m)), 8), p=1.0),
        A.Sharpen(alpha=(0.0, 0.9 * m), lightness=(1.0, 1.0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0.0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.9 * m, p=1.0),
        A.ColorJitter(brightness=0.0, contrast=0.0, saturation=0.9 * m, hue=0.0, p=1.0),
    ]


def _parse_auto_augment(spec: str) -> tuple[int, float]:
    """'rand' or 'rand-m9-n2' -> (num_ops, magnitude)."""
    match = re.fullmatch(r"rand((?:-[mn][0-9.]+)*)", spec)
    if not match:
        raise ValueError(f"unknown auto-augment spec {spec!r}; use 'rand' or e.g. 'rand-m9-n2' (or none)")
    num_ops, magnitude = 2, 9.0
    for key, value in re.findall(r"-([mn])([0-9.]+)", match.group(1)):
        if key == "m":
            magnitude = float(value)
        else:
            num_ops = int(value)
    return num_ops, magnitude


def build_train_transform(
        img_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        auto_augment: str | None = None,
        reprob: float = 0.0,
) -> SeededTransform:
    """Training pipeline: random resized crop, flip, colour jitter or RandAugment-style ops, random erasing.

    As in timm, colour jitter is used only without auto-augment. Random erasing fills boxes with per-pixel random
    values before normalization. Returns a `SeededTransform` giving CHW float32 tensors.
    """
    h, w = _size_hw(img_size)
    ops: list[A.BasicTransform] = [A.RandomResizedCrop(size=(h, w), scale=tuple(scale), ratio=tuple(ratio),
                                                       interpolation=_interpolation(interpolation))]
    if hflip > 0:
        ops.append(A.HorizontalFlip(p=hflip))
    if auto_augment and auto_augment.lower() != "none":
        num_ops, magnitude = _parse_auto_augment(auto_augment)
        ops.append(A.SomeOf(_rand_augment_ops(magnitude), n=num_ops, replace=True, p=1.0))
    elif color_jitter and color_jitter > 0:
        ops.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0,
                                 p=1.0))
    if reprob > 0:
        ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=reprob))
    ops += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return SeededTransform(A.Compose(ops))


def build_eval_transform(
        img_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
) -> SeededTransform:
    """Evaluation pipeline with timm's crop_pct convention: resize to floor(size / crop_pct), center-crop size."""
    h, w = _size_hw(img_size)
    interp = _interpolation(interpolation)
    if h == w:
        resize = A.SmallestMaxSize(max_size=math.floor(h / crop_pct), interpolation=interp)
    else:
        resize = A.Resize(math.floor(h / crop_pct), math.floor(w / crop_pct), interpolation=interp)
    ops = [resize, A.CenterCrop(h, w), A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
           ToTensorV2()]
    return SeededTransform(A.Compose(ops))


class ShardedBatchSampler(Sampler[list]):
    """Batches of `(index, seed)` keys for one process, resumable at any sample position of an epoch.

    Every epoch draws a permutation and per-index augmentation seeds from (seed, epoch). Process `rank` of
    `world_size` takes every `world_size`-th element of the permutation, after the first `start` elements that
    earlier (interrupted) work already consumed. With the same world size, resuming at `start = k * batch_size *
    world_size` reproduces batches k, k+1, ... of the uninterrupted epoch exactly; with another world size no
    sample is repeated or lost.

    Args:
        num_samples: dataset length.
        batch_size: per-process batch size.
        shuffle: permute per epoch (training) or keep file order (evaluation).
        drop_last: drop the ragged tail so every process sees the same number of full batches (training). When
            False (evaluation), all samples are covered and processes may differ by one sample.
        batches_multiple_of: trim the batch count to a multiple of this (gradient accumulation steps).
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, batches_multiple_of: int = 1):
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError("num_samples and batch_size must be positive")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.rank, self.world_size, self.batches_multiple_of = rank, world_size, batches_multiple_of
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the number of its samples (over all processes) already consumed."""
        self.epoch, self.start = epoch, start

    def batches_per_epoch(self, start: int = 0) -> int:
        remaining = max(self.num_samples - start, 0)
        if self.drop_last:
            n = remaining // self.world_size // self.batch_size
            return n - n % self.batches_multiple_of
        return math.ceil(len(range(self.rank, remaining, self.world_size)) / self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch(self.start)

    def _order_and_seeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        seeds = torch.randint(0, 2 ** 31 - 1, (self.num_samples,), generator=g)
        return order, seeds

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = self._order_and_seeds()
        mine = order[self.start:][self.rank::self.world_size]
        n_batches = len(self)
        if self.drop_last:
            mine = mine[:n_batches * self.batch_size]
        keys = list(zip(mine.tolist(), seeds[mine].tolist()))
        for b in range(n_batches):
            yield keys[b * self.batch_size:(b + 1) * self.batch_size]


def worker_init(worker_id: int) -> None:
    """DataLoader worker setup: single-threaded OpenCV (no oversubscription), and SIGTERM left to the main process,
    which checkpoints before it exits (a scheduler's SIGTERM to the whole process group must not kill the loaders
    under it first)."""
    cv2.setNumThreads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def export_digits_imagefolder(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's 1,797 8x8 handwritten digits as PNGs in `<root>/{train,val}/<digit>/` (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    idx_train, idx_val = train_test_split(np.arange(len(images)), test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    root = Path(root)
    for split, indices in (("train", idx_train), ("val", idx_val)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    return root


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a small real dataset as an ImageFolder.")
    parser.add_argument("dataset", choices=["digits"], help="scikit-learn's 8x8 handwritten digits")
    parser.add_argument("out", help="output folder (gets train/ and val/)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    cli = parser.parse_args()
    print(export_digits_imagefolder(cli.out, cli.val_fraction))
