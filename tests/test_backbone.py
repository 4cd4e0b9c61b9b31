"""ViT backbones from local weight files, and the CAM network on top of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from wsss.models import CheckpointError, LoadReport
from wsss.models.backbone import (
    BackboneConfig,
    create_vit,
    forward_tokens,
    load_backbone_weights,
    patch_size,
    resize_pos_grid,
)
from wsss.models.cam_net import CAMNet

OVERRIDES = {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
TINY = BackboneConfig("vit_tiny_patch16_224", 32, OVERRIDES)


def _vit(img_size: int = 32, seed: int = 0, pos_resize: str = "size") -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_vit(BackboneConfig("vit_tiny_patch16_224", img_size, OVERRIDES, pos_resize=pos_resize)).eval()


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        if k not in skip:
            assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------------ create_vit


def test_create_vit_is_headless_with_the_requested_shape() -> None:
    vit = _vit()
    assert patch_size(vit) == 8 and vit.embed_dim == 48 and len(vit.blocks) == 1
    assert tuple(vit.patch_embed.grid_size) == (4, 4)
    assert vit.pos_embed.shape == (1, 17, 48) and vit.num_prefix_tokens == 1
    assert not any(k.startswith("head.") for k in vit.state_dict())


@pytest.mark.parametrize(("h", "w"), [(32, 32), (48, 64), (16, 40)])
def test_dynamic_input_sizes(h: int, w: int) -> None:
    vit = _vit().eval()
    with torch.no_grad():
        tokens, aux = forward_tokens(vit, torch.randn(2, 3, h, w), aux_index=0)
    assert tokens.shape == aux.shape == (2, 1 + (h // 8) * (w // 8), 48)
    assert torch.isfinite(tokens).all()


def test_forward_tokens_matches_timm_at_native_size_and_resizes_bicubically() -> None:
    vit = _vit().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(forward_tokens(vit, x)[0], vit.forward_features(x), rtol=0, atol=0)
        # at another size the patch grid of pos_embed is resized with plain bicubic (§1.1)
        grid = vit.pos_embed[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
        resized = F.interpolate(grid, size=(6, 2), mode="bicubic", align_corners=False)
        want = torch.cat([vit.pos_embed[:, :1], resized.flatten(2).transpose(1, 2)], 1)
        vit.blocks = torch.nn.Sequential()  # isolate the embedding: tokens = norm(patches + pos)
        vit.norm = torch.nn.Identity()
        y = torch.randn(1, 3, 48, 16)
        patches = vit.patch_embed(y)
        tokens, _ = forward_tokens(vit, y)
        torch.testing.assert_close(tokens[:, 1:], patches + want[:, 1:])


# ----------------------------------------------------------------------------------------------- load_backbone_weights


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [
        ("", ".safetensors"),
        ("module.", ".pth"),
        ("backbone.", ".safetensors"),
        ("encoder.", ".bin"),
        ("model.", ".pth"),
        ("module.backbone.", ".pth"),
    ],
)
def test_prefixes_are_stripped(tmp_path: Path, prefix: str, suffix: str) -> None:
    source, target = _vit(seed=1), _vit(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    path = _save({prefix + k: v for k, v in source.state_dict().items()}, tmp_path / f"w{suffix}")
    report = load_backbone_weights(target, path)
    assert isinstance(report, LoadReport) and report.layout == "timm-vit" and report.source == str(path)
    assert report.loaded == len(source.state_dict())
    assert report.missing == report.unexpected == report.mismatched == report.resized == [] and not report.skipped
    assert report.check() is report
    _assert_same_weights(source, target)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], target.state_dict()["blocks.0.attn.qkv.weight"])
    assert str(report) == f"{path} (timm-vit): loaded {len(source.state_dict())} tensors"


def test_classifier_heads_are_dropped(tmp_path: Path) -> None:
    source, target = _vit(seed=1), _vit(seed=2)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state.update({
        "module.head.weight": torch.randn(10, 48),
        "module.head.bias": torch.zeros(10),
        "fc_norm.weight": torch.ones(48),
        "fc_norm.bias": torch.zeros(48),
    })  # fmt: skip
    report = load_backbone_weights(target, _save(state, tmp_path / "with_head.pth"))
    assert report.unexpected == [] and report.missing == [] and report.loaded == len(source.state_dict())
    assert report.skipped == dict.fromkeys(["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"],
                                           "classifier head")  # fmt: skip
    assert "skipped 4 (classifier head)" in str(report)
    _assert_same_weights(source, target)


def test_unknown_keys_are_reported_not_fatal(tmp_path: Path) -> None:
    source, target = _vit(seed=1), _vit(seed=2)
    state = dict(source.state_dict())
    state["decoder.conv.weight"] = torch.zeros(3, 3)
    del state["norm.weight"]
    report = load_backbone_weights(target, _save(state, tmp_path / "w.safetensors"))
    assert report.unexpected == ["decoder.conv.weight"]
    assert report.missing == ["norm.weight"]
    assert report.loaded == len(source.state_dict()) - 1
    assert "missing (1): norm.weight" in str(report) and "unexpected (1): decoder.conv.weight" in str(report)
    with pytest.raises(CheckpointError, match=r"missing \(1\): norm\.weight; unexpected \(1\)") as info:
        report.check()
    assert "\n" not in str(info.value) and "timm-vit" in str(info.value)
    assert report.check(allow_missing=True, allow_unexpected=True) is report


def test_shape_mismatches_are_reported_and_not_loaded(tmp_path: Path) -> None:
    source, target = _vit(seed=1), _vit(seed=2)
    before = target.state_dict()["blocks.0.mlp.fc1.weight"].clone()
    state = dict(source.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.randn(96, 48)
    report = load_backbone_weights(target, _save(state, tmp_path / "w.pth"))
    assert report.mismatched == ["blocks.0.mlp.fc1.weight (96, 48) != (192, 48)"] and report.unexpected == []
    assert report.missing == ["blocks.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match="shape mismatches"):
        report.check(allow_missing=True)  # a mismatch is never allowed
    assert torch.equal(target.state_dict()["blocks.0.mlp.fc1.weight"], before)
    _assert_same_weights(source, target, skip=("blocks.0.mlp.fc1.weight",))


def test_unrelated_file_raises(tmp_path: Path) -> None:
    path = _save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.bias": torch.zeros(4)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_backbone_weights(_vit(), path)
    heads_only = _save({"head.weight": torch.zeros(10, 48)}, tmp_path / "head.safetensors")
    with pytest.raises(CheckpointError, match="right file"):
        load_backbone_weights(_vit(), heads_only)


def test_pos_embed_is_resampled_from_another_img_size(tmp_path: Path) -> None:
    source, target = _vit(img_size=64, seed=1), _vit(img_size=32, seed=2)
    assert source.pos_embed.shape == (1, 65, 48)
    init = target.pos_embed.detach().clone()
    report = load_backbone_weights(target, _save(source.state_dict(), tmp_path / "w64.safetensors"))
    assert report.resized == ["pos_embed"] and report.loaded == len(source.state_dict())
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert "resampled pos_embed" in str(report)
    got = target.pos_embed.detach()
    assert got.shape == (1, 17, 48) and not torch.allclose(got, init)
    torch.testing.assert_close(got[:, :1], source.pos_embed.detach()[:, :1], rtol=0, atol=0)  # class token kept
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(got, expected)
    _assert_same_weights(source, target, skip=("pos_embed",))


def test_constant_pos_embed_stays_constant_when_resampled(tmp_path: Path) -> None:
    """Independent oracle: interpolating a constant grid gives the same constant; the class slot is not mixed in."""
    source, target = _vit(img_size=48, seed=1), _vit(img_size=32, seed=2)
    cls_vec, grid_vec = torch.randn(48), torch.randn(48)
    state = dict(source.state_dict())
    pos = torch.empty(1, 1 + 36, 48)
    pos[0, 0], pos[0, 1:] = cls_vec, grid_vec
    state["pos_embed"] = pos
    load_backbone_weights(target, _save(state, tmp_path / "w.pth"))
    got = target.pos_embed.detach()[0]
    torch.testing.assert_close(got[0], cls_vec)
    torch.testing.assert_close(got[1:], grid_vec.expand(16, 48), atol=1e-5, rtol=1e-5)


def test_resampled_model_still_runs(tmp_path: Path) -> None:
    source, target = _vit(img_size=64, seed=1), _vit(img_size=32, seed=2)
    load_backbone_weights(target, _save(source.state_dict(), tmp_path / "w.safetensors"))
    with torch.no_grad():
        out = target.forward_features(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 17, 48) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------------- CAMNet


def _cam(pooling: str, num_fg: int = 3) -> CAMNet:
    torch.manual_seed(0)
    return CAMNet(TINY, num_fg, pooling=pooling).eval()


@pytest.mark.parametrize("pooling", ["gmp", "gap", "lse"])
@pytest.mark.parametrize(("h", "w"), [(32, 32), (24, 48)])
def test_cam_net_shapes(pooling: str, h: int, w: int) -> None:
    net = _cam(pooling, num_fg=5)
    assert net.patch_size == 8
    assert net.classifier.weight.shape == (5, 48, 1, 1) and net.classifier.bias is None
    with torch.no_grad():
        logits, cams = net(torch.randn(2, 3, h, w))
    assert logits.shape == (2, 5) and cams.shape == (2, 5, h // 8, w // 8)


def test_gap_logits_equal_the_mean_of_the_cam() -> None:
    net = _cam("gap").double()
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cams = net(x)
    torch.testing.assert_close(logits, cams.mean(dim=(2, 3)), rtol=0, atol=1e-12)


def test_gmp_logits_are_the_classifier_on_max_pooled_features() -> None:
    net = _cam("gmp").double()
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, cams = net(x)
        feats = net.features(x)
    assert feats.shape == (2, 48, 4, 5)
    weight = net.classifier.weight[:, :, 0, 0]
    torch.testing.assert_close(logits, feats.amax(dim=(2, 3)) @ weight.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(cams, torch.einsum("bdhw,kd->bkhw", feats, weight), rtol=0, atol=1e-12)
    # GMP of features is not the mean of the CAM
    assert not torch.allclose(logits, cams.mean(dim=(2, 3)))


def test_features_follow_the_token_order() -> None:
    """Patch token (row r, column c) becomes feature map position [r, c] (row-major unflatten)."""
    net = _cam("gap")
    x = torch.randn(1, 3, 16, 24)
    with torch.no_grad():
        tokens = forward_tokens(net.backbone, x)[0][:, 1:]
        feats = net.features(x)
    assert feats.shape == (1, 48, 2, 3)
    torch.testing.assert_close(feats[0, :, 1, 2], tokens[0, 5])
    torch.testing.assert_close(feats[0, :, 0, 1], tokens[0, 1])


def test_lse_logits_pool_the_cam_between_its_mean_and_its_max() -> None:
    """z_k = (1/r) log mean_p exp(r A[k, p]), written out per class; r -> 0 gives the mean, large r the max."""
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = _cam("lse").double()
    with torch.no_grad():
        logits, cams = net(x)
        a = cams.flatten(2)
        torch.testing.assert_close(logits, torch.log(torch.exp(5.0 * a).mean(2)) / 5.0, rtol=0, atol=1e-12)
        assert (logits <= a.amax(2) + 1e-12).all() and (logits >= a.mean(2) - 1e-12).all()
        net.lse_r = 1e-6
        torch.testing.assert_close(net(x)[0], a.mean(2), rtol=0, atol=1e-5)
        net.lse_r = 1e4
        torch.testing.assert_close(net(x)[0], a.amax(2), rtol=0, atol=1e-3)


def test_invalid_pooling_raises() -> None:
    with pytest.raises(ValueError, match="pooling must be one of"):
        CAMNet(TINY, 3, pooling="max")
    with pytest.raises(ValueError, match="lse_r must be > 0"):
        CAMNet(TINY, 3, pooling="lse", lse_r=0)


def test_param_groups_split_backbone_and_head() -> None:
    net = _cam("gmp")
    backbone, head = net.param_groups()
    assert len(head) == 1 and head[0] is net.classifier.weight
    assert len(backbone) == len(list(net.backbone.parameters()))
    assert {id(p) for p in backbone} | {id(p) for p in head} == {id(p) for p in net.parameters()}


def test_any_input_size_floors_the_token_grid() -> None:
    """Rows and columns past the last whole patch are dropped, as a stride-p convolution does."""
    net = _cam("gmp")
    x = torch.randn(1, 3, 39, 47, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, cams = net(x)
        logits_c, cams_c = net(x[..., :32, :40])
    assert cams.shape == (1, 3, 4, 5)
    torch.testing.assert_close(cams, cams_c, rtol=0, atol=0)
    torch.testing.assert_close(logits, logits_c, rtol=0, atol=0)


def test_a_voc_sized_image_at_patch_16_gives_17_by_31() -> None:
    cfg = BackboneConfig("vit_tiny_patch16_224", 32, {"depth": 1, "embed_dim": 48, "num_heads": 2})
    net = CAMNet(cfg, 2).eval()
    with torch.no_grad():
        _, cams = net(torch.zeros(1, 3, 281, 500))
    assert cams.shape == (1, 2, 17, 31)


# ------------------------------------------------------------------------------------------- position grid rules


def _pos(g: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(1, g[0] * g[1], 5, generator=torch.Generator().manual_seed(seed))


def test_size_rule_is_bicubic_to_the_token_grid() -> None:
    pos = _pos((4, 4))
    grid = pos.reshape(1, 4, 4, 5).permute(0, 3, 1, 2)
    for target in ((6, 2), (3, 5), (4, 4)):
        want = F.interpolate(grid, size=target, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        got = resize_pos_grid(pos, (4, 4), target, (8 * target[0], 8 * target[1]), "size")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # at the native grid it is an identity (resampled anyway: one graph branch)
    torch.testing.assert_close(resize_pos_grid(pos, (4, 4), (4, 4), (32, 32)), pos, rtol=0, atol=1e-6)


def test_dino_rule_keeps_the_stored_grid_only_for_square_images_of_its_token_count() -> None:
    """§4.4: DINO's ``interpolate_pos_encoding``: kept as is when N == stored N and w == h, else bicubic by the
    scale factor ``(h + 0.1) / g0``, which maps coordinates by that factor and not by ``h / g0``."""
    pos = _pos((4, 4), 1)
    assert torch.equal(resize_pos_grid(pos, (4, 4), (4, 4), (32, 32), "dino"), pos)  # exactly
    grid = pos.reshape(1, 4, 4, 5).permute(0, 3, 1, 2)
    for target, image in (((6, 3), (48, 24)), ((2, 8), (16, 64)), ((4, 4), (32, 35)), ((5, 5), (40, 40))):
        want = F.interpolate(grid, scale_factor=((target[0] + 0.1) / 4, (target[1] + 0.1) / 4), mode="bicubic")
        got = resize_pos_grid(pos, (4, 4), target, image, "dino")
        assert got.shape == (1, target[0] * target[1], 5)
        # the exportable matrix form of the same resampling: equal within float32 rounding
        torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
    # the two rules differ off the stored grid (the scale factor shifts the sampling positions)
    a = resize_pos_grid(pos, (4, 4), (6, 3), (48, 24), "dino")
    b = resize_pos_grid(pos, (4, 4), (6, 3), (48, 24), "size")
    assert not torch.allclose(a, b)
    # a non-square image of the stored token count is resampled: 4.1 / 4 keeps the 4 x 4 size, not the values
    same_n = resize_pos_grid(pos, (4, 4), (4, 4), (32, 35), "dino")
    assert same_n.shape == pos.shape and not torch.allclose(same_n, pos)


def test_backbones_follow_their_pos_resize_rule() -> None:
    size, dino = _vit(pos_resize="size"), _vit(pos_resize="dino")
    dino.load_state_dict(size.state_dict())
    assert size.pos_resize == "size" and dino.pos_resize == "dino"
    square = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(forward_tokens(dino, square)[0], dino.forward_features(square), rtol=0, atol=0)
        torch.testing.assert_close(forward_tokens(size, square)[0], forward_tokens(dino, square)[0])
        wide = torch.randn(1, 3, 32, 56, generator=torch.Generator().manual_seed(5))
        assert not torch.allclose(forward_tokens(size, wide)[0], forward_tokens(dino, wide)[0])
    with pytest.raises(ValueError, match="pos_resize must be one of"):
        create_vit(BackboneConfig("vit_tiny_patch16_224", 32, OVERRIDES, pos_resize="nearest"))


def test_conv_stem_keeps_the_token_grid() -> None:
    cfg = BackboneConfig("vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2},
                         stem="conv")  # fmt: skip
    net = CAMNet(cfg, 3).eval()
    assert isinstance(net.backbone.patch_embed.proj, torch.nn.Sequential)
    strides = [m.stride[0] for m in net.backbone.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1]  # three stride-2 3x3 convs make the 8-pixel patch, then a 1x1 projection
    logits, cams = net(torch.randn(2, 3, 40, 24))
    assert logits.shape == (2, 3) and cams.shape == (2, 3, 5, 3)
    with pytest.raises(ValueError, match="power-of-two"):
        create_vit(BackboneConfig("vit_tiny_patch16_224", 36, {"patch_size": 12, "depth": 1}, stem="conv"))
    with pytest.raises(ValueError, match="stem must be"):
        create_vit(BackboneConfig("vit_tiny_patch16_224", 32, {"patch_size": 8}, stem="hybrid"))
