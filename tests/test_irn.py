"""IRN stage (§6; CoBra §4.9-§4.10): path index, affinities, random walk, masks, IR labels, losses, training."""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.cam.irn import (
    cobra_mask,
    edge_to_affinity,
    ir_labels,
    irn_mask,
    path_index,
    path_max,
    random_walk,
    search_directions,
    transition_matrix,
)
from wsss.data.datasets import VOCDataset
from wsss.data.palette import save_label_png
from wsss.models import CheckpointError, ModelSpec, build_model, load_model, save_checkpoint, save_model
from wsss.models.irn import EdgeDisplacement
from wsss.models.resnet import ResNetConfig
from wsss.train.irn import (
    IRLabelDataset,
    IRNConfig,
    augment_pair,
    build_irn,
    irn_losses,
    load_irn,
    normalize_image,
    pair_labels,
    train_irn,
)

# ------------------------------------------------------------------------------------------------------ references


def rule_directions(r: int) -> set[tuple[int, int]]:
    """§6.5 written out: every offset of the y >= 0 half-plane within the radius, minus the mirrored y = 0 half."""
    out = set()
    for y in range(0, r):
        for x in range(-r + 1, r):
            if x * x + y * y < r * r and (y > 0 or x > 0):
                out.add((y, x))
    return out


def segment_distance(p: tuple[int, int], d: tuple[int, int]) -> float:
    """Euclidean distance from lattice point ``p`` to the segment (0, 0) -> ``d``."""
    p_, d_ = np.array(p, float), np.array(d, float)
    t = np.clip(p_ @ d_ / (d_ @ d_), 0, 1)
    return float(np.linalg.norm(p_ - t * d_))


def brute_path(d: tuple[int, int]) -> set[tuple[int, int]]:
    ys = range(min(0, d[0]), max(0, d[0]) + 1)
    xs = range(min(0, d[1]), max(0, d[1]) + 1)
    return {(y, x) for y in ys for x in xs if segment_distance((y, x), d) ** 2 < 1 - 1e-12}


def connected(points: set[tuple[int, int]]) -> bool:
    """8-connectivity of a point set (breadth-first search)."""
    start = next(iter(points))
    seen, todo = {start}, deque([start])
    while todo:
        y, x = todo.popleft()
        for q in ((y + a, x + b) for a in (-1, 0, 1) for b in (-1, 0, 1)):
            if q in points and q not in seen:
                seen.add(q)
                todo.append(q)
    return seen == points


def brute_pairs(h: int, w: int, r: int):
    """Every (source, destination, direction index) of the crop rule, one pair at a time."""
    r_f = math.ceil(r) - 1
    dirs = [tuple(d) for d in search_directions(r)]
    for y in range(h - r_f):
        for x in range(r_f, w - r_f):
            for k, (dy, dx) in enumerate(dirs):
                yield (y, x), (y + dy, x + dx), k


def brute_affinity(edge: np.ndarray, r: int) -> np.ndarray:
    """(6.7) on the unpadded grid: 1 - max edge on the path for pairs within the radius; 0 beyond; unit diagonal."""
    h, w = edge.shape
    n = h * w
    a = np.eye(n)
    for dy, dx in search_directions(r):
        path = brute_path((int(dy), int(dx)))
        for y in range(h):
            for x in range(w):
                y2, x2 = y + dy, x + dx
                if 0 <= y2 < h and 0 <= x2 < w:
                    v = 1 - max(edge[y + py, x + px] for py, px in path)
                    a[y * w + x, y2 * w + x2] = a[y2 * w + x2, y * w + x] = v
    return a


# ------------------------------------------------------------------------------------------------------ path index


@pytest.mark.parametrize(("r", "count"), [(5, 34), (10, 152)])
def test_search_directions_follow_the_rule(r, count):
    dirs = [tuple(int(v) for v in d) for d in search_directions(r)]
    assert len(dirs) == len(set(dirs)) == count
    assert set(dirs) == rule_directions(r)
    assert (0, 0) not in dirs
    assert all(y >= 0 and x * x + y * y < r * r and (y > 0 or x > 0) for y, x in dirs)
    assert dirs[: r - 1] == [(0, x) for x in range(1, r)]  # the y = 0 row comes first


