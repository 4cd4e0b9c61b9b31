"""The one tag parser: every per-image form, the per-file decision and every error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from wsss.data.tags import (
    TagError,
    classes_from_tags,
    load_npy_dict,
    names_to_tags,
    parse_tags,
    split_tag_cell,
)

CLASSES = ("background", "bird", "cat", "dog", "fish")  # K = 4
SRC = "tags.json"


def _parse(raw: dict, classes: tuple[str, ...] = CLASSES) -> dict[str, list[float]]:
    return {k: v.tolist() for k, v in parse_tags(raw, classes, SRC, "classes.txt").items()}


def _error(raw: dict, classes: tuple[str, ...] = CLASSES) -> str:
    with pytest.raises(TagError) as err:
        parse_tags(raw, classes, SRC, "classes.txt")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(SRC)
    return msg


EXPECTED = {"a": [0, 0, 1, 0], "b": [1, 0, 0, 1], "c": [0, 0, 0, 0]}


def test_names_indices_and_vectors_agree() -> None:
    assert _parse({"a": ["dog"], "b": [" bird", "fish"], "c": []}) == EXPECTED
    assert _parse({"a": [3], "b": [4, 1, 4], "c": []}) == EXPECTED  # repeated indices are fine, like names
    assert _parse({"a": [0, 0, 1, 0], "b": [1, 0, 0, 1], "c": [0, 0, 0, 0]}) == EXPECTED  # K
    assert _parse({"a": [1, 0, 0, 1, 0], "b": [0, 1, 0, 0, 1], "c": [1, 0, 0, 0, 0]}) == EXPECTED  # K+1
    assert _parse({"a": (0.0, 0.0, 1.0, 0.0), "b": [True, False, False, True], "c": [0, 0, 0, 0.0]}) == EXPECTED
    arrays = {k: np.asarray(v, np.uint8) for k, v in EXPECTED.items()}
    assert _parse(arrays) == EXPECTED
    assert all(v.dtype == np.float32 for v in parse_tags(arrays, CLASSES, SRC).values())


def test_background_is_dropped() -> None:
    assert _parse({"a": ["background", "dog"], "b": ["_background_"]}) == {"a": [0, 0, 1, 0], "b": [0, 0, 0, 0]}
    assert _parse({"a": [0, 3], "b": [0]}) == {"a": [0, 0, 1, 0], "b": [0, 0, 0, 0]}
    assert _parse({"a": [1, 0, 0, 0, 0], "b": [1, 0, 0, 1, 0]}) == {"a": [0, 0, 0, 0], "b": [0, 0, 1, 0]}
    assert names_to_tags(["bg", "cat"], CLASSES, "x.xml").tolist() == [0, 1, 0, 0]


def test_ambiguous_file() -> None:
    two = ("background", "cat")  # K + 1 == 2
    msg = _error({"a": [1, 0], "b": [0, 1]}, two)
    assert "ambiguous tags: entry 'a' = [1, 0] reads both as class indices and as a 0/1 vector" in msg
    assert "write class names instead" in msg
    assert "ambiguous" in _error({"a": [0, 1], "b": [1, 0]}, ("background", "cat", "dog"))  # K == 2
    assert _parse({"a": [0, 1], "b": [0, 1]}, two) == {"a": [1], "b": [1]}  # both readings agree: accepted
    assert _parse({"a": [1], "b": [0]}, ("background", "cat")) == {"a": [1], "b": [0]}
    assert _parse({"a": [1, 0], "b": [1]}, two) == {"a": [1], "b": [1]}  # lengths differ: indices
    assert _parse({"a": [1.0, 0.0], "b": [0.0, 1.0]}, two) == {"a": [0], "b": [1]}  # floats: vectors


def test_value_errors() -> None:
    assert "entry 'a': class index 5 is out of range 0..4 (classes.txt: background at 0, 4 classes)" in _error(
        {"a": [5]}
    )
    assert "entry 'a': class index -1 is out of range" in _error({"a": [-1, 2]})
    assert "entry 'b': 'dragon' is not a known class (known: bird, cat, dog, fish)" in _error(
        {"a": ["cat"], "b": ["dragon"]}
    )
    assert "entry 'a': vector value 0.5 is not 0 or 1" in _error({"a": [0, 0.5, 1, 0]})
    assert "entry 'a': vector value 2.0 is not 0 or 1" in _error({"a": [0, 2.0, 2, 0]})


def test_vector_length_errors() -> None:
    want = "vector has length 3, but classes.txt has 4 foreground classes (expected 4, or 5 with background first)"
    assert f"entry 'a': {want}" in _error({"a": [0, 1, 0]})  # 0/1 with a repeat: a vector, not indices
    assert "entry 'b': vector has length 6" in _error({"a": [0.0, 1, 0, 0], "b": [0.0] * 6})
    assert "entry 'c': vector has length 0" in _error({"a": [0.0, 1, 0, 0], "c": []})
    assert "entry 'b': vector has length 5, but entry 'a' has 4 (use one length" in _error(
        {"a": [0.0, 1, 0, 0], "b": [0.0, 1, 0, 0, 0]}
    )


def test_type_errors() -> None:
    assert "entry 'a': mixes class names and numbers" in _error({"a": ["cat", 2]})
    assert "entry 'b': numbers, but entry 'a' has class names (use one form for the file)" in _error(
        {"a": ["cat"], "c": [], "b": [1]}
    )
    assert "entry 'a': must be a list of class names, class indices or a 0/1 vector, got 'cat'" in _error({"a": "cat"})
    assert "entry 'a': None is neither a class name nor a number" in _error({"a": [None]})
    assert "entry 'a': expected a 1-D array of numbers or names, got float32 (2, 4)" in _error(
        {"a": np.zeros((2, 4), np.float32)}
    )


def test_classes_from_tags() -> None:
    assert classes_from_tags({"x": ["dog", "cat "], "y": ["background"], "z": []}, SRC) == ("background", "cat", "dog")
    with pytest.raises(TagError, match=r"tags\.json: entry 'y': class indices and 0/1 vectors need the class list"):
        classes_from_tags({"x": ["dog"], "y": [2]}, SRC)


def test_split_tag_cell() -> None:
    assert split_tag_cell("dog; cat |traffic light") == ["dog", "cat", "traffic light"]
    assert split_tag_cell(" 3;15 ") == [3, 15]
    assert split_tag_cell("0 1 0, 1") == [0, 1, 0, 1]
    assert split_tag_cell("0.0;1.0;1e0") == [0.0, 1.0, 1.0]
    assert split_tag_cell("") == []


class _Evil:
    def __reduce__(self) -> tuple:  # os.system, not print: Ray Data, once imported in a process, replaces print
        return os.system, ("echo unpickled code ran",)


def test_load_npy_dict(tmp_path: Path) -> None:
    f = tmp_path / "cls_labels.npy"
    vec = np.eye(4, dtype=np.float32)[2]
    np.save(f, {"2007_000032": vec, np.int32(2007000039): vec, np.uint64(12): vec})  # IRN stores int ids
    loaded = load_npy_dict(f)
    assert sorted(loaded) == ["12", "2007_000032", "2007_000039"]
    assert _parse(loaded) == {k: [0, 0, 1, 0] for k in loaded}
    np.save(f, {"a": vec, "b": _Evil()}, allow_pickle=True)
    refused = rf"cls_labels\.npy: malformed label \.npy \(refusing to load {os.system.__module__}\.system"
    with pytest.raises(TagError, match=refused):
        load_npy_dict(f)  # refused before anything is called: nothing runs
    np.save(f, {("a", 1): vec})
    with pytest.raises(TagError, match=r"entry \('a', 1\): image id must be a string"):
        load_npy_dict(f)
    np.save(f, np.zeros((3, 4), np.float32))
    with pytest.raises(TagError, match=r"expected a pickled dict"):
        load_npy_dict(f)
