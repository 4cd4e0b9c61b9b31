"""SEAM (§7.1): the PCM against a per-pixel loop, (7.4)-(7.7) against per-element transcriptions (values and
gradients), inference against a transcription of the official multi-scale loop, the one loader, ONNX parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.cam.pipeline import predict_cams
from wsss.data.datasets import VOCDataset
from wsss.data.transforms import normalize_images
from wsss.export.onnx import FP32_TOLERANCE, export_onnx, verify_onnx
from wsss.models import CAMSettings, ModelSpec, build_model, load_model, load_pretrained, save_model
from wsss.models.seam import SEAMNet, pcm_affinity, pcm_input, pcm_propagate
from wsss.train.configs import SEAM_BASELINE, get_config
from wsss.train.loop import train
from wsss.train.seam import (
    SEAM_DEFAULTS,
    cls_loss,
    er_loss,
    max_norm,
    max_onehot,
    min_pool_loss,
    ohem_l1,
    seam_losses,
    with_background,
)

EPS = 1e-5
CLASSES = ("background", "boat", "train", "cow")
TINY_CNN = {"name": "custom", "layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32], "block": "basic",
            "strides": [1, 2, 1, 1], "fixed_bn": True, "frozen_stages": 1}  # fmt: skip
TINY_ARCH = {"backbone": TINY_CNN, "output_stride": 8, "img_size": 48, "pcm_dims": [8, 8], "pcm_out": 16}


def _spec(cam_output: str = "pcm", cam: dict | None = None) -> ModelSpec:
    return ModelSpec("seam", {**TINY_ARCH, "cam_output": cam_output}, CLASSES, CAMSettings.for_family("seam", cam))


def _model(spec: ModelSpec | None = None, seed: int = 0) -> SEAMNet:
    torch.manual_seed(seed)
    return build_model(spec or _spec()).eval()


# ---- the PCM, (7.1)-(7.3), against per-pixel loops ----


def _pcm_input_direct(cam):
    b, c, h, w = cam.shape
    out = torch.zeros_like(cam)
    for bi in range(b):
        norm = {}
        for ci in range(c):
            peak = max(max(float(cam[bi, ci, y, x]), 0.0) for y in range(h) for x in range(w)) + EPS
            for y in range(h):
                for x in range(w):
                    norm[ci, y, x] = max(max(float(cam[bi, ci, y, x]), 0.0) - EPS, 0.0) / peak
        for y in range(h):
            for x in range(w):
                top = max(norm[ci, y, x] for ci in range(1, c))
                out[bi, 0, y, x] = 1 - top
                for ci in range(1, c):
                    out[bi, ci, y, x] = norm[ci, y, x] if norm[ci, y, x] >= top else 0.0
    return out


def _pcm_direct(cam_hat, f):
    """y_j = sum_i Y_i S_ij / (sum_i S_ij + eps), S_ij = ReLU(f_i . f_j / ((|f_i| + eps)(|f_j| + eps)))."""
    b, c, h, w = cam_hat.shape
    out = torch.zeros_like(cam_hat)
    pixels = [(y, x) for y in range(h) for x in range(w)]
    for bi in range(b):
        unit = {p: f[bi, :, p[0], p[1]] / (f[bi, :, p[0], p[1]].norm() + EPS) for p in pixels}
        for j in pixels:
            s = {i: max(float(unit[i] @ unit[j]), 0.0) for i in pixels}
            total = sum(s.values()) + EPS
            for ci in range(c):
                out[bi, ci, j[0], j[1]] = sum(float(cam_hat[bi, ci, i[0], i[1]]) * s[i] for i in pixels) / total
    return out


def test_pcm_matches_a_per_pixel_loop():
    torch.manual_seed(0)
    cam, f = torch.randn(2, 4, 3, 4), torch.randn(2, 5, 3, 4)
    cam_hat = pcm_input(cam)
    torch.testing.assert_close(cam_hat, _pcm_input_direct(cam), atol=1e-6, rtol=1e-5)
    assert torch.all((cam_hat[:, 1:] > 0).sum(1) <= 1)  # one foreground channel per pixel survives
    torch.testing.assert_close(pcm_propagate(cam_hat, pcm_affinity(f)), _pcm_direct(cam_hat, f), atol=1e-5, rtol=1e-4)


def test_network_pcm_uses_detached_cam_and_features():
    """(7.2): the PCM sees conv4/conv5 and Y without gradient, so only its own layers learn from y."""
    model = _model().train()
    x = torch.randn(2, 3, 40, 48)
    cam, revised = model(x, mode="train")
    assert cam.shape == revised.shape == (2, 4, 40, 48)
    revised.sum().backward()
    assert all(p.grad is None for p in [*model.cnn.parameters(), *model.classifier.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fuse.parameters())
    logits, maps = model.eval()(x)
    assert logits.shape == (2, 3) and maps.shape == (2, 3, 40, 48)


# ---- (7.4)-(7.7) against per-element transcriptions ----


def _value(t) -> float:
    return float(t.detach())


def _max_norm_direct(p):
    b, c, h, w = p.shape
    out = [[[[None] * w for _ in range(h)] for _ in range(c)] for _ in range(b)]
    for bi in range(b):
        for ci in range(c):
            vals = [torch.relu(p[bi, ci, y, x]) for y in range(h) for x in range(w)]
            lo, hi = min(vals, key=_value), max(vals, key=_value)
            for y in range(h):
                for x in range(w):
                    out[bi][ci][y][x] = torch.relu(torch.relu(p[bi, ci, y, x]) - lo - EPS) / (hi - lo + EPS)
    return torch.stack([torch.stack([torch.stack([torch.stack(r) for r in ch]) for ch in im]) for im in out])


def _bilinear_ac_direct(m, size):
    """Bil(m; size, ac=True) per output pixel: source ``i (n_in - 1) / (n_out - 1)``."""
    b, c, h, w = m.shape
    oh, ow = size

    def taps(i, n_in, n_out):
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        lo = min(int(math.floor(src)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), src - lo

    rows = []
    for y in range(oh):
        y0, y1, ty = taps(y, h, oh)
        cols = []
        for x in range(ow):
            x0, x1, tx = taps(x, w, ow)
            cols.append((1 - ty) * ((1 - tx) * m[..., y0, x0] + tx * m[..., y0, x1])
                        + ty * ((1 - tx) * m[..., y1, x0] + tx * m[..., y1, x1]))  # fmt: skip
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _mlsm_direct(z, y):
    b, k = z.shape
    total = 0
    for bi in range(b):
        terms = [y[bi, j] * torch.log(torch.sigmoid(z[bi, j])) + (1 - y[bi, j]) * torch.log(1 - torch.sigmoid(z[bi, j]))
                 for j in range(k)]  # fmt: skip
        total = total - sum(terms) / k
    return total / b


def _losses_direct(cam1, rev1, cam2, rev2, labels):
    """The official training step written out: every map built pixel by pixel, each loss summed term by term."""
    b, c = cam1.shape[:2]
    y_bg = [[1.0] + [float(v) for v in labels[bi]] for bi in range(b)]
    gap = [
        torch.stack([torch.stack([m[bi, ci].mean() for ci in range(1, c)]) for bi in range(b)]) for m in (cam1, cam2)
    ]
    l_cls = (_mlsm_direct(gap[0], labels) + _mlsm_direct(gap[1], labels)) / 2

    def l_min(rev):
        h, w = rev.shape[-2:]
        k = h * w // 4
        total = 0
        for bi in range(b):
            top = [max((rev[bi, ci, y, x] * y_bg[bi][ci] for ci in range(1, c)), key=_value)
                   for y in range(h) for x in range(w)]  # fmt: skip
            total = total + sum(torch.relu(v) for v in sorted(top, key=_value)[:k])
        return total / (k * b)

    l_min_total = (l_min(rev1) + l_min(rev2)) / 2
    size = cam2.shape[-2:]

    def masked(m):
        return torch.stack([torch.stack([m[bi, ci] * y_bg[bi][ci] for ci in range(c)]) for bi in range(b)])

    c1, r1 = (masked(_bilinear_ac_direct(_max_norm_direct(m), size)) for m in (cam1, rev1))
    c2, r2 = masked(_max_norm_direct(cam2)), masked(_max_norm_direct(rev2))
    hs, ws = size
    l_er = sum((c1[bi, ci, y, x] - c2[bi, ci, y, x]).abs() for bi in range(b) for ci in range(1, c)
               for y in range(hs) for x in range(ws)) / (b * (c - 1) * hs * ws)  # fmt: skip

    def onehot_target(m):  # background rewritten, then onehotmax, detached
        out = torch.zeros_like(m)
        for bi in range(b):
            for y in range(hs):
                for x in range(ws):
                    top = max(_value(m[bi, ci, y, x]) for ci in range(1, c))
                    out[bi, 0, y, x] = 1 - top
                    for ci in range(1, c):
                        out[bi, ci, y, x] = _value(m[bi, ci, y, x]) if _value(m[bi, ci, y, x]) == top else 0.0
        return out

    def ohem(target, pred):
        k = int(c * hs * ws * 0.2)
        total = 0
        for bi in range(b):
            diffs = [(target[bi, ci, y, x] - pred[bi, ci, y, x]).abs() for ci in range(c) for y in range(hs)
                     for x in range(ws)]  # fmt: skip
            total = total + sum(sorted(diffs, key=_value, reverse=True)[:k]) / k
        return total / b

    l_ecr = ohem(onehot_target(c2), r1) + ohem(onehot_target(c1), r2)
    return {"cls": l_cls, "min": l_min_total, "er": l_er, "ecr": l_ecr, "loss": l_cls + l_min_total + l_er + l_ecr}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, 4, *hw, generator=g).requires_grad_() for hw in ((6, 5), (6, 5), (3, 2), (3, 2))]
    return maps, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def test_seam_losses_match_the_transcribed_training_step_values_and_gradients():
    maps, labels = _inputs()
    got = seam_losses([(maps[0], maps[1]), (maps[2], maps[3])], labels, SEAM_DEFAULTS)
    want = _losses_direct(*maps, labels)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    for name in want:
        g_got = torch.autograd.grad(got[name], maps, retain_graph=True, allow_unused=True)
        g_want = torch.autograd.grad(want[name], maps, retain_graph=True, allow_unused=True)
        for a, e in zip(g_got, g_want, strict=True):
            assert (a is None) == (e is None) or float((a if e is None else e).abs().sum()) == 0, name
            if a is not None and e is not None:
                torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-4, msg=name)


def test_each_loss_term_against_its_equation():
    maps, labels = _inputs(1)
    cam, rev = maps[0], maps[1]
    y_bg = torch.cat([torch.ones(2, 1), labels], 1)[..., None, None]
    torch.testing.assert_close(max_norm(cam), _max_norm_direct(cam), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_loss(cam, labels), _mlsm_direct(cam[:, 1:].mean((2, 3)), labels))
    # (7.4) min term: a map whose per-pixel foreground max is known
    flat = torch.arange(30.0).view(1, 1, 6, 5) - 10  # values -10..19: the 7 smallest are -10..-4 -> ReLU 0
    assert float(min_pool_loss(torch.cat([flat - 100, flat], 1), torch.ones(1, 2, 1, 1))) == 0.0
    shifted = torch.cat([flat - 100, flat + 20], 1)  # smallest 7 of 10..39: mean 13
    assert float(min_pool_loss(shifted, torch.ones(1, 2, 1, 1))) == pytest.approx(13.0)
    a, b = max_norm(cam) * y_bg, max_norm(rev) * y_bg
    assert _value(er_loss(a, b)) == pytest.approx(_value((a[:, 1:] - b[:, 1:]).abs().sum()) / (2 * 3 * 30))
    bg = with_background(a)
    torch.testing.assert_close(bg[:, 0], 1 - a[:, 1:].amax(1))
    hot = max_onehot(bg)
    assert torch.equal(hot[:, 0], bg[:, 0]) and torch.all((hot[:, 1:] > 0).sum(1) <= 1)
    diff = (hot - b).abs().flatten(1)
    k = int(4 * 30 * 0.2)
    want = torch.stack([torch.sort(row, descending=True).values[:k].mean() for row in diff]).mean()
    torch.testing.assert_close(ohem_l1(hot, b), want)


def test_the_baseline_is_the_classification_loss_of_view_one():
    maps, labels = _inputs(2)
    s = {**SEAM_DEFAULTS, "views": 1, "weights": {"cls": 1.0, "min": 0.0, "er": 0.0, "ecr": 0.0}}
    out = seam_losses([(maps[0], maps[1])], labels, s)
    torch.testing.assert_close(out["loss"], F.multilabel_soft_margin_loss(maps[0][:, 1:].mean((2, 3)), labels))
    assert set(out) == {"cls", "min", "loss"}


# ---- inference (§7.1): the one CAM path against the official loop ----


def _official_seeds(model, img, labels, scales=(0.5, 1.0, 1.5, 2.0), bg=0.26):
    """infer_SEAM: PIL bicubic at round(s * size), the image and its flip, the PCM foreground upsampled to the image
    (ac=False) times the labels, flips undone, summed; negatives to 0; (7.8); argmax against ``bg``."""
    h, w = img.shape[:2]
    total = 0
    for s in scales:
        scaled = np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s)), Image.BICUBIC))
        x = normalize_images(scaled)[None]
        for flip in (False, True):
            with torch.no_grad():
                _, maps = model(x.flip(-1) if flip else x)
            m = F.interpolate(maps, (h, w), mode="bilinear", align_corners=False)[0] * labels[:, None, None]
            total = total + (m.flip(-1) if flip else m)
    total = total.relu()
    lo, hi = total.amin((1, 2), keepdim=True), total.amax((1, 2), keepdim=True)
    norm = torch.where(total < lo + EPS, torch.zeros_like(total), (total - lo - EPS) / (hi - lo + EPS))  # (7.8)
    return torch.cat([torch.full((1, h, w), bg), norm]).argmax(0), norm, total


def test_cam_path_reproduces_the_official_inference():
    model = _model(seed=3)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    labels = torch.tensor([1.0, 0.0, 1.0])
    spec = model.spec
    assert spec.cam.bkg_thresh == 0.26 and spec.cam.scales == (0.5, 1.0, 1.5, 2.0) and spec.cam.input_size is None
    res = predict_cams(model, [img], [labels.numpy()], spec.cam)[0]
    seed, norm, total = _official_seeds(model, img, labels)
    present = labels.bool()
    # the package's min-max (1.5) differs from (7.8) by at most eps / (max - min + eps) per class, plus float32
    # rounding of the sums (relative 1e-5 of their maximum, scaled by the same 1 / (max - min))
    hi = total.amax((1, 2))[present]
    spread = hi - total.amin((1, 2))[present]
    gap = (res.cam[present] - norm[present]).abs().flatten(1).amax(1)
    assert torch.all(gap <= (EPS + 1e-5 * hi) / (spread + EPS)), (gap, spread)
    assert (torch.from_numpy(res.seed.astype(np.int64)) == seed).float().mean() > 0.999


# ---- the one loader, training and export ----


def test_checkpoint_round_trip_and_pretrained_trunk(tmp_path):
    model = _model()
    path = save_model(tmp_path / "seam.safetensors", model, model.spec, step=1)
    loaded = load_model(path)
    assert isinstance(loaded.model, SEAMNet) and loaded.spec.family == "seam" and loaded.spec.patch_size == 8
    x = torch.randn(1, 3, 33, 41)
    for a, b in zip(model(x), loaded.model(x), strict=True):
        torch.testing.assert_close(a, b)
    cfg = get_config("seam-tiny-synth")
    big = build_model(ModelSpec("seam", cfg["model"], CLASSES))
    report = load_pretrained(big, cfg["pretrained_cnn"], "cnn").check(allow_unexpected=True)
    assert report.loaded > 0
    with pytest.raises(ValueError, match="no ViT backbone"):
        load_pretrained(big, cfg["pretrained_cnn"], "backbone")  # --pretrained on a ResNet-only network


def test_seam_trains_and_its_baseline_reads_the_cam(synth, tmp_path):
    cnn = json.dumps({**TINY_CNN, "strides": [1, 2, 1, 1]})
    small = ["pretrained_cnn=null", f"model.backbone={cnn}", "data.crop=48", "train.batch_size=4", "train.iters=2",
             "train.log_every=1", "train.ckpt_every=2"]  # fmt: skip
    for name, extra in (("seam", []), ("baseline", SEAM_BASELINE)):
        ckpt = train(get_config("seam-tiny-synth", [*small, *extra]), VOCDataset(synth, "train"), tmp_path / name,
                     progress=False)  # fmt: skip
        loaded = load_model(ckpt)
        assert loaded.model.cam_output == ("pcm" if name == "seam" else "cam")
        log = (tmp_path / name / "metrics.jsonl").read_text()
        assert ('"ecr"' in log) == (name == "seam")


def test_onnx_graph_gives_the_maps_of_the_torch_path(tmp_path):
    model = _model(seed=1)
    out = tmp_path / "seam.onnx"
    result = export_onnx(model, model.spec, out, normalize=True)
    assert result.outputs == ["logits", "cams", "cams_norm"]
    assert max(r["max_rel"] for r in verify_onnx(model, out, [(48, 48), (37, 45), (20, 35)])) < FP32_TOLERANCE