@pytest.mark.parametrize("r", [5, 10])
def test_paths_hold_both_endpoints_and_the_distance_rule(r):
    pidx = path_index(r, (3 * r, 4 * r))
    for d, path in zip(pidx.directions, pidx.paths, strict=True):
        d = (int(d[0]), int(d[1]))
        pts = [tuple(int(v) for v in p) for p in path]
        assert pts[0] == d and pts[-1] == (0, 0)
        assert set(pts) == brute_path(d) and len(pts) == len(set(pts))
        sums = [abs(y) + abs(x) for y, x in pts]
        assert sums == sorted(sums, reverse=True)
        assert set(sums) == set(range(abs(d[0]) + abs(d[1]) + 1))  # no level skipped
        assert connected(set(pts))
    grouped = np.concatenate([g.dir_ids for g in pidx.groups])
    assert sorted(grouped.tolist()) == list(range(len(pidx.directions)))
    for g in pidx.groups:
        assert all(len(pidx.paths[i]) == g.offsets.shape[1] for i in g.dir_ids)
        assert np.array_equal(g.flat, g.offsets[..., 0] * pidx.size[1] + g.offsets[..., 1])


def test_source_crop_and_destinations():
    h, w, r = 9, 13, 4
    pidx = path_index(r, (h, w))
    ys, xs = np.divmod(pidx.src, w)
    assert ys.min() == 0 and ys.max() == h - 3 - 1 and xs.min() == 3 and xs.max() == w - 3 - 1
    assert len(pidx.src) == (h - 3) * (w - 6)
    d_y, d_x = np.divmod(pidx.dst, w)
    assert np.array_equal(d_y - ys, np.broadcast_to(pidx.directions[:, :1], d_y.shape))
    assert np.array_equal(d_x - xs, np.broadcast_to(pidx.directions[:, 1:], d_x.shape))
    with pytest.raises(ValueError, match="too small"):
        path_index(5, (20, 8))


def test_path_max_matches_pairwise_loop():
    h, w, r = 7, 10, 3
    vals = torch.rand(2, h, w, generator=torch.Generator().manual_seed(0))
    pidx = path_index(r, (h, w))
    out = path_max(vals, pidx)
    paths = [[tuple(p) for p in path] for path in pidx.paths]
    flat_src = {int(s): i for i, s in enumerate(pidx.src)}
    for (y, x), _, k in brute_pairs(h, w, r):
        ref = torch.stack([vals[:, y + py, x + px] for py, px in paths[k]]).amax(0)
        assert torch.equal(out[:, k, flat_src[y * w + x]], ref)


# ------------------------------------------------------------------------------------------------------- affinity


def test_affinity_uniform_edge_is_one_within_radius():
    h, w, r = 6, 8, 3
    a = edge_to_affinity(torch.zeros(h, w), radius=r)
    ys, xs = np.divmod(np.arange(h * w), w)
    d2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    assert torch.equal(a, torch.from_numpy((d2 < r * r).astype(np.float32)))


def test_affinity_wall_cuts_pairs_across_it():
    h, w, r, wall = 6, 9, 4, 4
    edge = torch.zeros(h, w)
    edge[:, wall] = 1
    a = edge_to_affinity(edge, radius=r).numpy()
    xs = np.arange(h * w) % w
    ys = np.arange(h * w) // w
    d2 = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2
    across = ((xs[:, None] < wall) & (xs[None] > wall)) | ((xs[:, None] > wall) & (xs[None] < wall))
    touches = (xs[:, None] == wall) | (xs[None] == wall)
    assert (a[across] == 0).all()
    off_diag = ~np.eye(h * w, dtype=bool)
    assert (a[touches & off_diag] == 0).all()
    same_side = ~across & ~touches & (d2 < r * r)
    assert (a[same_side] == 1).all() and same_side.sum() > 0
    assert np.array_equal(a, a.T) and (np.diag(a) == 1).all()


def test_affinity_matches_bruteforce_and_batches():
    h, w, r = 5, 7, 3
    edge = torch.rand(h, w, generator=torch.Generator().manual_seed(1))
    a = edge_to_affinity(edge, radius=r)
    np.testing.assert_allclose(a.numpy(), brute_affinity(edge.numpy(), r), atol=1e-6)
    batch = torch.stack([edge, edge.flip(0)])[:, None]
    ab = edge_to_affinity(batch, radius=r)
    assert ab.shape == (2, h * w, h * w) and torch.equal(ab[0], a)
    assert torch.equal(ab[1], edge_to_affinity(edge.flip(0), radius=r))
    with pytest.raises(ValueError, match="edge map"):
        edge_to_affinity(torch.zeros(2, 3, h, w))


