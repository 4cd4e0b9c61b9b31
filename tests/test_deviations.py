"""The deviations from the official code that issue 14 fixed, each on its exact case (§1.3, §1.5, §2.1, §4.8).

1. CoBra's ReLU runs on the feature grid, before upsampling (§4.8); SeCo's after upsampling and flip-max (§1.3).
2. Inputs of any size: the token grid floors (281 x 500 at patch 16 -> 17 x 31) and CoBra's DeiT resizes its
   position grid with DINO's "+0.1" scale factor, kept as is at 224 x 224 (§1.1, §4.4).
3. PAR's image is the official uint8 cast of ``x * std + mean`` in 0-255 units (§2.1, Q2.4).
4. ``cam_to_roi_mask`` without an image box is the plain background-threshold label (§1.5).
5. Multi-scale input sizes: ``floor(s * H)`` for SeCo (§1.3), NumPy's round-half-to-even for CoBra (§4.8), never
   rounded to the patch multiple.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from wsss.cam.labels import cam_to_label
from wsss.cam.pipeline import (
    forward_pyramid,
    image_pyramid,
    normalized_maps,
    pyramid_sizes,
    stack_maps,
    tensor_pyramid,
)
from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize_images, to_uint8_levels
from wsss.kernels import cam_postprocess, normalize_maps
from wsss.models import CAMSettings, ModelSpec, build_model
from wsss.models.backbone import resize_pos_grid

CLASSES = ("background", "a", "b")
COBRA = CAMSettings.for_family("cobra")
SECO = CAMSettings.for_family("seco")


class SignedCAM(nn.Module):
    """Raw CAMs with both signs on a stride-4 grid: channel k = x[:, k] average-pooled 4 x 4 (any input size)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.avg_pool2d(x[:, :2], 4)
        return a.amax((2, 3)), a


