"""SC-CAM (§7.2): the joint loss (7.10), the per-class k-means labels (7.9), the network and the resumable rounds."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from wsss.cam.pipeline import predict_cams
from wsss.data.datasets import VOCDataset
from wsss.models import build_model, load_checkpoint, load_model
from wsss.train import sccam_rounds
from wsss.train.configs import get_config, model_spec
from wsss.train.loop import CHECKPOINT
from wsss.train.sccam import cluster_sub_labels, joint_loss
from wsss.train.sccam_rounds import LABELS, round_config, train_rounds

# Round 0 and one joint round of a few steps on a small trunk: the fixture's 16 images, K = 2.
SMALL = ["pretrained=null", "model.backbone.channels=[8,16,16,32]", "model.backbone.img_size=48", "data.crop=48",
         "train.batch_size=4", "train.iters=3", "train.log_every=1", "train.ckpt_every=2", "cam.input_size=48",
         "model.sub_k=2", "sccam.rounds=1"]  # fmt: skip


def mlsm_by_element(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MultiLabelSoftMargin written out: -(1/BC) sum_{b,c} [y log sigma(x) + (1 - y) log(1 - sigma(x))]."""
    b, c = x.shape
    total = x.new_zeros(())
    for i in range(b):
        for j in range(c):
            p = 1 / (1 + torch.exp(-x[i, j]))
            total = total - (y[i, j] * torch.log(p) + (1 - y[i, j]) * torch.log(1 - p))
    return total / (b * c)


def test_joint_loss_matches_eq_7_10_by_element():
    g = torch.Generator().manual_seed(0)
    z, s = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 12, generator=g, dtype=torch.float64)
    y, ys = (torch.rand(3, 4, generator=g) > 0.5).double(), (torch.rand(3, 12, generator=g) > 0.7).double()
    ours = [t.clone().requires_grad_() for t in (z, s)]
    ref = [t.clone().requires_grad_() for t in (z, s)]
    got = joint_loss(ours[0], ours[1], y, ys, lambda_sub=5.0)
    want = mlsm_by_element(ref[0], y) + 5.0 * mlsm_by_element(ref[1], ys)
    torch.testing.assert_close(got["loss"].double(), want)
    got["loss"].backward()
    want.backward()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    # round 0: the parent term alone
    torch.testing.assert_close(joint_loss(z, None, y, None, 5.0)["loss"].double(), mlsm_by_element(z, y))


def test_sub_labels_are_per_class_kmeans_one_per_parent():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) > 0.5).astype(np.float32)
    labels[:6] = np.eye(3)[[0, 1, 2, 0, 1, 2]]  # every class in some images
    feats = rng.normal(size=(40, 5)).astype(np.float32)
    sub, inertia = cluster_sub_labels(feats, labels, k=3, seed=0, n_init=2)
    for c in range(3):  # a direct loop: fit each class alone, then place each image's cluster at c*K + j
        members = np.flatnonzero(labels[:, c])
        km = KMeans(3, random_state=0, max_iter=300, n_init=2).fit(feats[members])
        want = np.zeros((40, 3), np.uint8)
        for i, j in zip(members, km.labels_, strict=True):
            want[i, j] = 1
        np.testing.assert_array_equal(sub[:, 3 * c : 3 * c + 3], want)
        assert inertia[c] == pytest.approx(km.inertia_)
    np.testing.assert_array_equal(sub.reshape(40, 3, 3).sum(2), labels)  # one sub-label per parent present


def test_a_class_rarer_than_k_gets_one_cluster_per_image():
    labels = np.zeros((5, 2), np.float32)
    labels[:, 0], labels[[0, 3], 1] = 1, 1
    feats = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    sub, _ = cluster_sub_labels(feats, labels, k=3, n_init=1)
    assert sub[[0, 3], 3:].sum() == 2 and sorted(sub[[0, 3], 3:].argmax(1)) == [0, 1]  # apart, 2 of K used
    assert sub[[1, 2, 4], 3:].sum() == 0


def test_network_logits_are_the_mean_of_its_cams(synth):
    cfg = get_config("sccam-tiny-synth", SMALL)
    model = build_model(model_spec(cfg, VOCDataset(synth, "train").classes)).eval()
    x = torch.randn(2, 3, 40, 56)
    z, cams = model(x)
    assert cams.shape == (2, model.num_fg, 5, 7)  # output stride 8
    torch.testing.assert_close(z, cams.mean((2, 3)))  # GAP before a linear head (dropout off in eval)
    zj, s = model(x, mode="joint")
    torch.testing.assert_close(zj, z)
    assert s.shape == (2, model.num_fg * 2) and model(x, mode="feature").shape == (2, model.feature_dim)


