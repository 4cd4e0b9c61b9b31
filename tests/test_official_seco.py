"""Official SeCo checkpoints give the official CAMs and seeds at any image size (§1.1-§1.4, §3.15).

A tiny network in the official layout of ``model/model_seco.py: network`` (student ViT under ``encoder.*`` with its
unused ImageNet ``head``, ``classifier.weight`` / ``aux_classifier.weight`` without bias, the ASPP
``decoder.c0..3``, and the training-only key encoder, projection heads, prototype bank and queue) is saved with
``torch.save`` as the official script saves it, plain and DDP-prefixed (``module.``). Its methods are an
independent reference of the official forward, written from METHODS (not from wsss):

* ViT: floor patch grid, the stored grid resized bicubically to (H/16, W/16) at every pass (the "size" rule),
  ``F = LN(x_L)``, ``F_aux`` = the output of block ``L - 3`` before the final norm; CAM ``= W * F`` (1x1, no bias);
* ``multi_scale_cam2``: scale 1.0 first whatever the list, ``Bil(x; floor(sH), floor(sW))``, each CAM upsampled
  to (H, W), flips merged by max, then ReLU, summed over scales, min-max normalised (1e-5);
* validation / seed export: the normalised image resized to 448 x 448 first, CAMs resized back to the image's
  size, ``cam_to_label`` at 0.5 (the background wins ``<=``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_official_cobra import (  # noqa: F401  (one_thread: the module's autouse fixture)
    DIM,
    PATCH,
    SIZES,
    RefViT,
    assert_maps_close,
    assert_seeds_agree,
    make_image,
    one_thread,
    randomise,
    size_pos,
)
from torch import nn

from wsss.cam.pipeline import RawCAMs, normalized_maps, postprocess, predict_cams, stack_maps
from wsss.data.palette import COCO_CLASSES
from wsss.models import CheckpointError, load_model
from wsss.models.official import detect_layout

NUM_FG, DEPTH, HEADS, AUX_LAYER = 3, 3, 2, -3
ARCH = {"backbone": {"name": "vit_base_patch16_224", "img_size": 224, "stem": "patch", "pos_resize": "size",
                     "overrides": {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}},
        "aux_layer": AUX_LAYER}  # fmt: skip
VOC_SCALES = (1.0, 0.5, 0.75, 1.5)  # SeCo's VOC validation scales (§1.3)
FEW_SCALES = (0.5, 1.0, 1.5)
TAGS = np.array([1, 0, 1], np.float32)
MEAN_255, STD_255 = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
SIZE_IDS = [f"{h}x{w}" for h, w in SIZES]


class ASPP(nn.Module):
    def __init__(self, dim: int, classes: int, rates=(6, 12, 18, 24)):
        super().__init__()
        for i, rate in enumerate(rates):
            self.add_module(f"c{i}", nn.Conv2d(dim, classes, 3, padding=rate, dilation=rate))

    def forward(self, x):
        return sum(branch(x) for branch in self.children())


class SeCoStudent(nn.Module):
    """The inference parts of ``model/model_seco.py: network`` with the official key names."""

    def __init__(self, num_fg: int = NUM_FG):
        super().__init__()
        self.encoder = RefViT(DIM, DEPTH, HEADS)
        self.encoder.head = nn.Linear(DIM, 1000)  # the ViT's ImageNet head: stored, never used
        self.decoder = ASPP(DIM, num_fg + 1)
        self.classifier = nn.Conv2d(DIM, num_fg, 1, bias=False)
        self.aux_classifier = nn.Conv2d(DIM, num_fg, 1, bias=False)

    def features(self, x: torch.Tensor):
        """(F, F_aux) as (B, D, h, w): the final-LN tokens and block ``L + aux_layer``'s raw output."""
        final, outs, _ = self.encoder.run(x, size_pos, need_attn=False)
        embeds = [*outs[:-1], final]  # the official list: its last entry is replaced by the normed tokens
        h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH

        def grid(t):
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

        return grid(final[:, 1:]), grid(embeds[AUX_LAYER][:, 1:])

    def cam_only(self, x):
        f, f_aux = self.features(x)
        return F.conv2d(f_aux, self.aux_classifier.weight), F.conv2d(f, self.classifier.weight)

    def logits(self, x):
        f, _ = self.features(x)
        return self.classifier(F.adaptive_max_pool2d(f, (1, 1))).flatten(1)  # GMP, then W

    def seg(self, x):
        return self.decoder(self.features(x)[0])