def up(a: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(a, size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------ (1) ReLU order


def test_relu_order_cobra_on_the_grid_seco_after_upsampling():
    torch.manual_seed(0)
    net, x = SignedCAM(), torch.randn(2, 3, 32, 40)
    size = (32, 40)
    grid, grid_f = net(x)[1], net(x.flip(-1))[1]
    assert (grid < 0).any() and (grid > 0).any()

    # CoBra, §4.8 and (4.17): M^s = Bil(ReLU(A)) + flip(Bil(ReLU(A'))), max-normalised
    cobra = COBRA.replace(scales=(1.0,))
    stack = stack_maps(forward_pyramid(net, [x], cobra), size, cobra)
    relu_first, relu_first_f = up(grid.relu(), size), up(grid_f.relu(), size).flip(-1)
    relu_after = up(grid, size).relu()
    assert (relu_first - relu_after).abs().max() > 0.05  # the two orders differ on this input ...
    torch.testing.assert_close(stack[0, 0], relu_first)  # ... and wsss takes CoBra's
    torch.testing.assert_close(stack[0, 1], relu_first_f)
    assert (stack[0, 0] - relu_after).abs().max() > 0.05
    cams, _, _ = cam_postprocess(stack, torch.ones(2, 2), 0.0, cobra.flip_merge, cobra.norm, return_cams=True)
    torch.testing.assert_close(cams, normalize_maps(relu_first + relu_first_f, "max"))

    # SeCo, §1.3 with (1.4), (1.5): raw CAMs upsampled, flips merged by max, then ReLU, min-max normalised
    seco = SECO.replace(scales=(1.0,), input_size=None)
    stack = stack_maps(forward_pyramid(net, [x], seco), size, seco)
    torch.testing.assert_close(stack[0, 0], up(grid, size))  # no ReLU on the grid
    got = normalized_maps(stack, seco)
    want = normalize_maps(torch.maximum(up(grid, size), up(grid_f, size).flip(-1)).relu(), "minmax")
    torch.testing.assert_close(got, want)
    other = normalize_maps(torch.maximum(relu_first, relu_first_f), "minmax")  # the CoBra order, SeCo's merge
    assert (got - other).abs().max() > 0.05


# ------------------------------------------------------------------------------ (2) sizes not multiple of 16


def _tiny_vit16(pos_resize: str) -> nn.Module:
    arch = {"backbone": {"name": "vit_tiny_patch16_224", "img_size": 224, "pos_resize": pos_resize,
                         "overrides": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}  # fmt: skip
    return build_model(ModelSpec("cam", arch, CLASSES)).eval()


def test_any_size_grid_floors_and_cobra_dino_position_resize():
    torch.manual_seed(0)
    seco, cobra = _tiny_vit16("size"), _tiny_vit16("dino")
    cobra.load_state_dict(seco.state_dict())  # the same weights; only the position resize rule differs
    x = torch.randn(1, 3, 281, 500)
    with torch.no_grad():
        _, cams = seco(x)
        _, cams_dino = cobra(x)
        # 281 x 500 at patch 16: floor -> 17 x 31 (a stride-16 convolution); the old path padded to 18 x 32
        assert cams.shape == cams_dino.shape == (1, 2, 17, 31)
        assert (cams - cams_dino).abs().max() > 1e-4  # the rules differ at this size ...
        square = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(seco(square)[1], cobra(square)[1])  # ... and agree at the stored grid

    # resize_pos_grid against an independent transcription of DINO's interpolate_pos_encoding (§4.4)
    pos = torch.randn(1, 14 * 14, 8)
    grid = pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    dino = resize_pos_grid(pos, (14, 14), (17, 31), (281, 500), "dino")
    want = F.interpolate(grid, scale_factor=((17 + 0.1) / 14, (31 + 0.1) / 14), mode="bicubic")
    assert want.shape[-2:] == (17, 31)
    torch.testing.assert_close(dino, want.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)  # matrix form, fp32
    size = resize_pos_grid(pos, (14, 14), (17, 31), (281, 500), "size")  # SeCo (§1.1): Bic(pos; (h, w))
    torch.testing.assert_close(size, up_bicubic(grid, (17, 31)).flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert (dino - size).abs().max() > 1e-2
    # kept as is at 224 x 224 (stored token count, square image); resized when the image is not square
    assert torch.equal(resize_pos_grid(pos, (14, 14), (14, 14), (224, 224), "dino"), pos)
    torch.testing.assert_close(resize_pos_grid(pos, (14, 14), (14, 14), (224, 224), "size"), pos)
    skewed = resize_pos_grid(pos, (14, 14), (14, 14), (224, 230), "dino")
    torch.testing.assert_close(skewed, F.interpolate(grid, scale_factor=(14.1 / 14, 14.1 / 14), mode="bicubic")
                               .flatten(2).transpose(1, 2), rtol=0, atol=1e-5)  # fmt: skip
    assert not torch.equal(skewed, pos)


def up_bicubic(a: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(a, size=size, mode="bicubic", align_corners=False)


# ------------------------------------------------------------------------------------ (3) PAR denormalisation

OFFICIAL_MEAN = (123.675, 116.28, 103.53)  # SeCo utils/imutils.py: denormalize_img (0-255 units)
OFFICIAL_STD = (58.395, 57.12, 57.375)


def every_level(float64: bool = False) -> torch.Tensor:
    """(1, 3, 1, 256): every uint8 level 0..255 in each channel, ImageNet-normalised in float32 (``float64``: in
    float64 and stored as float32, as SeCo's ``normalize_img`` does)."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    if not float64:
        return normalize_images(levels)[None]
    x = (levels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)[None]


def official_uint8(x: torch.Tensor) -> torch.Tensor:
    """``denormalize_img``: ``x[:, c] * std[c] + mean[c]`` (float32 tensor ops with Python scalars), cast to uint8."""
    return torch.stack([(x[:, c] * OFFICIAL_STD[c] + OFFICIAL_MEAN[c]).to(torch.uint8) for c in range(3)], 1)


@pytest.mark.parametrize("float64", [False, True], ids=["float32-normalised", "float64-normalised"])
def test_par_denormalisation_is_the_official_uint8_cast(float64):
    # Regression: the constants must be float32(std * 255) of the Python floats; float32(0.224) * 255 computed in
    # float32 is one ulp above float32(57.12) and put 26 G levels (50 with float64 normalisation) one level off.
    x = every_level(float64)
    want = official_uint8(x).float()
    got = to_uint8_levels(x)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert torch.equal(got, want), f"{int((got != want).sum())} levels differ"


def test_old_par_denormalisation_differs_from_the_official_cast():
    """The old input, ``floor(clamp(x * std_01 + mean_01, 0, 1) * 255)``, misses the official uint8 image at
    dozens of levels per channel (§2.1, Q2.4); the official cast itself does not recover every level either."""
    x = every_level()
    want = official_uint8(x).float()
    old = (denormalize(x) * 255).floor()
    per_channel = (old != want).sum((0, 2, 3))
    assert (per_channel >= 20).all() and (per_channel <= 80).all(), per_channel.tolist()
    assert (want != torch.arange(256.0)).any()  # Q2.4: e.g. 254.9999 truncates to 254
    assert ((old - want).abs() <= 1).all()


# ------------------------------------------------------------------------------------ (4) roi mask without box


def test_roi_mask_without_box_is_the_plain_bkg_label():
    # §1.5: VOC thresholds, values on both sides of each of them; two classes, one absent
    v = torch.tensor([0.1, 0.25, 0.3, 0.5, 0.55, 0.7, 0.75, 0.95])
    cam = torch.zeros(1, 3, 2, 8)
    cam[0, 1, 0] = v
    cam[0, 2, 1] = v.flip(0)
    cam[0, 0] = 0.99  # absent class: masked by the tags
    y = torch.tensor([[0.0, 1.0, 1.0]])
    plain = torch.tensor([[[0, 0, 0, 0, 2, 2, 2, 2], [3, 3, 3, 3, 0, 0, 0, 0]]])
    for uncertain in (-1, 255):
        valid, roi = cam_to_label(cam, y, 0.5, 0.7, 0.25, ignore_mid=True, uncertain=uncertain)
        assert torch.equal(roi, plain)  # values in {0..K}: no -1 band, no 255
        assert set(roi.unique().tolist()) <= set(range(4))
        assert torch.equal(roi, cam_to_label(cam, y, 0.5)[1])
        assert torch.equal(valid, cam * y[:, :, None, None])
    # with the whole image as the box the band is back (the code's behaviour with a box)
    _, boxed = cam_to_label(cam, y, 0.5, 0.7, 0.25, torch.tensor([[0, 2, 0, 8]]), ignore_mid=True, uncertain=-1)
    assert boxed[0, 0].tolist() == [0, 0, -1, -1, -1, -1, 2, 2]


# --------------------------------------------------------------------------------------- (5) pyramid sizes


def test_pyramid_sizes_floor_for_seco_round_half_even_for_cobra():
    seco = CAMSettings(scales=(1.0, 0.75))
    assert pyramid_sizes((400, 400), seco) == [(400, 400), (300, 300)]  # floor(300): not 304, the multiple of 16
    assert pyramid_sizes((281, 500), SECO.replace(scales=(0.5, 0.75))) == [(281, 500), (140, 250), (210, 375)]
    # CoBra: its listed order, (round(sH), round(sW)) with NumPy's round-half-to-even: 140.5 -> 140, 421.5 -> 422
    cobra = COBRA.replace(scales=(0.5, 1.0, 1.25, 1.5))
    assert pyramid_sizes((281, 500), cobra) == [(140, 250), (281, 500), (351, 625), (422, 750)]
    assert int(281 * 0.5 + 0.5) == 141 and int(0.75 * 281) == 210 != int(np.round(0.75 * 281))

    x = torch.randn(1, 3, 400, 400)
    assert [tuple(t.shape) for t in tensor_pyramid(x, seco)] == [(1, 3, 400, 400), (1, 3, 300, 300)]
    torch.testing.assert_close(tensor_pyramid(x, seco)[1], up(x, (300, 300)))  # Bil(x; floor(sH), floor(sW))
    y = torch.randn(2, 3, 281, 500)
    assert [tuple(t.shape[-2:]) for t in tensor_pyramid(y, cobra)] == [(140, 250), (281, 500), (351, 625),
                                                                        (422, 750)]  # fmt: skip
    # CoBra's pyramid of a uint8 image: PIL bicubic to those sizes, then normalised (§4.8)
    img = np.random.default_rng(0).integers(0, 256, (281, 500, 3), dtype=np.uint8)
    small = COBRA.replace(scales=(0.5, 1.0))
    inputs = image_pyramid([img], small)
    assert [tuple(t.shape) for t in inputs] == [(1, 3, 140, 250), (1, 3, 281, 500)]
    pil = np.asarray(Image.fromarray(img).resize((250, 140), Image.BICUBIC))
    torch.testing.assert_close(inputs[0][0], normalize_images(pil))
