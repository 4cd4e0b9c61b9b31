"""The segmentation stage: §3.15 inference against a transcription, torch vs ONNX Runtime, the labeler's seg source,
and the segmentation network trained on pseudo-masks (255 ignored, exact resume, export parity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from wsss.cam.seg import predict_segmentation, refine_segmentation, seg_settings
from wsss.cli import cli
from wsss.data.datasets import DatasetError, VOCDataset
from wsss.data.masks import MaskedDataset
from wsss.data.palette import read_label_png, save_label_png
from wsss.data.transforms import normalize_images
from wsss.export.onnx import FP32_TOLERANCE, verify_onnx
from wsss.models import build_model, load_model
from wsss.runtime.backends import OnnxBackend, TorchBackend
from wsss.runtime.labeler import LabelConfig, label_dataset
from wsss.train.configs import get_config, model_spec
from wsss.train.seg import SegObjective, train_segmentation

TINY_DEEPLAB = ["model.backbone.channels=[8,16,16,32]", "pretrained=null", "data.crop=48", "data.cache_images=false",
                "train.batch_size=4", "train.log_every=2", "train.ckpt_every=2", "cam.input_size=48"]  # fmt: skip
TINY_SECO = ['model.backbone.overrides={"patch_size": 8, "depth": 3, "embed_dim": 48, "num_heads": 2}',
             "model.backbone.img_size=48", "cam.input_size=48"]  # fmt: skip

TINY_SEGFORMER = ["model.backbone.name=mit_b0", "model.decoder_channels=32", "data.crop=48", "train.batch_size=2",
                  "train.workers=0", "train.log_every=2", "train.ckpt_every=2", "cam.input_size=48"]  # fmt: skip


@pytest.fixture(scope="module")
def deeplab_ckpt(synth, tmp_path_factory):
    cfg = get_config("deeplab-tiny-synth", [*TINY_DEEPLAB, "train.iters=4"])
    return train_segmentation(cfg, VOCDataset(synth, "train"), synth / "SegmentationClass",
                              tmp_path_factory.mktemp("deeplab"), progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def segformer_ckpt(synth, tmp_path_factory):
    cfg = get_config("segformer-b2-voc", [*TINY_SEGFORMER, "train.iters=2"])
    return train_segmentation(cfg, VOCDataset(synth, "train"), synth / "SegmentationClass",
                              tmp_path_factory.mktemp("segformer"), progress=False)  # fmt: skip


def _images(sizes=((50, 60), (41, 47), (64, 33))):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _transcription(model, image: np.ndarray, size: int) -> np.ndarray:
    """[SeCo] tools/infer_seg_voc.py for one image: per scale a direct resize of the normalised image to
    int(size * s) squared, the flip in the batch, logits resized to the image and flips summed; max over scales."""
    x = normalize_images(image)[None]
    per_scale = []
    for s in (1.0, 1.25, 1.5):
        xs = F.interpolate(x, size=[int(size * s)] * 2, mode="bilinear", align_corners=False)
        segs = model.segment(torch.cat([xs, xs.flip(-1)]))
        segs = F.interpolate(segs, size=image.shape[:2], mode="bilinear", align_corners=False)
        per_scale.append(segs[:1] + segs[1:].flip(-1))
    return torch.max(torch.stack(per_scale), dim=0)[0][0].softmax(0).numpy()


def _transcribed_crf(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """DenseCRF(iter 10, pos_xy_std 1, pos_w 1, bi_xy_std 121, bi_rgb_std 5, bi_w 4) on softmax probabilities."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=1, compat=1)
    crf.addPairwiseBilateral(sxy=121, srgb=5, rgbim=np.ascontiguousarray(image), compat=4)
    return np.argmax(np.array(crf.inference(10)).reshape(c, h, w), axis=0)


@pytest.mark.parametrize("config,overrides", [("seco-tiny-synth", TINY_SECO), ("deeplab-tiny-synth", TINY_DEEPLAB)])
@torch.no_grad()
def test_protocol_matches_the_per_image_transcription(config, overrides):
    spec = model_spec(get_config(config, overrides), ("background", "a", "b"))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    for p in model.parameters():  # a decoder with some spread, so that the CRF has decisions to make
        p.add_(torch.randn_like(p) * 0.05)
    images = _images()
    results = predict_segmentation(TorchBackend(model, spec=spec, what="seg"), images, [None] * 3,
                                   seg_settings(spec.cam))  # fmt: skip
    refined = refine_segmentation(images, [r.cam.numpy() for r in results])
    for image, result, label in zip(images, results, refined, strict=True):
        want = _transcription(model, image, 48)
        np.testing.assert_allclose(result.cam.numpy(), want, atol=1e-5)
        assert np.array_equal(result.seed, want.argmax(0))
        assert np.array_equal(label, _transcribed_crf(image, want))


