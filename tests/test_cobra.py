"""CoBra: losses against per-anchor transcriptions of the paper's equations, seed rules, network, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_COBRA

from wsss.cam.cobra import _thresholds_from, attention_background, ir_thresholds
from wsss.cam.pipeline import predict_cams, single_scale_maps
from wsss.data.datasets import VOCDataset
from wsss.kernels import NORM_EPS, combine_sources, normalize_maps
from wsss.models import CAMSettings, CheckpointError, CoBraNet, build_model, load_model
from wsss.models.vgg import VGGTrunk
from wsss.train.cobra_losses import cam_l1_loss, cap_loss, cls_loss, pseudo_labels, sap_loss, stable_topk
from wsss.train.cobra_masks import cobra_masks
from wsss.train.configs import get_config, model_spec
from wsss.train.loop import train

CLASSES = ("background", "boat", "train", "cow")  # three foreground classes


# ---- per-anchor transcriptions of (4.8)/(4.9) and the code's (4.11)-(4.14) ----


def _anchor_loss(v, i, pos, neg, tau, neg_exp):
    """L^i = (1/|P+|) sum_{j in P+} -log(X_ij / (X_ij + Y_i)), one anchor, written out term by term."""
    if neg_exp == "paper":
        y = sum(torch.exp(v[i] @ v[k] / tau) for k in neg)
    else:
        y = sum(torch.exp(v[i] @ v[k]) for k in neg) / tau
    terms = [-torch.log(torch.exp(v[i] @ v[j] / tau) / (torch.exp(v[i] @ v[j] / tau) + y)) for j in pos]
    return sum(terms) / len(pos)


def _ranked(row, k, largest):
    order = sorted(range(len(row)), key=lambda j: (-row[j] if largest else row[j], j))  # ties: lowest index
    return order[:k]


def _cap_direct(v, aff, kp, kn, tau):
    b, n, _ = v.shape
    total = 0
    for bi in range(b):
        for i in range(n):
            row = aff[bi, i].tolist()
            total = total + _anchor_loss(v[bi], i, _ranked(row, kp, True), _ranked(row, kn, False), tau, "paper")
    return total / (b * n)  # mean over anchors (D3 "mean")


def _sap_direct(v, m_cnn, labels, kp, kn, tau, rank, absent, anchors, neg_exp):
    b, c, h, w = m_cnn.shape
    total, count = 0, 0
    for bi in range(b):
        logits = m_cnn[bi].flatten(1).clone()
        present = [True] + [bool(x) for x in labels[bi]]
        for ci in range(c):
            if not present[ci]:
                logits[ci] = 0 if absent == "zero" else float("-inf")
        probs = logits.softmax(0)
        for i in range(h * w):
            col = probs[:, i].tolist()
            y_i = max(range(c), key=lambda ci: (col[ci], -ci))  # first maximum
            if anchors == "positive" and y_i == 0:
                continue
            row = (probs[y_i] if rank == "prob" else m_cnn[bi, y_i].flatten()).tolist()
            pos, neg = _ranked(row, kp, True), _ranked(row, kn, False)
            total = total + _anchor_loss(v[bi], i, pos, neg, tau, neg_exp)
            count += 1
    return total / max(count, 1)


def _unit(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).requires_grad_(True)


def test_stable_topk_breaks_ties_by_lowest_index():
    scores = torch.tensor([[0.5, 1.0, 1.0, 0.2, 1.0, 0.2]])
    assert stable_topk(scores, 2, True).tolist() == [[1, 2]]
    assert stable_topk(scores, 3, False).tolist() == [[3, 5, 0]]
    with pytest.raises(ValueError, match="exceeds"):
        stable_topk(scores, 7, True)


def test_cap_selects_top_and_bottom_of_hand_made_affinity():
    # 4 patches; row i prefers patch (i + 1) % 4 most and patch (i + 2) % 4 least.
    aff = torch.zeros(1, 4, 4)
    for i in range(4):
        aff[0, i, (i + 1) % 4], aff[0, i, (i + 2) % 4] = 1.0, -1.0
    v = torch.zeros(1, 4, 2, requires_grad=True)
    v.data[0] = torch.tensor([[1.0, 0], [0, 1.0], [-1.0, 0], [0, -1.0]])
    got = cap_loss(v, aff, k_pos=1, k_neg=1, tau=1.0)
    # every anchor: positive at cos 0, negative at cos -1: -log(1 / (1 + e^-1))
    assert float(got.detach()) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "paper_sum"])
def test_cap_matches_paper_equation_values_and_gradients(reduction):
    v = _unit((2, 9, 5), 0)
    aff = torch.rand(2, 9, 9, generator=torch.Generator().manual_seed(1))
    got = cap_loss(v, aff, k_pos=3, k_neg=4, tau=0.1, reduction=reduction)
    want = _cap_direct(v, aff, 3, 4, 0.1) * (9 if reduction == "paper_sum" else 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, v)
    (g_want,) = torch.autograd.grad(want, v)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("rank", "absent", "anchors", "neg_exp"),
    [("prob", "neg_inf", "positive", "paper"), ("raw_cam", "zero", "all", "code"), ("prob", "zero", "all", "paper")],
)
def test_sap_matches_paper_equation_values_and_gradients(rank, absent, anchors, neg_exp):
    g = torch.Generator().manual_seed(2)
    v = _unit((2, 12, 6), 3)
    m_cnn = torch.randn(2, 4, 3, 4, generator=g) * 2
    m_cnn[0, 2] = -5  # a present class that never wins, and absent classes that can (code mode, Q4.5)
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    got = sap_loss(v, m_cnn, labels, 5, 3, 0.1, rank, absent, anchors, neg_exp)
    want = _sap_direct(v, m_cnn, labels, 5, 3, 0.1, rank, absent, anchors, neg_exp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, v)
    (g_want,) = torch.autograd.grad(want, v)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_sap_without_anchors_is_zero_and_keeps_the_graph():
    v = _unit((1, 4, 3), 4)
    m_cnn = torch.zeros(1, 3, 2, 2)
    m_cnn[0, 0] = 5.0  # background everywhere
    loss = sap_loss(v, m_cnn, torch.tensor([[1.0, 0.0]]), 2, 1)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, v)
    assert torch.count_nonzero(grad) == 0


def test_sap_code_negatives_differ_from_paper():
    v = _unit((1, 8, 4), 5)
    m_cnn = torch.randn(1, 2, 2, 4, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([[1.0]])
    paper = sap_loss(v, m_cnn, y, 3, 2, 0.1, anchors="all", neg_exp="paper")
    code = sap_loss(v, m_cnn, y, 3, 2, 0.1, anchors="all", neg_exp="code")
    assert not torch.isclose(paper, code)


def test_cap_and_sap_under_bf16_autocast_equal_float32():
    """The ranked scores and the InfoNCE logits (/ tau) stay float32 under autocast (the reference path's Gram
    matrix would otherwise run in bf16)."""
    import inspect

    v = _unit((2, 36, 16), 7)
    aff = torch.rand(2, 36, 36, generator=torch.Generator().manual_seed(8))
    m_cnn = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    want = cap_loss(v, aff, 2, 4), sap_loss(v, m_cnn, y, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cap_loss(v, aff, 2, 4), sap_loss(v, m_cnn, y, 4, 2)
        naive = inspect.unwrap(cap_loss)(v, aff, 2, 4), inspect.unwrap(sap_loss)(v, m_cnn, y, 4, 2)
    for g, w, n in zip(got, want, naive, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
        assert abs(n.float() - w) > 1e-4 * abs(w)  # the guard matters


def test_sap_ranks_float32_cnn_scores_under_bf16_autocast():
    """Under autocast ``M_cnn`` is bf16 and its patches tie; SAP ranks ``W_c F_cnn`` recomputed in float32."""
    from wsss.train.cobra import _cnn_scores

    torch.manual_seed(0)
    model = _cobra()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)), mode="train")[0]
        scores = _cnn_scores(model, out)
    assert out.m_cnn.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, F.conv2d(out.f_cnn.float(), model.cnn_classifier.weight), rtol=0, atol=0)
    ties = lambda m: sum(144 - len(row.unique()) for row in m.flatten(2).flatten(0, 1))  # noqa: E731
    assert ties(out.m_cnn) > 10 * max(ties(scores), 1)  # 12 x 12 patches per map
    assert _cnn_scores(model, model(torch.randn(1, 3, 48, 48), mode="train")[0]).dtype == torch.float32


def test_pseudo_labels_first_index_rule_for_absent_classes():
    m = torch.full((1, 4, 1, 2), -1.0)  # every present channel negative: absent classes (logit 0) win in code mode
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    _, code = pseudo_labels(m, labels, "zero")
    _, paper = pseudo_labels(m, labels, "neg_inf")
    assert code.tolist() == [[2, 2]]  # lowest-index absent channel (Q4.5)
    assert paper.tolist() == [[0, 0]]  # background wins the tie with class 1 (first index)


def test_cam_l1_terms():
    a, b = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    b[0, 1] = 1.0  # image 0's only present class differs by 1 everywhere
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    all_only = cam_l1_loss(a, b, labels, 4, "all_only")
    assert float(all_only) == pytest.approx(1 / 6)
    # positive term: image 0 -> 1.0, image 1 -> 0.0; batch mean 0.5
    assert float(cam_l1_loss(a, b, labels, 4, "both")) == pytest.approx(1 / 6 + 0.5)
    assert torch.isnan(cam_l1_loss(a, b, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 4, "both"))


# ---- seeds: fusion, background percentile, IR thresholds ----


def test_fusion_identity_and_sources():
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(3, 4, 5, 5, generator=g), torch.rand(3, 4, 5, 5, generator=g)
    torch.testing.assert_close(combine_sources(a, b, "fuse"), (torch.maximum(a, b) + b) / 2)  # D14
    torch.testing.assert_close(combine_sources(a, b, "avg"), (a + b) / 2)
    assert torch.equal(combine_sources(a, b, "max"), torch.maximum(a, b))
    with pytest.raises(ValueError, match="combine must be one of"):
        combine_sources(a, b, "mean")
    with pytest.raises(ValueError, match="seed source"):
        CAMSettings.for_family("cobra", {"source": "mean"})


@pytest.mark.parametrize("source", ["cnn", "vit", "avg", "max", "fuse"])
def test_single_scale_sources_of_the_attention_rule(source):
    """The seed source picks or combines the max-normalised CNN and ViT maps; A_obj rides along in channel K."""
    g = torch.Generator().manual_seed(8)
    cnn, vit = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 4, 4, 5, generator=g)
    settings = CAMSettings.for_family("cobra", {"source": source})
    out = single_scale_maps([cnn, vit], (4, 5), settings)
    m_c, m_v = normalize_maps(cnn.relu(), "max"), normalize_maps(vit[:, :3].relu(), "max")
    want = {"cnn": m_c, "vit": m_v}.get(source)
    want = combine_sources(m_c, m_v, source) if want is None else want
    assert out.shape == (2, 4, 4, 5)
    torch.testing.assert_close(out[:, :3], want)
    torch.testing.assert_close(out[:, 3], vit[:, 3].relu())


def test_max_normalize_and_percentile_background():
    m = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]]])
    torch.testing.assert_close(normalize_maps(m, "max"), m / (4 + 1e-5))
    assert NORM_EPS == 1e-5
    a = torch.arange(101, dtype=torch.float32).view(1, 1, 101)
    assert attention_background(a, 70).tolist() == [70.0]
    a2 = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    assert attention_background(a2, 50).item() == pytest.approx(1.5)  # linear, as np.percentile


@pytest.mark.parametrize(
    ("t", "t_bg"),
    [(0.30, 0.25), (0.32, 0.30), (0.28, 0.25), (0.325, 0.30), (0.375, 0.35), (0.30000001192092896, 0.30),
     (0.0, -0.05), (0.8500000000000001, 0.85)],
)  # fmt: skip
def test_ir_threshold_oracle(t, t_bg):
    fg, bg = _thresholds_from(t)
    assert bg == pytest.approx(t_bg, abs=1e-12) and fg == pytest.approx(t_bg + 0.5, abs=1e-12)


def test_ir_thresholds_use_the_93rd_percentile():
    a = torch.linspace(0, 1, 101)  # 93rd percentile = 0.93 -> t_bg 0.90
    fg, bg = ir_thresholds(a)
    assert bg == pytest.approx(0.90) and fg == pytest.approx(1.40)


# ---- network and training ----


def _cobra(*overrides: str) -> CoBraNet:
    return build_model(model_spec(get_config("cobra-tiny-synth", [*TINY_COBRA, *overrides]), CLASSES))


def test_network_outputs_and_gradient_routing():
    model = _cobra()
    assert model.backbone.pos_resize == "dino"  # CoBra's DeiT resizes its position grid the DINO way (§4.4)
    x = torch.randn(2, 3, 48, 48)
    out, v_c, v_s = model(x, mode="train")
    assert out.m_cnn.shape == out.m_tran.shape == (2, 4, 6, 6)
    assert out.affinity.shape == (2, 36, 36) and out.a_obj.shape == (2, 6, 6)
    # each layer's attention rows sum to 1, so the layer sum's rows sum to the depth
    torch.testing.assert_close(out.attn.sum(-1), torch.full((2, 37), 2.0))
    assert v_c.shape == v_s.shape == (2, 36, 16)
    torch.testing.assert_close(v_c.norm(dim=-1), torch.ones(2, 36))
    # CAP moves only the CNN; SAP only the ViT
    cap_loss(v_c, out.affinity, 2, 4).backward(retain_graph=True)
    assert model.cnn_proj.weight.grad is not None and model.backbone.blocks[0].attn.qkv.weight.grad is None
    model.zero_grad(set_to_none=True)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    sap_loss(v_s, out.m_cnn, y, 4, 2, anchors="all").backward()
    assert model.vit_proj.weight.grad is not None and model.cnn_classifier.weight.grad is None
    logits, cams_cnn, cams_vit = model(x)
    assert logits.shape == (2, 3) and cams_cnn.shape == (2, 3, 6, 6) and cams_vit.shape == (2, 4, 6, 6)
    with torch.no_grad():
        out = model.branches(x)
    torch.testing.assert_close(cams_cnn, out.m_cnn[:, 1:])
    torch.testing.assert_close(cams_vit[:, 3], out.a_obj)  # A_obj last, then A_obj * M_tran (4.5) before it
    torch.testing.assert_close(cams_vit[:, :3], out.a_obj[:, None] * out.m_tran[:, 1:])


def test_attention_sum_is_accumulated_block_by_block():
    model = _cobra()
    seen = []  # every block's probabilities, captured beside the recorder
    for block in model.backbone.blocks:
        block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    with torch.no_grad():
        out = model.branches(torch.randn(2, 3, 48, 56))
    torch.testing.assert_close(out.attn, torch.stack([a.mean(1) for a in seen]).sum(0))  # (4.3)
    assert model._recorder.total is None  # taken: nothing of this pass stays referenced


@pytest.mark.parametrize("pooling", ["gap", "gmp"])
def test_image_logits_pool_the_foreground_maps(pooling):
    cfg = get_config("cobra-tiny-synth", [*TINY_COBRA, f"model.pooling={pooling}"])
    model = build_model(model_spec(cfg, CLASSES)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out, logits = model.branches(x), model(x)[0]
    pool = (lambda m: m[:, 1:].mean((2, 3))) if pooling == "gap" else (lambda m: m[:, 1:].flatten(2).max(-1).values)
    torch.testing.assert_close(logits, (pool(out.m_cnn) + pool(out.m_tran)) / 2)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(cls_loss(out.m_cnn, y, pooling), F.multilabel_soft_margin_loss(pool(out.m_cnn), y))
    with pytest.raises(ValueError, match="pooling"):
        build_model(model_spec({**cfg, "model": {**cfg["model"], "pooling": "avg"}}, CLASSES))


def test_grid_mismatch_is_refused_in_training_only():
    model = _cobra("model.cnn.strides=[1,2,2,1]").eval()  # CNN output stride 16, patch 8
    with pytest.raises(ValueError, match=r"CNN grid \(3, 3\) != ViT grid \(6, 6\).*output stride"):
        model(torch.randn(1, 3, 48, 48), mode="train")
    with torch.no_grad():
        logits, cams_cnn, cams_vit = model(torch.randn(1, 3, 48, 48))  # inference: each branch on its grid
    assert logits.shape == (1, 3) and cams_cnn.shape == (1, 3, 3, 3) and cams_vit.shape == (1, 4, 6, 6)


def test_odd_input_sizes_give_each_branch_its_own_grid():
    model = _cobra().eval()
    with torch.no_grad():
        logits, cams_cnn, cams_vit = model(torch.randn(1, 3, 50, 61))
    # ResNet (output stride 8, padded convs): ceil-like 7 x 8; ViT (patch 8, floors): 6 x 7
    assert logits.shape == (1, 3) and cams_cnn.shape == (1, 3, 7, 8) and cams_vit.shape == (1, 4, 6, 7)
    with pytest.raises(ValueError, match="CNN grid"):
        model(torch.randn(1, 3, 50, 61), mode="train")
    with pytest.raises(ValueError, match="mode must be"):
        model(torch.randn(1, 3, 48, 48), mode="cams")


def test_tiny_training_run_saves_both_branches(synth, tmp_path):
    cfg = get_config("cobra-tiny-synth", [*TINY_COBRA, "train.iters=3"])
    ckpt = train(cfg, VOCDataset(synth, "train"), tmp_path, progress=False)
    loaded = load_model(ckpt)
    model, spec = loaded.model, loaded.spec
    assert spec.family == "cobra" and isinstance(model, CoBraNet)
    assert any(k.startswith("cnn.") for k in model.state_dict())
    assert spec.class_names == VOCDataset(synth, "train").classes and loaded.meta["step"] == 3
    assert spec.arch["backbone"]["pos_resize"] == "dino" and model.backbone.pos_resize == "dino"
    # the CoBra order of operations with the config's own values on top (§4.8, §4.9)
    assert (spec.cam.flip_merge, spec.cam.rescale, spec.cam.norm, spec.cam.background) == (
        "sum", "pil_bicubic_round", "max", "attention_percentile")  # fmt: skip
    assert spec.cam.relu_first and spec.cam.source == "fuse" and spec.cam.scales == (1.0, 0.5)
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"sap"' in line]
    assert records, "the contrast losses are logged"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])  # fmt: skip
def test_mask_stages_run_and_resume(synth, tmp_path, device):
    """IR labels -> IRN -> random walk -> masks through the CLI; a rerun finds every output and redoes nothing."""
    from click.testing import CliRunner

    from wsss.cli import cli
    from wsss.data.palette import read_label_png

    cfg = get_config("cobra-tiny-synth", [*TINY_COBRA, "train.iters=2"])
    ckpt = train(cfg, VOCDataset(synth, "train"), tmp_path / "run", progress=False)
    out = tmp_path / "masks"
    args = ["cobra-masks", "--ckpt", str(ckpt), "--data", f"voc:{synth}:train", "--out", str(out), "--irn", "tiny",
            "--pad-size", "64", "--device", device]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = VOCDataset(synth, "train")
    for i, id_ in enumerate(data.ids):
        ir, mask = read_label_png(out / "ir_labels" / f"{id_}.png"), read_label_png(out / "masks" / f"{id_}.png")
        allowed = {0, *(np.flatnonzero(data.labels(i)) + 1)}
        assert ir.shape == mask.shape == data[i].image.shape[:2]
        assert set(np.unique(mask)) <= allowed and set(np.unique(ir)) <= allowed | {255}
    stamp = (out / "masks" / f"{data.ids[0]}.png").stat().st_mtime_ns
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert (out / "masks" / f"{data.ids[0]}.png").stat().st_mtime_ns == stamp
    bad = CliRunner().invoke(cli, [*args, "--ir-thresholds", "0.3"])
    assert bad.exit_code != 0 and "FG,BG" in bad.output


def test_a_vgg_cnn_branch_trains_on_the_vit_grid_and_gives_seeds_but_no_irn(synth, tmp_path):
    tiny_vit = [o for o in TINY_COBRA if not o.startswith("model.cnn.")]  # the VGG trunk is cam-vgg-synth's own
    cfg = get_config("cobra-vgg-synth", [*tiny_vit, "train.iters=2"])
    data = VOCDataset(synth, "train")
    loaded = load_model(train(cfg, data, tmp_path / "run", progress=False))
    model, spec = loaded.model, loaded.spec
    assert isinstance(model.cnn, VGGTrunk) and spec.arch["cnn"]["kind"] == "vgg"
    with torch.no_grad():
        out = model.branches(torch.randn(1, 3, 48, 48))
    assert out.m_cnn.shape == out.m_tran.shape == (1, data.num_classes, 6, 6)  # both at stride 8
    sample = data[0]
    (result,) = predict_cams(model, [sample.image], [sample.labels], spec.cam, mean=spec.mean, std=spec.std)
    assert result.seed.shape == sample.image.shape[:2]
    assert set(np.unique(result.seed)) <= {0, *(np.flatnonzero(sample.labels) + 1)}
    with pytest.raises(ValueError, match="VGG trunk: it makes CAMs and seeds"):
        cobra_masks(loaded, data, tmp_path / "masks", irn_preset="tiny")
    assert not (tmp_path / "masks").exists()  # refused before any work


def test_wrong_cnn_weights_are_refused(synth, tmp_path):
    cfg = get_config("cobra-tiny-synth", [*TINY_COBRA, "train.iters=1", "pretrained_cnn=builtin:vit-tiny-synth"])
    with pytest.raises(CheckpointError, match="torchvision-resnet weights do not fit the network: .*missing") as info:
        train(cfg, VOCDataset(synth, "train"), tmp_path, progress=False)
    assert "vit-tiny-synth" in str(info.value) and "\n" not in str(info.value)