# ---------------------------------------------------------------------------------------------------- random walk


def test_transition_matrix_matches_dense_matrix_power():
    edge = torch.rand(4, 5, generator=torch.Generator().manual_seed(2)) * 0.5
    a = edge_to_affinity(edge, radius=3).double()
    for exp_times in (0, 3, 8):
        t = transition_matrix(a.float(), beta=10, exp_times=exp_times)
        assert torch.allclose(t.sum(0), torch.ones(20), atol=1e-5)  # columns sum to 1
        ref = a**10 / (a**10).sum(0, keepdim=True)
        ref = torch.linalg.matrix_power(ref, 2**exp_times)
        assert torch.allclose(t.double(), ref, atol=1e-5)


def test_random_walk_matches_direct_formula():
    gen = torch.Generator().manual_seed(3)
    edge, cam = torch.rand(5, 6, generator=gen) * 0.6, torch.rand(2, 5, 6, generator=gen)
    rw = random_walk(cam, edge, beta=10, exp_times=4, radius=3)
    a = edge_to_affinity(edge, radius=3).double()
    t = torch.linalg.matrix_power(a**10 / (a**10).sum(0, keepdim=True), 16)
    ref = ((cam * (1 - edge)).reshape(2, -1).double() @ t).reshape(2, 5, 6)
    assert rw.shape == (2, 5, 6) and torch.allclose(rw.double(), ref, atol=1e-5)


def test_random_walk_stays_in_its_block():
    h, w, wall = 8, 12, 6
    edge = torch.full((h, w), 0.05)
    edge[:, wall] = 1.0
    cam = torch.zeros(2, h, w)
    cam[0, 2:5, 1:3] = 1.0  # left block
    cam[1, 3, 9] = 1.0  # right block
    rw = random_walk(cam, edge, beta=10, exp_times=8, radius=5)
    assert (rw[0, :, wall:] == 0).all() and rw[0, :, :wall].sum() > 0
    assert (rw[1, :, : wall + 1] == 0).all() and rw[1, :, wall + 1 :].sum() > 0
    assert (rw[0, :, :wall] > 0).all()  # spread over the whole block
    with pytest.raises(ValueError, match="same size"):
        random_walk(cam, edge[:, :-1])


# -------------------------------------------------------------------------------------------------------- masks


def test_irn_mask_uses_global_max_and_bg_plane():
    h, w = 6, 8
    rw = torch.zeros(2, h, w)
    rw[0, :, :3] = 4.0  # strong class on the left
    rw[1, :, 5:] = 0.6  # weak class on the right: 0.15 of the global max < 0.25
    keys = np.array([0, 3, 7])
    size = (4 * h - 2, 4 * w - 3)
    mask = irn_mask(rw, size, keys)
    assert mask.shape == size and mask.dtype == np.uint8
    assert (mask[:, :8] == 3).all() and (mask[:, -12:] == 0).all()
    rw[1] *= 2.0  # 0.3 of the global max: now above the background
    mask = irn_mask(rw * 1000, size, keys)  # scale-free
    assert (mask[:, :8] == 3).all() and (mask[:, -8:] == 7).all()
    assert (irn_mask(torch.zeros(2, h, w), size, keys) == 0).all()
    with pytest.raises(ValueError, match="stride 4"):
        irn_mask(rw, (4 * h + 1, 4 * w), keys)
    with pytest.raises(ValueError, match="keys"):
        irn_mask(rw, size, np.array([0, 3]))


def test_cobra_mask_threshold_rule():
    gen = torch.Generator().manual_seed(4)
    rw = torch.rand(2, 5, 6, generator=gen) * torch.tensor([1.0, 3.0])[:, None, None] + 0.2
    keys = np.array([0, 2, 9])
    mask = cobra_mask(rw, (5, 6), keys)  # same size: the resize is the identity
    r = rw.numpy()
    thr = 0.31 * r.max(axis=(1, 2)) + r.min(axis=(1, 2))  # (4.22)
    kept = np.where(r < thr[:, None, None], 0.0, r)
    expected = keys[np.concatenate([np.zeros((1, 5, 6)), kept]).argmax(0)]
    assert np.array_equal(mask, expected) and (mask == 0).any() and (mask == 9).any()
    flat = torch.ones(1, 3, 3)  # max + min > max: every pixel falls below its threshold -> background
    assert (cobra_mask(flat, (3, 3), np.array([0, 5])) == 0).all()
    img = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    refined = cobra_mask(rw, (10, 12), keys, image=img)
    assert refined.shape == (10, 12) and set(np.unique(refined)) <= {0, 2, 9}


