"""Training configs and overrides, the PolyWarmupAdamW schedule (§3.14) and the augmentation pipeline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wsss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    augment,
    color_jitter,
    denormalize,
    random_crop,
    to_tensor,
)
from wsss.train.configs import CONFIGS, apply_override, get_config, with_iters
from wsss.train.optim import PolyWarmupAdamW, make_optimizer, param_groups, poly_warmup_factor

# ------------------------------------------------------------------------------------------------------------ configs


def test_get_config_returns_a_named_copy() -> None:
    cfg = get_config("cam-tiny-synth")
    assert cfg["name"] == "cam-tiny-synth" and "name" not in CONFIGS["cam-tiny-synth"]
    assert cfg["method"] == "cam" and cfg["optim"]["lr"] == 2e-4
    assert get_config("cam-vitb16-voc")["train"]["iters"] == 20000
    coco = get_config("cam-vitb16-coco")
    assert coco["train"]["iters"] == 80000 and coco["cam"]["bkg_thresh"] == 0.45
    assert CONFIGS["cam-vitb16-voc"]["train"]["iters"] == 20000  # the coco variant did not touch voc
    assert CONFIGS["cam-vitb16-voc"]["cam"]["scales"] == [1.0, 0.5, 0.75, 1.5]


def test_cobra_configs_resize_positions_the_dino_way() -> None:
    """CoBra's DeiT resizes its position grid as DINO does (§4.4); the ViT-B configs keep SeCo's rule (§1.1)."""
    for name, cfg in CONFIGS.items():
        rule = cfg["model"]["backbone"].get("pos_resize", "size")
        assert rule == ("dino" if cfg["method"] == "cobra" else "size"), name
    assert {n for n, c in CONFIGS.items() if c["method"] == "cobra"} >= {"cobra-r152-deits-voc", "cobra-tiny-synth"}


def test_unknown_config_suggests_the_close_one() -> None:
    with pytest.raises(KeyError) as info:
        get_config("cam-tiny-synt")
    msg = info.value.args[0]
    assert "unknown config 'cam-tiny-synt'" in msg and "did you mean 'cam-tiny-synth'?" in msg
    assert "cam-vitb16-voc" in msg  # lists the available ones
    with pytest.raises(KeyError) as info:
        get_config("zzzz")
    assert "did you mean" not in info.value.args[0]


def test_overrides_parse_json_and_coerce_int_to_float() -> None:
    cfg = get_config(
        "cam-tiny-synth",
        [
            "optim.lr=1",
            "train.iters=30",
            "cam.scales=[1.0, 0.75]",
            "data.scale_range=[0.5,2.0]",
            "train.amp=false",
            "model.pooling=gap",
            'model.backbone.overrides={"depth": 2}',
            "pretrained=null",
        ],
    )
    assert cfg["optim"]["lr"] == 1.0 and type(cfg["optim"]["lr"]) is float
    assert cfg["train"]["iters"] == 30 and type(cfg["train"]["iters"]) is int
    assert cfg["cam"]["scales"] == [1.0, 0.75]
    assert cfg["data"]["scale_range"] == [0.5, 2.0]
    assert cfg["train"]["amp"] is False
    assert cfg["model"]["pooling"] == "gap"  # a bare word is a string
    assert cfg["model"]["backbone"]["overrides"] == {"depth": 2}
    assert cfg["pretrained"] is None


def test_override_none_slot_accepts_any_type() -> None:
    cfg = get_config("cam-vitb16-voc", ["pretrained=/weights/vit.pth"])
    assert cfg["pretrained"] == "/weights/vit.pth"


def test_override_value_may_contain_equals_sign() -> None:
    cfg = get_config("cam-tiny-synth", ["pretrained=file:a=b"])
    assert cfg["pretrained"] == "file:a=b"


def test_override_unknown_key_suggests() -> None:
    with pytest.raises(KeyError) as info:
        get_config("cam-tiny-synth", ["optim.lrr=1"])
    msg = info.value.args[0]
    assert "unknown key 'optim.lrr'" in msg and "did you mean 'lr'?" in msg
    with pytest.raises(KeyError, match="no section 'optimizer'"):
        get_config("cam-tiny-synth", ["optimizer.lr=1"])
    with pytest.raises(KeyError, match="no section 'optim.lr'"):
        get_config("cam-tiny-synth", ["optim.lr.x=1"])  # a leaf is not a section


@pytest.mark.parametrize(
    ("item", "expected", "got"),
    [
        ("train.iters=1.5", "int", "float"),
        ("train.iters=abc", "int", "str"),
        ("train.iters=true", "int", "bool"),
        ("train.amp=1", "bool", "int"),
        ("optim.lr=true", "float", "bool"),
        ("cam.scales=1.0", "list", "float"),
        ("model.pooling=3", "str", "int"),
    ],
)
def test_override_type_mismatch(item: str, expected: str, got: str) -> None:
    with pytest.raises(TypeError, match=f"expected {expected}, got {got}"):
        get_config("cam-tiny-synth", [item])


def test_override_bad_syntax() -> None:
    with pytest.raises(ValueError, match="must look like key=value"):
        get_config("cam-tiny-synth", ["train.iters"])
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_override({"a": 1}, "a 1")


def test_apply_override_in_place() -> None:
    cfg = {"a": {"b": 1.5, "c": [1]}, "d": None}
    apply_override(cfg, " a.b =2")
    assert cfg["a"]["b"] == 2.0 and type(cfg["a"]["b"]) is float
    apply_override(cfg, "a.c=[]")
    assert cfg["a"]["c"] == []


def test_overrides_do_not_mutate_configs() -> None:
    snapshot = copy.deepcopy(CONFIGS)
    cfg = get_config("cam-tiny-synth", ["cam.scales=[2.0]", "model.backbone.img_size=64", "optim.lr=0.5"])
    cfg["data"]["scale_range"].append(9.0)
    cfg["model"]["backbone"]["overrides"]["depth"] = 99
    assert cfg["model"]["backbone"]["img_size"] == 64
    assert snapshot == CONFIGS
    assert get_config("cam-tiny-synth")["model"]["backbone"] == {
        "name": "vit_tiny_patch16_224",
        "img_size": 112,
        "overrides": {"patch_size": 8, "depth": 4},
        "stem": "patch",
    }


# ------------------------------------------------------------------------------------------------------- LR schedule

ETA, T, T_W, R, POWER = 6e-5, 20000, 1500, 1e-6, 0.9


def _lr(t: int) -> float:
    return ETA * poly_warmup_factor(t, T, T_W, R, POWER)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0, 6.0000e-11),
        (199, 7.960e-6),  # log line "Iter 200"
        (1499, 5.9960e-05),
        (1500, 5.5934e-05),
        (1599, 5.566e-5),  # log line "Iter 1600"
        (9999, 3.2156e-05),
        (19999, 8.0765e-09),
    ],
)
def test_lr_schedule_matches_the_seco_log(t: int, expected: float) -> None:
    assert _lr(t) == pytest.approx(expected, rel=1e-3)


def test_lr_jumps_at_the_end_of_warmup() -> None:
    assert _lr(1499) / ETA == pytest.approx(1 - (1 / 1500) * (1 - R), rel=1e-12)
    assert _lr(1500) / ETA == pytest.approx(0.93224, abs=1e-5)
    assert _lr(1500) / ETA == pytest.approx((1 - 1500 / 20000) ** 0.9, rel=1e-12)
    assert _lr(T) == 0.0 and _lr(T + 100) == 0.0
    # warm-up is linear in t
    assert _lr(750) == pytest.approx(ETA * (0.5 + 0.5 * R), rel=1e-12)


def test_no_warmup() -> None:
    assert poly_warmup_factor(0, 100, 0, R, 0.9) == 1.0
    assert poly_warmup_factor(50, 100, 0, R, 1.0) == pytest.approx(0.5)


def _two_params() -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    return torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))


def test_optimizer_applies_the_factor_to_each_group() -> None:
    backbone, head = _two_params()
    groups = param_groups([backbone], [head], lr=ETA, head_lr=10)
    assert [g["lr"] for g in groups] == [ETA, pytest.approx(10 * ETA)]
    opt = PolyWarmupAdamW(groups, total=T, warmup=T_W, warmup_ratio=R, power=POWER, weight_decay=0.0)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    for t in range(3):
        backbone.grad, head.grad = torch.ones(4), torch.ones(2)
        opt.step()
        assert opt.global_step == t + 1
        assert opt.param_groups[0]["lr"] == pytest.approx(_lr(t), rel=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(10 * _lr(t), rel=1e-12)
        assert opt.param_groups[0]["base_lr"] == ETA  # the base is not compounded
    opt.global_step = 199
    backbone.grad, head.grad = torch.ones(4), torch.ones(2)
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(7.960e-6, rel=1e-3)
    assert opt.param_groups[1]["lr"] == pytest.approx(7.960e-5, rel=1e-3)


def test_first_update_moves_each_group_by_its_scheduled_lr() -> None:
    """With a constant gradient, Adam's first bias-corrected update is lr * sign(g): it reveals the lr used."""
    backbone, head = _two_params()
    groups = param_groups([backbone], [head], lr=ETA, head_lr=10)
    opt = PolyWarmupAdamW(groups, total=T, warmup=T_W, warmup_ratio=R, power=POWER, weight_decay=0.0)
    opt.global_step = 1599
    backbone.grad, head.grad = torch.full((4,), 0.5), torch.full((2,), -2.0)
    opt.step()
    lr = _lr(1599)
    torch.testing.assert_close(backbone.detach(), torch.full((4,), -lr), rtol=1e-4, atol=0)
    torch.testing.assert_close(head.detach(), torch.full((2,), 10 * lr), rtol=1e-4, atol=0)
    assert lr == pytest.approx(5.566e-5, rel=1e-3)


