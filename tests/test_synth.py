"""The embedded synthetic benchmark: determinism, VOC layout, label/context masks and co-occurrence statistics."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import wsss.data.synth as synth
from wsss.data.datasets import VOCDataset
from wsss.data.palette import IGNORE_INDEX, PALETTE, read_label_png
from wsss.data.synth import (
    CO_OCCURRENCE,
    DEMO_CLASSES,
    SynthConfig,
    broad2_classes,
    broad_classes,
    cooccurrence_stats,
    generate_synth,
    make_scene,
)

SMALL = SynthConfig(n_train=60, n_val=20, min_size=64, max_size=80, seed=3)
DEMO_NAMES = ("background", "boat", "train", "cow", "person", "horse", "bottle", "cat", "car")
CONTEXT_IDS = {1: "water", 2: "rails", 3: "grass"}  # boat, train, cow


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small")
    stats = generate_synth(root, SMALL, progress=False)
    return root, stats


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """400 train images at 48-64 px: enough for the co-occurrence rates to settle (about a second)."""
    root = tmp_path_factory.mktemp("large")
    stats = generate_synth(root, SynthConfig(n_train=400, n_val=0, min_size=48, max_size=64, seed=0), progress=False)
    return root, stats


# ------------------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_files(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, stats = small
    again = generate_synth(tmp_path / "again", SMALL, progress=False)
    first, second = _all_files(root), _all_files(tmp_path / "again")
    assert len(first) == 3 * (60 + 20) + 5  # jpg + png + context png per image; 2 split lists, 3 json/txt files
    assert first == second
    assert again == stats


def test_different_seed_gives_different_data(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = small
    other = tmp_path / "other"
    generate_synth(other, SynthConfig(n_train=60, n_val=20, min_size=64, max_size=80, seed=4), progress=False)
    ids = _ids(root, "train") + _ids(root, "val")
    assert ids == _ids(other, "train") + _ids(other, "val")  # same names...
    same = sum((root / "JPEGImages" / f"{i}.jpg").read_bytes() == (other / "JPEGImages" / f"{i}.jpg").read_bytes()
               for i in ids)  # fmt: skip
    assert same == 0  # ...different pixels
    assert (root / "cls_labels.json").read_text() != (other / "cls_labels.json").read_text()


def test_val_split_does_not_depend_on_n_train(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = small
    other = tmp_path / "fewer_train"
    generate_synth(other, SynthConfig(n_train=7, n_val=20, min_size=64, max_size=80, seed=3), progress=False)
    assert _ids(other, "train") == [f"train_{i:06d}" for i in range(7)]
    assert _ids(other, "val") == _ids(root, "val")
    for i in _ids(root, "val"):
        for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png"), ("ContextMask", "png")):
            assert (other / sub / f"{i}.{ext}").read_bytes() == (root / sub / f"{i}.{ext}").read_bytes(), (sub, i)
    labels_a = json.loads((root / "cls_labels.json").read_text())
    labels_b = json.loads((other / "cls_labels.json").read_text())
    assert {i: labels_b[i] for i in _ids(root, "val")} == {i: labels_a[i] for i in _ids(root, "val")}
    # the first train images come from the same stream too
    for i in _ids(other, "train"):
        assert (other / "JPEGImages" / f"{i}.jpg").read_bytes() == (root / "JPEGImages" / f"{i}.jpg").read_bytes()


def test_make_scene_is_deterministic_for_a_seed() -> None:
    cfg = SynthConfig(min_size=40, max_size=50)
    a = make_scene(DEMO_CLASSES, cfg, np.random.default_rng(11))
    b = make_scene(DEMO_CLASSES, cfg, np.random.default_rng(11))
    c = make_scene(DEMO_CLASSES, cfg, np.random.default_rng(12))
    for field in ("image", "label", "context"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.classes == b.classes
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


# ------------------------------------------------------------------------------------------------------------ layout


def test_voc_layout(small: tuple[Path, dict]) -> None:
    root, _ = small
    for sub in ("JPEGImages", "SegmentationClass", "ContextMask", "ImageSets/Segmentation"):
        assert (root / sub).is_dir(), sub
    train, val = _ids(root, "train"), _ids(root, "val")
    assert train == [f"train_{i:06d}" for i in range(60)]
    assert val == [f"val_{i:06d}" for i in range(20)]
    assert (root / "classes.txt").read_text().splitlines() == list(DEMO_NAMES)
    labels = json.loads((root / "cls_labels.json").read_text())
    assert sorted(labels) == sorted(train + val)
    assert json.loads((root / "synth_stats.json").read_text())["config"]["n_train"] == 60
    for i in train + val:
        img = cv2.imread(str(root / "JPEGImages" / f"{i}.jpg"))
        assert img is not None and img.ndim == 3 and img.shape[2] == 3
        h, w = img.shape[:2]
        assert 64 <= h <= 80 and 64 <= w <= 80, (i, h, w)
        for sub in ("SegmentationClass", "ContextMask"):
            with Image.open(root / sub / f"{i}.png") as png:
                assert png.mode == "P", (sub, i)
                assert png.size == (w, h), (sub, i)
                palette = png.getpalette()
                assert len(palette) == 768
                np.testing.assert_array_equal(np.array(palette, np.uint8).reshape(256, 3), PALETTE)


def test_label_values_and_cls_labels(small: tuple[Path, dict]) -> None:
    root, _ = small
    labels = json.loads((root / "cls_labels.json").read_text())
    n_multi = 0
    for i, names in labels.items():
        mask = read_label_png(root / "SegmentationClass" / f"{i}.png")
        values = set(np.unique(mask).tolist())
        assert values <= set(range(9)) | {255}, (i, values)
        assert 0 in values  # objects cover at most half the short side: background is always visible
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names) and names == sorted(names, key=DEMO_NAMES.index)
        present = {DEMO_NAMES[k] for k in values - {0, 255}}
        assert present <= set(names), i  # every labelled pixel's class is in the image-level labels
        n_multi += len(names) > 1
    assert n_multi > 0


def test_cls_labels_equal_mask_ids(large: tuple[Path, dict]) -> None:
    """Image-level labels must be the classes present in the GT mask (VOC convention: 0 and 255 excluded).

    An object that is visible only as a sliver (clipped at the border, or occluded) can end up entirely inside
    the 255 ignore band; its class must then not be listed either, or the two label sources disagree.
    """
    root, _ = large
    labels = json.loads((root / "cls_labels.json").read_text())
    mismatched = {}
    for i, names in labels.items():
        mask = read_label_png(root / "SegmentationClass" / f"{i}.png")
        present = sorted(DEMO_NAMES[k] for k in set(np.unique(mask).tolist()) - {0, 255})
        if present != sorted(names):
            mismatched[i] = (names, present)
    assert not mismatched, f"cls_labels.json lists classes absent from the mask: {mismatched}"


def _capture_raw_labels(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    raw: list[np.ndarray] = []
    original = synth._ignore_band

    def spy(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raw.append(label.copy())
        return original(label, rng)

    monkeypatch.setattr(synth, "_ignore_band", spy)
    return raw


def _neighbourhood_differs(raw: np.ndarray) -> np.ndarray:
    """True where the 3x3 neighbourhood of a pixel (clipped at the border) holds more than one label."""
    kernel = np.ones((3, 3), np.uint8)
    return cv2.dilate(raw, kernel, borderType=cv2.BORDER_REPLICATE) != cv2.erode(
        raw, kernel, borderType=cv2.BORDER_REPLICATE
    )


def test_ignore_band_lies_exactly_on_object_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    raw_labels = _capture_raw_labels(monkeypatch)
    cfg = SynthConfig(min_size=56, max_size=72)
    rng = np.random.default_rng(5)
    interior_total = 0
    for _ in range(40):
        scene = make_scene(DEMO_CLASSES, cfg, rng)
        raw = raw_labels[-1]
        assert raw.shape == scene.label.shape and 255 not in raw
        band = scene.label == 255
        assert band.any()
        # outside the band the label is the raw label
        np.testing.assert_array_equal(scene.label[~band], raw[~band])
        # every 255 pixel sits where labels change
        differs = _neighbourhood_differs(raw)
        assert not (band & ~differs).any()
        # object interiors (uniform 3x3 neighbourhood) keep their class
        interior = (raw > 0) & ~differs
        assert not (band & interior).any()
        interior_total += int(interior.sum())
        # every label edge between 4-neighbours is covered by the band on at least one side
        for a, b, da, db in (
            (raw[:, :-1], raw[:, 1:], band[:, :-1], band[:, 1:]),
            (raw[:-1], raw[1:], band[:-1], band[1:]),
        ):
            edge = a != b
            assert (da | db)[edge].all()
        # the present classes are those drawn
        assert scene.classes == sorted(set(np.unique(raw).tolist()) - {0})
    assert interior_total > 1000


# ------------------------------------------------------------------------------------------------------ context masks


def test_context_masks(small: tuple[Path, dict]) -> None:
    root, _ = small
    labels = json.loads((root / "cls_labels.json").read_text())
    seen = set()
    for i in labels:
        gt = read_label_png(root / "SegmentationClass" / f"{i}.png")
        ctx = read_label_png(root / "ContextMask" / f"{i}.png")
        assert ctx.shape == gt.shape
        assert set(np.unique(ctx).tolist()) <= {0, 1, 2, 3}, i
        assert not ctx[(gt > 0) & (gt < 255)].any(), i  # no context under a foreground pixel
        seen |= set(np.unique(ctx).tolist()) - {0}
    assert seen == {1, 2, 3}


def test_context_pixels_look_like_their_region(small: tuple[Path, dict]) -> None:
    """Water is blue-dominant and grass green-dominant in the image."""
    root, _ = small
    means: dict[int, list[np.ndarray]] = {1: [], 3: []}
    for i in _ids(root, "train"):
        img = cv2.imread(str(root / "JPEGImages" / f"{i}.jpg"))[..., ::-1].astype(np.float64)
        ctx = read_label_png(root / "ContextMask" / f"{i}.png")
        for k in means:
            # stay clear of region edges where JPEG blurs colours together
            inner = cv2.erode((ctx == k).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if inner.sum() > 20:
                means[k].append(img[inner].mean(0))
    water, grass = np.mean(means[1], 0), np.mean(means[3], 0)
    assert water[2] > water[1] > water[0]
    assert grass[1] > grass[0] and grass[1] > grass[2]


# ------------------------------------------------------------------------------------------------------- statistics


def _recompute(root: Path) -> dict:
    labels = json.loads((root / "cls_labels.json").read_text())
    names = (root / "classes.txt").read_text().splitlines()[1:]
    n = len(labels)
    out: dict = {"images": n, "per_class": {}}
    ctx_of = {}
    for i in labels:
        ctx = read_label_png(root / "ContextMask" / f"{i}.png")
        ctx_of[i] = set(np.unique(ctx).tolist()) - {0}
    for k, name in enumerate(names, 1):
        has = [name in labels[i] for i in labels]
        row = {"images": sum(has), "frequency": sum(has) / n}
        if k in CONTEXT_IDS:
            with_ctx = [k in ctx_of[i] for i in labels]
            both = sum(a and b for a, b in zip(has, with_ctx, strict=True))
            row["p_context_given_class"] = both / sum(has) if sum(has) else math.nan
            row["p_class_given_context"] = both / sum(with_ctx) if sum(with_ctx) else math.nan
        out["per_class"][name] = row
    horse = [i for i in labels if "horse" in labels[i]]
    out["person|horse"] = sum("person" in labels[i] for i in horse) / len(horse)
    out["multi_label_share"] = sum(len(v) > 1 for v in labels.values()) / n
    return out


def test_stats_equal_a_recomputation_from_the_files(large: tuple[Path, dict]) -> None:
    root, stats = large
    assert json.loads((root / "synth_stats.json").read_text()) == json.loads(json.dumps(stats))
    expected = _recompute(root)
    assert stats["images"] == expected["images"] == 400
    for name, row in expected["per_class"].items():
        got = stats["per_class"][name]
        assert got["images"] == row["images"], name
        assert got["frequency"] == pytest.approx(row["frequency"], abs=1e-12), name
        if "p_context_given_class" in row:
            assert got["context"] == CONTEXT_IDS[DEMO_NAMES.index(name)]
            assert got["p_context_given_class"] == pytest.approx(row["p_context_given_class"], abs=1e-12), name
            assert got["p_class_given_context"] == pytest.approx(row["p_class_given_context"], abs=1e-12), name
        else:
            assert "p_context_given_class" not in got, name
    assert stats["p_b_given_a"]["person|horse"] == pytest.approx(expected["person|horse"], abs=1e-12)
    assert stats["multi_label_share"] == pytest.approx(expected["multi_label_share"], abs=1e-12)
    top = stats["top_pairs"]
    assert len(top) == 5 and top[0]["pair"] == ["person", "horse"]
    assert [t["images"] for t in top] == sorted((t["images"] for t in top), reverse=True)


def test_cooccurrence_rates_follow_the_config(large: tuple[Path, dict]) -> None:
    _, stats = large
    p = SynthConfig().p_context
    for name in ("boat", "train", "cow"):
        row = stats["per_class"][name]
        assert row["images"] >= 40, name
        assert abs(row["p_context_given_class"] - p) <= 0.1, (name, row)
        # a context shows up without its class only rarely (p_context_alone = 0.08 spread over 3 contexts)
        assert row["p_class_given_context"] >= 0.75, (name, row)
    base = stats["per_class"]["person"]["frequency"]
    p_person_horse = stats["p_b_given_a"]["person|horse"]
    assert p_person_horse > base + 0.2
    assert p_person_horse >= 0.5  # 0.7 forced, plus random picks; some persons are fully occluded
    # no other pair is forced: horse-person dominates the joint counts
    assert stats["top_pairs"][0]["images"] >= 2 * stats["top_pairs"][1]["images"]


def test_no_context_rates_when_p_context_is_zero(tmp_path: Path) -> None:
    cfg = SynthConfig(n_train=60, n_val=0, min_size=40, max_size=48, p_context=0.0, p_context_alone=0.0, seed=1)
    stats = generate_synth(tmp_path, cfg, progress=False)
    for name in ("boat", "train", "cow"):
        assert stats["per_class"][name]["p_context_given_class"] == 0.0
        assert math.isnan(stats["per_class"][name]["p_class_given_context"])
    for i in _ids(tmp_path, "train"):
        assert not read_label_png(tmp_path / "ContextMask" / f"{i}.png").any()


def test_cooccurrence_stats_on_a_hand_made_table() -> None:
    labels = {
        "a": ["boat"],
        "b": ["boat", "person"],
        "c": ["horse", "person"],
        "d": ["horse"],
        "e": ["cat"],
    }
    contexts = {"a": [1], "b": [], "c": [], "d": [], "e": [1, 3]}
    stats = cooccurrence_stats(labels, contexts, DEMO_CLASSES)
    assert stats["images"] == 5
    boat = stats["per_class"]["boat"]
    assert boat["images"] == 2 and boat["frequency"] == pytest.approx(0.4)
    assert boat["p_context_given_class"] == pytest.approx(0.5)
    assert boat["p_class_given_context"] == pytest.approx(0.5)
    cow = stats["per_class"]["cow"]
    assert cow["images"] == 0 and math.isnan(cow["p_context_given_class"]) and cow["p_class_given_context"] == 0.0
    assert stats["p_b_given_a"] == {"person|horse": pytest.approx(0.5)}
    assert stats["multi_label_share"] == pytest.approx(0.4)
    assert {tuple(t["pair"]): t["images"] for t in stats["top_pairs"]}[("boat", "person")] == 1
    assert CO_OCCURRENCE == {"horse": ("person", 0.7)}


# ------------------------------------------------------------------------------------------------------ broad corpus


def test_broad_classes() -> None:
    specs = broad_classes(0)
    assert len(specs) == 24
    assert broad_classes(0) == specs
    assert broad_classes(1) != specs
    names = [s.name for s in specs]
    assert len(set(names)) == 24
    assert not set(names) & set(DEMO_NAMES)
    assert [s.context for s in specs[:3]] == ["water", "rails", "grass"]
    assert all(s.context is None for s in specs[3:])
    assert all(n.endswith(f"-{i}") for i, n in enumerate(names))
    assert len(broad_classes(0, n=5)) == 5


def test_broad_corpus_dataset(tmp_path: Path) -> None:
    cfg = SynthConfig(n_train=24, n_val=4, min_size=48, max_size=56, corpus="broad", seed=2)
    stats = generate_synth(tmp_path, cfg, progress=False)
    classes = (tmp_path / "classes.txt").read_text().splitlines()
    assert classes == ["background"] + [s.name for s in broad_classes(2)]
    assert len(classes) == 25
    assert set(stats["per_class"]) == set(classes[1:])
    assert stats["p_b_given_a"] == {}  # horse/person are not in this corpus
    labels = json.loads((tmp_path / "cls_labels.json").read_text())
    for i, names in labels.items():
        assert set(names) <= set(classes[1:])
        mask = read_label_png(tmp_path / "SegmentationClass" / f"{i}.png")
        assert set(np.unique(mask).tolist()) <= set(range(25)) | {255}
        assert set(np.unique(read_label_png(tmp_path / "ContextMask" / f"{i}.png")).tolist()) <= {0, 1, 2, 3}
    ds = VOCDataset(tmp_path, "train")
    assert ds.num_fg == 24 and len(ds) == 24


# ------------------------------------------------------------------------------------------------------- read back


def test_reads_back_as_voc_dataset(small: tuple[Path, dict]) -> None:
    root, _ = small
    labels = json.loads((root / "cls_labels.json").read_text())
    ds = VOCDataset(root, "train")
    assert len(ds) == 60 and ds.classes == DEMO_NAMES and ds.num_fg == 8
    assert ds.ids == _ids(root, "train")
    for k in (0, 17, 59):
        sample = ds[k]
        assert sample.id == f"train_{k:06d}"
        assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
        assert sample.mask is not None and sample.mask.shape == sample.image.shape[:2]
        expected = np.zeros(8, np.float32)
        expected[[DEMO_NAMES.index(n) - 1 for n in labels[sample.id]]] = 1
        np.testing.assert_array_equal(sample.labels, expected)
        np.testing.assert_array_equal(sample.mask, read_label_png(root / "SegmentationClass" / f"{sample.id}.png"))
    val = VOCDataset(root, "val")
    assert len(val) == 20 and val.ids[0] == "val_000000"


# ------------------------------------------------------------------------------------------------------- broad2

BROAD2 = SynthConfig(n_train=16, n_val=4, min_size=48, max_size=80, seed=2, corpus="broad2", max_objects=4)


def _scene_digest(specs: tuple, cfg: SynthConfig, n: int = 12) -> str:
    rng, digest = np.random.default_rng([cfg.seed, 0]), hashlib.sha256()
    for _ in range(n):
        scene = make_scene(specs, cfg, rng)
        for a in (scene.image, scene.label, scene.context):
            digest.update(np.ascontiguousarray(a).tobytes())
        digest.update(bytes(scene.classes))
    return digest.hexdigest()


def test_demo_and_broad_scenes_are_unchanged_by_broad2() -> None:
    # Digests of 12 scenes each, computed on the commit before broad2 was added (2a0f7bb).
    demo = "4fa34ed8bea118f2cecd89440ad00638409f81faf59f4a32079581301b8055d7"
    broad = "4c930fd0dc463e2b00460b65b7bb32aeea80ba781d64ff2da66dfdc407a1f746"
    assert _scene_digest(DEMO_CLASSES, SynthConfig()) == demo
    assert _scene_digest(broad_classes(1), SynthConfig(corpus="broad", seed=1)) == broad


def test_broad2_classes() -> None:
    specs = broad2_classes(0)
    assert broad2_classes(0) == specs and broad2_classes(1) != specs
    names = [s.name for s in specs]
    assert len(set(names)) == len(names) == 34 and not set(names) & set(DEMO_NAMES)
    families = [s.family for s in specs]
    assert (families.count("shape"), families.count("texture"), families.count("shape+texture")) == (18, 10, 6)
    assert not {"rings", "zigzag"} & set(synth.PATTERNS)  # the probe set's two pattern classes stay unseen
    assert all(s.rgb is None for s in specs)
    assert [s.context for s in specs if s.context] == list(synth.CONTEXTS)
    for s in specs:  # the pools are disjoint, so no instance fits two classes
        pool = {"shape": {"any"}, "texture": set(synth.PATTERNS), "shape+texture": set(synth.COMBO_TEXTURES)}
        assert s.texture in pool[s.family]
        assert (s.shape == "any") == (s.family == "texture")
        assert (s.shape == "outline") == (s.outline is not None)
    pools = (set(synth.PATTERNS), set(synth.COMBO_TEXTURES), set(synth.NUISANCE_TEXTURES))
    assert sum(len(p) for p in pools) == len(set.union(*pools))
    outlines = [s.outline for s in specs if s.family == "shape+texture"]
    assert len(set(outlines)) == 2  # each combo outline carries every combo texture
    assert synth.corpus_classes(SynthConfig(corpus="broad2", seed=0)) == specs
    with pytest.raises(ValueError, match="unknown synthetic corpus 'nope'"):
        synth.corpus_classes(SynthConfig(corpus="nope"))


@pytest.mark.parametrize("kind", synth.OUTLINE_KINDS)
def test_random_outlines_fill_the_unit_square(kind: str) -> None:
    points, aspect = synth._random_outline(kind, np.random.default_rng(4))
    np.testing.assert_allclose(points.min(0), 0, atol=1e-9)
    np.testing.assert_allclose(points.max(0), 1, atol=1e-9)
    assert 0.4 <= aspect <= 2.5 and len(points) >= 3
    assert synth._poly(points, 40, 40).mean() > 0.2


def test_broad2_is_deterministic() -> None:
    specs = broad2_classes(BROAD2.seed)
    assert _scene_digest(specs, BROAD2) == _scene_digest(broad2_classes(BROAD2.seed), BROAD2)
    assert _scene_digest(specs, BROAD2) != _scene_digest(specs, replace(BROAD2, seed=3))


def _instances(spec, n: int = 40) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` single instances of ``spec`` on a black canvas: (image, boolean mask) each."""
    rng, out = np.random.default_rng(9), []
    for _ in range(n):
        img, label = np.zeros((96, 96, 3), np.float32), np.zeros((96, 96), np.uint8)
        synth._draw_free_object(img, label, spec, 1, None, rng)
        out.append((img, label == 1))
    return out


