"""The Vision Longhorn models through timm's API: sizes, shapes, features, checkpoints and input errors."""
import math

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import save_file

import vlonghorn  # noqa: F401  (registers the models)
from vlonghorn.models import VisionLonghorn

SIZES = ["vlonghorn_tiny", "vlonghorn_small", "vlonghorn_base"]
# the full-size models run on the GPU where there is one (on the CPU they take minutes each)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _nano(**kwargs):
    return timm.create_model("vlonghorn_nano", **kwargs)


def test_models_are_registered():
    assert timm.list_models("vlonghorn*") == ["vlonghorn_base", "vlonghorn_nano", "vlonghorn_small",
                                              "vlonghorn_tiny"]
    assert timm.is_model("vlonghorn_small")


@pytest.mark.parametrize("name,width,millions", [
    ("vlonghorn_tiny", 192, (6.0, 8.0)), ("vlonghorn_small", 384, (24.0, 28.0)), ("vlonghorn_base", 768, (93, 100)),
])
def test_sizes_match_the_vim_family(name, width, millions):
    model = timm.create_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions[0] < params < millions[1]
    assert model.num_features == model.head_hidden_size == width
    assert len(model.blocks) == 24
    assert model.patch_embed.patch_size == (16, 16)
    mixer = model.blocks[0].mixer
    assert mixer.in_proj.out_features == 4 * width               # x and z, E = 2 * d_model
    assert mixer.fwd.x_proj.out_features == -(-width // 16) + 32   # dt_rank + 2 * d_state


@pytest.mark.slow
@pytest.mark.parametrize("name", SIZES)
def test_forward_backward_at_224_and_320(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, device=DEV)
    out = model(torch.randn(1, 3, 224, 224, device=DEV))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing

    model = timm.create_model(name, num_classes=10, dynamic_img_size=True, device=DEV)
    out = model(torch.randn(1, 3, 320, 320, device=DEV))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", SIZES)
def test_features_only_gives_stride_16_maps(name):
    model = timm.create_model(name, features_only=True, out_indices=(5, 11, 23), dynamic_img_size=True,
                              device=DEV).eval()
    assert model.feature_info.channels() == [model.feature_info.channels()[0]] * 3
    assert model.feature_info.reduction() == [16, 16, 16]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 96, 128, device=DEV))
    assert [tuple(f.shape) for f in feats] == [(2, model.feature_info.channels()[0], 6, 8)] * 3


def test_forward_intermediates_match_forward_features():
    torch.manual_seed(0)
    model = _nano().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, 3])
        torch.testing.assert_close(final, model.forward_features(x))
        assert [tuple(t.shape) for t in inter] == [(2, 64, 8, 8)] * 2
        tokens = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        spatial, cls_token = tokens[0]
        assert spatial.shape == (2, 64, 64) and cls_token.shape == (2, 1, 64)
        # The class token sits in the middle of the sequence; removing it leaves the patches in raster order.
        torch.testing.assert_close(inter[-1].flatten(2).transpose(1, 2), spatial)
        torch.testing.assert_close(cls_token[:, 0], final.new_tensor(0) + model.blocks(model._embed(x))[:, 32])
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], model.forward_intermediates(x, intermediates_only=True)[1])


def test_prune_intermediate_layers_keeps_taps():
    model = _nano().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        kept = model.prune_intermediate_layers([1])
        assert len(model.blocks) == 2 and model.num_classes == 0
        torch.testing.assert_close(model.forward_intermediates(x, indices=kept, intermediates_only=True)[0], want)


@pytest.mark.parametrize("pool,shape", [("token", (2, 64)), ("avg", (2, 64)), ("", (2, 65, 64))])
def test_global_pool(pool, shape):
    model = _nano(num_classes=0, global_pool=pool).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == shape


def test_class_token_pooling_reads_the_middle_token():
    model = _nano(global_pool="token").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 32])


def test_default_pooling_is_the_mean_of_the_patch_tokens():
    """'avg' is the default (issue 19); the class token in the middle is left out of the mean."""
    model = _nano().eval()
    assert model.global_pool == "avg"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, torch.cat([feats[:, :32], feats[:, 33:]], dim=1).mean(dim=1))


