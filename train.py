#!/usr/bin/env python3
"""Train or fine-tune timm image classifiers (the vlonghorn backbones included) with Hugging Face Accelerate.

    python train.py --config configs/cifar10.yaml --data-dir data/cifar10 [--key value ...]
    accelerate launch --multi_gpu --num_processes 8 train.py --config configs/imagenet_vlonghorn_tiny.yaml ...

Values given on the command line override those of the YAML recipe, which override the defaults below. The data
is an ImageFolder (`<data-dir>/<split>/<class>/<image>`). A run writes into `<output>/<experiment>/`: args.yaml,
summary.csv, summary.png, train.log, tensorboard/, checkpoints/ (Accelerate states, resumable with
`--resume auto`), and last/ and best/ weights (model.safetensors + timm config.json) that load with

    timm.create_model(name, pretrained=True, num_classes=N, **model_kwargs,
                      pretrained_cfg_overlay=dict(file="<run>/best/model.safetensors", num_classes=N))

or simply `timm.create_model("local-dir:<run>/best", pretrained=True)`. A SIGTERM checkpoints and exits; the same
command with `--resume auto` continues where it stopped (on CPU, bit for bit as if never stopped).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, TorchDynamoPlugin, set_seed
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import timm
import timm.models
from timm.data import Mixup, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import vlonghorn  # noqa: F401  (registers the vlonghorn models with timm)
from vlonghorn.data import (ImageFolderDataset, ShardedBatchSampler, SplitError, build_eval_transform,
                            build_train_transform, find_classes, worker_init)
from vlonghorn.ops import scan_redone_share

_logger = logging.getLogger("train")


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help already speaks of its default or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _KeyValueAction(argparse.Action):
    """`k=v k2=v2 ...` -> dict, values parsed as YAML scalars (2 -> int, 0.1 -> float, true -> bool, [1,2] -> list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            if "=" not in item:
                parser.error(f"{option_string} expects key=value items, got {item!r}")
            key, value = item.split("=", 1)
            kwargs[key.strip().replace("-", "_")] = yaml.safe_load(value)
        setattr(namespace, self.dest, kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train or fine-tune a timm classifier on an ImageFolder with Accelerate "
                    "(YAML recipe via --config; command-line values override it).",
        formatter_class=_HelpFormatter)
    bool_flag = argparse.BooleanOptionalAction
    p.add_argument("--config", default=None, metavar="YAML",
                   help="recipe file whose keys are these options' names (dashes or underscores)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vlonghorn_tiny", help="timm model name (vlonghorn_* are registered too)")
    g.add_argument("--model-kwargs", nargs="*", default=None, action=_KeyValueAction, metavar="K=V",
                   help="extra timm.create_model kwargs, e.g. depth=4 embed_dim=96 patch_size=4; merged over the "
                        "recipe's model_kwargs")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: number of class folders in the training split)")
    g.add_argument("--img-size", type=int, default=None,
                   help="input resolution for data and model (default: the model's pretrained cfg)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (model default if unset)")
    g.add_argument("--drop", type=float, default=None, help="dropout before the classifier (model default if unset)")
    g.add_argument("--pretrained", action=bool_flag, default=False,
                   help="start from the model's pretrained weights (hub, or --initial-checkpoint)")
    g.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                   help="fine-tune from these weights (model.safetensors/.pth file, or a folder holding "
                        "model.safetensors such as <run>/best): the head is replaced when --num-classes differs and "
                        "position embeddings are resampled to --img-size by the model's checkpoint filter")
    g.add_argument("--grad-checkpointing", action=bool_flag, default=False,
                   help="activation checkpointing in the model's blocks (less memory, more compute)")
    g.add_argument("--channels-last", action=bool_flag, default=False, help="channels_last memory format")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training model (default backend: inductor; aot_eager checks tracing "
                        "only): removes most of eager mode's per-op host time, which limits vlonghorn's training "
                        "speed below batch 256 at 224 px on an H100")
    g.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="torch.compile mode with --compile, e.g. reduce-overhead (CUDA graphs: on one H100, "
                        "vlonghorn_small at batch 64 trained 2.2x faster than in eager mode)")

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="ImageFolder root holding <train-split>/ and <val-split>/")
    g.add_argument("--train-split", default="train", help="training split folder name")
    g.add_argument("--val-split", default="val", help="evaluation split folder name (e.g. 'test' for CIFAR)")
    g.add_argument("--batch-size", type=int, default=128, help="per-process batch size")
    g.add_argument("--eval-batch-size", type=int, default=None, help="per-process eval batch size (default 2x)")
    g.add_argument("--workers", type=int, default=4, help="data loader worker processes per process")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="override the model cfg's normalization mean")
    g.add_argument("--std", type=float, nargs=3, default=None, help="override the model cfg's normalization std")
    g.add_argument("--crop-pct", type=float, default=None,
                   help="eval resize = img_size / crop_pct, then center crop (default: the model cfg's)")
    g.add_argument("--interpolation", default=None, choices=["nearest", "bilinear", "bicubic", "area", "lanczos"],
                   help="resize interpolation (default: the model cfg's)")

    g = p.add_argument_group("augmentation and regularization")
    g.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="random resized crop area range")
    g.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="random resized crop aspect range")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--color-jitter", type=float, default=0.4, help="color jitter strength (only without --aa)")
    g.add_argument("--aa", default=None, help="RandAugment-style policy: 'rand' or e.g. 'rand-m9-n2' (none: off)")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"], help="how mixup params apply")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup/cutmix off from this epoch (0 = never)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: lr-base * global batch / lr-base-size)")
    g.add_argument("--lr-base", type=float, default=5e-4, help="learning rate at a global batch of --lr-base-size")
    g.add_argument("--lr-base-size", type=int, default=512, help="global batch size that --lr-base refers to")
    g.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (not on norms, biases, embeddings)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas")
    g.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise lr decay for fine-tuning, e.g. 0.75 (uses the model's group_matcher)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer update")
    g.add_argument("--sched", default="cosine", choices=["cosine", "tanh", "step", "multistep", "poly"],
                   help="lr schedule (stepped every update)")
    g.add_argument("--epochs", type=int, default=300, help="training epochs")
    g.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up epochs")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the start of warm-up")
    g.add_argument("--warmup-prefix", action=bool_flag, default=False,
                   help="start the decay after warm-up (default, as timm: the decay curve counts from update 0)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="floor of the schedule")
    g.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at min-lr after the schedule")
    g.add_argument("--decay-epochs", type=float, default=90, help="step schedule period")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=(90, 180, 270), help="multistep milestones")
    g.add_argument("--decay-rate", type=float, default=0.1, help="step/multistep decay factor")

    g = p.add_argument_group("model EMA")
    g.add_argument("--model-ema", action=bool_flag, default=False, help="keep and evaluate an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per update")
    g.add_argument("--model-ema-warmup", action=bool_flag, default=False,
                   help="ramp the EMA decay up over the first updates (for short runs)")

    g = p.add_argument_group("run, checkpoints and hardware")
    g.add_argument("--output", default="output/train", help="parent folder of run folders")
    g.add_argument("--experiment", default=None,
                   help="run folder name (default: <config name>-<model>); the same command run again after the run "
                        "finished trains a new run in <name>-1, <name>-2, ...")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue the newest run of this name from its latest checkpoint (start fresh if "
                        "none; nothing to do if it finished); or a checkpoint folder / run folder to continue from")
    g.add_argument("--checkpoint-steps", type=int, default=1000,
                   help="also checkpoint every N optimizer updates inside an epoch (0: only at epoch ends)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many newest checkpoints to keep")
    g.add_argument("--eval-only", action=bool_flag, default=False,
                   help="evaluate the val split (with --initial-checkpoint, --pretrained or --resume) and exit")
    g.add_argument("--seed", type=int, default=42, help="random seed (data order, augmentation, init)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                   help="autocast dtype; auto = bf16 on GPUs that support it, else fp32 (or accelerate config)")
    g.add_argument("--cpu", action=bool_flag, default=False, help="run on CPU even if a GPU is present")
    g.add_argument("--log-interval", type=int, default=50, help="micro-batches between progress/TensorBoard updates")
    g.add_argument("--progress", action=bool_flag, default=True, help="tqdm progress bars (main process)")
    g.add_argument("--stop-after-epochs", type=int, default=None,
                   help="exit cleanly once this many epochs are done, as a preempted job would (schedule still "
                        "follows --epochs; continue with --resume auto)")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="checkpoint and exit cleanly at this optimizer update (mid-epoch preemption)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    recipe_model_kwargs: dict[str, Any] = {}
    if pre.config:
        with open(pre.config) as f:
            recipe = yaml.safe_load(f) or {}
        recipe = {k.replace("-", "_"): v for k, v in recipe.items()}
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(recipe) - known)
        if unknown:
            parser.error(f"unknown keys in {pre.config}: {', '.join(unknown)}")
        recipe_model_kwargs = dict(recipe.pop("model_kwargs", None) or {})
        recipe.pop("config", None)
        parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    args.model_kwargs = {**recipe_model_kwargs, **(args.model_kwargs or {})}
    for name in ("scale", "ratio", "decay_milestones", "mean", "std", "opt_betas"):
        if getattr(args, name) is not None:
            setattr(args, name, list(getattr(args, name)))
    if args.aa is not None and str(args.aa).lower() == "none":
        args.aa = None
    return args


