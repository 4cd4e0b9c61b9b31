"""The model spec: round trips through checkpoints, family CAM defaults, validation, user overrides, old layouts."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from wsss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from wsss.models import (
    FAMILIES,
    BackboneConfig,
    CAMNet,
    CAMSettings,
    CheckpointError,
    CoBraNet,
    ModelSpec,
    SeCoNet,
    build_model,
    load_checkpoint,
    load_model,
    load_state_into,
    save_checkpoint,
    save_model,
    spec_from_meta,
)
from wsss.models.spec import FAMILY_CAM, SEED_SOURCES
from wsss.train.configs import CONFIGS, get_config, model_spec

TINY_VIT = dataclasses.asdict(
    BackboneConfig("vit_tiny_patch16_224", 32, {"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2})
)
CLASSES = ("background", "boat", "train", "cow")
TINY_COBRA = [
    'model.backbone.overrides={"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}',
    "model.backbone.img_size=32",
    "model.cnn.channels=[8,16,16,32]",
    "model.proj_dim=16",
]
# CAMSettings' own defaults: SeCo's validation CAMs (§1.3, §3.15)
SECO_RULES = {"input_size": 448, "scales": (1.0, 0.5, 0.75, 1.5), "flip": True, "flip_merge": "max",
              "relu_first": False, "rescale": "bilinear_floor", "norm": "minmax", "background": "threshold",
              "bkg_thresh": 0.5, "bg_percentile": 70.0, "score_thresh": 0.5, "source": None, "layers": ()}  # fmt: skip
COBRA_RULES = {**SECO_RULES, "input_size": None, "scales": (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0),
               "flip_merge": "sum", "relu_first": True, "rescale": "pil_bicubic_round", "norm": "max",
               "background": "attention_percentile", "source": "fuse"}  # fmt: skip
SEAM_RULES = {**SECO_RULES, "input_size": None, "scales": (0.5, 1.0, 1.5, 2.0), "flip_merge": "sum",
              "rescale": "pil_bicubic_round", "bkg_thresh": 0.26}  # §7.1, (7.8)  # fmt: skip
SCCAM_RULES = {**SECO_RULES, "input_size": None, "scales": (1.0, 0.5, 1.5, 2.0), "flip_merge": "sum",
               "relu_first": True, "rescale": "pil_bicubic_round", "norm": "max", "bkg_thresh": 0.15}  # fmt: skip


def _cam_spec(**cam) -> ModelSpec:
    return ModelSpec("cam", {"backbone": dict(TINY_VIT), "pooling": "gap"}, CLASSES, CAMSettings.for_family("cam", cam))


def _seco_spec() -> ModelSpec:
    return ModelSpec("seco", {"backbone": dict(TINY_VIT), "aux_layer": -1}, CLASSES, CAMSettings.for_family("seco"))


def _cobra_spec(**cam) -> ModelSpec:
    cfg = get_config("cobra-tiny-synth", TINY_COBRA)
    spec = model_spec(cfg, CLASSES)
    return spec.replace(cam=spec.cam.replace(**cam)) if cam else spec


def _legacy_meta(method: str = "cam", cam: dict | None = None) -> dict:
    """The metadata training wrote before specs: top-level method/model/class_names/mean/std, CAM in config."""
    model = {"backbone": dict(TINY_VIT), "pooling": "gap"}
    return {"method": method, "config_name": f"{method}-tiny-synth", "model": model,
            "config": {"method": method, "model": model, "cam": cam or {}}, "class_names": list(CLASSES),
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "seed": 0, "step": 4}  # fmt: skip


def _as_dict(settings: CAMSettings) -> dict:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("make", [_cam_spec, _seco_spec, _cobra_spec], ids=["cam", "seco", "cobra"])
def test_spec_round_trips_through_a_checkpoint(tmp_path: Path, make) -> None:
    spec = make()
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = save_model(tmp_path / "m.safetensors", model, spec, step=5, config_name="x")
    _, meta = load_checkpoint(path)
    assert meta["spec"] == json.loads(json.dumps(spec.to_dict()))  # plain JSON: lists, not tuples
    assert ModelSpec.from_dict(meta["spec"]) == spec == spec_from_meta(meta, path)
    loaded = load_model(path)
    assert loaded.spec == spec and loaded.model.spec == spec and type(loaded.model) is type(model)
    assert loaded.meta["step"] == 5 and loaded.meta["config_name"] == "x"
    x = torch.randn(1, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(model(x), loaded.model(x), strict=True):
            assert torch.equal(a, b)


def test_every_setting_survives_the_round_trip() -> None:
    cam = CAMSettings(input_size=None, scales=(2.0, 1.0), flip=False, flip_merge="sum", relu_first=True,
                      rescale="pil_bicubic_round", norm="max", background="attention_percentile", bkg_thresh=0.3,
                      bg_percentile=55.5, score_thresh=0.25, source="avg")  # fmt: skip
    spec = ModelSpec("cam", {"backbone": dict(TINY_VIT)}, CLASSES, cam, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["cam"]["scales"] == [2.0, 1.0] and d["mean"] == [0.5, 0.5, 0.5]
    again = ModelSpec.from_dict(d)
    assert again == spec and again.cam == cam and isinstance(again.cam.scales, tuple)
    assert again.class_names == CLASSES and again.num_fg == 3 and again.patch_size == 8


def test_to_dict_is_a_copy() -> None:
    spec = _cam_spec()
    d = spec.to_dict()
    d["arch"]["backbone"]["img_size"] = 999
    assert spec.arch["backbone"]["img_size"] == 32
    assert ModelSpec.from_dict(spec.to_dict()).arch is not spec.arch


def test_from_dict_fills_the_family_cam_defaults() -> None:
    d = {"family": "cobra", "arch": _cobra_spec().arch, "class_names": list(CLASSES)}
    spec = ModelSpec.from_dict(d)
    assert _as_dict(spec.cam) == COBRA_RULES
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD


def test_patch_size() -> None:
    assert _cam_spec().patch_size == 8
    vit_b = {"backbone": {"name": "vit_base_patch16_224"}}
    assert ModelSpec("cam", vit_b, CLASSES).patch_size == 16
    with pytest.raises(ValueError, match="cannot tell the patch size"):
        _ = ModelSpec("cam", {"backbone": {"name": "resnet50"}}, CLASSES).patch_size


# ---------------------------------------------------------------------------------------------- family defaults


def test_family_defaults() -> None:
    assert set(FAMILIES) >= {"cam", "seco", "cobra", "irn"}
    assert _as_dict(CAMSettings.for_family("cam")) == SECO_RULES == _as_dict(CAMSettings())
    assert _as_dict(CAMSettings.for_family("seco")) == SECO_RULES
    assert _as_dict(CAMSettings.for_family("cobra")) == COBRA_RULES
    assert _as_dict(CAMSettings.for_family("seam")) == SEAM_RULES
    assert _as_dict(CAMSettings.for_family("sccam")) == SCCAM_RULES
    assert set(FAMILY_CAM) == {"cam", "seco", "cobra", "seam", "sccam"}


def test_config_values_go_on_top_of_the_family_rules() -> None:
    cobra = CAMSettings.for_family("cobra", {"input_size": 112, "scales": [1.0, 0.5], "bg_percentile": 60})
    assert cobra.input_size == 112 and cobra.scales == (1.0, 0.5) and cobra.bg_percentile == 60.0
    assert (cobra.flip_merge, cobra.norm, cobra.background, cobra.relu_first) == (
        "sum", "max", "attention_percentile", True)  # fmt: skip
    seco = CAMSettings.for_family("seco", {"bkg_thresh": 0.45})
    assert seco.bkg_thresh == 0.45 and seco.flip_merge == "max" and seco.norm == "minmax"
    assert CAMSettings.for_family("irn") == CAMSettings()  # no CAM rules of its own
    assert CAMSettings.for_family("cam", None) == CAMSettings.for_family("cam", {})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_configs_give_their_family_rules(name: str) -> None:
    cfg = get_config(name)
    spec = model_spec(cfg, CLASSES)
    rules = {"cobra": COBRA_RULES, "seam": SEAM_RULES, "sccam": SCCAM_RULES}.get(cfg["method"], SECO_RULES)
    want = {**rules, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["cam"].items()}}
    assert spec.family == cfg["method"] and _as_dict(spec.cam) == want
    assert spec.class_names == CLASSES and spec.arch == cfg["model"] and spec.arch is not cfg["model"]
    assert spec.arch["backbone"].get("pos_resize", "size") == ("dino" if cfg["method"] == "cobra" else "size")


# --------------------------------------------------------------------------------------------------- validation


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'fcn'; registered: .*cam.*cobra.*irn.*seco"):
        ModelSpec("fcn", {"backbone": TINY_VIT}, CLASSES)


@pytest.mark.parametrize(
    "names",
    [("boat", "train"), ("background",), ("Background", "boat"), ("boat", "background")],
    ids=["no-background", "background-only", "capitalised", "background-last"],
)
def test_bad_class_names(names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="class names must start with 'background' and name at least one class"):
        ModelSpec("cam", {"backbone": TINY_VIT}, names)


def test_class_names_are_a_tuple_and_irn_needs_none() -> None:
    spec = ModelSpec("cam", {"backbone": TINY_VIT}, list(CLASSES), mean=[0.5, 0.5, 0.5])
    assert spec.class_names == CLASSES and spec.mean == (0.5, 0.5, 0.5)
    assert ModelSpec("irn", {"backbone": {}}, ()).class_names == ()


def test_unknown_cam_key() -> None:
    with pytest.raises(ValueError, match=r"unknown CAM settings \['refine', 'scale'\]; known: "):
        CAMSettings.for_family("cam", {"scale": [1.0], "refine": "crf", "flip": True})
    d = {**_cam_spec().to_dict(), "cam": {"thresh": 0.3}}
    with pytest.raises(ValueError, match="unknown CAM settings"):
        ModelSpec.from_dict(d)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("flip_merge", "mean", "flip_merge must be one of"),
        ("rescale", "nearest", "rescale must be one of"),
        ("norm", "l2", "norm must be one of"),
        ("background", "crf", "background must be one of"),
        ("source", "mean", "seed source must be one of"),
        ("scales", (), "scales must be positive"),
        ("scales", (1.0, 0.0), "scales must be positive"),
        ("bg_percentile", 101, r"bg_percentile must be in \[0, 100\]"),
    ],
)
def test_bad_values(key: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CAMSettings(**{key: value})
    with pytest.raises(ValueError, match=match):
        CAMSettings().replace(**{key: value})  # replace validates too


def test_seed_sources() -> None:
    assert SEED_SOURCES == ("cnn", "vit", "avg", "max", "fuse")
    for source in SEED_SOURCES:
        assert CAMSettings.for_family("cobra", {"source": source}).source == source


def test_from_dict_needs_family_arch_and_classes() -> None:
    for key in ("family", "arch", "class_names"):
        d = _cam_spec().to_dict()
        del d[key]
        with pytest.raises(ValueError, match=rf"a model spec needs \['{key}'\]"):
            ModelSpec.from_dict(d)


def test_settings_are_frozen() -> None:
    settings = CAMSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.flip = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        _cam_spec().family = "seco"  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------- override


def test_override_none_keeps_everything() -> None:
    for settings in (CAMSettings.for_family("seco"), CAMSettings.for_family("cobra")):
        assert settings.override() == settings


def test_override_input_size_zero_is_native() -> None:
    seco = CAMSettings.for_family("seco")
    assert seco.override(input_size=0).input_size is None
    assert seco.override(input_size=224).input_size == 224
    assert seco.override(input_size=None).input_size == 448
    cobra = CAMSettings.for_family("cobra")
    assert cobra.override(input_size=112).input_size == 112 and cobra.override(input_size=0).input_size is None


def test_override_background_follows_the_rule() -> None:
    seco = CAMSettings.for_family("seco")
    t = seco.override(background=0.35)
    assert t.bkg_thresh == 0.35 and t.bg_percentile == seco.bg_percentile
    assert seco.override(background=0).bkg_thresh == 0.0  # zero is a value, not "unset"
    cobra = CAMSettings.for_family("cobra")
    p = cobra.override(background=55)
    assert p.bg_percentile == 55.0 and p.bkg_thresh == cobra.bkg_thresh
    assert seco.with_background(0.2) == seco.replace(bkg_thresh=0.2)
    assert cobra.with_background(80) == cobra.replace(bg_percentile=80.0)
    with pytest.raises(ValueError, match="bg_percentile must be in"):
        cobra.override(background=150)


def test_override_source_is_for_cobra_only() -> None:
    for family in ("cam", "seco"):
        with pytest.raises(ValueError, match="only CoBra networks have several seed sources"):
            CAMSettings.for_family(family).override(source="cnn")
    cobra = CAMSettings.for_family("cobra")
    assert cobra.override(source="vit").source == "vit"
    with pytest.raises(ValueError, match="seed source must be one of"):
        cobra.override(source="mean")


def test_override_scales_and_flip() -> None:
    seco = CAMSettings.for_family("seco")
    out = seco.override(scales=[1, 2], flip=False)
    assert out.scales == (1.0, 2.0) and out.flip is False
    assert seco.scales == (1.0, 0.5, 0.75, 1.5) and seco.flip is True  # the original is untouched
    assert seco.override(flip=True) == seco
    with pytest.raises(ValueError, match="scales must be positive"):
        seco.override(scales=[])


def test_override_all_at_once() -> None:
    cobra = CAMSettings.for_family("cobra").override(scales=(1.0,), flip=False, background=40, input_size=0,
                                                     source="cnn")  # fmt: skip
    assert (cobra.scales, cobra.flip, cobra.bg_percentile, cobra.input_size, cobra.source) == (
        (1.0,), False, 40.0, None, "cnn")  # fmt: skip
    assert cobra.flip_merge == "sum" and cobra.norm == "max"  # the rules stay


# ---------------------------------------------------------------------------------------------- legacy metadata


def test_legacy_metadata_gives_a_spec() -> None:
    meta = _legacy_meta("cam", {"input_size": 48, "scales": [1.0, 0.5], "flip": True, "bkg_thresh": 0.4,
                                "score_thresh": 0.5, "refine": "crf"})  # fmt: skip
    spec = spec_from_meta(meta)
    assert spec.family == "cam" and spec.class_names == CLASSES and spec.arch == meta["model"]
    assert spec.cam == CAMSettings.for_family("cam", {"input_size": 48, "scales": (1.0, 0.5), "bkg_thresh": 0.4})
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD


def test_legacy_metadata_without_cam_or_normalisation() -> None:
    meta = _legacy_meta("seco")
    meta["model"] = {"backbone": dict(TINY_VIT), "aux_layer": -1}
    del meta["config"], meta["mean"], meta["std"]
    spec = spec_from_meta(meta)
    assert spec.family == "seco" and spec.cam == CAMSettings.for_family("seco")
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD


def test_legacy_cobra_metadata_keeps_the_cobra_rules() -> None:
    cfg = get_config("cobra-tiny-synth", TINY_COBRA)
    meta = {"method": "cobra", "model": cfg["model"], "class_names": list(CLASSES),
            "config": {"cam": {**cfg["cam"], "source": None}}}  # fmt: skip
    spec = spec_from_meta(meta)
    assert spec.cam.source == "fuse"  # an unset source meant fusion
    assert spec.cam.flip_merge == "sum" and spec.cam.background == "attention_percentile"
    assert spec.cam.input_size == 112 and spec.cam.scales == (1.0, 0.5, 1.5)


@pytest.mark.parametrize("drop", ["method", "model", "class_names"])
def test_incomplete_legacy_metadata_is_not_a_spec(drop: str) -> None:
    meta = _legacy_meta()
    del meta[drop]
    with pytest.raises(CheckpointError, match="holds no model spec"):
        spec_from_meta(meta, "old.safetensors")


def test_invalid_specs_in_metadata_are_checkpoint_errors() -> None:
    bad_family = {"spec": {**_cam_spec().to_dict(), "family": "fcn"}}
    with pytest.raises(CheckpointError, match=r"m\.safetensors: the model spec in the metadata is invalid: .*fcn"):
        spec_from_meta(bad_family, "m.safetensors")
    bad_cam = {"spec": {**_cam_spec().to_dict(), "cam": {"norm": "l2"}}}
    with pytest.raises(CheckpointError, match="invalid: CAM setting norm"):
        spec_from_meta(bad_cam)
    legacy_bad = {**_legacy_meta(), "class_names": ["boat", "cow"]}
    with pytest.raises(CheckpointError, match="invalid: class names"):
        spec_from_meta(legacy_bad)


def test_spec_key_wins_over_legacy_keys() -> None:
    spec = _seco_spec()
    meta = {**_legacy_meta("cam"), "spec": spec.to_dict()}
    assert spec_from_meta(meta) == spec


def test_load_model_reads_a_checkpoint_of_the_old_layout(tmp_path: Path) -> None:
    meta = _legacy_meta("cam", {"input_size": 48, "scales": [1.0, 0.5], "bkg_thresh": 0.45})
    torch.manual_seed(2)
    net = CAMNet(BackboneConfig(**TINY_VIT), 3, pooling="gap").eval()
    path = save_checkpoint(tmp_path / "old.safetensors", net.state_dict(), meta)
    loaded = load_model(path)
    assert isinstance(loaded.model, CAMNet) and loaded.model.pooling == "gap" and not loaded.model.training
    assert loaded.spec.family == "cam" and loaded.spec.class_names == CLASSES and loaded.model.spec == loaded.spec
    assert loaded.spec.cam.bkg_thresh == 0.45 and loaded.spec.cam.input_size == 48
    assert loaded.meta["step"] == 4 and loaded.meta["method"] == "cam"  # the file's own metadata, as written
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a, b in zip(net(x), loaded.model(x), strict=True):
            assert torch.equal(a, b)


def test_load_model_reads_an_old_cobra_checkpoint(tmp_path: Path) -> None:
    cfg = get_config("cobra-tiny-synth", TINY_COBRA)
    spec = _cobra_spec()
    torch.manual_seed(4)
    net = build_model(spec).eval()
    meta = {"method": "cobra", "model": cfg["model"], "config": cfg, "class_names": list(CLASSES), "step": 2}
    path = save_checkpoint(tmp_path / "old_cobra.safetensors", net.state_dict(), meta)
    loaded = load_model(path)
    assert isinstance(loaded.model, CoBraNet) and loaded.spec == spec
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for a, b in zip(net(x), loaded.model(x), strict=True):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------------- resume


def test_load_state_into_the_same_family(tmp_path: Path) -> None:
    spec = _cam_spec()
    torch.manual_seed(6)
    source = build_model(spec)
    path = save_model(tmp_path / "m.safetensors", source, spec, step=9)
    torch.manual_seed(7)
    target = build_model(spec)
    meta, report = load_state_into(target, path)
    assert meta["step"] == 9 and report.loaded == len(source.state_dict()) and report.layout == "wsss"
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_state_into_refuses_another_family(tmp_path: Path) -> None:
    cam = _cam_spec()
    path = save_model(tmp_path / "cam.safetensors", build_model(cam), cam)
    seco = build_model(_seco_spec())
    assert isinstance(seco, SeCoNet)
    before = copy.deepcopy(seco.state_dict())
    with pytest.raises(CheckpointError, match="a cam checkpoint cannot resume a seco network") as info:
        load_state_into(seco, path)
    assert str(path) in str(info.value)
    for key, value in before.items():
        assert torch.equal(seco.state_dict()[key], value), key  # nothing was loaded


def test_load_state_into_refuses_a_file_without_a_spec(tmp_path: Path) -> None:
    spec = _cam_spec()
    model = build_model(spec)
    path = save_checkpoint(tmp_path / "bare.safetensors", model.state_dict(), {"step": 1})
    with pytest.raises(CheckpointError, match="holds no model spec"):
        load_state_into(model, path)


# -------------------------------------------------------------------------------------------------- named config


def test_a_named_config_builds_through_model_spec() -> None:
    tiny = 'model.backbone.overrides={"patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}'
    cfg = get_config("cam-tiny-synth", [tiny, "model.backbone.img_size=32", "cam.input_size=64"])
    spec = model_spec(cfg, CLASSES)
    assert spec.family == "cam" and spec.cam.input_size == 64 and spec.cam.scales == (1.0, 0.5, 1.5)
    model = build_model(spec)
    assert isinstance(model, CAMNet) and model.spec is spec and model.pooling == cfg["model"]["pooling"]
    assert model.classifier.out_channels == 3 and len(model.backbone.blocks) == 1
    cfg["model"]["pooling"] = "gap"
    assert spec.arch["pooling"] == "gmp"  # the spec holds its own copy
    logits, cams = model(torch.zeros(1, 3, 32, 48))
    assert logits.shape == (1, 3) and cams.shape == (1, 3, 4, 6)
