"""End-to-end tests of train.py on CPU with real data (scikit-learn's 8x8 digits written as an ImageFolder).

Runs are subprocesses, as a user would start them; torch is pinned to one thread per process, which is both
faster on small CPUs shared with other work and keeps the floating-point reduction order fixed.
"""
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlonghorn.data import ImageFolderDataset, build_eval_transform, export_digits_imagefolder

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
DIGITS_RECIPE = REPO / "configs" / "digits.yaml"
TINY_KWARGS = dict(depth=2, embed_dim=48, patch_size=2, img_size=8)  # as in configs/digits.yaml
# every source of randomness is on: drop-path, mixup/cutmix, RandAugment, random erasing, EMA, 2 loader workers
RESUME_ARGS = ["--epochs", "3", "--batch-size", "16", "--grad-accum-steps", "2", "--checkpoint-steps", "4",
               "--workers", "2", "--drop-path", "0.1", "--mixup", "0.4", "--cutmix", "0.4", "--mixup-prob", "0.7",
               "--reprob", "0.3", "--aa", "rand-m5-n1", "--model-ema", "--model-ema-decay", "0.9"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def run_train(*args, check=True, timeout=600, launcher=None):
    cmd = [*(launcher or [sys.executable]), str(TRAIN), "--config", str(DIGITS_RECIPE), "--no-progress",
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexited {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_summary(run_dir):
    with open(Path(run_dir) / "summary.csv") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def _data_root(run_dir):
    return Path(yaml.safe_load((run_dir / "args.yaml").read_text())["data_dir"])


def _updates_per_epoch(run_dir):
    """From an epoch-end checkpoint: updates so far / epochs so far."""
    meta = json.loads(next((run_dir / "checkpoints").glob("epoch_*/meta.json")).read_text())
    return meta["updates"] // (meta["epoch"] + 1)


def assert_same_run(a, b):
    """Two runs that must be identical: every eval metric and the final weights bit for bit."""
    rows_a, rows_b = read_summary(a), read_summary(b)
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("eval_loss", "eval_top1", "eval_top5", "lr", "ema_eval_loss", "ema_eval_top1", "ema_eval_top5"):
            assert ra[key] == rb[key], (key, ra, rb)
        # the training loss is summed in float64 with the partial sums split at checkpoints: equal to ~1e-12
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-9, abs=1e-12)
    for weights in ("last/model.safetensors", "last/ema/model.safetensors"):
        wa, wb = load_file(str(Path(a) / weights)), load_file(str(Path(b) / weights))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{weights} differ"


@pytest.fixture(scope="module")
def train_module():
    spec = importlib.util.spec_from_file_location("train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """All 1,797 digits (train/val), plus two unreadable files in the training split and one in the val split."""
    root = export_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits")
    (root / "train" / "3" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    (root / "train" / "7" / "empty.jpg").write_bytes(b"")
    (root / "val" / "5" / "broken.png").write_bytes(b"not a png")   # its stand-in would be a "6"
    return root


@pytest.fixture(scope="module")
def small_digits(digits, tmp_path_factory):
    """32 training and 10 validation images per class: quick runs for the resume tests."""
    root = tmp_path_factory.mktemp("data") / "small_digits"
    for split, per_class in (("train", 32), ("val", 10)):
        for class_dir in sorted((digits / split).iterdir()):
            files = sorted(p for p in class_dir.iterdir() if p.name[0].isdigit())[:per_class]
            (root / split / class_dir.name).mkdir(parents=True)
            for p in files:
                shutil.copy(p, root / split / class_dir.name / p.name)
    return root


@pytest.fixture(scope="module")
def digits_run(digits, tmp_path_factory):
    """A 4-epoch run; its console output is in `console.txt` beside the run folder."""
    out = tmp_path_factory.mktemp("runs")
    proc = run_train("--data-dir", digits, "--output", out, "--experiment", "digits", "--epochs", "4")
    (out / "console.txt").write_text(proc.stdout + proc.stderr)
    return out / "digits"


@pytest.fixture(scope="module")
def reference_run(small_digits, tmp_path_factory):
    """An uninterrupted run that the interrupted ones must reproduce exactly."""
    out = tmp_path_factory.mktemp("runs")
    run_train("--data-dir", small_digits, "--output", out, "--experiment", "reference", *RESUME_ARGS)
    return out / "reference"


# ---------------------------------------------------------------------------------------------------- CLI

def test_help_documents_every_option(train_module):
    parser = train_module.build_parser()
    undocumented = [a.dest for a in parser._actions if a.dest != "help" and not (a.help or "").strip()]
    assert not undocumented
    options = {opt for a in parser._actions for opt in a.option_strings}
    for required in ("--model", "--model-kwargs", "--data-dir", "--num-classes", "--img-size", "--batch-size",
                     "--epochs", "--lr", "--weight-decay", "--warmup-epochs", "--drop-path", "--mixup", "--cutmix",
                     "--smoothing", "--model-ema", "--workers", "--seed", "--output", "--resume",
                     "--initial-checkpoint", "--pretrained", "--layer-decay", "--eval-only", "--config"):
        assert required in options, required
    # every default is stated once, and none as "None"
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.lower().count("default") <= 1 and "default: None" not in text, (action.dest, text)
    assert "(default: 128)" in formatter._expand_help(next(a for a in parser._actions if a.dest == "batch_size"))


def test_command_line_overrides_recipe(train_module, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vlonghorn_small\nlr: 0.1\nmodel-ema: true\nscale: [0.5, 1.0]\n"
                      "model_kwargs: {depth: 4, embed_dim: 96}\n")
    args = train_module.parse_args(["--config", str(recipe), "--lr", "0.2", "--no-model-ema",
                                    "--model-kwargs", "depth=2", "patch_size=4"])
    assert args.model == "vlonghorn_small" and args.lr == 0.2 and args.model_ema is False
    assert args.scale == [0.5, 1.0]
    assert args.model_kwargs == {"depth": 2, "embed_dim": 96, "patch_size": 4}
    recipe.write_text("lr: 0.1\nlearning_rate_typo: 3\n")
    with pytest.raises(SystemExit):
        train_module.parse_args(["--config", str(recipe)])


@pytest.mark.slow
def test_missing_split_is_one_line_naming_the_option(digits, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits / "train", data / "train")
    proc = run_train("--data-dir", data, "--output", tmp_path / "out", check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("--val-split val: split folder") and "does not exist" in error, proc.stderr
    assert "holds train" in error and "name the split with --val-split" in error
    assert not (tmp_path / "out").exists()      # no run folder, no empty train.log


# ---------------------------------------------------------------------------------------------------- learning

@pytest.mark.slow
def test_digits_learns_and_writes_timm_style_outputs(digits_run):
    rows = read_summary(digits_run)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    best = max(r["eval_top1"] for r in rows)
    assert best >= 80.0, rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["skipped_images"] == 2 for r in rows)     # the two unreadable training files, every epoch
    assert all(r["eval_skipped_images"] == 1 for r in rows)     # and the unreadable val file
    for name in ("args.yaml", "summary.png", "train.log", "last/model.safetensors", "last/config.json",
                 "best/model.safetensors", "best/info.json", "checkpoints/latest"):
        assert (digits_run / name).is_file(), name
    assert list((digits_run / "tensorboard").glob("events.out.tfevents.*"))
    assert not (digits_run / "tensorboard" / "tensorboard").exists()
    info = json.loads((digits_run / "best" / "info.json").read_text())
    assert info["eval_top1"] == best
    config = json.loads((digits_run / "best" / "config.json").read_text())
    assert config["pretrained_cfg"]["tag"] == "digits"          # the run's name, not the untrained cfg's
    assert "2 in training (replaced by their neighbours), 1 in evaluation" in (digits_run / "train.log").read_text()


@pytest.mark.slow
def test_console_says_where_outputs_went(digits_run):
    console = (digits_run.parent / "console.txt").read_text()
    assert f"run folder {digits_run}:" in console
    last = console.strip().splitlines()[-1]
    assert "training finished: 4 epochs" in last and f"outputs in {digits_run}:" in last, last
    assert f"local-dir:{digits_run / 'best'}" in last
    assert "is_fx_tracing" not in console and "Traceback" not in console


@pytest.mark.slow
def test_best_weights_load_with_timm(digits_run):
    import timm

    import vlonghorn  # noqa: F401

    weights = digits_run / "best" / "model.safetensors"
    model = timm.create_model("vlonghorn_tiny", pretrained=True, num_classes=10, **TINY_KWARGS,
                              pretrained_cfg_overlay=dict(file=str(weights), num_classes=10)).eval()
    from_dir = timm.create_model(f"local-dir:{digits_run / 'best'}", pretrained=True).eval()
    saved = load_file(str(weights))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    cfg = timm.data.resolve_data_config(model=from_dir)
    assert cfg["input_size"] == (3, 8, 8) and cfg["crop_pct"] == 1.0
    # the reloaded model reproduces the recorded accuracy, over the readable val images (each once)
    val = ImageFolderDataset(_data_root(digits_run), "val",
                             build_eval_transform(8, cfg["mean"], cfg["std"], crop_pct=cfg["crop_pct"]))
    readable = [item for item in (val[i] for i in range(len(val))) if item[2] == 0]
    assert len(readable) == len(val) - 1
    images = torch.stack([image for image, _, _ in readable])
    targets = torch.tensor([target for _, target, _ in readable])
    with torch.no_grad():
        logits = model(images)
        torch.testing.assert_close(from_dir(images), logits)
    top1 = 100.0 * (logits.argmax(1) == targets).double().mean().item()
    assert top1 == pytest.approx(json.loads((digits_run / "best" / "info.json").read_text())["eval_top1"], abs=1e-6)


@pytest.mark.slow
def test_eval_only_and_finetune_new_head_and_resolution(digits_run, small_digits, train_module, tmp_path):
    best = digits_run / "best"
    best_top1 = json.loads((best / "info.json").read_text())["eval_top1"]
    proc = run_train("--data-dir", _data_root(digits_run), "--eval-only", "--initial-checkpoint", best,
                     "--output", tmp_path, "--experiment", "eval")
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert results["model"]["top1"] == pytest.approx(best_top1, abs=1e-6) and results["model"]["skipped"] == 1
    assert f"results in {tmp_path / 'eval' / 'eval_results.json'}" in proc.stdout

    # fine-tuning: 12-way head and 12 px input from the 10-way, 8 px checkpoint; the trunk is loaded as is
    args = train_module.parse_args(["--config", str(DIGITS_RECIPE), "--initial-checkpoint", str(best),
                                    "--img-size", "12", "--num-classes", "12"])
    model, arch_kwargs = train_module.create_model(args, num_classes=12)
    saved = load_file(str(best / "model.safetensors"))
    state = model.state_dict()
    assert arch_kwargs["img_size"] == 12 and state["head.weight"].shape[0] == 12
    # recorded though the recipe leaves them at their defaults
    assert arch_kwargs["global_pool"] == model.global_pool and arch_kwargs["step_scale"] == "auto"
    # the steps were learned on the checkpoint's grid, which the fine-tuned model keeps (below: loaded as is)
    assert saved["step_grid"].tolist() == [4, 4] and model.step_grid_size == (4, 4)
    resampled = [k for k in saved if k in state and saved[k].shape != state[k].shape]
    assert resampled and all("pos_embed" in k or k.startswith("head.") for k in resampled), resampled
    assert all(torch.equal(saved[k], state[k]) for k in saved if k in state and k not in resampled)
    # layer-wise lr decay follows the model's group_matcher: deeper groups get larger lr scales, the head 1.0
    optimizer = train_module.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 0.75
    # and the whole fine-tuning path runs from the command line
    run_train("--data-dir", small_digits, "--initial-checkpoint", best, "--img-size", "12", "--layer-decay", "0.75",
              "--epochs", "1", "--output", tmp_path, "--experiment", "finetune")
    rows = read_summary(tmp_path / "finetune")
    assert len(rows) == 1 and rows[0]["eval_top1"] > 10.0   # above chance after one epoch


# ---------------------------------------------------------------------------------------------------- never lose work

@pytest.mark.slow
def test_compiled_training_resumes_and_exports_plain_weights(small_digits, tmp_path):
    """--compile (aot_eager here: the tracing without a C++ toolchain): trains, resumes, and writes checkpoints and
    exported weights with the plain model's keys."""
    import timm
    import vlonghorn  # noqa: F401  (registers the models)
    args = ("--data-dir", small_digits, "--output", tmp_path, "--experiment", "compiled", "--epochs", "2",
            "--compile", "aot_eager")
    proc = run_train(*args, "--stop-after-epochs", "1")
    assert "under torch.compile (backend aot_eager, mode default)" in proc.stdout + proc.stderr
    run_train(*args, "--resume", "auto")
    rows = read_summary(tmp_path / "compiled")
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["eval_top1"] > 0 for r in rows)
    plain = timm.create_model("vlonghorn_tiny", num_classes=10, **TINY_KWARGS).state_dict().keys()
    for weights in ("last/model.safetensors", "best/model.safetensors", "checkpoints/latest"):
        path = tmp_path / "compiled" / weights
        if path.name == "latest":
            path = path.parent / path.read_text().strip() / "model.safetensors"
        assert load_file(str(path)).keys() == plain, weights


def _fake_run(run_dir, epochs_done, epochs):
    """A run folder as far as train.resolve_run reads it: args.yaml and an epoch-end checkpoint named latest."""
    ckpt = run_dir / "checkpoints" / f"epoch_{epochs_done - 1:04d}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"updates": 10 * epochs_done, "epoch": epochs_done - 1,
                                                "samples_done": 0, "epoch_end": True}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    (run_dir / "args.yaml").write_text(yaml.safe_dump({"epochs": epochs}))


def test_run_folders_are_never_trained_over(train_module, tmp_path):
    """A finished run's command run again trains a new run in <name>-<n> (timm gives every run a folder of its
    own); an unfinished run must be continued (--resume auto: the newest of the series) or named otherwise."""
    def resolve(*argv):
        args = train_module.parse_args(["--config", str(DIGITS_RECIPE), "--data-dir", "data", *argv])
        return train_module.resolve_run(base, args)

    base = tmp_path / "digits"
    assert resolve()[:2] == (base, None)
    base.mkdir()
    (base / "train.log").write_text("a run that failed before its first checkpoint")
    assert resolve()[:2] == (base, None)                                  # starts over in place
    _fake_run(base, 8, 8)
    run_dir, resume_from, notes = resolve()
    assert (run_dir, resume_from) == (tmp_path / "digits-1", None)
    assert notes[0][1] == f"{base} holds a finished run (8/8 epochs): this run writes to {run_dir}"
    assert resolve("--eval-only")[:2] == (base, None)
    _fake_run(tmp_path / "digits-1", 3, 8)                               # the second run stopped after 3 epochs
    with pytest.raises(SystemExit, match=r"digits-1 holds an unfinished run \(3 of 8 epochs done\): pass --resume"):
        resolve()
    run_dir, resume_from, _ = resolve("--resume", "auto")
    assert run_dir == tmp_path / "digits-1" and resume_from == run_dir / "checkpoints" / "epoch_0002"
    run_dir, resume_from, _ = resolve("--resume", str(base / "checkpoints" / "epoch_0007"))
    assert run_dir == base and resume_from.name == "epoch_0007"         # a checkpoint continues in its own run
    for name in ("digits-old", "digits-2x"):                             # not numbered runs of the series
        (tmp_path / name).mkdir()
    (tmp_path / "digits-1" / "checkpoints" / "latest").unlink()
    _fake_run(tmp_path / "digits-1", 8, 8)
    assert resolve()[0] == tmp_path / "digits-2"


@pytest.mark.slow
def test_rerunning_a_finished_run_trains_a_new_one(small_digits, tmp_path):
    args = ("--data-dir", small_digits, "--output", tmp_path, "--experiment", "again", "--epochs", "1")
    run_train(*args)
    proc = run_train(*args)                 # the README's situation: the same command once more
    assert f"{tmp_path / 'again'} holds a finished run (1/1 epochs): this run writes to {tmp_path / 'again-1'}" \
        in proc.stdout
    assert len(read_summary(tmp_path / "again")) == len(read_summary(tmp_path / "again-1")) == 1


@pytest.mark.slow
def test_resume_auto_on_a_finished_run_says_so(digits_run):
    proc = run_train("--data-dir", _data_root(digits_run), "--output", digits_run.parent, "--experiment", "digits",
                     "--epochs", "4", "--resume", "auto")
    best = json.loads((digits_run / "best" / "info.json").read_text())
    assert (f"{digits_run} already finished training (4/4 epochs; best top-1 {best['eval_top1']:.2f} at epoch "
            f"{best['epoch']}") in proc.stdout
    assert "leave out --resume (a new run folder)" in proc.stdout
    assert not (digits_run.parent / "digits-1").exists() and len(read_summary(digits_run)) == 4


def test_preemption_check_never_waits(train_module, monkeypatch):
    """With several processes the SIGTERM flags are summed on the CPU in a gloo group, asynchronously: each check
    starts a sum and reads the one the previous check started. No device tensor, no accelerator.reduce, no wait on
    the device in the training step."""
    calls = []

    class Work:
        def wait(self):
            calls.append("wait")

    def all_reduce(tensor, group=None, async_op=False):
        calls.append((tensor.device.type, group, async_op))
        return Work()

    monkeypatch.setattr(torch.distributed, "new_group", lambda backend: f"{backend} group")
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        preemption = train_module.Preemption(num_processes=2)
        assert preemption.requested() is False and calls == [("cpu", "gloo group", True)]    # nothing to read yet
        preemption.flag = True
        assert preemption.requested() is False                  # reads the sum started before the flag was set
        assert preemption.requested() is True
        assert calls[1:] == ["wait", ("cpu", "gloo group", True)] * 2
        preemption.close()
        assert calls[-1] == "wait"
    finally:
        signal.signal(signal.SIGTERM, handler)


def _preemption_worker(train_module, rank, init_file, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    preemption = train_module.Preemption(num_processes=2)
    for step in range(10):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)                # one process is told to stop
        if preemption.requested():
            break
    preemption.close()
    dist.destroy_process_group()
    queue.put((rank, step))


def test_preemption_stops_every_process_at_the_same_update(train_module, tmp_path):
    import multiprocessing
    ctx = multiprocessing.get_context("fork")   # the children inherit the loaded train module
    queue = ctx.Queue()
    procs = [ctx.Process(target=_preemption_worker, args=(train_module, rank, tmp_path / "init", queue))
             for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(queue.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert results == [(0, 4), (1, 4)]          # the flag raised before check 3 is read by both at check 4


@pytest.mark.slow
def test_resume_at_epoch_boundary_matches_uninterrupted(reference_run, small_digits):
    out = reference_run.parent
    run_train("--data-dir", small_digits, "--output", out, "--experiment", "epoch_stop", *RESUME_ARGS,
              "--stop-after-epochs", "1")
    assert len(read_summary(out / "epoch_stop")) == 1
    # a second start without --resume refuses to overwrite the run
    proc = run_train("--data-dir", small_digits, "--output", out, "--experiment", "epoch_stop", *RESUME_ARGS,
                     check=False)
    assert proc.returncode != 0 and "--resume auto" in proc.stderr + proc.stdout
    run_train("--data-dir", small_digits, "--output", out, "--experiment", "epoch_stop", *RESUME_ARGS,
              "--resume", "auto")
    assert_same_run(reference_run, out / "epoch_stop")


@pytest.mark.slow
def test_resume_mid_epoch_matches_uninterrupted(reference_run, small_digits):
    out = reference_run.parent
    updates_per_epoch = _updates_per_epoch(reference_run)
    stop_at = updates_per_epoch + updates_per_epoch // 2 + 1           # inside epoch 1, not on a checkpoint step
    run_train("--data-dir", small_digits, "--output", out, "--experiment", "mid_stop", *RESUME_ARGS,
              "--stop-after-steps", stop_at)
    ckpt_dir = out / "mid_stop" / "checkpoints"
    latest = (ckpt_dir / "latest").read_text().strip()
    assert latest == f"step_{stop_at:09d}"
    state = json.loads((ckpt_dir / latest / "meta.json").read_text())
    assert state["epoch"] == 1 and 0 < state["samples_done"]
    assert len([d for d in ckpt_dir.iterdir() if d.is_dir()]) <= 2      # --keep-checkpoints 2 (default)
    run_train("--data-dir", small_digits, "--output", out, "--experiment", "mid_stop", *RESUME_ARGS,
              "--resume", "auto")
    assert_same_run(reference_run, out / "mid_stop")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(reference_run, small_digits):
    """SIGKILL (no chance to clean up) right after the first epoch's checkpoint, then --resume auto."""
    out = reference_run.parent
    cmd = [sys.executable, str(TRAIN), "--config", str(DIGITS_RECIPE), "--no-progress", "--data-dir",
           str(small_digits), "--output", str(out), "--experiment", "killed", *RESUME_ARGS]
    latest = out / "killed" / "checkpoints" / "latest"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and latest.read_text().strip().startswith("epoch_"):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL      # it really died mid-run (maybe before its first summary.csv)
    assert not (out / "killed" / "summary.csv").exists() or len(read_summary(out / "killed")) < 3
    run_train("--data-dir", small_digits, "--output", out, "--experiment", "killed", *RESUME_ARGS, "--resume", "auto")
    assert_same_run(reference_run, out / "killed")


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(small_digits, tmp_path):
    """A scheduler's SIGTERM (to the whole process group, loader workers included) ends the run with a checkpoint."""
    cmd = [sys.executable, str(TRAIN), "--config", str(DIGITS_RECIPE), "--no-progress", "--data-dir",
           str(small_digits), "--output", str(tmp_path), "--experiment", "term", *RESUME_ARGS]
    latest = tmp_path / "term" / "checkpoints" / "latest"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not latest.is_file():
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "continue with --resume auto" in output
    name = latest.read_text().strip()
    assert (tmp_path / "term" / "checkpoints" / name / "meta.json").is_file()
    assert len(read_summary(tmp_path / "term")) < 3


# ---------------------------------------------------------------------------------------------------- distributed

@pytest.mark.slow
def test_accelerate_launch_two_processes(small_digits, tmp_path):
    accelerate = shutil.which("accelerate")
    assert accelerate is not None, "the accelerate CLI (installed with the package) is not on PATH"
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_train("--cpu", "--data-dir", small_digits, "--output", tmp_path, "--experiment", "ddp", "--epochs", "2",
                     "--workers", "0", "--model-ema", "--warmup-epochs", "3", launcher=launcher)
    assert "x 2 processes" in proc.stdout + proc.stderr
    # a recipe's warm-up longer than a short run is shortened, not a crash in the scheduler
    assert "warm-up of 3 epochs does not fit a 2-epoch run: using 1" in proc.stdout + proc.stderr
    rows = read_summary(tmp_path / "ddp")
    assert len(rows) == 2 and all(r["eval_top1"] is not None for r in rows)
    ckpt = tmp_path / "ddp" / "checkpoints" / "epoch_0001"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