# --------------------------------------------------------------------------------------------------------------
# Run state and checkpoints
# --------------------------------------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything about the run's progress that `Accelerator.save_state` does not already hold."""
    epoch: int = 0                # epoch in progress (or next to start)
    samples_done: int = 0         # samples of `epoch` consumed over all processes (the data position)
    updates: int = 0              # optimizer updates so far
    loss_sum: float = 0.0         # training loss summed over the epoch's micro-batches of all processes ...
    loss_count: int = 0           # ... and their number, folded in at each checkpoint
    skipped: int = 0              # unreadable images replaced this epoch
    best_top1: float = -1.0
    best_epoch: int = -1
    best_source: str = ""
    world_size: int = 1
    batch_size: int = 0
    history: list = field(default_factory=list)   # one summary row per finished epoch

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Checkpoints:
    """Accelerate states under `<run>/checkpoints/`, saved atomically: written to a temporary folder, renamed
    into place, then named in the `latest` file (itself replaced atomically). A kill at any moment leaves the
    previous checkpoint intact and pointed to."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = run_dir / "checkpoints"
        self.keep = max(1, keep)

    def save(self, accelerator: Accelerator, name: str, meta: dict) -> Path:
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_text(tmp / "meta.json", json.dumps(meta, indent=2))
            if final.exists():  # a stale copy from before a resume; `latest` never names it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_text(self.dir / "latest", name + "\n")
            self._prune(keep_name=name)
        accelerator.wait_for_everyone()
        return final

    def _complete(self) -> list[tuple[int, int, Path]]:
        found = []
        if self.dir.is_dir():
            for d in self.dir.iterdir():
                meta = d / "meta.json"
                if d.is_dir() and not d.name.startswith(".") and meta.is_file():
                    m = json.loads(meta.read_text())
                    found.append((m["updates"], m["epoch_end"], d))
        return sorted(found)

    def _prune(self, keep_name: str) -> None:
        complete = self._complete()
        for _, _, d in complete[:-self.keep]:
            if d.name != keep_name:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.dir.glob(".tmp-*"):
            if d.name != f".tmp-{keep_name}":
                shutil.rmtree(d, ignore_errors=True)

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if pointer.is_file():
            d = self.dir / pointer.read_text().strip()
            if (d / "meta.json").is_file():
                return d
        complete = self._complete()
        return complete[-1][2] if complete else None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _run_series(base: Path) -> list[Path]:
    """`base` and the numbered runs beside it (`base-1`, `base-2`, ...) that exist, oldest first."""
    numbered = []
    if base.parent.is_dir():
        for d in base.parent.iterdir():
            suffix = d.name[len(base.name) + 1:] if d.name.startswith(f"{base.name}-") else ""
            if suffix.isdigit() and d.is_dir():
                numbered.append((int(suffix), d))
    return ([base] if base.is_dir() else []) + [d for _, d in sorted(numbered)]


def _epochs_done(checkpoint: Path) -> int:
    meta = json.loads((checkpoint / "meta.json").read_text())
    return meta["epoch"] + 1 if meta["epoch_end"] else meta["epoch"]


def resolve_run(base: Path, args: argparse.Namespace) -> tuple[Path, Path | None, list[tuple[int, str]]]:
    """The run folder, the checkpoint to resume from (or None) and notes for the log.

    A run folder is never trained over. As timm gives every run a folder of its own, running the command of a
    finished run again starts a new run in the next free `<base>-<n>`; an unfinished run (one with a checkpoint)
    must be continued with `--resume auto` or given another `--experiment`, so that no work is lost by mistake.
    `--resume auto` continues the newest run of the series. At most the newest run of a series is unfinished.
    """
    series = _run_series(base)
    newest = series[-1] if series else base
    if args.resume == "auto":
        resume_from = Checkpoints(newest, 1).latest()
        if resume_from is None:
            return newest, None, [(logging.INFO, f"--resume auto: no checkpoint in {newest} yet, starting fresh")]
        return newest, resume_from, []
    if args.resume is not None:
        resume_from = Path(args.resume)
        if (resume_from / "checkpoints").is_dir():
            resume_from = Checkpoints(resume_from, 1).latest()
        if resume_from is None or not (resume_from / "meta.json").is_file():
            raise SystemExit(f"--resume {args.resume}: no checkpoint found there")
        owner = next((d for d in series if d.resolve() in resume_from.resolve().parents), None)
        if owner is not None or args.eval_only:
            return owner or base, resume_from, []
    else:
        resume_from = None
        if args.eval_only:
            return base, None, []
    latest = Checkpoints(newest, 1).latest()
    if latest is None:      # a new series, or a run that stopped before its first checkpoint: start (over) there
        return newest, resume_from, []
    saved = newest / "args.yaml"
    epochs = (yaml.safe_load(saved.read_text()) or {}).get("epochs") if saved.is_file() else None
    done = _epochs_done(latest)
    if epochs is None or done < epochs:
        raise SystemExit(f"{newest} holds an unfinished run ({done} of {epochs or '?'} epochs done): pass --resume "
                         f"auto to continue it, or --experiment NAME to start another")
    number = int(newest.name[len(base.name) + 1:]) + 1 if newest != base else 1
    run_dir = base.with_name(f"{base.name}-{number}")
    return run_dir, resume_from, [(logging.INFO, f"{newest} holds a finished run ({done}/{epochs} epochs): this run "
                                                 f"writes to {run_dir}")]


class Preemption:
    """SIGTERM (sent by schedulers and `kill`) asks the run to checkpoint at the next update and exit.

    With several processes, all must stop at the same update, or some would enter save_state's barriers while
    others keep training. Their flags are summed over a CPU (gloo) process group of their own, without waiting:
    each check starts the sum of the flags as they are and returns the sum started at the previous check, which
    every process reads at the same check (one update late). The training step never waits for the device.
    Every process must call `requested` equally often, and `close` before the process group goes away.
    """

    def __init__(self, num_processes: int = 1):
        self.flag = False
        self._group = torch.distributed.new_group(backend="gloo") if num_processes > 1 else None
        self._pending: tuple[Any, torch.Tensor] | None = None    # the sum started at the previous check
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, signum, frame):
        self.flag = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once

    def requested(self) -> bool:
        if self._group is None:
            return self.flag
        stop = False
        if self._pending is not None:
            work, total = self._pending
            work.wait()
            stop = int(total[0]) > 0
        flags = torch.tensor([int(self.flag)], dtype=torch.int32)
        self._pending = (torch.distributed.all_reduce(flags, group=self._group, async_op=True), flags)
        return stop

    def close(self) -> None:
        """Wait for the sum still in flight (all processes started it, so it completes)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