@pytest.fixture(scope="module")
def uninterrupted(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("sccam_full")
    train_rounds(get_config("sccam-tiny-synth", SMALL), VOCDataset(synth, "train"), out, progress=False)
    return out


def test_rounds_keep_a_checkpoint_each_and_serve_cams(uninterrupted, synth):
    for r, sub_k in ((0, 0), (1, 2)):
        _, meta = load_checkpoint(uninterrupted / f"round{r}" / CHECKPOINT)
        assert meta["step"] == 3 and meta["spec"]["arch"]["sub_k"] == sub_k
    assert (uninterrupted / "round1" / LABELS).is_file() and not (uninterrupted / "round0" / LABELS).exists()
    loaded = load_model(uninterrupted / CHECKPOINT)  # the final round's network through the one loader
    sample = VOCDataset(synth, "val")[0]
    (result,) = predict_cams(loaded.model, [sample.image], [sample.labels], loaded.spec.cam)
    assert result.seed.shape == sample.image.shape[:2] and result.cam.shape[0] == loaded.spec.num_fg


def _tensors(path):
    return load_checkpoint(path)[0]


def test_resume_after_round1_kmeans_gives_the_uninterrupted_result(uninterrupted, synth, tmp_path, monkeypatch):
    cfg, data = get_config("sccam-tiny-synth", SMALL), VOCDataset(synth, "train")
    real_train, real_labels = sccam_rounds.train, sccam_rounds.make_sub_labels

    def stop_in_round1(cfg_r, *args, **kwargs):
        if cfg_r["model"]["sub_k"]:  # round 1, its k-means labels written
            raise KeyboardInterrupt("stopped after round 1's k-means")
        return real_train(cfg_r, *args, **kwargs)

    monkeypatch.setattr(sccam_rounds, "train", stop_in_round1)
    with pytest.raises(KeyboardInterrupt):
        train_rounds(cfg, data, tmp_path, progress=False)
    assert (tmp_path / "round1" / LABELS).is_file() and not (tmp_path / "round1" / CHECKPOINT).exists()
    calls = []
    monkeypatch.setattr(sccam_rounds, "train", real_train)
    monkeypatch.setattr(sccam_rounds, "make_sub_labels", lambda *a, **k: calls.append(1) or real_labels(*a, **k))
    r0_before = _tensors(tmp_path / "round0" / CHECKPOINT)
    train_rounds(cfg, data, tmp_path, resume=True, progress=False)
    assert calls == []  # neither round 0 nor round 1's clustering was redone
    for key, value in r0_before.items():
        assert torch.equal(value, _tensors(tmp_path / "round0" / CHECKPOINT)[key])
    np.testing.assert_array_equal(np.load(tmp_path / "round1" / LABELS)["sub_labels"],
                                  np.load(uninterrupted / "round1" / LABELS)["sub_labels"])  # fmt: skip
    final, want = _tensors(tmp_path / CHECKPOINT), _tensors(uninterrupted / CHECKPOINT)
    assert final.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(final[key], want[key], rtol=0, atol=0)


def test_max_steps_stops_inside_a_round_and_resume_finishes_it(uninterrupted, synth, tmp_path):
    cfg, data = get_config("sccam-tiny-synth", SMALL), VOCDataset(synth, "train")
    path = train_rounds(cfg, data, tmp_path, progress=False, max_steps=2)
    assert path == tmp_path / "round0" / CHECKPOINT and load_checkpoint(path)[1]["step"] == 2
    assert not (tmp_path / "round1").exists()
    train_rounds(cfg, data, tmp_path, resume=True, progress=False)
    want = _tensors(uninterrupted / CHECKPOINT)
    for key, value in _tensors(tmp_path / CHECKPOINT).items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)


def test_round_config_and_its_errors():
    cfg = get_config("sccam-r50-voc")
    assert round_config(cfg, 0, None)["model"]["sub_k"] == 0 and round_config(cfg, 2, None)["model"]["sub_k"] == 10
    assert sccam_rounds.round_stop(cfg, 3) == 50 * 661 and cfg["sccam"]["lambda_sub"] == 5.0
    assert math.prod(cfg["model"]["backbone"]["strides"]) * 4 == cfg["model"]["output_stride"]
    with pytest.raises(ValueError, match="round_iters needs 4 entries"):
        bad = get_config("sccam-r50-voc", ["sccam.round_iters=[1,2]"])
        train_rounds(bad, None, "unused")


def test_resume_refuses_a_round_trained_with_another_config(uninterrupted, synth, tmp_path):
    shutil.copytree(uninterrupted / "round0", tmp_path / "round0")
    cfg = get_config("sccam-tiny-synth", [*SMALL, "optim.lr=0.1"])
    with pytest.raises(ValueError, match="trained with another config \\(optim differ"):
        train_rounds(cfg, VOCDataset(synth, "train"), tmp_path, resume=True, progress=False)
