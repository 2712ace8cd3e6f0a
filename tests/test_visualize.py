"""Tests of vlonghorn.visualize on CPU: scikit-image's astronaut photo through a random-init vlonghorn_nano."""
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

import vlonghorn  # noqa: F401
from vlonghorn.visualize import main, pca_rgb


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((192, 160)).save(path)     # 192 x 160: not square, not 64 px
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init vlonghorn_nano saved as train.py exports weights (the model named in the file's metadata)."""
    torch.manual_seed(0)
    model = timm.create_model("vlonghorn_nano", num_classes=7)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file(model.state_dict(), str(path), metadata={"format": "pt", "architecture": "vlonghorn_nano",
                                                        "num_classes": "7", "model_args": json.dumps({})})
    return path


def test_command_writes_image_and_features_side_by_side(photo, checkpoint, tmp_path):
    out = tmp_path / "features.png"
    proc = subprocess.run([sys.executable, "-m", "vlonghorn.visualize", "--checkpoint", str(checkpoint),
                           "--image", str(photo), "--out", str(out), "--img-size", "128"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4/4" in proc.stderr                                                      # the progress line
    # the shorter side 160 -> 128 px, the longer 192 -> 153.6 -> 152 (a multiple of the patch, 8)
    assert f"wrote {out}: block 3 of {checkpoint} on a 128 x 152 input, 16 x 19 patches x 64 channels" in proc.stdout
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[0] >= 256 and picture.shape[1] > 2 * picture.shape[0] * 0.9     # two panels side by side
    assert picture.reshape(-1, 3).std(0).min() > 10                                       # not blank


def test_timm_folders_and_named_models_load(photo, checkpoint, tmp_path):
    folder = tmp_path / "hf"
    model = timm.create_model("vlonghorn_nano", num_classes=7)
    timm.models.save_for_hf(model, str(folder))                 # config.json + model.safetensors
    info = main(["--checkpoint", str(folder), "--image", str(photo), "--out", str(tmp_path / "a.png"),
                 "--block", "1"])
    assert info["block"] == 1 and info["grid"] == (8, 10) and info["input_size"] == (64, 80)  # the model's 64 px
    plain = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(plain))                   # no metadata: the model must be named
    with pytest.raises(SystemExit, match="pass --model"):
        main(["--checkpoint", str(plain), "--image", str(photo), "--out", str(tmp_path / "b.png")])
    info = main(["--checkpoint", str(plain), "--model", "vlonghorn_nano", "--model-kwargs", "num_classes=7",
                 "--image", str(photo), "--out", str(tmp_path / "b.png")])
    assert info["channels"] == 64 and (tmp_path / "b.png").is_file()


def test_pca_colours_follow_the_feature_structure():
    """Two kinds of patches (left half, right half) get two clearly different colours; within a kind, one."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, 1, 1, generator=generator).expand(32, 6, 8).clone()
    features[:, :, 4:] += 5 * torch.randn(32, 1, 1, generator=generator)
    features += 0.01 * torch.randn(32, 6, 8, generator=generator)
    rgb, explained = pca_rgb(features)
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    assert explained[0] > 0.95 and sum(explained) <= 1 + 1e-9
    left, right = rgb[:, :4].reshape(-1, 3).astype(int), rgb[:, 4:].reshape(-1, 3).astype(int)
    assert np.abs(left.mean(0) - right.mean(0)).max() > 200
    assert np.abs(left[:, 0] - left[0, 0]).max() < 3 and np.abs(right[:, 0] - right[0, 0]).max() < 3