# --------------------------------------------------------------------------------------------------------------
# Model, weights and data
# --------------------------------------------------------------------------------------------------------------

def _weights_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no model.safetensors in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"initial checkpoint {path} does not exist")
    return path


def _checkpoint_num_classes(path: Path, model_name: str) -> int | None:
    """Classifier size stored in a weights file (safetensors metadata, else the classifier weight's shape)."""
    classifier = timm.models.get_pretrained_cfg_value(model_name, "classifier") or "head"
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "num_classes" in meta:
                return int(meta["num_classes"])
            key = f"{classifier}.weight"
            return f.get_slice(key).get_shape()[0] if key in f.keys() else None
    state_dict = timm.models.load_state_dict(str(path))
    weight = state_dict.get(f"{classifier}.weight")
    return None if weight is None else weight.shape[0]


def create_model(args: argparse.Namespace, num_classes: int) -> tuple[torch.nn.Module, dict]:
    """timm.create_model with the run's kwargs; returns the model and the architecture kwargs that rebuild it."""
    arch_kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        if arch_kwargs.get("img_size", args.img_size) != args.img_size:
            raise ValueError(f"--img-size {args.img_size} contradicts model kwarg img_size={arch_kwargs['img_size']}")
        arch_kwargs["img_size"] = args.img_size
    train_kwargs = {}
    if args.drop_path is not None:
        train_kwargs["drop_path_rate"] = args.drop_path
    if args.drop is not None:
        train_kwargs["drop_rate"] = args.drop
    load_kwargs = {}
    if args.initial_checkpoint:
        weights = _weights_file(args.initial_checkpoint)
        overlay = dict(file=str(weights))
        ckpt_classes = _checkpoint_num_classes(weights, args.model)
        if ckpt_classes is not None:  # lets timm keep the head when sizes match and drop it when they differ
            overlay["num_classes"] = ckpt_classes
        load_kwargs = dict(pretrained=True, pretrained_cfg_overlay=overlay)
    elif args.pretrained:
        load_kwargs = dict(pretrained=True)
    try:
        model = timm.create_model(args.model, num_classes=num_classes, **arch_kwargs, **train_kwargs, **load_kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" in args.model_kwargs:
            raise
        # models without an img_size argument (most CNNs) take any resolution as is
        arch_kwargs.pop("img_size")
        model = timm.create_model(args.model, num_classes=num_classes, **arch_kwargs, **train_kwargs, **load_kwargs)
    for key in ("global_pool", "step_scale"):
        # recorded even when left at their defaults, so that the weights rebuild as trained if a default changes
        if isinstance(getattr(model, key, None), (str, float)):
            arch_kwargs.setdefault(key, getattr(model, key))
    return model, arch_kwargs


def export_weights(module: torch.nn.Module, folder: Path, model_name: str, num_classes: int, arch_kwargs: dict,
                   data_config: dict, tag: str, info: dict | None = None) -> None:
    """Write `folder/model.safetensors` (atomically) and a timm `config.json` whose pretrained cfg carries `tag`
    (timm's name for a set of weights: the run's name), so that both
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))` and
    `timm.create_model('local-dir:<folder>')` rebuild the model."""
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
    metadata = {"format": "pt", "architecture": model_name, "num_classes": str(num_classes),
                "model_args": json.dumps(arch_kwargs)}
    tmp = folder / ".model.safetensors.tmp"
    save_file(state_dict, str(tmp), metadata=metadata)
    os.replace(tmp, folder / "model.safetensors")
    pretrained_cfg = dict(getattr(module, "pretrained_cfg", {}) or {})
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items()
                      if k not in ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")}
    pretrained_cfg.update(tag=tag, num_classes=num_classes, input_size=list(data_config["input_size"]),
                          mean=list(data_config["mean"]), std=list(data_config["std"]),
                          crop_pct=data_config["crop_pct"], interpolation=data_config["interpolation"])
    config = {"architecture": model_name, "num_classes": num_classes,
              "num_features": getattr(module, "num_features", None), "model_args": arch_kwargs,
              "pretrained_cfg": pretrained_cfg}
    _write_text(folder / "config.json", json.dumps(config, indent=2, default=str))
    if info is not None:
        _write_text(folder / "info.json", json.dumps(info, indent=2))


def open_splits(args: argparse.Namespace) -> tuple[ImageFolderDataset | None, ImageFolderDataset]:
    """(the training split, None with --eval-only; the evaluation split, labelled as the training split).

    A missing or malformed split is one line naming the option that chooses it, never a traceback."""
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"--data-dir {data_dir}: no such folder (expected <data-dir>/<split>/<class>/<image>)")

    def split_error(option: str, split: str, error: SplitError) -> SystemExit:
        found = sorted(d.name for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        return SystemExit(f"{option} {split}: {error}; {data_dir} holds {', '.join(found) or 'no folders'}: "
                          f"name the split with {option}")

    train_set, class_to_idx = None, None
    train_dir = data_dir / args.train_split
    try:
        if not args.eval_only:
            train_set = ImageFolderDataset(data_dir, args.train_split)
            class_to_idx = train_set.class_to_idx
        elif train_dir.is_dir():  # labels still follow the training split's class folders when it is there
            class_to_idx = find_classes(train_dir)
    except SplitError as e:
        raise split_error("--train-split", args.train_split, e) from None
    try:
        val_set = ImageFolderDataset(data_dir, args.val_split, class_to_idx=class_to_idx)
    except SplitError as e:
        raise split_error("--val-split", args.val_split, e) from None
    return train_set, val_set


def build_loaders(args, accelerator: Accelerator, data_config: dict, train_set: ImageFolderDataset | None,
                  val_set: ImageFolderDataset) -> tuple[DataLoader | None, DataLoader]:
    """Give the datasets their transforms (from the model's data config) and this process's loaders."""
    img_size = data_config["input_size"][1:]
    mean, std = data_config["mean"], data_config["std"]
    loader_kwargs = dict(num_workers=args.workers, pin_memory=accelerator.device.type == "cuda",
                         worker_init_fn=worker_init, persistent_workers=args.workers > 0,
                         # a private generator keeps loader start-up from consuming the global RNG stream
                         generator=torch.Generator().manual_seed(args.seed))
    train_loader = None
    if train_set is not None:
        train_set.transform = build_train_transform(
            img_size, mean, std, scale=args.scale, ratio=args.ratio, interpolation=data_config["interpolation"],
            hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa, reprob=args.reprob)
        sampler = ShardedBatchSampler(len(train_set), args.batch_size, shuffle=True, drop_last=True, seed=args.seed,
                                      rank=accelerator.process_index, world_size=accelerator.num_processes,
                                      batches_multiple_of=args.grad_accum_steps)
        if sampler.batches_per_epoch() == 0:
            raise SplitError(f"the training split has {len(train_set)} images: too few for one update of "
                             f"{args.batch_size} x {args.grad_accum_steps} x {accelerator.num_processes} processes")
        train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    val_set.transform = build_eval_transform(img_size, mean, std, crop_pct=data_config["crop_pct"],
                                             interpolation=data_config["interpolation"])
    val_sampler = ShardedBatchSampler(len(val_set), args.eval_batch_size or 2 * args.batch_size, shuffle=False,
                                      drop_last=False, rank=accelerator.process_index,
                                      world_size=accelerator.num_processes)
    return train_loader, DataLoader(val_set, batch_sampler=val_sampler, **loader_kwargs)


# --------------------------------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, args, desc: str) -> dict:
    """Loss, top-1 and top-5 (%) over the split's readable images, exact across processes (each counted once),
    and `skipped`, the number of unreadable ones.

    The dataset hands an unreadable image's place to its next readable neighbour (marked by a nonzero skip count),
    which is also evaluated in its own place: those stand-ins are left out, so no image counts twice.
    Pass the unwrapped model: processes may see one batch more or less, and a DDP forward could wait on the others.
    """
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss, top1, top5, count, skipped
    bar = tqdm(loader, desc=desc, leave=False, disable=not (args.progress and accelerator.is_main_process))
    for images, targets, skipped in bar:
        images = images.to(accelerator.device, non_blocking=True)
        targets = targets.to(accelerator.device, non_blocking=True)
        skipped = skipped.to(accelerator.device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        readable = (skipped == 0).double()
        correct = logits.topk(k, dim=1).indices.eq(targets[:, None]).double() * readable[:, None]
        loss = F.cross_entropy(logits, targets, reduction="none").double() * readable
        totals += torch.stack([loss.sum(), correct[:, :1].sum(), correct.sum(), readable.sum(),
                               (1.0 - readable).sum()])
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    loss, top1, top5, count, skipped = totals.tolist()
    if count == 0:
        raise SystemExit(f"{desc}: none of the {int(skipped)} images of --val-split {args.val_split} can be read")
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
            "skipped": int(round(skipped))}


def train_one_epoch(epoch: int, ctx: dict) -> bool:
    """One (possibly resumed) epoch. Returns True when the run must stop (preemption / --stop-after-steps)."""
    args, accelerator, state = ctx["args"], ctx["accelerator"], ctx["state"]
    model, optimizer, scheduler, loader = ctx["model"], ctx["optimizer"], ctx["scheduler"], ctx["train_loader"]
    mixup_fn, criterion, ema, checkpoints = ctx["mixup_fn"], ctx["criterion"], ctx["ema"], ctx["checkpoints"]
    device = accelerator.device
    micro_batch = args.batch_size * accelerator.num_processes
    n_batches = len(loader)
    model.train()

    local = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, micro-batches, skipped images

    def fold_local():
        """Fold this process's running sums into the (process-identical) state, so checkpoints carry them."""
        totals = accelerator.reduce(local.clone(), reduction="sum") if accelerator.num_processes > 1 else local
        loss_sum, count, skipped = totals.tolist()
        state.loss_sum += loss_sum
        state.loss_count += int(round(count))
        state.skipped += int(round(skipped))
        local.zero_()

    bar = tqdm(total=n_batches, desc=f"train {epoch}", unit="batch", dynamic_ncols=True,
               disable=not (args.progress and accelerator.is_main_process))
    t_start = time.perf_counter()
    interval_loss, interval_n = torch.zeros((), device=device), 0
    for i, (images, targets, skipped) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with accelerator.accumulate(model):
            loss = criterion(model(images), targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        # samples whose own image was unreadable (the skip counts summed would count a run of bad files repeatedly)
        local += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device),
                              (skipped > 0).sum().to(device=device, dtype=torch.float64)])
        interval_loss += loss.float()
        interval_n += 1
        state.samples_done += micro_batch
        bar.update(1)

        if accelerator.sync_gradients:
            state.updates += 1
            scheduler.step_update(num_updates=state.updates)
            if ema is not None:
                ema.update(ctx["plain_model"], step=state.updates)

        if interval_n == args.log_interval or i + 1 == n_batches:
            elapsed = time.perf_counter() - t_start
            mean_loss = (interval_loss / interval_n).item()
            lr = max(group["lr"] for group in optimizer.param_groups)
            img_s = (i + 1) * micro_batch / elapsed
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
            redone = scan_redone_share(accelerator.device)   # None where the reconstructing backward never ran
            if bar.disable:  # no progress bar (batch jobs, logs): a line per interval instead
                _logger.info("train %d [%d/%d] loss %.4f lr %.3g %.0f img/s%s", epoch, i + 1, n_batches, mean_loss, lr,
                             img_s, "" if redone is None else f" | scan backward redone {redone:.3f}")
            accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/img_per_s": img_s,
                             **({} if redone is None else {"train/scan_redone_share": redone})}, step=state.updates)
            interval_loss.zero_()
            interval_n = 0

        # the epoch's last update is checkpointed by the epoch-end save, after evaluation
        if accelerator.sync_gradients and i + 1 < n_batches:
            stop = ctx["preemption"].requested() or (
                args.stop_after_steps is not None and state.updates >= args.stop_after_steps)
            if stop or (args.checkpoint_steps and state.updates % args.checkpoint_steps == 0):
                fold_local()
                checkpoints.save(accelerator, f"step_{state.updates:09d}",
                                 {"updates": state.updates, "epoch": epoch, "samples_done": state.samples_done,
                                  "epoch_end": False})
            if stop:
                bar.close()
                _logger.info("stopping at update %d (epoch %d, %d samples in); continue with --resume auto",
                             state.updates, epoch, state.samples_done)
                return True
    bar.close()
    fold_local()
    ctx["epoch_time"] = time.perf_counter() - t_start
    ctx["epoch_img_s"] = n_batches * micro_batch / max(ctx["epoch_time"], 1e-9)
    return False


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------