@pytest.mark.parametrize("family", ["shape", "texture", "shape+texture"])
def test_broad2_colours_vary_per_instance(family: str) -> None:
    spec = next(s for s in broad2_classes(0) if s.family == family)
    means = np.array([img[m].mean(0) for img, m in _instances(spec) if m.sum() > 20])
    assert len(means) >= 30
    assert (means.std(0) > 30).all(), means.std(0)  # one fixed colour would give ~2 (the +-12 and noise jitter)
    assert np.ptp(means.mean(1)) > 100  # bright and dark instances both occur


def test_broad2_texture_classes_change_shape_and_shape_classes_do_not() -> None:
    specs = broad2_classes(0)

    def fill_ratios(spec) -> np.ndarray:  # object area over its bounding-box area: rotation changes it a little
        ratios = []
        for _, m in _instances(spec):
            ys, xs = np.nonzero(m)
            if len(ys) > 40 and ys.min() > 0 and xs.min() > 0 and ys.max() < 95 and xs.max() < 95:
                ratios.append(m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        return np.array(ratios)

    texture = fill_ratios(next(s for s in specs if s.family == "texture"))
    star = fill_ratios(next(s for s in specs if s.name.startswith("shape-star")))
    assert len(texture) > 10 and len(star) > 10
    assert texture.std() > 1.5 * star.std()


@pytest.mark.parametrize("kind", synth.BACKGROUNDS)
def test_broad2_backgrounds(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "BACKGROUNDS", (kind,))
    specs, rng = broad2_classes(0), np.random.default_rng(1)
    for _ in range(3):
        scene = make_scene(specs, BROAD2, rng)
        assert scene.image.dtype == np.uint8 and scene.image.shape[:2] == scene.label.shape
        assert min(scene.label.shape) >= 48 and max(scene.label.shape) <= 80
        assert set(np.unique(scene.label).tolist()) <= set(range(len(specs) + 1)) | {IGNORE_INDEX}
        assert scene.image.std() > 3  # a textured or noisy ground, never one flat value


def test_broad2_corpus_dataset(tmp_path: Path) -> None:
    generate_synth(tmp_path / "a", BROAD2, progress=False)
    generate_synth(tmp_path / "b", BROAD2, progress=False)
    assert _all_files(tmp_path / "a") == _all_files(tmp_path / "b")
    classes = (tmp_path / "a" / "classes.txt").read_text().splitlines()
    assert classes == ["background"] + [s.name for s in broad2_classes(BROAD2.seed)]
    labels = json.loads((tmp_path / "a" / "cls_labels.json").read_text())
    for i, names in labels.items():
        mask = read_label_png(tmp_path / "a" / "SegmentationClass" / f"{i}.png")
        assert sorted(classes[k] for k in set(np.unique(mask).tolist()) - {0, IGNORE_INDEX}) == sorted(names)
    assert VOCDataset(tmp_path / "a", "train").num_fg == 34