def test_classifier_reset_and_head():
    model = _nano(num_classes=5)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(3, "avg")
    assert model.get_classifier().out_features == 3 and model.global_pool == "avg"
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(2, "max")


def test_grad_checkpointing_gives_the_same_output_and_grads():
    torch.manual_seed(0)
    model = _nano(num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out2 = model(x)
    grads2 = torch.autograd.grad(out2.sum(), list(model.parameters()))
    torch.testing.assert_close(out, out2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2)


def test_optimizer_helpers():
    model = _nano()
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len(optimizer.param_groups) > 4  # stem, blocks and head get their own layer-decay scales


def test_autocast_bf16_runs_with_fp32_residual():
    model = _nano(num_classes=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.forward_features(torch.randn(2, 3, 64, 64))
        out = model.forward_head(feats)
    assert feats.dtype == torch.float32  # the residual stream and the final norm stay fp32
    assert torch.isfinite(out).all()


def test_device_and_dtype_arguments():
    model = timm.create_model("vlonghorn_nano", device="meta", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_bad_inputs_raise_clear_errors():
    model = _nano()
    with pytest.raises(ValueError, match=r"image size 64x60 is not divisible by the patch size 8x8"):
        model(torch.randn(1, 3, 64, 60))
    with pytest.raises(ValueError, match=r"expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"does not match the model's 64x64.*dynamic_img_size=True"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected an image batch"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="global_pool"):
        _nano(global_pool="max")
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("vlonghorn_huge")
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model("vlonghorn_small.in1k", pretrained=True)
    with pytest.raises(TypeError):
        timm.create_model("vlonghorn_nano", not_an_argument=1)


def test_dynamic_img_size_accepts_any_multiple_of_the_patch():
    model = _nano(dynamic_img_size=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 96)).shape == (1, 1000)
        assert model.forward_features(torch.randn(1, 3, 40, 96)).shape == (1, 5 * 12 + 1, 64)


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_pretrained_file_loads_at_a_new_size_with_a_new_head(tmp_path, suffix):
    torch.manual_seed(0)
    source = _nano()
    path = tmp_path / f"model.{suffix}"
    state = source.state_dict()
    if suffix == "safetensors":
        save_file(state, str(path))
    else:  # a training checkpoint: wrapped, with DDP's prefix
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    model = timm.create_model("vlonghorn_nano", pretrained=True, num_classes=7, img_size=96,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert model.pos_embed.shape == (1, 12 * 12 + 1, 64)
    assert model.head.out_features == 7
    torch.testing.assert_close(model.blocks[2].mixer.fwd.D, source.blocks[2].mixer.fwd.D)
    torch.testing.assert_close(model.pos_embed[:, 0], source.pos_embed[:, 0])  # class token's entry kept
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_pretrained_url_and_patch_size_change(tmp_path, monkeypatch):
    # downloads land in torch.hub's cache, which would otherwise hand back any earlier file of the same name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    source = _nano()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model("vlonghorn_nano", pretrained=True, patch_size=16, img_size=128,
                              pretrained_cfg_overlay=dict(url=path.as_uri(), file=None))
    assert model.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 64)


def test_set_input_size_resamples_the_position_embedding():
    model = _nano()
    model.set_input_size((96, 128))
    assert model.pos_embed.shape == (1, 12 * 16 + 1, 64)
    assert model(torch.randn(1, 3, 96, 128)).shape == (1, 1000)


def test_is_a_vision_longhorn():
    assert isinstance(_nano(), VisionLonghorn)


@pytest.mark.parametrize("content,suffix", [(b"not a checkpoint", "safetensors"), (b"not a checkpoint", "pth"),
                                            (None, "pth")])
def test_bad_pretrained_file_error_names_the_file(tmp_path, content, suffix):
    path = tmp_path / f"weights.{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RuntimeError, match=f"could not load pretrained weights for vlonghorn_nano from {path}"):
        timm.create_model("vlonghorn_nano", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_build_errors_with_pretrained_are_not_loading_errors(tmp_path):
    """pretrained=True names the weights only when loading them fails: a bad build argument stays its own error."""
    path = tmp_path / "nano.safetensors"
    save_file(_nano().state_dict(), str(path))
    with pytest.raises(ValueError, match="global_pool must be") as info:
        _nano(pretrained=True, global_pool="bogus", pretrained_cfg_overlay=dict(file=str(path)))
    assert "could not load pretrained weights" not in str(info.value)


def test_checkpoints_with_the_old_direction_name_load(tmp_path):
    """Weights saved when the second scan direction was called `bwd` load into `rev`."""
    model = _nano()
    old = {k.replace(".mixer.rev.", ".mixer.bwd."): v for k, v in model.state_dict().items()}
    assert any(".mixer.bwd." in k for k in old)
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    loaded = _nano(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- scan orders
def test_reorder_tokens_moves_patches_and_keeps_the_class_token_in_the_middle():
    from vlonghorn.models.vision_longhorn import reorder_tokens
    height, width = 3, 5
    patches = torch.arange(height * width)
    x = torch.cat([patches[:7], torch.tensor([-1]), patches[7:]]).view(1, -1, 1).float()  # class token = -1
    column = reorder_tokens(x, (height, width), "raster", "column")
    want = patches.view(height, width).t().flatten()
    torch.testing.assert_close(column[0, :, 0], torch.cat([want[:7], torch.tensor([-1]), want[7:]]).float())
    square = torch.cat([torch.arange(8), torch.tensor([-1]), torch.arange(8, 16)]).view(1, -1, 1).float()
    zorder = reorder_tokens(square, (4, 4), "raster", "zorder")[0, :, 0].tolist()
    assert zorder == [0, 1, 4, 5, 2, 3, 6, 7, -1, 8, 9, 12, 13, 10, 11, 14, 15]   # 2x2 cells, then cells of cells
    for order in ("column", "zorder"):
        y = reorder_tokens(x, (height, width), "raster", order)
        torch.testing.assert_close(reorder_tokens(y, (height, width), order, "raster"), x)
    torch.testing.assert_close(reorder_tokens(reorder_tokens(x, (3, 5), "raster", "column"), (3, 5), "column",
                                              "zorder"), reorder_tokens(x, (3, 5), "raster", "zorder"))


@pytest.mark.parametrize("order", ["alternate", "zorder"])
def test_scan_orders_scan_blocks_in_their_order_and_give_raster_features(order):
    from vlonghorn.models.vision_longhorn import reorder_tokens
    torch.manual_seed(0)
    model = _nano(scan_order=order, dynamic_img_size=True).eval()
    raster = _nano(dynamic_img_size=True).eval()
    raster.load_state_dict(model.state_dict())   # same weights, raster scans: checkpoints load across orders
    x = torch.randn(2, 3, 48, 80)                  # a 6 x 10 grid
    grid = (6, 10)
    with torch.no_grad():
        tokens, taps = model._embed(x), []
        for i, block in enumerate(model.blocks):
            scan = "column" if (order == "alternate" and i % 2) else ("zorder" if order == "zorder" else "raster")
            scanned = block(reorder_tokens(tokens, grid, "raster", scan), model.step_shift(grid))
            tokens = reorder_tokens(scanned, grid, scan, "raster")
            taps.append(tokens)
        torch.testing.assert_close(model.forward_features(x), model.norm(tokens))
        final, inter = model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC")
        torch.testing.assert_close(final, model.norm(tokens))
        for got, want in zip(inter, (taps[1], taps[3])):
            torch.testing.assert_close(got, model._split_class_token(want)[0])
        assert not torch.allclose(raster.forward_features(x), final, atol=1e-3)   # the order changes the result


def test_scan_order_trains_with_grad_checkpointing():
    torch.manual_seed(0)
    model = _nano(scan_order="alternate", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    grads = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    for g, g2 in zip(grads, torch.autograd.grad(model(x).sum(), list(model.parameters()))):
        torch.testing.assert_close(g, g2)
    assert all(g.abs().sum() > 0 for g in grads[:3])


def test_step_scale_shifts_every_step_size():
    torch.manual_seed(0)
    model = _nano(step_scale=0.25).eval()
    shifted = _nano(step_scale=1.0).eval()
    shifted.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in shifted.blocks:
            for direction in (block.mixer.fwd, block.mixer.rev):
                direction.dt_proj.bias += math.log(0.25)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(model(x), shifted(x))
        tokens = torch.randn(1, 65, 64)
        torch.testing.assert_close(model.blocks[0].mixer(tokens, model.step_shift((8, 8))),
                                   shifted.blocks[0].mixer(tokens))
        model.set_step_scale(1.0)
        assert model.step_shift((8, 8)) == 0.0
        assert not torch.allclose(model.blocks[0].mixer(tokens, model.step_shift((8, 8))),
                                  shifted.blocks[0].mixer(tokens), rtol=0.05)
    for bad in (0, -1.0, "grid"):
        with pytest.raises(ValueError, match="step_scale must be"):
            model.set_step_scale(bad)


def _fixed_step(model, scale):
    """A copy of `model` (its weights) with the step factor fixed to `scale`."""
    fixed = _nano(step_scale=scale, dynamic_img_size=True).eval()
    fixed.load_state_dict(model.state_dict())
    return fixed


def test_auto_step_scale_follows_the_token_grid():
    """'auto' (the default) multiplies the steps by the training grid's token count over the input's: 1 at the
    training size, 1/4 at twice the size, 16/15 on a 6 x 10 grid of an 8 x 8-trained model."""
    torch.manual_seed(0)
    model = _nano(dynamic_img_size=True).eval()
    assert model.step_scale == "auto" and model.step_grid.tolist() == [8, 8]
    with torch.no_grad():
        for size, scale in (((64, 64), 1.0), ((128, 128), 0.25), ((48, 80), 64 / 60)):
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(model(x), _fixed_step(model, scale)(x), msg=str(size))
            feats = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
            torch.testing.assert_close(
                feats, _fixed_step(model, scale).forward_intermediates(x, indices=[2], intermediates_only=True)[0])


@pytest.mark.parametrize("old", [False, True])
def test_weights_keep_the_grid_their_steps_were_learned_on(tmp_path, old):
    """Loaded into a model built for a larger image, weights keep their training grid (a buffer in the state dict;
    weights saved before it existed: their position embedding's grid), so 'auto' scales the steps for the larger
    image as dynamic_img_size would; set_input_size keeps it too."""
    torch.manual_seed(0)
    source = _nano(dynamic_img_size=True).eval()
    state = source.state_dict()
    if old:
        del state["step_grid"]
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    model = timm.create_model("vlonghorn_nano", pretrained=True, img_size=128,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert model.step_grid.tolist() == [8, 8] and model.step_grid_size == (8, 8)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-5)  # pos embed resampled the same way
        assert model.step_shift((16, 16)) == pytest.approx(math.log(0.25))
    plain = _nano()
    plain.load_state_dict(state)  # plain torch loading: the model's pos grid is the weights'
    plain.set_input_size((128, 128))
    assert plain.step_grid.tolist() == [8, 8] and plain.step_grid_size == (8, 8)


def test_bad_scan_order_names_the_choices():
    with pytest.raises(ValueError, match="scan_order must be one of .*'raster', 'alternate', 'zorder'.*'columns'"):
        _nano(scan_order="columns")


# --------------------------------------------------------------------------------- the fused add + norm of the blocks
def _unfused_forward(model, x, taps=()):
    """What the blocks computed before the add moved into the next norm: per block h = h + drop_path(mixer(norm(h)))
    with timm's RmsNorm, then the final norm of the stream. Returns (normalised tokens, stream values at `taps`,
    raster order, class token included)."""
    from vlonghorn.models.vision_longhorn import reorder_tokens
    grid = model._input_grid(x)
    h = model._embed(x)
    dt_shift = model.step_shift(grid)
    order, inter = "raster", []
    for i, block in enumerate(model.blocks):
        if model.block_orders[i] != order:
            h = reorder_tokens(h, grid, order, model.block_orders[i])
            order = model.block_orders[i]
        h = h + block.drop_path(block.mixer(block.norm(h), dt_shift))
        if i in taps:
            inter.append(reorder_tokens(h, grid, order, "raster"))
    return model.norm(reorder_tokens(h, grid, order, "raster")), inter


def _fused_and_unfused(model, x, seed=5):
    """(final tokens, taps of blocks 0 and 2, every parameter's gradient) of the model and of _unfused_forward,
    each run from the same random state (drop_path draws the same masks)."""
    results = []
    for run in ("fused", "unfused"):
        torch.manual_seed(seed)
        if run == "fused":
            final, inter = model.forward_intermediates(x, indices=[0, 2], output_fmt="NLC")
            inter = [torch.cat([t[:, :32], torch.zeros_like(t[:, :1]), t[:, 32:]], 1) for t in inter]
        else:
            final, inter = _unfused_forward(model, x, taps=(0, 2))
            inter = [torch.cat([t[:, :32], torch.zeros_like(t[:, :1]), t[:, 33:]], 1) for t in inter]
        # random projections: the squared norm of a normalised row is nearly constant, its gradient only rounding
        weights = torch.randn((3,) + final.shape, generator=torch.Generator().manual_seed(7))
        loss = sum((t * g).sum() for t, g in zip([final] + inter, weights))
        results.append([final] + inter + list(torch.autograd.grad(loss, list(model.parameters()))))
    return results


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("order", ["raster", "alternate"])
def test_fused_blocks_match_the_unfused_block_computation(order, train, checkpointing, fused):
    """The blocks pass the stream on with the update still to add, which the next block's norm (or the final one)
    adds: outputs, intermediates (stream values) and every parameter's gradient are the unfused blocks', with
    drop_path (same masks from the same seed), in every scan order, with and without grad checkpointing."""
    torch.manual_seed(0)
    model = _nano(num_classes=0, scan_order=order, drop_path_rate=0.5 if train else 0., fused_norm=fused).train(train)
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(4, 3, 64, 64)
    names = ["final", "tap 0", "tap 2"] + [n for n, _ in model.named_parameters()]
    for name, got, want in zip(names, *_fused_and_unfused(model, x)):
        # fp32 rounding only: the taps' gradient terms reach the stream in another order
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < 1e-6, (name, err)
    if train:   # drop_path dropped something: the result depends on the seed
        torch.manual_seed(6)
        assert not torch.allclose(model.forward_features(x), _fused_and_unfused(model, x)[0][0])


def test_a_block_called_alone_is_the_residual_block():
    """Block(x) = x + drop_path(mixer(norm(x))), as before the add moved: for anyone calling a block directly."""
    torch.manual_seed(0)
    block = _nano(fused_norm=True).blocks[1]
    x = torch.randn(2, 65, 64)
    torch.testing.assert_close(block(x), x + block.mixer(block.norm(x)), rtol=1e-6, atol=1e-6)
    r, delta = block.forward_residual(x, torch.ones_like(x))
    torch.testing.assert_close(r, x + 1)
    torch.testing.assert_close(delta, block.mixer(block.norm(x + 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_blocks_match_the_unfused_blocks_on_the_triton_path(monkeypatch, recompute):
    """The same on the Triton kernels (the interpreter standing in for CUDA): the fused norm kernels, with the
    recompute region (the norm's backward taking the stream's gradient) or without, against the unfused blocks
    over the same scan kernels."""
    from vlonghorn.ops import longhorn
    pytest.importorskip("triton")
    monkeypatch.setattr(longhorn, "_AUTO", "triton")
    torch.manual_seed(0)
    model = _nano(num_classes=0, img_size=16, depth=3, drop_path_rate=0.5, recompute_mixer=recompute,
                  fused_norm=True).train()
    x = torch.randn(2, 3, 16, 16)
    results = []
    for run in ("fused", "unfused"):
        torch.manual_seed(5)
        final = model.forward_features(x) if run == "fused" else _unfused_forward(model, x)[0]
        loss = (final * torch.randn(final.shape, generator=torch.Generator().manual_seed(7))).sum()
        results.append([final] + list(torch.autograd.grad(loss, list(model.parameters()))))
    names = ["final"] + [n for n, _ in model.named_parameters()]
    for name, got, want in zip(names, *results):
        err = ((got - want).norm() / want.norm()).item()
        assert torch.isfinite(got).all() and err < 1e-5, (name, err)