def official_state(net: SeCoStudent, seed: int = 5) -> dict[str, torch.Tensor]:
    """``network.state_dict()``: the student plus every training-only tensor the official file holds."""
    g = torch.Generator().manual_seed(seed)
    state = dict(net.state_dict())
    for key, value in net.encoder.state_dict().items():
        state[f"encoder_k.{key}"] = value + 0.01 * torch.randn(value.shape, generator=g)  # the EMA key encoder
    for head in ("proj_head", "proj_head_t"):  # DINO heads: Linear-GELU-Linear-GELU-Linear, weight-normed last
        for i, (cin, cout) in enumerate(((DIM, 32), (32, 32), (32, DIM))):
            state[f"{head}.mlp.{2 * i}.weight"] = torch.randn(cout, cin, generator=g)
            state[f"{head}.mlp.{2 * i}.bias"] = torch.zeros(cout)
        state[f"{head}.last_layer.weight_g"] = torch.ones(DIM, 1)
        state[f"{head}.last_layer.weight_v"] = torch.randn(DIM, DIM, generator=g)
    state.update({"prototypes": torch.randn(NUM_FG, DIM, generator=g), "queue": torch.randn(12, DIM, generator=g),
                  "queue_label_flag": torch.zeros(12, 1), "queue_ptr": torch.zeros(1, dtype=torch.long)})  # fmt: skip
    return state


TRAINING_ONLY = ("encoder.head.", "encoder_k.", "proj_head.", "proj_head_t.", "prototypes", "queue")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(reference network, state, plain file, DDP file)."""
    net = randomise(SeCoStudent(), 7)
    state = official_state(net)
    folder = tmp_path_factory.mktemp("seco")
    torch.save(state, folder / "seco_voc.pth")
    torch.save({"module." + k: v for k, v in state.items()}, folder / "seco_voc_ddp.pth")
    return net, state, folder / "seco_voc.pth", folder / "seco_voc_ddp.pth"


@pytest.fixture(scope="module")
def loaded(files):
    return load_model(files[2], arch=ARCH)


# ---------------------------------------------------------------- the official multi_scale_cam2 and validation


def official_normalise(img: np.ndarray) -> torch.Tensor:
    """``datasets/transforms.py: normalize_img`` (0-255 units, float64 arithmetic stored as float32), CHW."""
    out = np.empty(img.shape, np.float32)
    for c in range(3):
        out[..., c] = (img[..., c] - MEAN_255[c]) / STD_255[c]
    return torch.from_numpy(out.transpose(2, 0, 1).copy())


def bil(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def reference_multi_scale_cam2(net: SeCoStudent, x: torch.Tensor, scales):
    """(M, M_aux, the per-scale runs) of ``utils/camutils.py: multi_scale_cam2``."""
    b, _, h, w = x.shape
    runs = [x] + [bil(x, (int(s * h), int(s * w))) for s in scales if s != 1.0]  # 1.0 always, and first
    sums, record = [[], []], []
    for xs in runs:
        cam_aux, cam = net.cam_only(torch.cat([xs, xs.flip(-1)]))
        record.append({"input": xs, "cam": cam, "cam_aux": cam_aux})
        for i, c in enumerate((cam, cam_aux)):
            c = bil(c, (h, w))
            sums[i].append(F.relu(torch.maximum(c[:b], c[b:].flip(-1))))  # upsample, flip max, then ReLU
    out = []
    for maps in sums:
        m = torch.stack(maps).sum(0)
        m = m + F.adaptive_max_pool2d(-m, (1, 1))
        out.append(m / (F.adaptive_max_pool2d(m, (1, 1)) + 1e-5))
    return out[0], out[1], record


def reference_cam_to_label(cam: torch.Tensor, y: torch.Tensor, bkg: float):
    """(labels, margin): ``cam_to_label`` without a box, and the gap between the best two of [bkg, y * M]."""
    valid = y[:, :, None, None] * cam
    value, idx = valid.max(1)
    label = idx + 1
    label[value <= bkg] = 0
    scores = torch.cat([torch.full_like(valid[:, :1], bkg), valid], 1).sort(1).values
    return label, scores[:, -1] - scores[:, -2]


@torch.no_grad()
def reference_seco(net: SeCoStudent, img: np.ndarray, tags: np.ndarray, scales, input_size=448, bkg=0.5):
    """SeCo's validation / seed-export path for one image (``input_size=None``: the same at the image's size)."""
    size = img.shape[:2]
    x = official_normalise(img)[None]
    if input_size:
        x = bil(x, (input_size, input_size))
    cam, cam_aux, record = reference_multi_scale_cam2(net, x, scales)
    y = torch.as_tensor(tags)[None]
    resized = bil(cam, size) if input_size else cam
    label, margin = reference_cam_to_label(resized, y, bkg)
    return {"cam": cam, "cam_aux": cam_aux, "runs": record, "resized": resized[0], "seed": label[0].numpy(),
            "margin": margin[0].numpy(), "logits": net.logits(x)}  # fmt: skip


class Recording:
    """The network as ``forward_pyramid`` calls it: every call's batch and its main + auxiliary CAMs (``"cams"``
    mode), while ``predict_cams`` gets the main CAMs only, so one run serves every check."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x):
        logits, cams = self.net(x, mode="cams")
        self.calls.append((x, logits, cams))
        return logits, cams[:, :NUM_FG]

    def raw(self, aux: bool = False) -> RawCAMs:
        part = slice(NUM_FG, None) if aux else slice(None, NUM_FG)
        return RawCAMs(self.calls[0][1][:1], [[c[:, part]] for _, _, c in self.calls], batch=1, flip=True)