def test_weight_decay_reaches_every_group() -> None:
    backbone, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = PolyWarmupAdamW(param_groups([backbone], [head], 1e-2, 10), total=10, warmup=0, warmup_ratio=R, power=1.0,
                          weight_decay=0.5)  # fmt: skip
    backbone.grad, head.grad = torch.zeros(3), torch.zeros(3)
    opt.step()  # zero gradient: only decoupled weight decay acts, p *= 1 - lr * wd
    torch.testing.assert_close(backbone.detach(), torch.full((3,), 1 - 1e-2 * 0.5))
    torch.testing.assert_close(head.detach(), torch.full((3,), 1 - 1e-1 * 0.5))


def test_param_groups_drop_frozen_parameters() -> None:
    a, b, c = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    b.requires_grad_(False)
    groups = param_groups([a, b], [c], lr=0.1, head_lr=10)
    assert groups[0]["params"] == [a] and groups[1]["params"] == [c]
    assert groups[0]["lr"] == 0.1 and groups[1]["lr"] == pytest.approx(1.0)


# -------------------------------------------------------------------------------------------------------- transforms


def _coded_image(h: int, w: int) -> np.ndarray:
    """Pixel (y, x) holds (y, x, 7): every pixel is non-zero and says where it came from."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(h)[:, None]
    img[..., 1] = np.arange(w)[None, :]
    img[..., 2] = 7
    return img


@pytest.mark.parametrize(("h", "w"), [(10, 14), (40, 30), (10, 50), (50, 12), (24, 24)])
def test_random_crop_box_semantics(h: int, w: int) -> None:
    crop = 24
    img = _coded_image(h, w)
    offsets = set()
    for seed in range(12):
        out, box = random_crop(img, crop, np.random.default_rng(seed))
        assert out.shape == (crop, crop, 3) and out.dtype == np.uint8
        assert box.dtype == np.int16 and box.shape == (4,)
        top, bottom, left, right = (int(v) for v in box)
        assert 0 <= top < bottom <= crop and 0 <= left < right <= crop
        assert bottom - top == min(h, crop) and right - left == min(w, crop)
        inside = np.zeros((crop, crop), bool)
        inside[top:bottom, left:right] = True
        assert not out[~inside].any()  # black canvas outside the box
        assert (out[inside][:, 2] == 7).all()  # real pixels inside
        y0, x0 = int(out[top, left, 0]), int(out[top, left, 1])
        np.testing.assert_array_equal(out[top:bottom, left:right], img[y0 : y0 + bottom - top, x0 : x0 + right - left])
        offsets.add((top, left, y0, x0))
    if (h, w) != (crop, crop):
        assert len(offsets) > 1  # the placement is random


def test_random_crop_is_deterministic_for_a_seed() -> None:
    img = _coded_image(40, 30)
    a, box_a = random_crop(img, 24, np.random.default_rng(3))
    b, box_b = random_crop(img, 24, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(box_a, box_b)


def test_augment_shape_dtype_and_determinism() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(1, 256, (30, 44, 3), dtype=np.uint8)
    cfg = AugmentConfig(crop=32, scale_range=(0.5, 1.5), flip=0.5, jitter=0.8)
    outs = []
    for seed in (5, 5, 6):
        out, box = augment(img, cfg, np.random.default_rng(seed))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert box.dtype == np.int16
        top, bottom, left, right = (int(v) for v in box)
        assert 0 <= top < bottom <= 32 and 0 <= left < right <= 32
        outside = np.ones((32, 32), bool)
        outside[top:bottom, left:right] = False
        assert not out[outside].any()
        outs.append((out, box))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    assert not np.array_equal(outs[0][0], outs[2][0])
    np.testing.assert_array_equal(img, np.random.default_rng(0).integers(1, 256, (30, 44, 3), dtype=np.uint8))


def test_augment_without_jitter_flip_or_rescale_is_a_crop() -> None:
    img = _coded_image(20, 28)
    cfg = AugmentConfig(crop=32, scale_range=(1.0, 1.0), flip=0.0, jitter=0.0)
    out, box = augment(img, cfg, np.random.default_rng(1))
    top, bottom, left, right = (int(v) for v in box)
    assert (bottom - top, right - left) == (20, 28)
    np.testing.assert_array_equal(out[top:bottom, left:right], img)
    flipped, box = augment(img, AugmentConfig(crop=32, scale_range=(1.0, 1.0), flip=1.0, jitter=0.0),
                           np.random.default_rng(1))  # fmt: skip
    top, bottom, left, right = (int(v) for v in box)
    np.testing.assert_array_equal(flipped[top:bottom, left:right], img[:, ::-1])


def test_augment_rescale_changes_the_box_size() -> None:
    img = _coded_image(20, 20)
    cfg = AugmentConfig(crop=64, scale_range=(2.0, 2.0), flip=0.0, jitter=0.0)
    _, box = augment(img, cfg, np.random.default_rng(0))
    assert (int(box[1] - box[0]), int(box[3] - box[2])) == (40, 40)


def test_to_tensor_and_denormalize_round_trip() -> None:
    img = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    x = to_tensor(img)
    assert x.shape == (3, 6, 9) and x.dtype == torch.float32
    expected_00 = (img[0, 0] / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x[:, 0, 0].numpy(), expected_00, rtol=1e-5, atol=1e-6)
    back = denormalize(x)
    assert back.shape == (3, 6, 9) and back.min() >= 0 and back.max() <= 1
    diff = np.abs(back.permute(1, 2, 0).numpy() * 255 - img.astype(np.float64)).max()
    assert diff <= 1.0
    batch = denormalize(torch.stack([x, x]))
    torch.testing.assert_close(batch[1], back)


def test_denormalize_clamps() -> None:
    x = torch.full((3, 2, 2), 10.0)
    assert torch.equal(denormalize(x), torch.ones(3, 2, 2))
    assert torch.equal(denormalize(-x), torch.zeros(3, 2, 2))


def test_color_jitter() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    a = color_jitter(img, np.random.default_rng(4))
    b = color_jitter(img, np.random.default_rng(4))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, img)
    # zero strengths: only the uint8 HSV round trip and float truncation remain
    same = color_jitter(img, np.random.default_rng(4), 0, 0, 0, 0)
    assert np.abs(same.astype(int) - img).mean() < 1.0
    # saturation and hue leave a grey image grey
    grey = np.full((4, 4, 3), 120, np.uint8)
    out = color_jitter(grey, np.random.default_rng(1), brightness=0, contrast=0, saturation=0.5, hue=0.5)
    assert (out == out[..., :1]).all() and abs(int(out[0, 0, 0]) - 120) <= 1
    # brightness scales a grey image by a factor within [0.6, 1.4]
    for seed in range(5):
        out = color_jitter(grey, np.random.default_rng(seed), brightness=0.4, contrast=0, saturation=0, hue=0)
        assert (out == out[0, 0, 0]).all() and 71 <= int(out[0, 0, 0]) <= 168


@pytest.mark.parametrize("name", sorted(n for n, c in CONFIGS.items() if c["optim"].get("name", "adamw") == "sgd"))
def test_every_sgd_config_optimizer_steps_with_the_poly_schedule(name):
    """The CoBra configs' PolySGD (§4.7) steps (it once reused AdamW's bound ``step`` and crashed at step 1) and
    decays each group as ``lr (1 - t/T)^power`` from its own base rate."""
    cfg = get_config(name)
    backbone, head = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = make_optimizer(param_groups([backbone], [head], cfg["optim"]["lr"], cfg["optim"]["head_lr"]),
                         cfg["optim"], total=10)  # fmt: skip
    for step in range(3):
        (backbone.sum() + head.sum()).backward()
        opt.step()
        opt.zero_grad()
        factor = (1 - step / 10) ** cfg["optim"]["power"]
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg["optim"]["lr"] * factor)
        assert opt.param_groups[1]["lr"] == pytest.approx(cfg["optim"]["lr"] * cfg["optim"]["head_lr"] * factor)
    assert isinstance(opt, torch.optim.SGD) and float(backbone.detach()[0]) < 1


# ------------------------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize(
    "requested, local_rank, cuda, current, expected",
    [
        (None, None, 0, 0, "cpu"),
        (None, None, 2, 0, "cuda:0"),
        ("cuda:1", None, 2, 0, "cuda:1"),
        ("cuda", None, 2, 1, "cuda:1"),  # a bare "cuda" is the current device
        (None, 1, 2, 0, "cuda:1"),  # torchrun: LOCAL_RANK
        ("cuda", 1, 2, 0, "cuda:1"),
        ("cpu", 1, 2, 0, "cpu"),  # gloo ranks on the CPU of a GPU machine
    ],
)
def test_resolve_device(requested, local_rank, cuda, current, expected):
    from wsss.train.loop import resolve_device

    assert resolve_device(requested, local_rank, cuda, current) == torch.device(expected)


@pytest.mark.parametrize(
    "requested, local_rank, cuda, message",
    [
        ("cuda", None, 0, "no CUDA device is visible"),
        ("cuda:3", None, 2, "only 2 CUDA device"),
        ("cuda:0", 1, 2, "under torchrun: each rank trains on cuda:LOCAL_RANK"),
    ],
)
def test_resolve_device_refuses_what_cannot_run(requested, local_rank, cuda, message):
    from wsss.train.loop import resolve_device

    with pytest.raises(ValueError, match=message):
        resolve_device(requested, local_rank, cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_makes_the_requested_gpu_current():
    """Triton launches on the current device: ``--device cuda:N`` must make cuda:N current."""
    from wsss.train.loop import _setup

    last = torch.cuda.device_count() - 1
    device, rank, world = _setup(f"cuda:{last}")
    assert device == torch.device("cuda", last) and torch.cuda.current_device() == last and (rank, world) == (0, 1)


def test_loader_workers_are_capped_at_the_cores_per_rank(monkeypatch, capsys):
    from wsss.train.loop import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers(8) == 2 and "train.workers=8 capped at 2" in capsys.readouterr().out
    assert loader_workers(2) == 2 and loader_workers(0) == 0 and capsys.readouterr().out == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers(8) == 1


def test_batches_are_a_function_of_the_step_whatever_the_workers(synth):
    """One loader serves the run: 2 worker processes give the in-process batches, and starting at step 5 gives
    the batches an uninterrupted run sees from step 5 on (resume), across an epoch boundary."""
    from conftest import TINY

    from wsss.data.datasets import VOCDataset
    from wsss.train.loop import _batches, training_set

    cfg = get_config("cam-tiny-synth", TINY)  # 16 images, batch 4: 4 steps per epoch
    trainset = training_set(cfg, VOCDataset(synth, "train"), 0)

    def images(start: int, workers: int, n: int) -> list[torch.Tensor]:
        batches = _batches(trainset, {**cfg["train"], "workers": workers}, 0, 0, 1, start, verbose=False)
        return [next(batches)["image"] for _ in range(n)]

    straight = images(0, 0, 7)
    for a, b in zip(straight, images(0, 2, 7), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight[5:], images(5, 0, 2), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(straight[0], straight[4])  # a new epoch, a new order and new views


def test_with_iters_scales_every_step_counted_setting() -> None:
    cfg = get_config("seco-tiny-synth")  # 300 iterations: lig/lil from 60, seg/reg from 120, prototypes from 40
    short = with_iters(cfg, 100)
    assert short["train"]["iters"] == 100 and short["optim"]["warmup"] == 7 and short["seco"]["proto_start"] == 13
    assert short["seco"]["schedule"]["lig"] == [20, 0.5] and short["seco"]["schedule"]["seg"] == [40, 0.12]
    assert short["seco"]["cam2mask"] == 100_000  # the ROI switch the tiny run never makes stays unmade
    assert cfg["train"]["iters"] == 300 and cfg["seco"]["schedule"]["lig"] == [60, 0.5]  # the original is untouched
    paper = with_iters(get_config("seco-vitb16-voc"), 2000)  # a named schedule (§3.13) becomes a table
    assert paper["seco"]["schedule"]["lil"] == [100, 0.5] and paper["seco"]["schedule"]["reg"] == [200, 0.05]
    assert with_iters(get_config("cam-tiny-synth"), 125)["optim"]["warmup"] == 10