def test_ir_labels_rule_without_crf():
    keys = np.array([0, 4, 11])
    cams = np.zeros((2, 2, 3), np.float32)
    cams[0] = [[0.9, 0.2, 0.01], [0.30, 0.05, 0.0]]
    cams[1] = [[0.1, 0.25, 0.02], [0.31, 0.04, 0.06]]
    img = np.zeros((2, 3, 3), np.uint8)
    ir = ir_labels(img, cams, keys, t_fg=0.30, t_bg=0.05, crf=False)
    # (6.1): fg = [4, 0, 0; 11, 0, 0]; bg = [4, 11, 0; 11, 0(tie), 11]; (6.2) combines them
    assert ir.dtype == np.uint8
    assert ir.tolist() == [[4, 255, 0], [11, 0, 255]]
    with pytest.raises(ValueError, match="keys"):
        ir_labels(img, cams, np.array([0, 4]), 0.3, 0.05, crf=False)
    out = ir_labels(np.random.default_rng(0).integers(0, 255, (2, 3, 3), dtype=np.uint8), cams, keys, 0.3, 0.05)
    assert set(np.unique(out)) <= {0, 4, 11, 255}


# ------------------------------------------------------------------------------------------------- training parts


def test_pair_labels_rule():
    h, w, r = 5, 8, 3
    gen = np.random.default_rng(5)
    label = gen.choice(np.array([0, 1, 2, 21, 255]), size=(2, h, w)).astype(np.uint8)
    pidx = path_index(r, (h, w))
    for num_classes in (21, 22):
        bg, fg, neg = pair_labels(torch.from_numpy(label), pidx, num_classes)
        col = {int(s): i for i, s in enumerate(pidx.src)}
        for b in range(2):
            for (y, x), (y2, x2), k in brute_pairs(h, w, r):
                ls, ld = int(label[b, y, x]), int(label[b, y2, x2])
                ok = ls < num_classes and ld < num_classes
                i = col[y * w + x]
                assert bool(bg[b, k, i]) == (ok and ls == ld == 0)
                assert bool(fg[b, k, i]) == (ok and ls == ld and ls >= 1)
                assert bool(neg[b, k, i]) == (ok and ls != ld)
    assert not (bg & fg).any() and not (fg & neg).any()


def reference_losses(edge_logit, disp, label, r, num_classes):
    """(6.3)-(6.6) transcribed pair by pair."""
    sums = {k: 0.0 for k in ("bg", "fg", "neg", "dfg", "dbg")}
    counts = {k: 0 for k in ("bg", "fg", "neg")}
    b, _, h, w = edge_logit.shape
    e = torch.sigmoid(edge_logit[:, 0]).double()
    dirs = search_directions(r)
    for n in range(b):
        for (y, x), (y2, x2), k in brute_pairs(h, w, r):
            ls, ld = int(label[n, y, x]), int(label[n, y2, x2])
            if ls >= num_classes or ld >= num_classes:
                continue
            path = brute_path((int(dirs[k][0]), int(dirs[k][1])))
            a = 1 - max(float(e[n, y + py, x + px]) for py, px in path)  # (6.3)
            delta = disp[n, :, y, x].double() - disp[n, :, y2, x2].double()  # (6.5)
            if ls == ld == 0:
                sums["bg"] += -math.log(a + 1e-5)
                sums["dbg"] += float(delta.abs().sum())
                counts["bg"] += 1
            elif ls == ld:
                sums["fg"] += -math.log(a + 1e-5)
                sums["dfg"] += float((delta - torch.tensor(dirs[k], dtype=torch.float64)).abs().sum())
                counts["fg"] += 1
            else:
                sums["neg"] += -math.log(1 + 1e-5 - a)
                counts["neg"] += 1
    pos = 0.5 * sums["bg"] / (counts["bg"] + 1e-5) + 0.5 * sums["fg"] / (counts["fg"] + 1e-5)  # (6.4)
    neg = sums["neg"] / (counts["neg"] + 1e-5)
    dp_fg = sums["dfg"] / (2 * counts["fg"] + 1e-5)
    dp_bg = sums["dbg"] / (2 * counts["bg"] + 1e-5)
    return {"loss": (pos + neg) / 2 + (dp_fg + dp_bg) / 2, "neg": neg, "dp_fg": dp_fg, "dp_bg": dp_bg}  # (6.6)