@pytest.fixture(scope="module")
def runs(files, loaded):
    """``run(size, settings)`` -> (reference, recording, predict_cams result), computed once per case."""
    cache = {}

    def run(size, input_size=448, scales=VOC_SCALES):
        key = (size, input_size, scales)
        if key not in cache:
            settings = dataclasses.replace(loaded.spec.cam, input_size=input_size, scales=scales)
            img = make_image(size, seed=11)
            want = reference_seco(files[0], img, TAGS, scales, input_size, settings.bkg_thresh)
            net = Recording(loaded.model)
            result = predict_cams(net, [img], [TAGS], settings)[0]
            cache[key] = settings, want, net, result
        return cache[key]

    return run


def check_path(run, size, input_size, scales):
    settings, want, net, result = run(size, input_size, scales)
    at_size = (input_size,) * 2 if input_size else size
    where = f"{size} (input {at_size}, scales {scales})"
    # the pyramid: 1.0 first, floor(s * H), bilinear on the normalised image
    assert [tuple(x.shape[-2:]) for x, _, _ in net.calls] == [tuple(r["input"].shape[-2:]) for r in want["runs"]]
    for (x, _, cams), ref in zip(net.calls, want["runs"], strict=True):
        at = f"{where} at {tuple(x.shape[-2:])}"
        assert_maps_close(x[:1], ref["input"], f"input {at}")
        assert torch.equal(x[1:], x[:1].flip(-1)), at
        assert_maps_close(cams[:, :NUM_FG], ref["cam"], f"raw CAM W * LN(tokens), both flips, {at}")
        assert_maps_close(cams[:, NUM_FG:], ref["cam_aux"], f"raw aux CAM W_aux * F_aux, both flips, {at}")
    assert_maps_close(net.calls[0][1][:1], want["logits"], f"logits W * GMP(F) {where}")
    # merged, normalised CAMs at the network's input size (1.4), (1.5)
    y = torch.as_tensor(TAGS)[None]
    cams, bkg, _ = postprocess(stack_maps(net.raw(), at_size, settings), y, settings)
    assert_maps_close(cams, want["cam"], f"M (1.4)-(1.5) {where}")
    assert_maps_close(normalized_maps(stack_maps(net.raw(aux=True), at_size, settings), settings), want["cam_aux"],
                      f"M_aux {where}")  # fmt: skip
    assert float(bkg[0]) == 0.5
    # the entry point: maps back at the image's size, seeds at 0.5
    assert tuple(result.cam.shape[-2:]) == size, f"predict_cams maps at {tuple(result.cam.shape[-2:])}, not {size}"
    assert_maps_close(result.cam, want["resized"], f"predict_cams maps {where}")
    assert_seeds_agree(result.seed, want["seed"], want["margin"], f"seeds {where}")
    assert len(np.unique(want["seed"])) >= 2  # not a trivial seed


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_validation_path_matches_the_official_rules(runs, size):
    """The official settings: resized to 448 x 448, scales (1.0, 0.5, 0.75, 1.5), back to the image's size."""
    check_path(runs, size, 448, VOC_SCALES)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_native_size_path_matches_the_official_rules(runs, size):
    """The same rules at the image's own size (floor grids at 281 x 500: 17 x 31, then 8 x 15 and 26 x 46)."""
    check_path(runs, size, None, FEW_SCALES)


def test_scale_one_is_run_first_even_when_not_listed(runs):
    """Quirk Q1.5: ``multi_scale_cam2`` always starts at 1.0."""
    _, _, net, _ = runs((281, 500), 448, (0.5, 1.5))
    assert [tuple(x.shape[-2:]) for x, _, _ in net.calls] == [(448, 448), (224, 224), (672, 672)]
    check_path(runs, (281, 500), 448, (0.5, 1.5))


def test_segmentation_head_and_grids_at_an_odd_size(files, loaded):
    x = torch.randn(1, 3, 281, 500, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_maps_close(loaded.model.segment(x), files[0].seg(x), "ASPP decoder logits at 281 x 500")
        logits, cams = loaded.model(x)
        assert cams.shape[-2:] == (17, 31)
        assert_maps_close(logits, files[0].logits(x), "logits at 281 x 500")


def test_position_rule_is_the_size_rule(files, loaded):
    """At the stored 14 x 14 grid the resize is an identity; elsewhere bicubic to the floor grid."""
    with torch.no_grad():
        for size in ((224, 224), (233, 239), (281, 500)):
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(3))
            assert_maps_close(loaded.model(x)[1], files[0].cam_only(x)[1], f"CAM at {size}")


