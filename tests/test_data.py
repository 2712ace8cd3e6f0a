"""Tests of vlonghorn.data: split checks, corrupt-image skipping, seeded transforms, the resumable sampler."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from vlonghorn.data import (ImageFolderDataset, ShardedBatchSampler, SplitError, build_eval_transform,
                            build_train_transform, export_digits_imagefolder)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _write_images(folder, n, size=(12, 10), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(SplitError, match="does not exist"):
        ImageFolderDataset(tmp_path, "train")


def test_split_without_classes_or_images_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(SplitError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path, "train")
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(SplitError, match="holds no images"):
        ImageFolderDataset(tmp_path, "train")


def test_eval_split_classes_must_exist_in_train(tmp_path):
    _write_images(tmp_path / "train" / "cat", 2)
    _write_images(tmp_path / "train" / "dog", 2)
    _write_images(tmp_path / "val" / "cat", 1)
    _write_images(tmp_path / "val" / "emu", 1)
    train = ImageFolderDataset(tmp_path, "train")
    assert train.classes == ["cat", "dog"] and len(train) == 4
    with pytest.raises(SplitError, match="emu"):
        ImageFolderDataset(tmp_path, "val", class_to_idx=train.class_to_idx)


def test_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    _write_images(tmp_path / "train" / "a", 3)
    _write_images(tmp_path / "train" / "b", 2)
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"definitely not a png")        # garbage
    good = (tmp_path / "train" / "b" / "0.png").read_bytes()
    (tmp_path / "train" / "b" / "0.png").write_bytes(good[: len(good) // 3])          # truncated
    ds = ImageFolderDataset(tmp_path, "train", build_eval_transform(8, MEAN, STD, crop_pct=1.0))
    with caplog.at_level(logging.WARNING, logger="vlonghorn.data"):
        items = [ds[i] for i in range(len(ds))]
    assert all(img.shape == (3, 8, 8) for img, _, _ in items)
    assert sum(skipped for _, _, skipped in items) == 2
    assert [target for _, target, _ in items] == [0, 0, 0, 1, 1]  # a neighbour of the same class replaced "a/1"
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2
    # known-bad files are not decoded again, but still counted
    assert ds[1][2] == 1


def test_skip_counts_mark_exactly_the_unreadable_samples(tmp_path):
    """Two unreadable files in a row: both samples are marked (their skip counts are 2 and 1), the readable ones
    are not, so the marked samples count the unreadable files and the unmarked ones are every readable file once."""
    _write_images(tmp_path / "val" / "a", 5)
    for name in ("1.png", "2.png"):
        (tmp_path / "val" / "a" / name).write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path, "val", build_eval_transform(8, MEAN, STD, crop_pct=1.0))
    items = [ds[i] for i in range(len(ds))]
    assert [skipped for _, _, skipped in items] == [0, 2, 1, 0, 0]
    assert torch.equal(items[1][0], items[3][0]) and torch.equal(items[2][0], items[3][0])   # stand-ins


def test_all_unreadable_raises_instead_of_looping(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"junk")
    ds = ImageFolderDataset(tmp_path, "train")
    with pytest.raises(RuntimeError, match="cannot be read"):
        ds[0]


def test_train_transform_is_reproducible_per_seed():
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    tf = build_train_transform(16, MEAN, STD, auto_augment="rand-m9-n2", reprob=0.5)
    a, b, a_again = tf(image, seed=1), tf(image, seed=2), tf(image, seed=1)
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, a_again) and not torch.equal(a, b)
    # all ops draw from one shared stream, not one copy of the same seed each
    nodes = tf._nodes
    assert len({id(n.random_generator) for n in nodes}) == 1
    with pytest.raises(ValueError, match="auto-augment"):
        build_train_transform(16, MEAN, STD, auto_augment="autoaug-v0")


def test_eval_transform_follows_crop_pct():
    ramp = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (40, 1, 3))
    identity = build_eval_transform(40, MEAN, STD, crop_pct=1.0)(ramp)
    expected = (torch.from_numpy(ramp).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(identity, expected)
    # crop_pct 0.8: resize the 40 px image to 40 / 0.8 = 50 px, crop the central 40: the ramp's ends fall away
    cropped = build_eval_transform(40, MEAN, STD, crop_pct=0.8)(ramp)
    assert cropped.shape == (3, 40, 40)
    assert cropped[0, 0, 0] > identity[0, 0, 0] and cropped[0, 0, -1] < identity[0, 0, -1]
    # non-square input: the shorter side is resized
    tall = np.zeros((80, 20, 3), np.uint8)
    assert build_eval_transform(16, MEAN, STD, crop_pct=0.875)(tall).shape == (3, 16, 16)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_without_overlap_and_resumes_exactly(world_size):
    n, batch = 103, 4
    samplers = [ShardedBatchSampler(n, batch, shuffle=True, drop_last=True, seed=7, rank=r, world_size=world_size,
                                    batches_multiple_of=2) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(3)
    full = [list(s) for s in samplers]
    lengths = {len(batches) for batches in full}
    assert len(lengths) == 1 and lengths.pop() % 2 == 0           # equal, accumulation-aligned batch counts
    indices = [i for batches in full for b in batches for i, _ in b]
    assert len(indices) == len(set(indices))                      # no sample twice in an epoch
    seeds = {i: s for batches in full for b in batches for i, s in b}
    # resume after k batches per process: exactly the remaining batches, same seeds
    k = 2
    for s, batches in zip(samplers, full):
        s.set_epoch(3, start=k * batch * world_size)
        assert list(s) == batches[k:]
    # another epoch: another order and other seeds
    samplers[0].set_epoch(4)
    other = [key for b in samplers[0] for key in b]
    assert [i for i, _ in other] != [i for b in full[0] for i, _ in b]
    assert any(seeds.get(i) not in (None, s) for i, s in other)


def test_eval_sampler_covers_every_sample_once():
    n = 29
    covered = []
    for rank in range(4):
        s = ShardedBatchSampler(n, 5, shuffle=False, drop_last=False, rank=rank, world_size=4)
        batches = list(s)
        assert len(batches) == len(s)
        covered += [i for b in batches for i, _ in b]
    assert sorted(covered) == list(range(n))


def test_export_digits_imagefolder(tmp_path):
    root = export_digits_imagefolder(tmp_path / "digits")
    train, val = ImageFolderDataset(root, "train"), ImageFolderDataset(root, "val", class_to_idx=None)
    assert len(train) + len(val) == 1797 and len(train.classes) == len(val.classes) == 10
    image = train.load(0)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and image.max() > 200