def test_losses_match_transcription():
    h, w, r = 6, 9, 3
    gen = torch.Generator().manual_seed(6)
    edge = torch.randn(2, 1, h, w, generator=gen) * 2
    disp = torch.randn(2, 2, h, w, generator=gen)
    label = torch.from_numpy(np.random.default_rng(6).choice(np.array([0, 0, 1, 2, 255]), size=(2, h, w)))
    got = irn_losses(edge, disp, label, path_index(r, (h, w)), 21)
    ref = reference_losses(edge, disp, label, r, 21)
    for key, value in ref.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key
    empty = irn_losses(edge, disp, torch.full((2, h, w), 255), path_index(r, (h, w)), 21)
    assert empty["loss"].item() == 0.0  # no valid pair: every masked mean is 0 / 1e-5


def test_augment_pair_fills_and_reduces():
    rng = np.random.default_rng(7)
    img = rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)
    label = np.full((10, 14), 3, np.uint8)
    out_img, small = augment_pair(img, label, 32, (1.0, 1.0), rng)
    assert out_img.shape == (32, 32, 3) and out_img.dtype == np.float32 and small.shape == (8, 8)
    assert set(np.unique(small)) == {3, 255}
    inside = (np.abs(out_img) > 0).any(-1)  # normalised real pixels are non-zero here, the canvas is 0
    assert inside.sum() == 10 * 14
    big = rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)
    out_img, small = augment_pair(big, np.ones((60, 70), np.uint8), 32, (1.0, 1.0), rng)
    assert (small == 1).all() and (np.abs(out_img) > 0).any(-1).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        IRNConfig.tiny(crop=90)
    with pytest.raises(ValueError, match="no source pixels"):
        IRNConfig.tiny(crop=64)


# -------------------------------------------------------------------------------------------------------- network


def test_network_shapes_groups_and_inference():
    torch.manual_seed(0)
    model = build_irn(IRNConfig.tiny())
    edge, disp = model(torch.randn(2, 3, 96, 96))
    assert edge.shape == (2, 1, 24, 24) and disp.shape == (2, 2, 24, 24)
    edge_p, disp_p = model.param_groups()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in edge_p}.isdisjoint({id(p) for p in disp_p})
    assert {id(p) for p in edge_p} | {id(p) for p in disp_p} == trainable
    assert not any(id(p) in trainable for p in model.trunk.parameters())
    model.train()
    assert not model.trunk.training and model.dp1.training
    x = torch.randn(3, 41, 70)
    e_inf = model.eval().infer_edge(x, pad_size=96)
    assert e_inf.shape == (11, 18) and ((e_inf > 0) & (e_inf < 1)).all()
    padded = F.pad(x, (0, 96 - 70, 0, 96 - 41))
    logit = model(torch.stack([padded, padded.flip(-1)]))[0]
    ref = torch.sigmoid((logit[0, 0] + logit[1, 0].flip(-1)) / 2)[:11, :18]
    assert torch.allclose(e_inf, ref, atol=1e-6)
    with pytest.raises(ValueError, match="pads to 96x96"):
        model.infer_edge(torch.randn(3, 100, 50), pad_size=96)


def test_network_on_resnet50_channels():
    model = EdgeDisplacement(ResNetConfig(name="resnet50"))
    assert model.edge1[0].in_channels == 64 and model.edge5[0].in_channels == 2048
    assert model.dp4[0].in_channels == 1024
    edge, disp = model.eval()(torch.randn(1, 3, 64, 80))
    assert edge.shape == (1, 1, 16, 20) and disp.shape == (1, 2, 16, 20)


# ------------------------------------------------------------------------------------------------------- training