# ---------------------------------------------------------------- the loader on the official file


def test_layout_report_and_spec(files, loaded):
    net, state, plain, ddp = files
    assert detect_layout(list(state)) == "seco" and detect_layout(["module." + k for k in state]) == "seco"
    report, spec = loaded.report, loaded.spec
    assert report.layout == "seco" and report.loaded == len(loaded.model.state_dict())
    skipped = {k for k in state if k.startswith(TRAINING_ONLY)}
    assert set(report.skipped) == skipped and set(report.skipped.values()) == {"training-only"}
    assert report.missing == report.unexpected == report.mismatched == [] and report.aliases == 0
    assert report.loaded + len(skipped) == len(state)
    assert f"loaded {report.loaded} tensors, skipped {len(skipped)} (training-only)" in str(report)
    assert spec.family == "seco" and spec.class_names == ("background", "class_1", "class_2", "class_3")
    assert spec.arch["backbone"]["img_size"] == 224 and spec.arch["backbone"]["pos_resize"] == "size"
    assert spec.arch["aux_layer"] == -3
    cam = spec.cam
    assert (cam.input_size, cam.scales, cam.flip, cam.flip_merge, cam.relu_first, cam.rescale, cam.norm,
            cam.background, cam.bkg_thresh) == (448, VOC_SCALES, True, "max", False, "bilinear_floor", "minmax",
            "threshold", 0.5)  # fmt: skip
    assert len(loaded.meta["source_sha256"]) == 64 and loaded.meta["imported_from"] == str(plain)
    other = load_model(ddp, arch=ARCH)
    assert other.report.loaded == report.loaded and set(other.report.skipped) == skipped
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[key], value), key
    assert torch.equal(loaded.model.backbone.pos_embed, net.encoder.pos_embed)


def test_coco_checkpoint_gets_cocos_settings(files, tmp_path):
    _, state, _, _ = files
    g = torch.Generator().manual_seed(0)
    coco = dict(state)
    for key in ("classifier.weight", "aux_classifier.weight"):
        coco[key] = torch.randn(80, DIM, 1, 1, generator=g)
    for i in range(4):
        coco[f"decoder.c{i}.weight"], coco[f"decoder.c{i}.bias"] = torch.randn(81, DIM, 3, 3), torch.zeros(81)
    coco["prototypes"] = torch.randn(80, DIM)
    torch.save(coco, tmp_path / "seco_coco.pth")
    got = load_model(tmp_path / "seco_coco.pth", arch=ARCH)
    assert got.spec.class_names == tuple(COCO_CLASSES) and got.spec.num_fg == 80
    assert got.spec.cam.bkg_thresh == 0.45 and got.spec.cam.scales == (1.0, 0.5, 0.75, 1.25, 1.5)


def test_shape_mismatch_is_refused_in_one_line_naming_key_and_shapes(files, tmp_path):
    _, state, _, _ = files
    bad = dict(state)
    bad["aux_classifier.weight"] = torch.randn(NUM_FG, 40, 1, 1)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "shape.pth", arch=ARCH)
    msg = str(err.value)
    assert "shape mismatches (1): aux_classifier.weight (3, 40, 1, 1) != (3, 48, 1, 1)" in msg and "\n" not in msg


def test_missing_tensor_is_refused_in_one_line(files, tmp_path):
    _, state, _, _ = files
    torch.save({k: v for k, v in state.items() if k != "aux_classifier.weight"}, tmp_path / "no_aux.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "no_aux.pth", arch=ARCH)
    msg = str(err.value)
    assert "missing (1): aux_classifier.weight" in msg and "\n" not in msg


def test_unexpected_tensors_unknown_and_misused_files_are_refused_in_one_line(files, tmp_path):
    _, state, plain, _ = files
    overrides = {**ARCH["backbone"]["overrides"], "depth": 2}
    shallow = {"backbone": {**ARCH["backbone"], "overrides": overrides}, "aux_layer": -2}
    with pytest.raises(CheckpointError, match=r"unexpected \(12\): backbone.blocks.2.norm1.weight"):
        load_model(plain, arch=shallow)  # a depth-2 network cannot take a depth-3 file
    torch.save({k: v for k, v in state.items() if k != "classifier.weight"}, tmp_path / "headless.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "headless.pth", arch=ARCH)
    msg = str(err.value)
    assert "matches no model family: resembles a seco but lacks classifier.weight" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="--vit-ckpt is for official CoBra pairs"):
        load_model(plain, vit_path=plain, arch=ARCH)