@pytest.mark.parametrize("net", ["deeplab", "segformer"])
def test_onnx_and_torch_seg_agree_through_the_labeler(synth, net, request, tmp_path):
    """A tiny DeepLab / SegFormer trained on masks exports with dynamic sizes (parity checked by --verify at three
    sizes, two off the stride-4 grid) and labels alike on torch and ORT."""
    ckpt = request.getfixturevalue(f"{net}_ckpt")
    onnx_path = tmp_path / "seg.onnx"
    result = CliRunner().invoke(cli, ["export", "--ckpt", ckpt, "--what", "seg", "--onnx", onnx_path, "--verify"])
    assert result.exit_code == 0 and "parity OK" in result.output, result.output
    loaded = load_model(ckpt)
    if net == "segformer":  # batch 1 and 3, sizes off the encoder's stride 32, one under it (one-cell last stage)
        sizes = [(41, 70), (75, 50), (20, 27)]
        rows = [r for b in (1, 3) for r in verify_onnx(loaded.model, onnx_path, sizes, batch=b)]
        assert len(rows) == 12 and max(r["max_rel"] for r in rows) <= FP32_TOLERANCE
    backends = {"torch": TorchBackend(loaded.model, spec=loaded.spec, what="seg"), "onnx": OnnxBackend(onnx_path)}
    assert backends["onnx"].what == "seg"
    images = _images()
    settings = seg_settings(loaded.spec.cam)
    a, b = (predict_segmentation(backend, images, [None] * 3, settings) for backend in backends.values())
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.cam.numpy(), y.cam.numpy(), atol=1e-5)
    job = LabelConfig(settings, "crf", "masks", "seeds", batch=4, workers=0, quiet=True, source="seg")
    for name, backend in backends.items():
        label_dataset(backend, loaded.spec, loaded.meta, VOCDataset(synth, "val"), tmp_path / name, job)
    for kind in ("seeds", "masks"):
        pngs = {n: {p.stem: read_label_png(p) for p in sorted((tmp_path / n / kind).glob("*.png"))} for n in backends}
        assert len(pngs["torch"]) == 6 and pngs["torch"].keys() == pngs["onnx"].keys()
        agreement = np.mean([np.mean(pngs["torch"][k] == pngs["onnx"][k]) for k in pngs["torch"]])
        assert agreement >= 0.999