def test_tiny_irn_trains_and_reloads(synth, tmp_path):
    data = VOCDataset(synth, "train")
    ir_dir = tmp_path / "ir"
    ir_dir.mkdir()
    for i in range(len(data)):
        save_label_png(ir_dir / f"{data.ids[i]}.png", data[i].mask)
    samples = IRLabelDataset.voc_samples(data, ir_dir)
    cfg = IRNConfig.tiny(max_steps=2)
    losses = []
    out = train_irn(cfg, samples, tmp_path / "irn.safetensors", seed=0, progress=False,
                    log=lambda step, v: losses.append(v["loss"]))  # fmt: skip
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model, cfg2 = load_irn(out)
    assert cfg2 == cfg and not model.training
    loaded = load_model(out)  # IRN is the "irn" family of the one loader
    assert loaded.spec.family == "irn" and loaded.spec.class_names == () and loaded.meta["kind"] == "irn"
    assert ResNetConfig.from_dict(loaded.spec.arch["backbone"]) == cfg.backbone
    torch.manual_seed(0)
    fresh = build_irn(cfg)
    for (k, v), v0 in zip(model.trunk.state_dict().items(), fresh.trunk.state_dict().values(), strict=True):
        assert torch.equal(v, v0), k  # the trunk never trains
    images = [data[i].image for i in range(len(data))]
    x = torch.from_numpy(np.stack([normalize_image(im[:48, :48]) for im in images[:2]]).transpose(0, 3, 1, 2))
    again, _ = load_irn(out)
    for a, b in zip(model(x), again(x), strict=True):
        assert torch.equal(a, b)
    # the mean shift centres the displacement of the mean-shift images (top-left 96 crops, zero-filled)
    crops = np.zeros((len(images), 96, 96, 3), np.float32)
    for i, im in enumerate(images):
        crops[i, : im.shape[0], : im.shape[1]] = normalize_image(im[:96, :96])
    with torch.no_grad():
        disp = model(torch.from_numpy(crops.transpose(0, 3, 1, 2)))[1]
    assert torch.allclose(disp.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-4)
    assert model.mean_shift.running_mean.abs().sum() > 0
    (tmp_path / "missing").mkdir()
    with pytest.raises(FileNotFoundError, match="IR label"):
        IRLabelDataset.voc_samples(data, tmp_path / "missing")


def _tiny_arch() -> dict:
    return {"backbone": dataclasses.asdict(IRNConfig.tiny().backbone)}


def test_irn_family_builds_and_round_trips(tmp_path):
    spec = ModelSpec("irn", _tiny_arch(), ())
    torch.manual_seed(1)
    model = build_model(spec).eval()
    assert isinstance(model, EdgeDisplacement) and model.spec is spec
    path = save_model(tmp_path / "irn.safetensors", model, spec, kind="irn", config=IRNConfig.tiny().to_dict())
    again, cfg = load_irn(path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for a, b in zip(model(x), again(x), strict=True):
            assert torch.equal(a, b)
    assert cfg == IRNConfig.tiny()


def test_irn_checkpoint_of_the_earlier_layout_loads(tmp_path):
    """train_irn once wrote {"kind": "irn", "config": ...} and no spec; those files still load."""
    torch.manual_seed(3)
    model = build_irn(IRNConfig.tiny()).eval()
    meta = {"kind": "irn", "config": IRNConfig.tiny().to_dict(), "seed": 0, "steps": 2, "mean_shift": [0.0, 0.0]}
    path = save_checkpoint(tmp_path / "old.safetensors", model.state_dict(), meta)
    again, cfg = load_irn(path)
    assert cfg == IRNConfig.tiny() and load_model(path).spec.family == "irn"
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x)[0], again(x)[0])


def test_load_irn_refuses_a_cam_checkpoint(tmp_path):
    from wsss.models import BackboneConfig

    arch = {"backbone": dataclasses.asdict(BackboneConfig("vit_tiny_patch16_224", 32,
                                                          {"patch_size": 8, "depth": 1, "embed_dim": 48,
                                                           "num_heads": 2}))}  # fmt: skip
    spec = ModelSpec("cam", arch, ("background", "boat"))
    path = save_model(tmp_path / "cam.safetensors", build_model(spec), spec)
    with pytest.raises(CheckpointError, match="not an IRN checkpoint"):
        load_irn(path)


def test_build_irn_loads_pretrained_trunk_weights(tmp_path):
    torch.manual_seed(5)
    source = build_irn(IRNConfig.tiny()).trunk.net
    state = {**source.state_dict(), "fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}  # torchvision
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    torch.manual_seed(6)
    model = build_irn(IRNConfig.tiny(pretrained=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.trunk.net.state_dict()[key], value), key
    torch.save({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        build_irn(IRNConfig.tiny(pretrained=str(tmp_path / "wrong.pth")))
