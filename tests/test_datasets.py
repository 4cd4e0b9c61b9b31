"""Dataset readers on tiny on-disk fixtures: layouts, label sources and every error path."""

from __future__ import annotations

import codecs
import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsss.data.datasets import (
    COCODataset,
    DatasetError,
    FolderDataset,
    VOCDataset,
    WSSSDataset,
    parse_data_spec,
)
from wsss.data.palette import COCO_CLASSES, VOC_CLASSES, save_label_png

H, W = 6, 8


def _img(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (100, 150, 200)).save(path)


def _mask(path: Path, values: Sequence[int], h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    for k, v in enumerate(values):
        m[k % h, k // h] = v
    save_label_png(path, m)


def _voc(root: Path, ids: Sequence[str] = ("a", "b"), split: str = "train", mask_dir: str | None = None) -> Path:
    for id_ in ids:
        _img(root / "JPEGImages" / f"{id_}.jpg")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    if mask_dir:
        (root / mask_dir).mkdir(parents=True, exist_ok=True)
    return root


def _onehot(*classes: int, k: int = 20) -> np.ndarray:
    v = np.zeros(k, np.float32)
    v[[c - 1 for c in classes]] = 1
    return v


# ------------------------------------------------------------------------------------------------------------- VOC


def test_voc_segmentation_class_and_mask_labels(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b", "c"), mask_dir="SegmentationClass")
    _mask(root / "SegmentationClass" / "a.png", [3, 3, 255])
    _mask(root / "SegmentationClass" / "b.png", [])
    ds = VOCDataset(root)
    assert isinstance(ds, WSSSDataset) and ds.split == "train" and len(ds) == 3
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21 and ds.num_fg == 20
    s = ds[0]
    assert s.id == "a" and s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
    assert s.mask is not None and s.mask.shape == (H, W) and s.mask[0, 0] == 3 and s.mask[2, 0] == 255
    np.testing.assert_array_equal(s.labels, _onehot(3))
    assert s.labels.dtype == np.float32
    np.testing.assert_array_equal(ds.labels(1), np.zeros(20))  # background-only mask: known, no fg class
    assert ds.mask_path(2) is None and ds[2].mask is None and ds[2].labels is None
    assert ds.image_path(1) == root / "JPEGImages" / "b.jpg"
    assert pickle.loads(pickle.dumps(ds)).labels(0).sum() == 1


def test_voc_aug_split_and_folder_preferred(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b"), split="train_aug", mask_dir="SegmentationClassAug")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    _mask(root / "SegmentationClass" / "a.png", [1])
    _mask(root / "SegmentationClassAug" / "a.png", [2])
    _mask(root / "SegmentationClassAug" / "b.png", [4, 5])
    ds = VOCDataset(root)
    assert ds.split == "train_aug" and ds.ids == ["a", "b"]
    assert ds.mask_path(0) == root / "SegmentationClassAug" / "a.png"
    np.testing.assert_array_equal(ds.labels(0), _onehot(2))
    np.testing.assert_array_equal(ds[1].labels, _onehot(4, 5))
    assert VOCDataset(root, "train").ids == ["a"]


def test_voc_split_lines_with_paths(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a",))
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text(
        "\n/JPEGImages/a.jpg /SegmentationClassAug/a.png\n\n"
    )
    assert VOCDataset(root).ids == ["a"]


def test_voc_json_labels_take_precedence(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b"), mask_dir="SegmentationClass")
    _mask(root / "SegmentationClass" / "a.png", [1])
    _mask(root / "SegmentationClass" / "b.png", [7])
    (root / "cls_labels.json").write_text(json.dumps({"a": ["dog", "person"], "zzz": []}))
    ds = VOCDataset(root)
    np.testing.assert_array_equal(ds[0].labels, _onehot(12, 15))
    np.testing.assert_array_equal(ds[1].labels, _onehot(7))  # absent from the json: falls back to the mask


def test_voc_npy_labels(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b"))
    np.save(root / "cls_labels_onehot.npy", {"a": _onehot(1, 20), "b": np.zeros(20, np.float64)})
    ds = VOCDataset(root)
    np.testing.assert_array_equal(ds.labels(0), _onehot(1, 20))
    assert ds.labels(1).dtype == np.float32 and ds.labels(1).sum() == 0


def _npy_protocol2(path: Path, obj: object) -> None:
    """Write an object .npy the way SeCo's file was written (pickle protocol 2: bytes via _codecs.encode)."""
    holder = np.empty((), dtype=object)
    holder[()] = obj
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(holder, f, protocol=2)


class _Rot13:
    def __reduce__(self) -> tuple:
        return codecs.encode, ("abc", "rot13")


def test_voc_npy_protocol2_like_seco(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a",))
    _npy_protocol2(root / "cls_labels_onehot.npy", {"a": _onehot(2, 19)})
    np.testing.assert_array_equal(VOCDataset(root).labels(0), _onehot(2, 19))
    _npy_protocol2(root / "cls_labels_onehot.npy", {"a": _Rot13()})
    with pytest.raises(DatasetError, match=r"refusing codec call encode\(\.\.\., 'rot13'\)"):
        VOCDataset(root)


def test_voc_npy_refuses_non_array_pickles(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a",))
    np.save(root / "cls_labels_onehot.npy", {"a": _onehot(1), "evil": print}, allow_pickle=True)
    with pytest.raises(DatasetError, match=r"cls_labels_onehot\.npy: malformed label \.npy \(refusing to load"):
        VOCDataset(root)
    np.save(root / "cls_labels_onehot.npy", np.zeros((3, 20), np.float32))
    with pytest.raises(DatasetError, match="expected a pickled dict"):
        VOCDataset(root)
    (root / "cls_labels_onehot.npy").write_text("garbage")
    with pytest.raises(DatasetError, match="malformed label .npy"):
        VOCDataset(root)


def test_voc_classes_file_and_count_mismatch(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a",))
    (root / "classes.txt").write_text("_background_\ncat\n\ndog\n")
    ds = VOCDataset(root)
    assert ds.classes == ("background", "cat", "dog") and ds.num_fg == 2
    np.save(root / "cls_labels_onehot.npy", {"a": _onehot(1)})
    with pytest.raises(DatasetError, match=r"npy: entry 'a': vector has length 20, but .*classes\.txt has 2 fore"):
        VOCDataset(root)
    (root / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=r"classes\.txt:1: first class must be the background"):
        VOCDataset(root)
    (root / "classes.txt").write_text("background\ncat\ncat\n")
    with pytest.raises(DatasetError, match=r"classes\.txt:3: duplicate class name 'cat'"):
        VOCDataset(root)


def _xml(names: Sequence[str], prolog: str = "") -> str:
    objs = "".join(f"<object><name> {n} </name><part><name>hand</name></part></object>" for n in names)
    return f"{prolog}<annotation><filename>x.jpg</filename>{objs}</annotation>"


def test_voc_xml_labels(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b", "c", "d"))
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(_xml(["cat", "person", "cat"]))
    (root / "Annotations" / "b.xml").write_text(_xml(["unicorn"]))
    (root / "Annotations" / "c.xml").write_text(_xml(["cat"], '<!DOCTYPE a [<!ENTITY x "y">]>'))
    (root / "Annotations" / "d.xml").write_text("<annotation><object>")
    ds = VOCDataset(root)
    np.testing.assert_array_equal(ds[0].labels, _onehot(8, 15))
    with pytest.raises(DatasetError, match=r"b\.xml: 'unicorn' is not a known class \(known: aeroplane"):
        ds.labels(1)
    with pytest.raises(DatasetError, match=r"c\.xml: XML with DOCTYPE/ENTITY declarations is refused"):
        ds.labels(2)
    with pytest.raises(DatasetError, match=r"d\.xml: malformed XML"):
        ds.labels(3)


def test_voc_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing VOC root folder"):
        VOCDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"JPEGImages: missing JPEGImages folder"):
        VOCDataset(tmp_path)
    root = _voc(tmp_path / "v", ("a", "b", "c"))
    with pytest.raises(DatasetError, match=r"val\.txt: missing split list for split 'val' \(available: train\)"):
        VOCDataset(root, "val")
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DatasetError, match=r"train\.txt: 1 listed image\(s\) missing: line 2: .*b\.jpg"):
        VOCDataset(root)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=r"train\.txt: split list is empty"):
        VOCDataset(root)


def test_voc_label_file_errors(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a",))
    (root / "cls_labels.json").write_text('{"a": ["cat", "dragon"]}')
    with pytest.raises(DatasetError, match=r"cls_labels\.json: entry 'a': 'dragon' is not a known class"):
        VOCDataset(root)
    (root / "cls_labels.json").write_text('{"a": ["background", "cat"]}')  # background is dropped from tags
    np.testing.assert_array_equal(VOCDataset(root).labels(0), _onehot(8))
    (root / "cls_labels.json").write_text('{"a": ["cat",]}')
    with pytest.raises(DatasetError, match=r"cls_labels\.json: malformed JSON at line 1, column \d+"):
        VOCDataset(root)
    (root / "cls_labels.json").write_text('{"a": "cat"}')
    with pytest.raises(DatasetError, match="entry 'a': must be a list of class names, class indices or a 0/1 vector"):
        VOCDataset(root)


# ------------------------------------------------------------------------------------------------- tag file forms

SYN_CLASSES = "background\nbird\ncat\ndog\nfish\n"  # K = 4
SYN_NAMES = {"tr_00000": ["dog"], "tr_00001": ["bird", "fish"], "tr_00002": []}


def _voc_tags(root: Path, name: str, tags: object) -> VOCDataset:
    """A VOC folder with classes.txt (K = 4) and one tag file; returns the dataset."""
    if not (root / "classes.txt").is_file():
        _voc(root, tuple(SYN_NAMES))
        (root / "classes.txt").write_text(SYN_CLASSES)
    for old in ("cls_labels.json", "cls_labels_onehot.npy", "cls_labels.npy"):
        (root / old).unlink(missing_ok=True)
    if name.endswith(".npy"):
        np.save(root / name, tags)
    else:
        (root / name).write_text(json.dumps(tags))
    return VOCDataset(root)


def _tag_rows(ds: WSSSDataset, n: int | None = None) -> list[list[float]]:
    """Tags of the first ``n`` images (all by default) as lists."""
    return [ds.labels(i).tolist() for i in range(len(ds) if n is None else n)]


def test_voc_index_tags_match_names(tmp_path: Path) -> None:
    """The issue's file: {"tr_00000": [3]}, indices into classes.txt with background at 0."""
    by_names = _tag_rows(_voc_tags(tmp_path, "cls_labels.json", SYN_NAMES))
    indices = {"tr_00000": [3], "tr_00001": [1, 4], "tr_00002": [0]}  # 0 (background) is dropped
    assert _tag_rows(_voc_tags(tmp_path, "cls_labels.json", indices)) == by_names
    assert by_names == [[0, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]]


def test_voc_multi_hot_tags_k_and_k_plus_1(tmp_path: Path) -> None:
    expected = _tag_rows(_voc_tags(tmp_path, "cls_labels.json", SYN_NAMES))
    k = {"tr_00000": [0, 0, 1, 0], "tr_00001": [1, 0, 0, 1], "tr_00002": [0, 0, 0, 0]}
    assert _tag_rows(_voc_tags(tmp_path, "cls_labels.json", k)) == expected
    k1 = {key: [1, *v] for key, v in k.items()}  # background first: dropped
    assert _tag_rows(_voc_tags(tmp_path, "cls_labels.json", k1)) == expected
    floats = {key: [float(x) for x in v] for key, v in k.items()}
    assert _tag_rows(_voc_tags(tmp_path, "cls_labels.json", floats)) == expected


def test_voc_npy_dicts_irn_and_seco(tmp_path: Path) -> None:
    expected = _tag_rows(_voc_tags(tmp_path, "cls_labels.json", SYN_NAMES))
    vecs = {key: np.asarray(v, np.float32) for key, v in zip(SYN_NAMES, expected, strict=True)}
    assert _tag_rows(_voc_tags(tmp_path, "cls_labels_onehot.npy", vecs)) == expected
    assert _tag_rows(_voc_tags(tmp_path, "cls_labels.npy", vecs)) == expected
    np.save(tmp_path / "cls_labels_onehot.npy", {k: np.zeros(4, np.float32) for k in vecs})
    assert _tag_rows(VOCDataset(tmp_path))[0] == [0, 0, 0, 0]  # cls_labels_onehot.npy wins over cls_labels.npy


def test_voc_npy_irn_integer_ids(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("2007_000032", "2007_000039"))
    np.save(root / "cls_labels.npy", {np.int32(2007000032): _onehot(1), 2007000039: _onehot(15, 20)})
    ds = VOCDataset(root)
    np.testing.assert_array_equal(ds.labels(0), _onehot(1))
    np.testing.assert_array_equal(ds.labels(1), _onehot(15, 20))


def test_voc_tag_file_errors(tmp_path: Path) -> None:
    cases = [
        (
            {"tr_00000": [5]},
            r"cls_labels\.json: entry 'tr_00000': class index 5 is out of range 0\.\.4 \(.*classes",
        ),
        ({"tr_00000": [0, 1, 0]}, r"entry 'tr_00000': vector has length 3, but .*classes\.txt has 4 foreground"),
        ({"tr_00000": ["dog", 2]}, r"cls_labels\.json: entry 'tr_00000': mixes class names and numbers"),
        ({"tr_00000": ["dog"], "tr_00001": [2]}, r"entry 'tr_00001': numbers, but entry 'tr_00000' has class names"),
        ({"tr_00000": [0, 0, 2.0, 0]}, r"entry 'tr_00000': vector value 2\.0 is not 0 or 1"),
    ]
    for tags, msg in cases:
        with pytest.raises(DatasetError, match=msg) as err:
            _voc_tags(tmp_path, "cls_labels.json", tags)
        assert "\n" not in str(err.value)


def test_voc_ambiguous_tag_file(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b"))
    (root / "classes.txt").write_text("background\ncat\n")  # K + 1 == 2: [1, 0] is {bg, cat} or "not cat"
    (root / "cls_labels.json").write_text(json.dumps({"a": [1, 0], "b": [0, 1]}))
    with pytest.raises(DatasetError, match=r"cls_labels\.json: ambiguous tags: entry 'a' = \[1, 0\].*class names"):
        VOCDataset(root)
    (root / "cls_labels.json").write_text(json.dumps({"a": [1, 0], "b": [1]}))  # lengths differ: indices
    assert _tag_rows(VOCDataset(root)) == [[1], [1]]
    (root / "cls_labels.json").write_text(json.dumps({"a": ["cat"], "b": []}))  # the fix the error suggests
    assert _tag_rows(VOCDataset(root)) == [[1], [0]]


def test_coco_index_tags(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    (root / "cls_labels.json").write_text(json.dumps({TR: [1, 80]}))
    assert np.flatnonzero(COCODataset(root).labels(0)).tolist() == [0, 79]
    (root / "cls_labels.json").write_text(json.dumps({TR: [81]}))
    with pytest.raises(DatasetError, match=rf"entry '{TR}': class index 81 is out of range 0\.\.80"):
        COCODataset(root)


def test_voc_bad_masks(tmp_path: Path) -> None:
    root = _voc(tmp_path, ("a", "b", "c"), mask_dir="SegmentationClass")
    _mask(root / "SegmentationClass" / "a.png", [21])
    _mask(root / "SegmentationClass" / "b.png", [1], h=H + 1)
    Image.new("RGB", (W, H)).save(root / "SegmentationClass" / "c.png")
    ds = VOCDataset(root)
    with pytest.raises(DatasetError, match=r"a\.png: mask value 21 is not a class id \(0\.\.20 or 255\)"):
        ds[0]
    with pytest.raises(DatasetError, match=r"b\.png: mask is 8x7 but image .*b\.jpg is 8x6"):
        ds[1]
    with pytest.raises(DatasetError, match=r"c\.png: cannot read mask"):
        ds[2]


# ------------------------------------------------------------------------------------------------------------ COCO

TR, VA = "COCO_train2014_000000000009", "COCO_val2014_000000000042"


def _coco(root: Path, img_sub: tuple[str, str] = ("train2014", "val2014")) -> Path:
    _img(root / "JPEGImages" / img_sub[0] / f"{TR}.jpg")
    _img(root / "JPEGImages" / img_sub[1] / f"{VA}.jpg")
    _mask(root / "SegmentationClass" / img_sub[0] / "000000000009.png", [1, 80])
    _mask(root / "SegmentationClass" / img_sub[1] / f"{VA}.png", [3])
    (root / "train.txt").write_text(f"{TR}\n")
    (root / "val.txt").write_text(f"{VA}\n")
    return root


def test_coco_seco_layout(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    ds = COCODataset(root)
    assert ds.classes == COCO_CLASSES and ds.num_fg == 80 and ds.ids == [TR]
    assert ds.image_path(0) == root / "JPEGImages" / "train2014" / f"{TR}.jpg"
    assert ds.mask_path(0) == root / "SegmentationClass" / "train2014" / "000000000009.png"
    s = ds[0]
    assert np.flatnonzero(s.labels).tolist() == [0, 79] and s.mask.shape == (H, W)
    assert pickle.loads(pickle.dumps(ds)).ids == ds.ids  # DataLoader workers get a copy
    val = COCODataset(root, "val")  # mask named by the full id is found too
    assert np.flatnonzero(val.labels(0)).tolist() == [2]


def test_coco_short_folder_names_and_npy_in_list_dir(tmp_path: Path) -> None:
    root = _coco(tmp_path / "coco", ("train", "val"))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "val_part.txt").write_text(f"{VA}\n")
    np.save(lists / "cls_labels_onehot.npy", {VA: _onehot(5, k=80)})
    ds = COCODataset(root, "val_part", list_dir=lists)
    assert ds.image_path(0).parent.name == "val"
    np.testing.assert_array_equal(ds.labels(0), _onehot(5, k=80))


def test_coco_unprefixed_ids_and_errors(tmp_path: Path) -> None:
    root = _coco(tmp_path)
    _img(root / "JPEGImages" / "val2014" / "plain.jpg")
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "val_x.txt").write_text("plain\n")
    assert COCODataset(root, "val_x").mask_path(0) is None
    with pytest.raises(DatasetError, match=r"missing COCO split list for split 'test' \(tried .*test\.txt"):
        COCODataset(root, "test")
    (root / "bad.txt").write_text("COCO_test2015_000000000001\n")
    with pytest.raises(DatasetError, match=r"missing image folder for 'COCO_test2015_\d+' \(expected test2015 or test"):
        COCODataset(root, "bad")
    (root / "train.txt").write_text(f"{TR}\nCOCO_train2014_000000000010\n")
    with pytest.raises(DatasetError, match=r"train\.txt: 1 listed image\(s\) missing: line 2"):
        COCODataset(root)


# ---------------------------------------------------------------------------------------------------------- folder


def _folder(d: Path, names: Sequence[str] = ("x.jpg", "y.png", "z.webp")) -> Path:
    for n in names:
        _img(d / n)
    (d / "notes.txt").write_text("not an image")
    (d / "._x.jpg").write_bytes(b"\x00")  # macOS resource fork: skipped
    _img(d / ".hidden" / "deep.jpg")  # hidden folders are not walked
    return d


def test_folder_csv(tmp_path: Path) -> None:
    d = _folder(tmp_path / "imgs")
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image,labels\nx.jpg,dog; cat\ny,bird|cat\n\n")
    ds = FolderDataset(d, csv_file)
    assert ds.ids == ["x", "y", "z"] and ds.classes == ("background", "bird", "cat", "dog")
    np.testing.assert_array_equal(ds[0].labels, [0, 1, 1])
    np.testing.assert_array_equal(ds.labels(1), [1, 1, 0])
    s = ds[2]
    assert s.labels is None and s.mask is None and s.image.shape == (H, W, 3)


def test_folder_json_with_given_classes(tmp_path: Path) -> None:
    d = _folder(tmp_path / "imgs")
    js = tmp_path / "labels.json"
    js.write_text(json.dumps({"x.jpg": ["cat"], "z": []}))
    ds = FolderDataset(d, js, classes=VOC_CLASSES)
    assert ds.num_fg == 20
    np.testing.assert_array_equal(ds.labels(0), _onehot(8))
    assert ds.labels(1) is None and ds.labels(2).sum() == 0
    js.write_text(json.dumps({"x.jpg": ["cat", "kitten"]}))
    with pytest.raises(DatasetError, match=r"labels\.json: entry 'x': 'kitten' is not a known class"):
        FolderDataset(d, js, classes=VOC_CLASSES)


def test_folder_index_and_vector_tags(tmp_path: Path) -> None:
    d = _folder(tmp_path / "imgs")
    classes = ("background", "bird", "cat", "dog")
    f = tmp_path / "tags.csv"
    f.write_text("image,labels\nx.jpg,3;2\ny,1\n")
    ds = FolderDataset(d, f, classes=classes)
    assert _tag_rows(ds, 2) == [[0, 1, 1], [1, 0, 0]] and ds.labels(2) is None
    f.write_text("image,labels\nx.jpg,0 1 1\ny,1;0;0\n")  # K-long vectors: spaces or ; separate numbers
    assert _tag_rows(FolderDataset(d, f, classes=classes), 2) == [[0, 1, 1], [1, 0, 0]]
    js = tmp_path / "tags.json"
    js.write_text(json.dumps({"x": [1, 0, 1, 1], "y": [0, 1, 0, 0]}))  # K+1-long vectors
    assert _tag_rows(FolderDataset(d, js, classes=classes), 2) == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(DatasetError, match=r"tags\.json: entry 'x': class indices and 0/1 vectors need the class list"):
        FolderDataset(d, js)
    f.write_text("image,labels\nx.jpg,4\n")
    with pytest.raises(DatasetError, match=r"tags\.csv: entry 'x': class index 4 is out of range 0\.\.3"):
        FolderDataset(d, f, classes=classes)


def test_folder_without_labels(tmp_path: Path) -> None:
    d = _folder(tmp_path / "imgs")
    ds = FolderDataset(d)
    assert ds.classes == ("background",) and ds.num_fg == 0 and ds[1].labels is None
    assert FolderDataset(d, classes=("background", "a")).num_classes == 2


def test_folder_errors(tmp_path: Path) -> None:
    d = _folder(tmp_path / "imgs")
    with pytest.raises(DatasetError, match=r"nope: missing image folder"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no images found \(extensions: \.jpg"):
        FolderDataset(tmp_path / "empty")
    f = tmp_path / "l.csv"
    cases = {
        "image,labels\nghost.jpg,cat\n": r"l\.csv:line 2: entry for non-existent image 'ghost\.jpg'",
        "image,labels\nx,cat\nx.jpg,dog\n": r"l\.csv:line 3: duplicate entry for image 'x'",
        "file,classes\nx,cat\n": r"l\.csv:1: CSV header must be 'image,labels', got 'file,classes'",
        "image,labels\nx,cat,dog\n": r"l\.csv:2: expected 2 columns \(image,labels\), got 3",
    }
    for text, msg in cases.items():
        f.write_text(text)
        with pytest.raises(DatasetError, match=msg):
            FolderDataset(d, f)
    with pytest.raises(DatasetError, match=r"missing\.csv: labels file not found"):
        FolderDataset(d, tmp_path / "missing.csv")
    (tmp_path / "l.txt").write_text("x cat")
    with pytest.raises(DatasetError, match=r"l\.txt: labels file must be \.csv or \.json, got '\.txt'"):
        FolderDataset(d, tmp_path / "l.txt")
    (tmp_path / "l.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"l\.json: expected a JSON object"):
        FolderDataset(d, tmp_path / "l.json")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("")
    with pytest.raises(DatasetError, match=r"none: no images found \(extensions: .*; 1 other entries\)"):
        FolderDataset(tmp_path / "none")


def test_folder_ids_are_unique_by_construction(tmp_path: Path) -> None:
    """Relative paths without extension; the extension kept where ids would coincide, however they chain."""
    d = _folder(tmp_path / "imgs", ("x.jpg", "x.png", "x.jpg.png", "y.png", "sub/y.jpg", "sub/deeper/z.tif"))
    ds = FolderDataset(d)
    assert ds.ids == ["sub/deeper/z", "sub/y", "x.jpg", "x.jpg.png", "x.png", "y"]
    assert [ds.image_path(i).relative_to(d).as_posix() for i in range(len(ds))] == [
        "sub/deeper/z.tif", "sub/y.jpg", "x.jpg", "x.jpg.png", "x.png", "y.png"]  # fmt: skip
    assert ds[ds.ids.index("sub/y")].image.shape == (H, W, 3)
    f = tmp_path / "l.csv"  # keys: an id or a relative path with its extension
    f.write_text("image,labels\nsub/y.jpg,cat\nsub/deeper/z,dog\nx.png,cat\nx.jpg,dog\ny.png,cat\n")
    ds = FolderDataset(d, f)
    assert {ds.ids[i]: ds.labels(i).tolist() for i in range(len(ds)) if ds.labels(i) is not None} == {
        "sub/y": [1, 0], "sub/deeper/z": [0, 1], "x.png": [1, 0], "x.jpg": [0, 1], "y": [1, 0]}  # fmt: skip
    f.write_text("image,labels\nx,cat\n")  # a stem two files share names neither
    with pytest.raises(DatasetError, match=r"l\.csv:line 2: 'x' names 2 images \(x\.jpg, x\.png\): give the file"):
        FolderDataset(d, f)
    f.write_text("image,labels\ny.jpg,cat\n")  # sub/y.jpg's file name alone is not a key
    with pytest.raises(DatasetError, match=r"entry for non-existent image 'y\.jpg'"):
        FolderDataset(d, f)


def test_folder_entries_that_are_not_images_are_listed_with_reasons(tmp_path: Path) -> None:
    d = _folder(tmp_path / "imgs", ("a.jpg", "dir.jpg/inside.png"))
    (d / "gone.jpg").symlink_to(d / "nowhere.jpg")
    (d / "link.png").symlink_to(d / "a.jpg")  # a link to an image is an image
    (tmp_path / "elsewhere").mkdir()
    (d / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    os.mkfifo(d / "pipe.png")
    ds = FolderDataset(d)
    assert ds.ids == ["a", "dir.jpg/inside", "link"]
    reasons = dict(ds.skipped)
    assert list(reasons) == ["dir.jpg", "gone.jpg", "linked", "notes.txt", "pipe.png"]
    assert reasons["dir.jpg"] == "a folder, not an image file (walked as a subfolder)"
    assert reasons["gone.jpg"] == f"a dangling link (to {d / 'nowhere.jpg'})"
    assert reasons["linked"] == "a link to a folder, not followed"
    assert reasons["notes.txt"].startswith("not an image file name (extension '.txt'; read: .jpg")
    assert reasons["pipe.png"] == "not a regular file"


# ------------------------------------------------------------------------------------------------------------ spec


def test_parse_data_spec(tmp_path: Path) -> None:
    voc = _voc(tmp_path / "voc", ("a",), split="val")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    coco = _coco(tmp_path / "coco")
    d = _folder(tmp_path / "imgs")
    (tmp_path / "l.csv").write_text("image,labels\nx,cat\n")
    assert isinstance(parse_data_spec(f"voc:{voc}"), VOCDataset)
    assert parse_data_spec(f"voc:{voc}:val").split == "val"
    assert parse_data_spec(f"VOC:{voc}:val", classes=VOC_CLASSES).num_classes == 21
    assert parse_data_spec(f"coco:{coco}:val").ids == [VA]
    assert parse_data_spec(f"coco:{coco}").ids == [TR]
    ds = parse_data_spec(f"folder:{d}:{tmp_path / 'l.csv'}")
    assert isinstance(ds, FolderDataset) and ds.classes == ("background", "cat")
    assert parse_data_spec(f"folder:{d}", classes=("background", "cat", "dog")).num_fg == 2
    with pytest.raises(DatasetError, match=r"unknown dataset spec 'kitti:/x': expected one of voc:ROOT\[:SPLIT\]"):
        parse_data_spec("kitti:/x")
    with pytest.raises(DatasetError, match=r"unknown dataset spec '/just/a/path'.*folder:DIR\[:LABELS_FILE\]"):
        parse_data_spec("/just/a/path")
    with pytest.raises(DatasetError, match=r"dataset spec 'voc:' names no path"):
        parse_data_spec("voc:")
    with pytest.raises(DatasetError, match=r"has 21 classes .* differ from the 3 requested"):
        parse_data_spec(f"voc:{voc}", classes=("background", "cat", "dog"))
