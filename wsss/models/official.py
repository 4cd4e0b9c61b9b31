"""Import official research checkpoints by explicit key tables (never by unpickling objects).

SeCo (``model/model_seco.py: network``, saved as ``model.state_dict()``, possibly under DDP's ``module.``):
the student ViT-B/16 under ``encoder.*`` (timm key names), ``classifier.weight`` and ``aux_classifier.weight``
(K x 768 x 1 x 1, no bias), the ASPP decoder ``decoder.c{0..3}.{weight,bias}``. The key encoder, the projection
heads and the contrastive buffers serve training only and are skipped.

CoBra (two files per epoch, each ``model.module.state_dict()`` of ``step/train_cam.py``; ``ep19_*`` are the
released ones):

* ``ep19_cnn_checkpoint.pth``, ``net/resnet50_cam.py: Net``: a torchvision-named ResNet (ResNet-152 despite the
  "resnet50" names) registered as ``resnet50`` and again through ``stage1 = (conv1, bn1, relu, maxpool, layer1)``,
  ``stage2..4 = (layer2..4,)`` and ``backbone = ModuleList(stage1..4)``, so every trunk tensor is stored three
  times; the CAM head ``classifier.weight`` ((K+1) x 2048 x 1 x 1, no bias, channel 0 background) also as
  ``newly_added.0.weight``; the CAP projection ``embed.weight`` (256 x 2048 x 1 x 1, never trained: Q4.2).
* ``ep19_tf_checkpoint.pth``, ``net/deit_cam.py: TSCAM``: DeiT-S with timm key names, the 3x3 CAM head
  ``head.{weight,bias}`` ((K+1) x 384 x 3 x 3) and the SAP projection ``embed.weight`` (256 x 384 x 1 x 1).

The tables below map every key; aliases of one tensor are merged only when their values are identical.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch

from ..data.palette import COCO_CLASSES, VOC_CLASSES
from .checkpoint import CheckpointError, read_state_dict
from .report import LoadReport, fit_state
from .spec import CAMSettings, ModelSpec, build_model

# (pattern, replacement); a key matching no rule is "unexpected", one matching a None rule is skipped.
SECO_KEYS: list[tuple[str, str | None]] = [
    (r"^encoder\.head\..*", None),
    (r"^encoder_k\..*", None),
    (r"^proj_head(_t)?\..*", None),
    (r"^(prototypes|queue|queue_label_flag|queue_ptr)$", None),
    (r"^encoder\.(.*)$", r"backbone.\1"),
    (r"^(classifier|aux_classifier)\.weight$", r"\1.weight"),
    (r"^decoder\.(c\d)\.(weight|bias)$", r"decoder.\1.\2"),
]

# CoBra CNN file (net/resnet50_cam.py: Net) -> CoBraNet. The trunk is stored under three aliases; the ResNet's
# own names (torchvision = timm: conv1, bn1, layer1..4 with Bottleneck conv1..3, bn1..3, downsample.0/1) follow
# the prefix. stage1 = Sequential(conv1 [0], bn1 [1], relu [2], maxpool [3], layer1 [4]); stageN = (layerN,).
COBRA_CNN_KEYS: list[tuple[str, str | None]] = [
    (r"^resnet50\.(conv1|bn1|layer[1-4])\.(.+)$", r"cnn.net.\1.\2"),
    (r"^stage1\.0\.(.+)$", r"cnn.net.conv1.\1"),
    (r"^stage1\.1\.(.+)$", r"cnn.net.bn1.\1"),
    (r"^stage1\.4\.(.+)$", r"cnn.net.layer1.\1"),
    (r"^stage([2-4])\.0\.(.+)$", r"cnn.net.layer\1.\2"),
    (r"^backbone\.0\.0\.(.+)$", r"cnn.net.conv1.\1"),  # backbone = ModuleList([stage1, ..., stage4])
    (r"^backbone\.0\.1\.(.+)$", r"cnn.net.bn1.\1"),
    (r"^backbone\.0\.4\.(.+)$", r"cnn.net.layer1.\1"),
    (r"^backbone\.1\.0\.(.+)$", r"cnn.net.layer2.\1"),
    (r"^backbone\.2\.0\.(.+)$", r"cnn.net.layer3.\1"),
    (r"^backbone\.3\.0\.(.+)$", r"cnn.net.layer4.\1"),
    (r"^(classifier|newly_added\.0)\.weight$", "cnn_classifier.weight"),  # W_c, 1x1, no bias
    (r"^embed\.weight$", "cnn_proj.weight"),  # P_c (CAP), 1x1, no bias
]
# CoBra ViT file (net/deit_cam.py: TSCAM, a DeiT-S with timm names) -> CoBraNet.
COBRA_VIT_KEYS: list[tuple[str, str | None]] = [
    (r"^(cls_token|pos_embed)$", r"backbone.\1"),
    (r"^(patch_embed\.proj|norm)\.(weight|bias)$", r"backbone.\1.\2"),
    (
        r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$",
        r"backbone.blocks.\1.\2.\3",
    ),
    (r"^head\.(weight|bias)$", r"vit_classifier.\1"),  # W_t, TS-CAM's 3x3 conv head with bias
    (r"^embed\.weight$", "vit_proj.weight"),  # P_t (SAP), 1x1, no bias
]
# Training-only projections: imported when present, else initialised deterministically (they never touch CAMs).
COBRA_OPTIONAL = ("cnn_proj.weight", "vit_proj.weight")
# (block, blocks per stage) of the torchvision/timm ResNets with the standard widths (64, 128, 256, 512).
RESNETS = {("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152", ("basic", (2, 2, 2, 2)): "resnet18",
           ("basic", (3, 4, 6, 3)): "resnet34"}  # fmt: skip

# The official architectures (§1.1, §4.3, §4.4); the position grid is read from the weights.
SECO_ARCH = {"backbone": {"name": "vit_base_patch16_224", "img_size": 224, "overrides": {}, "stem": "patch",
                          "pos_resize": "size"}, "aux_layer": -3}  # fmt: skip
COBRA_ARCH = {
    "backbone": {"name": "deit_small_patch16_224", "img_size": 224, "overrides": {}, "stem": "patch",
                 "pos_resize": "dino"},
    "proj_dim": 256, "pooling": "gap",
    "cnn": {"name": "resnet152", "strides": [1, 2, 2, 1], "fixed_bn": True, "frozen_stages": 2},
}  # fmt: skip
# SeCo's validation and seed CAMs (§1.3, §1.8, §3.15): VOC and COCO.
SECO_CAM = {"input_size": 448, "scales": (1.0, 0.5, 0.75, 1.5), "bkg_thresh": 0.5}
SECO_COCO_CAM = {"input_size": 448, "scales": (1.0, 0.5, 0.75, 1.25, 1.5), "bkg_thresh": 0.45}


def detect_layout(keys: list[str]) -> str | None:
    """Which official layout a state dict follows: "seco", "cobra-cnn", "cobra-vit" or None."""
    keys = [k.removeprefix("module.") for k in keys]
    if any(k.startswith("encoder.blocks.") for k in keys) and "classifier.weight" in keys:
        return "seco"
    branch = cobra_branch(keys)
    return None if branch is None else f"cobra-{branch}"


def describe_unknown(keys: list[str]) -> str:
    """Why a key set matches no family: the closest layout and the keys it lacks."""
    keys = {k.removeprefix("module.") for k in keys}
    wants = {"seco": ["encoder.blocks.0.attn.qkv.weight", "classifier.weight", "aux_classifier.weight"],
             "cobra CNN file": ["resnet50.conv1.weight", "classifier.weight", "embed.weight"],
             "cobra ViT file": ["pos_embed", "blocks.0.attn.qkv.weight", "head.weight", "embed.weight"],
             "timm ViT backbone": ["pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"],
             "torchvision ResNet backbone": ["conv1.weight", "layer1.0.conv1.weight", "fc.weight"]}  # fmt: skip
    score = {name: sum(k in keys for k in want) / len(want) for name, want in wants.items()}
    best = max(score, key=score.get)
    if score[best] == 0:
        sample = ", ".join(sorted(keys)[:3])
        return f"no known layout (keys like {sample}); expected a wsss, SeCo or CoBra checkpoint"
    lacking = [k for k in wants[best] if k not in keys]
    return f"resembles a {best} but lacks {', '.join(lacking)}" if lacking else f"looks like a {best}"


def cobra_branch(keys: list[str]) -> str | None:
    """Which file of an official CoBra checkpoint pair these keys come from: "cnn", "vit" or None."""
    keys = {k.removeprefix("module.") for k in keys}
    if any(k.startswith(("resnet50.", "stage1.")) for k in keys):
        return "cnn"
    if {"head.weight", "embed.weight", "pos_embed"} <= keys and any(k.startswith("blocks.") for k in keys):
        return "vit"
    return None


def map_keys(state: dict[str, torch.Tensor], table: list[tuple[str, str | None]]):
    """Rename by the first matching rule; returns (mapped, skipped, unexpected)."""
    renamed, skipped, unexpected = _rename(state, table)
    return {new: tensor for new, _, tensor in renamed}, skipped, unexpected


def _rename(state: dict[str, torch.Tensor], table: list[tuple[str, str | None]]):
    """(new name, old name, tensor) for every key a rule maps; the keys a rule skips; the keys no rule matches."""
    renamed, skipped, unexpected = [], [], []
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        for pattern, repl in table:
            if re.match(pattern, key):
                if repl is None:
                    skipped.append(key)
                else:
                    renamed.append((re.sub(pattern, repl, key), key, tensor))
                break
        else:
            unexpected.append(key)
    return renamed, skipped, unexpected


def seco_filter(state: dict[str, torch.Tensor], source: str, arch: dict | None = None):
    """An official SeCo state dict (plain or DDP) -> (network, spec, report); strict about what it loads.

    ``arch`` overrides the official ViT-B/16 architecture (for small test networks); the position grid is read
    from the weights. 80 classes are COCO (``bkg_thresh`` 0.45 and five scales), 20 VOC.
    """
    mapped, skipped, unexpected = map_keys(state, SECO_KEYS)
    for key in ("classifier.weight", "backbone.pos_embed", "backbone.patch_embed.proj.weight"):
        if key not in mapped:
            raise CheckpointError(f"{source}: no {key.replace('backbone.', 'encoder.')}: not a SeCo network state dict")
    num_fg = mapped["classifier.weight"].shape[0]
    arch = copy.deepcopy(arch or SECO_ARCH)
    arch["backbone"]["img_size"] = _stored_img_size(mapped)
    cam = CAMSettings.for_family("seco", SECO_COCO_CAM if num_fg == 80 else SECO_CAM)
    spec = ModelSpec("seco", arch, _class_names(num_fg), cam)
    model = build_model(spec)
    report = LoadReport(source, "seco", skipped=dict.fromkeys(skipped, "training-only"), unexpected=unexpected)
    fitting = fit_state(model, mapped, report)
    report.check()  # a one-line error before torch's own
    model.load_state_dict(fitting)
    return model.eval(), spec, report


def cobra_filter(cnn_state: dict[str, torch.Tensor], vit_state: dict[str, torch.Tensor], source: str,
                 arch: dict | None = None, class_names: list[str] | None = None):  # fmt: skip
    """The official CoBra pair (``ep19_cnn_checkpoint.pth``, ``ep19_tf_checkpoint.pth``) -> (network, spec, report).

    The ResNet (depth, block, widths) is read from the weights; its strides default to the official (2, 2, 2, 1)
    counted from conv1, i.e. ``[1, 2, 2, 1]`` for layer1..4. The ViT is DeiT-S by default (the number of heads
    is not in the weights) with the DINO position rule (§4.4); its stored grid comes from the file. ``arch``
    overrides the architecture sections. A CAP/SAP projection absent from a file is initialised from a fixed
    seed and listed as initialised.
    """
    mapped, skipped, unexpected, merged = _map_aliased(cnn_state, COBRA_CNN_KEYS, source)
    vit_mapped, vit_skipped, vit_unexpected, _ = _map_aliased(vit_state, COBRA_VIT_KEYS, source)
    mapped.update(vit_mapped)
    for key in ("cnn_classifier.weight", "vit_classifier.weight", "backbone.pos_embed",
                "backbone.patch_embed.proj.weight"):  # fmt: skip
        if key not in mapped:
            raise CheckpointError(f"{source}: no tensor for {key}; not an official CoBra checkpoint pair")
    num_fg = mapped["cnn_classifier.weight"].shape[0] - 1
    class_names = list(class_names or _class_names(num_fg))
    if len(class_names) != num_fg + 1:
        raise CheckpointError(f"{source}: {len(class_names)} class names for {num_fg} + 1 classifier channels")
    proj = {mapped[k].shape[0] for k in COBRA_OPTIONAL if k in mapped}
    if len(proj) > 1:
        raise CheckpointError(f"{source}: the CAP and SAP projections have different widths {sorted(proj)}")
    overrides, arch = arch or {}, copy.deepcopy(COBRA_ARCH)
    arch["cnn"] = {**arch["cnn"], **_resnet_config(mapped, source), **overrides.get("cnn", {})}
    arch["backbone"] = {**arch["backbone"], **overrides.get("backbone", {}), "img_size": _stored_img_size(mapped)}
    arch["proj_dim"] = proj.pop() if proj else arch["proj_dim"]
    spec = ModelSpec("cobra", arch, tuple(class_names), CAMSettings.for_family("cobra"))
    model = build_model(spec)
    report = LoadReport(source, "cobra", skipped=dict.fromkeys(skipped + vit_skipped, "training-only"),
                        unexpected=unexpected + vit_unexpected, aliases=merged)  # fmt: skip
    fitting = fit_state(model, mapped, report, optional=COBRA_OPTIONAL)
    report.check()
    generator = torch.Generator().manual_seed(0)
    for key in COBRA_OPTIONAL:
        if key not in fitting:  # Kaiming-uniform like nn.Conv2d's default, from a fixed seed
            weight = model.state_dict()[key]
            bound = (1 / weight[0].numel()) ** 0.5
            fitting[key] = torch.empty_like(weight).uniform_(-bound, bound, generator=generator)
            report.initialised.append(key)
    model.load_state_dict(fitting)
    return model.eval(), spec, report


def _stored_img_size(mapped: dict[str, torch.Tensor]) -> int:
    """The image size the position embedding was stored for: patch x sqrt(number of patch positions)."""
    grid = int(round((mapped["backbone.pos_embed"].shape[1] - 1) ** 0.5))
    return mapped["backbone.patch_embed.proj.weight"].shape[-1] * grid


def _map_aliased(state: dict[str, torch.Tensor], table: list[tuple[str, str | None]], source: str):
    """Like ``map_keys``, but several source keys may name one target: they must hold identical values.

    Returns (mapped, skipped, unexpected, number of merged aliases); raises CheckpointError on disagreement.
    """
    renamed, skipped, unexpected = _rename(state, table)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for target, key, tensor in renamed:
        groups.setdefault(target, []).append((key, tensor))
    mapped, merged = {}, 0
    for target, items in groups.items():
        first_key, first = items[0]
        for key, tensor in items[1:]:
            if not _same_tensor(first, tensor):
                raise CheckpointError(
                    f"{source}: {first_key} and {key} are aliases of one tensor ({target}) but hold different "
                    "values; the file was edited or is not an official CoBra checkpoint"
                )
            merged += 1
        mapped[target] = first
    return mapped, skipped, unexpected, merged


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # one storage saved once by torch.save: the usual case for module aliases
    return torch.equal(a, b)


def _resnet_config(mapped: dict[str, torch.Tensor], source: str) -> dict:
    """The ResNet the CNN file holds, from its blocks per stage, block type and stage widths."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in mapped if (m := re.match(rf"cnn\.net\.layer{stage}\.(\d+)\.", k))}
        if not indices:
            raise CheckpointError(f"{source}: the CNN file has no layer{stage} blocks; not a CoBra CNN checkpoint")
        blocks.append(max(indices) + 1)
    block = "bottleneck" if "cnn.net.layer1.0.conv3.weight" in mapped else "basic"
    widths = tuple(int(mapped[f"cnn.net.layer{s}.0.conv1.weight"].shape[0]) for s in range(1, 5)
                   if f"cnn.net.layer{s}.0.conv1.weight" in mapped)  # fmt: skip
    name = RESNETS.get((block, tuple(blocks)))
    if name is not None and widths == (64, 128, 256, 512):
        return {"name": name}
    return {"name": "custom", "layers": blocks, "channels": list(widths), "block": block}