SUMMARY_FIELDS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr", "ema_eval_loss",
                  "ema_eval_top1", "ema_eval_top5", "epoch_time_s", "train_img_s", "skipped_images",
                  "eval_skipped_images"]


def write_summary(run_dir: Path, history: list[dict]) -> None:
    """summary.csv and summary.png, rewritten from the checkpointed history (so a resume never duplicates rows)."""
    tmp = run_dir / ".summary.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_FIELDS})
    os.replace(tmp, run_dir / "summary.csv")
    if history:
        plot_summary(history, run_dir / "summary.png")


def plot_summary(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["eval_loss"] for r in history], "o-", label="eval")
    ax_acc.plot(epochs, [r["eval_top1"] for r in history], "o-", label="top-1")
    ax_acc.plot(epochs, [r["eval_top5"] for r in history], "o-", label="top-5")
    if history[0].get("ema_eval_top1") is not None:
        ax_loss.plot(epochs, [r["ema_eval_loss"] for r in history], "o--", label="eval (EMA)")
        ax_acc.plot(epochs, [r["ema_eval_top1"] for r in history], "o--", label="top-1 (EMA)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="eval accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _hparams(args: argparse.Namespace, **extra) -> dict:
    """TensorBoard hparams accept only scalars."""
    out = {}
    for key, value in {**vars(args), **extra}.items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.data_dir is None:
        raise SystemExit("--data-dir is required (an ImageFolder root with train/ and val/ splits)")
    experiment = args.experiment or "-".join(filter(None, [Path(args.config).stem if args.config else None,
                                                           args.model]))
    run_dir, resume_from, notes = resolve_run(Path(args.output) / experiment, args)
    checkpoints = Checkpoints(run_dir, args.keep_checkpoints)

    dynamo_plugin = None
    if args.compile:
        try:
            dynamo_plugin = TorchDynamoPlugin(backend=args.compile.upper(), mode=args.compile_mode)
        except ValueError as e:
            raise SystemExit(f"--compile {args.compile}: not a torch.compile backend accelerate knows ({e})")
    elif args.compile_mode:
        raise SystemExit("--compile-mode needs --compile")

    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        if "ACCELERATE_MIXED_PRECISION" in os.environ:
            mixed_precision = None  # set by `accelerate launch` / `accelerate config`
        else:
            gpu = torch.cuda.is_available() and not args.cpu
            mixed_precision = "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=mixed_precision, step_scheduler_with_optimizer=False,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum_steps,
                                                                sync_with_dataloader=False),
        dynamo_plugin=dynamo_plugin,
        log_with=None if args.eval_only else "tensorboard",
        # the tracker is named "tensorboard" and writes to <logging_dir>/<its name>: <run>/tensorboard/
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (e.g. the loss) on Ampere+
    torch.backends.cudnn.allow_tf32 = True

    if resume_from is not None and not args.eval_only and _epochs_done(resume_from) >= args.epochs:
        best = _read_json(run_dir / "best" / "info.json")
        _logger.info("%s already finished training (%d/%d epochs%s): nothing to do. To train again, leave out "
                     "--resume (a new run folder); to train this run longer, raise --epochs.", run_dir,
                     _epochs_done(resume_from), args.epochs,
                     f"; best top-1 {best['eval_top1']:.2f} at epoch {best['epoch']}, in {run_dir / 'best'}"
                     if best else "")
        return {"history": [], "finished": True, "run_dir": str(run_dir)}

    # both splits are scanned and checked before the model or the run folder exists, so a bad --data-dir fails in
    # seconds and leaves nothing behind
    t_setup = time.perf_counter()
    train_set, val_set = open_splits(args)
    dataset_classes = len(val_set.class_to_idx)
    num_classes = args.num_classes or dataset_classes
    if num_classes < dataset_classes:
        raise SystemExit(f"--num-classes {num_classes} is smaller than the {dataset_classes} class folders")
    update_size = args.batch_size * args.grad_accum_steps * accelerator.num_processes
    if train_set is not None and len(train_set) < update_size:
        raise SystemExit(f"--batch-size {args.batch_size}: the training split's {len(train_set)} images are too few "
                         f"for one update of {args.batch_size} x {args.grad_accum_steps} accumulation steps x "
                         f"{accelerator.num_processes} processes")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not args.eval_only:
            handler = logging.FileHandler(run_dir / "train.log")
            handler.setFormatter(logging.getLogger().handlers[0].formatter)
            logging.getLogger().addHandler(handler)
    accelerator.wait_for_everyone()
    for level, message in notes:
        _logger.log(level, message)
    if not args.eval_only:
        _logger.info("run folder %s: train.log, args.yaml, summary.csv and .png, tensorboard/, checkpoints/, last/ "
                     "and best/ weights", run_dir)
    _logger.info("data %s: %s train / %d %s images, %d classes (scanned in %.1fs)", args.data_dir,
                 len(train_set) if train_set is not None else "-", len(val_set), args.val_split, dataset_classes,
                 time.perf_counter() - t_setup)

    set_seed(args.seed)
    model, arch_kwargs = create_model(args, num_classes)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_args = {"input_size": (3, args.img_size, args.img_size) if args.img_size else None,
                 "crop_pct": args.crop_pct, "mean": args.mean, "std": args.std, "interpolation": args.interpolation}
    data_config = resolve_data_config({k: v for k, v in data_args.items() if v is not None}, model=model)
    if args.img_size is None and "img_size" in arch_kwargs:
        size = arch_kwargs["img_size"]
        data_config["input_size"] = (3, *((size, size) if isinstance(size, int) else size))
    train_loader, val_loader = build_loaders(args, accelerator, data_config, train_set, val_set)
    set_seed(args.seed, device_specific=True)  # per-process stochasticity (drop-path, mixup) from here on

    n_params = sum(p.numel() for p in model.parameters())
    _logger.info("model %s %s: %.2fM params, %d classes, data %s", args.model, arch_kwargs, n_params / 1e6,
                 num_classes, {k: data_config[k] for k in ("input_size", "mean", "std", "crop_pct")})

    global_batch = args.batch_size * args.grad_accum_steps * accelerator.num_processes
    lr = args.lr if args.lr is not None else args.lr_base * global_batch / args.lr_base_size
    opt_kwargs = {k: v for k, v in (("eps", args.opt_eps), ("betas", args.opt_betas)) if v is not None}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
    updates_per_epoch = (len(train_loader) // args.grad_accum_steps) if train_loader is not None else 1
    warmup_epochs = args.warmup_epochs
    if warmup_epochs >= args.epochs:  # e.g. a 1-epoch smoke or benchmark run of a recipe with 3 warm-up epochs
        warmup_epochs = args.epochs - 1
        _logger.warning("warm-up of %g epochs does not fit a %d-epoch run: using %d", args.warmup_epochs,
                        args.epochs, warmup_epochs)
    # with a warm-up prefix timm appends the decay after the warm-up: shorten it so the run ends at --epochs
    decay_span = args.epochs - warmup_epochs if args.warmup_prefix else args.epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=decay_span, warmup_epochs=warmup_epochs,
        warmup_lr=args.warmup_lr, warmup_prefix=args.warmup_prefix, min_lr=args.min_lr,
        cooldown_epochs=args.cooldown_epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, decay_rate=args.decay_rate,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the plain module (no DDP, no torch.compile wrapper): evaluation, EMA and exported weights use it
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    if args.compile:
        _logger.info("training model under torch.compile (backend %s, mode %s): the first steps compile",
                     args.compile, args.compile_mode or "default")
    ema = None
    if args.model_ema:
        ema = ModelEmaV3(plain_model, decay=args.model_ema_decay,
                         use_warmup=args.model_ema_warmup)

    state = TrainState(world_size=accelerator.num_processes, batch_size=args.batch_size)
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        scheduler.step_update(num_updates=state.updates)
        _logger.info("resumed from %s: epoch %d, %d samples into it, update %d", resume_from, state.epoch,
                     state.samples_done, state.updates)
        if state.samples_done and (state.world_size != accelerator.num_processes
                                   or state.batch_size != args.batch_size):
            _logger.warning("resuming mid-epoch with a different world size or batch size: the rest of epoch "
                            "%d is re-sharded from sample %d on (no sample repeated or lost, order differs)",
                            state.epoch, state.samples_done)
        state.world_size, state.batch_size = accelerator.num_processes, args.batch_size

    if args.eval_only:
        results = {"model": evaluate(plain_model, val_loader, accelerator, args, "eval")}
        if ema is not None and resume_from is not None:
            results["model_ema"] = evaluate(ema.module, val_loader, accelerator, args, "eval (EMA)")
        if accelerator.is_main_process:
            print(json.dumps(results, indent=2))
            _write_text(run_dir / "eval_results.json", json.dumps(results, indent=2))
        if results["model"]["skipped"]:
            _logger.warning("%d unreadable %s images were left out", results["model"]["skipped"], args.val_split)
        _logger.info("eval of %d %s images: top-1 %.2f top-5 %.2f; results in %s", len(val_set) -
                     results["model"]["skipped"], args.val_split, results["model"]["top1"], results["model"]["top5"],
                     run_dir / "eval_results.json")
        accelerator.end_training()
        return results

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise SystemExit("mixup/cutmix needs an even --batch-size")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                         num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    if accelerator.is_main_process:
        saved_args = {k: v for k, v in vars(args).items() if k != "config"}
        _write_text(run_dir / "args.yaml", yaml.safe_dump(saved_args, sort_keys=False))
    accelerator.init_trackers("tensorboard", config=_hparams(args, lr_effective=lr, global_batch=global_batch))
    _logger.info("lr %.3g (global batch %d = %d x %d accum x %d processes), %d updates/epoch, %d epochs, "
                 "mixed precision %s, device %s", lr, global_batch, args.batch_size, args.grad_accum_steps,
                 accelerator.num_processes, updates_per_epoch, args.epochs, accelerator.mixed_precision,
                 accelerator.device)

    ctx = dict(args=args, accelerator=accelerator, state=state, model=model, plain_model=plain_model,
               optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, mixup_fn=mixup_fn,
               criterion=criterion, ema=ema, checkpoints=checkpoints,
               preemption=Preemption(accelerator.num_processes))
    t_run, epoch_start = time.perf_counter(), state.epoch
    while state.epoch < args.epochs:
        epoch = state.epoch
        if args.stop_after_epochs is not None and epoch >= args.stop_after_epochs:
            _logger.info("stopping after %d epochs as asked; continue with --resume auto", epoch)
            break
        if mixup_fn is not None:
            mixup_fn.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
        train_loader.batch_sampler.set_epoch(epoch, state.samples_done)
        if train_one_epoch(epoch, ctx):
            break

        metrics = evaluate(plain_model, val_loader, accelerator, args, f"eval {epoch}")
        ema_metrics = evaluate(ema.module, val_loader, accelerator, args, f"eval {epoch} (EMA)") if ema else {}
        row = {"epoch": epoch, "train_loss": state.loss_sum / max(state.loss_count, 1),
               "eval_loss": metrics["loss"], "eval_top1": metrics["top1"], "eval_top5": metrics["top5"],
               "lr": max(group["lr"] for group in optimizer.param_groups),
               "ema_eval_loss": ema_metrics.get("loss"), "ema_eval_top1": ema_metrics.get("top1"),
               "ema_eval_top5": ema_metrics.get("top5"), "epoch_time_s": ctx.get("epoch_time"),
               "train_img_s": ctx.get("epoch_img_s"), "skipped_images": state.skipped,
               "eval_skipped_images": metrics["skipped"]}
        state.history.append(row)
        if state.skipped or metrics["skipped"]:
            _logger.warning("epoch %d: unreadable images were skipped: %d in training (replaced by their neighbours), "
                            "%d in evaluation (left out)", epoch, state.skipped, metrics["skipped"])

        candidates = [("model", metrics["top1"], plain_model)]
        if ema is not None:
            candidates.append(("model_ema", ema_metrics["top1"], ema.module))
        source, top1, best_module = max(candidates, key=lambda c: c[1])
        is_best = top1 > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch, state.best_source = top1, epoch, source
        if accelerator.is_main_process:
            export = dict(model_name=args.model, num_classes=num_classes, arch_kwargs=arch_kwargs,
                          data_config=data_config, tag=run_dir.name)
            export_weights(plain_model, run_dir / "last", **export,
                           info={"epoch": epoch, "source": "model", "eval_top1": metrics["top1"]})
            if ema is not None:
                export_weights(ema.module, run_dir / "last" / "ema", **export,
                               info={"epoch": epoch, "source": "model_ema", "eval_top1": ema_metrics["top1"]})
            if is_best:
                export_weights(best_module, run_dir / "best", **export,
                               info={"epoch": epoch, "source": source, "eval_top1": top1})

        state.epoch, state.samples_done = epoch + 1, 0
        state.loss_sum, state.loss_count, state.skipped = 0.0, 0, 0
        checkpoints.save(accelerator, f"epoch_{epoch:04d}",
                         {"updates": state.updates, "epoch": epoch, "samples_done": 0, "epoch_end": True})
        if accelerator.is_main_process:
            write_summary(run_dir, state.history)
        accelerator.log({"eval/loss": metrics["loss"], "eval/top1": metrics["top1"], "eval/top5": metrics["top5"],
                         "train/loss_epoch": row["train_loss"],
                         **({"eval_ema/top1": ema_metrics["top1"], "eval_ema/loss": ema_metrics["loss"]}
                            if ema else {})}, step=state.updates)
        _logger.info("epoch %d: train loss %.4f | eval loss %.4f top-1 %.2f top-5 %.2f%s | %.1fs, %.0f img/s | "
                     "best %.2f (epoch %d, %s)", epoch, row["train_loss"], metrics["loss"], metrics["top1"],
                     metrics["top5"], f" | EMA top-1 {ema_metrics['top1']:.2f}" if ema else "",
                     row["epoch_time_s"], row["train_img_s"], state.best_top1, state.best_epoch, state.best_source)
        if ctx["preemption"].requested() or (
                args.stop_after_steps is not None and state.updates >= args.stop_after_steps):
            _logger.info("stopping after epoch %d (update %d) as asked; continue with --resume auto", epoch,
                         state.updates)
            break

    ctx["preemption"].close()
    if accelerator.is_main_process:
        write_summary(run_dir, state.history)
    accelerator.end_training()
    elapsed = _duration(time.perf_counter() - t_run)
    best = f"best top-1 {state.best_top1:.2f} (epoch {state.best_epoch}, {state.best_source})"
    if state.epoch >= args.epochs:
        _logger.info("training finished: %d epochs (%s for the last %d): %s | outputs in %s: best/ and last/ "
                     "weights (load with timm.create_model('local-dir:%s', pretrained=True)), summary.csv, "
                     "summary.png, train.log, tensorboard/", args.epochs, elapsed, state.epoch - epoch_start, best,
                     run_dir, run_dir / "best")
    else:
        _logger.info("stopped with %d of %d epochs done (update %d, after %s): %s | outputs so far in %s; continue "
                     "with the same command and --resume auto", state.epoch, args.epochs, state.updates, elapsed,
                     best if state.best_epoch >= 0 else "no epoch evaluated yet", run_dir)
    return {"history": state.history, "best_top1": state.best_top1, "best_epoch": state.best_epoch,
            "run_dir": str(run_dir)}


if __name__ == "__main__":
    main()