def test_label_and_cam_source_seg_resume_and_eval(synth, deeplab_ckpt, tmp_path):
    args = ["--ckpt", deeplab_ckpt, "--data", f"voc:{synth}:val", "--source", "seg", "--workers", "0"]
    out = tmp_path / "cam"
    result = CliRunner().invoke(cli, ["cam", *args, "--out", out, "--refine", "crf"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["label", *args, "--out", tmp_path / "label", "--quiet"])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(cli, ["label", *args, "--out", tmp_path / "label", "--quiet", "--resume"])
    summary = json.loads((tmp_path / "label" / "summary-shard-0-of-1.json").read_text())
    assert again.exit_code == 0 and summary["processed_this_run"] == 0 and summary["ok"] == 6
    for p in sorted((out / "masks").glob("*.png")):  # wsss label's CRF labels are wsss cam's masks
        assert np.array_equal(read_label_png(p), read_label_png(tmp_path / "label" / "labels" / p.name))
    scored = CliRunner().invoke(cli, ["eval", "--pred", out / "masks", "--gt", synth / "SegmentationClass",
                                      "--allow-missing"])  # fmt: skip
    assert scored.exit_code == 0 and "mIoU" in scored.output, scored.output
    refused = CliRunner().invoke(cli, ["label", *args, "--out", tmp_path / "par", "--refine", "par"])
    assert refused.exit_code != 0 and "PAR refines CAMs" in refused.output
    no_cams = CliRunner().invoke(cli, ["label", *args[:-4], "--out", tmp_path / "x"])
    assert no_cams.exit_code != 0 and "has no CAMs" in no_cams.output


def test_training_resumes_exactly(synth, tmp_path):
    cfg = get_config("deeplab-tiny-synth", [*TINY_DEEPLAB, "train.iters=4"])
    data = VOCDataset(synth, "train")
    full = train_segmentation(cfg, data, None, tmp_path / "full", progress=False)
    train_segmentation(cfg, data, None, tmp_path / "cut", progress=False, max_steps=2)
    resumed = train_segmentation(cfg, data, None, tmp_path / "cut", progress=False, resume=True)
    a, b = load_model(full).model.state_dict(), load_model(resumed).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ignored_pixels_do_not_reach_the_loss():
    spec = model_spec(get_config("deeplab-tiny-synth", TINY_DEEPLAB), ("background", "a", "b"))
    torch.manual_seed(0)
    model = build_model(spec)
    x = torch.randn(2, 3, 48, 48)
    mask = torch.randint(0, 3, (2, 48, 48))
    mask[:, :, :24] = 255
    objective = SegObjective(model, {})
    loss = objective(model, {"image": x, "mask": mask}, 0)["loss"]
    up = F.interpolate(model(x), size=(48, 48), mode="bilinear", align_corners=False)
    kept = mask != 255
    manual = F.cross_entropy(up.permute(0, 2, 3, 1)[kept], mask[kept])
    torch.testing.assert_close(loss, manual)
    relabelled = mask.clone()
    relabelled[:, :, :24] = 255  # whatever the ignored pixels said, the loss is the same
    assert torch.equal(objective(model, {"image": x, "mask": relabelled}, 0)["loss"], loss)


def test_masks_folder_is_paired_and_checked(synth, tmp_path):
    data = VOCDataset(synth, "train")
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(len(data) - 1):
        label = read_label_png(data.mask_path(i))
        label[:4] = 255
        save_label_png(masks / f"{data.ids[i]}.png", label)
    with pytest.raises(DatasetError, match=f"no mask for 1 of {len(data)} images, e.g. .*{data.ids[-1]}.png"):
        MaskedDataset(data, masks)
    save_label_png(masks / f"{data.ids[-1]}.png", np.zeros((5, 7), np.uint8))
    paired = MaskedDataset(data, masks)
    assert (paired[0].mask[:4] == 255).all() and paired[0].image.shape == data[0].image.shape
    with pytest.raises(DatasetError, match="mask is 7x5 but image"):
        paired[len(data) - 1]
    result = CliRunner().invoke(cli, ["train", "--config", "cam-tiny-synth", "--data", f"voc:{synth}:train",
                                      "--masks", masks, "--out", tmp_path / "run"])  # fmt: skip
    assert result.exit_code != 0 and "learns from image-level tags" in result.output


def test_imagenet_weights_load_through_the_one_loader(tmp_path):
    """torchvision's ResNet files fit DeepLab's trunk, the SegFormer authors' MiT files its encoder (heads skipped)."""
    import torchvision

    from wsss.models import load_pretrained

    deeplab = build_model(
        model_spec(get_config("deeplab-r101-voc", ["model.backbone.name=resnet18"]), ("background", "a"))
    )
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    report = load_pretrained(deeplab, tmp_path / "resnet18.pth").check()
    assert report.loaded == len(deeplab.backbone.net.state_dict()) and list(report.skipped) == ["fc.weight", "fc.bias"]

    cfg = get_config("segformer-b2-voc", ["model.backbone.name=mit_b0", "model.decoder_channels=32"])
    segformer = build_model(model_spec(cfg, ("background", "a")))
    state = {**segformer.backbone.state_dict(), "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "mit_b0.pth")
    report = load_pretrained(segformer, tmp_path / "mit_b0.pth").check()
    assert report.loaded == len(segformer.backbone.state_dict()) and len(report.skipped) == 2


@torch.no_grad()
def test_segformer_is_smps_network_at_any_size():
    """Our SegFormer at sizes off the encoder's stride is smp's Segformer (same modules) on the input zero-padded to a
    multiple of 32, its logits cropped to the cells covering the image (the exportable crop changed no output)."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    ours = build_model(model_spec(get_config("segformer-b2-voc", TINY_SEGFORMER), ("background", "a", "b"))).eval()
    reference = smp.Segformer(encoder_name="mit_b0", encoder_weights=None, classes=3, upsampling=1,
                              decoder_segmentation_channels=32)  # fmt: skip
    reference.encoder, reference.decoder = ours.backbone, ours.head["decoder"]
    reference.segmentation_head = ours.head["classifier"]
    for h, w in ((41, 70), (75, 50), (20, 27), (64, 96)):
        x = torch.randn(2, 3, h, w)
        want = reference.eval()(F.pad(x, (0, 32 * -(-w // 32) - w, 0, 32 * -(-h // 32) - h)))
        got = ours.segment(x)
        assert got.shape[-2:] == (-(-h // 4), -(-w // 4))
        torch.testing.assert_close(got, want[..., : got.shape[-2], : got.shape[-1]], rtol=0, atol=1e-5)