def read_cobra_file(path: str | Path, branch: str) -> dict[str, torch.Tensor]:
    """One file of an official CoBra pair; refuses the other file or a non-CoBra state dict."""
    state = read_state_dict(path)
    found = cobra_branch(list(state))
    if found != branch:
        other = {"cnn": "CNN (ep19_cnn_checkpoint.pth)", "vit": "ViT (ep19_tf_checkpoint.pth)"}
        what = f"the {other[found]} file" if found else "not a CoBra state dict"
        raise CheckpointError(f"{path}: expected the {other[branch]} file of an official CoBra pair; it is {what}")
    return state


def cobra_partner(path: str | Path, branch: str) -> Path | None:
    """The other file of an official CoBra pair next to ``path``: ``ep19_cnn_checkpoint.pth`` <->
    ``ep19_tf_checkpoint.pth`` (``train_cam.py`` names them ``ep{e}_{cam1,cam2}_weights_name``)."""
    path = Path(path)
    old, new = ("cnn", "tf") if branch == "cnn" else ("tf", "cnn")
    if old not in path.name:
        return None
    head, _, tail = path.name.rpartition(old)
    partner = path.with_name(head + new + tail)
    return partner if partner.is_file() else None


def _class_names(num_fg: int) -> tuple[str, ...]:
    if num_fg == 20:
        return VOC_CLASSES
    if num_fg == 80:
        return COCO_CLASSES
    return ("background", *(f"class_{i}" for i in range(1, num_fg + 1)))
