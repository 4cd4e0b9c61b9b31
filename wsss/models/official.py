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

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.palette import COCO_CLASSES, VOC_CLASSES
from .backbone import BackboneConfig
from .checkpoint import CheckpointError, file_sha256, load_checkpoint, read_state_dict
from .cobra import CoBraNet
from .resnet import ResNetConfig
from .seco import SeCoNet

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
COBRA_CONFIG = "cobra-r152-deits-voc"
# (block, blocks per stage) of the torchvision/timm ResNets with the standard widths (64, 128, 256, 512).
RESNETS = {("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
           ("bottleneck", (3, 8, 36, 3)): "resnet152", ("basic", (2, 2, 2, 2)): "resnet18",
           ("basic", (3, 4, 6, 3)): "resnet34"}  # fmt: skip

SECO_CAM = {"input_size": 448, "scales": [1.0, 0.5, 0.75, 1.5], "flip": True, "bkg_thresh": 0.5, "score_thresh": 0.5}


@dataclass
class ImportReport:
    method: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    aliases: int = 0  # duplicate keys of one tensor merged (CoBra's CNN file stores its trunk three times)
    initialised: list[str] = field(default_factory=list)  # absent training-only tensors set deterministically

    def __str__(self) -> str:
        lines = [f"{self.method}: loaded {self.loaded} tensors, skipped {len(self.skipped)} training-only tensors"]
        if self.aliases:
            lines[0] += f", merged {self.aliases} aliased copies"
        if self.initialised:
            lines.append(f"  initialised (not in the file; training-only): {', '.join(self.initialised)}")
        for name in ("missing", "unexpected", "mismatched"):
            if items := getattr(self, name):
                lines.append(f"  {name} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        return "\n".join(lines)


def detect_method(keys: list[str]) -> str:
    """Guess which official layout a state dict follows from its keys."""
    keys = [k.removeprefix("module.") for k in keys]
    if any(k.startswith("encoder.blocks.") for k in keys) and "classifier.weight" in keys:
        return "seco"
    branch = cobra_branch(keys)
    if branch is not None:
        return "cobra" if branch == "cnn" else "cobra-vit"
    raise CheckpointError("unrecognised checkpoint layout: neither a wsss, SeCo nor CoBra state dict")


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


SECO_BACKBONE = {"name": "vit_base_patch16_224", "overrides": {}}


def import_seco(
    state: dict[str, torch.Tensor], source: str = "", backbone: dict | None = None
) -> tuple[SeCoNet, dict, ImportReport]:
    """An official SeCo state dict as a SeCoNet with metadata; strict about what it loads.

    ``backbone`` (name and overrides) defaults to SeCo's ViT-B/16; the position grid is read from the weights.
    """
    mapped, skipped, unexpected = map_keys(state, SECO_KEYS)
    if "classifier.weight" not in mapped:
        raise CheckpointError(f"{source}: no classifier.weight: not a SeCo network state dict")
    num_fg = mapped["classifier.weight"].shape[0]
    classes = VOC_CLASSES if num_fg == 20 else COCO_CLASSES if num_fg == 80 else _generic(num_fg)
    if "backbone.pos_embed" not in mapped or "backbone.patch_embed.proj.weight" not in mapped:
        raise CheckpointError(f"{source}: SeCo checkpoint lacks the encoder's position or patch embedding")
    grid = int(round((mapped["backbone.pos_embed"].shape[1] - 1) ** 0.5))
    patch = mapped["backbone.patch_embed.proj.weight"].shape[-1]
    backbone = {**SECO_BACKBONE, **(backbone or {}), "img_size": patch * grid}
    model = SeCoNet(BackboneConfig(**backbone), num_fg)
    report = ImportReport("seco", skipped=skipped, unexpected=unexpected)
    fitting = _fit(model, mapped, report)
    if report.missing or report.mismatched:
        raise CheckpointError(f"{source}: SeCo checkpoint does not fit the network\n{report}")
    model.load_state_dict(fitting)
    cam = {**SECO_CAM, "bkg_thresh": 0.45} if num_fg == 80 else SECO_CAM
    meta = {
        "method": "seco", "model": {"backbone": backbone, "aux_layer": -3}, "class_names": list(classes),
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "config": {"cam": cam}, "imported_from": source,
    }  # fmt: skip
    return model.eval(), meta, report


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


def _fit(model: torch.nn.Module, mapped: dict[str, torch.Tensor], report: ImportReport, optional=()) -> dict:
    """Tensors of ``mapped`` that fit ``model``; fills the report's missing/unexpected/mismatched lists."""
    target = model.state_dict()
    fitting = {}
    for key, tensor in mapped.items():
        if key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            report.mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(target[key].shape)}")
        else:
            fitting[key] = tensor
    report.missing = [k for k in target if k not in fitting and k not in optional]
    report.loaded = len(fitting)
    return fitting


def _read_cobra(path: str | Path, branch: str) -> dict[str, torch.Tensor]:
    state = read_state_dict(path)
    found = cobra_branch(list(state))
    if found != branch:
        other = {"cnn": "CNN (ep19_cnn_checkpoint.pth)", "vit": "ViT (ep19_tf_checkpoint.pth)"}
        what = f"the {other[found]} file" if found else "not a CoBra state dict"
        raise CheckpointError(f"{path}: expected the {other[branch]} file of an official CoBra pair; it is {what}")
    return state


def load_official_cobra(
    cnn_path: str | Path,
    vit_path: str | Path,
    num_fg: int | None = 20,
    cnn: dict | None = None,
    vit: dict | None = None,
    class_names: list[str] | None = None,
) -> tuple[CoBraNet, dict, ImportReport]:
    """The official CoBra pair (``ep19_cnn_checkpoint.pth``, ``ep19_tf_checkpoint.pth``) as a CoBraNet in eval
    mode, with metadata like our checkpoints' (method "cobra", the ``cobra-r152-deits-voc`` config adapted to
    the files, the SHA-256 of both files) and an import report.

    The ResNet (depth, block, widths) is read from the weights; its strides default to the official (2, 2, 2, 1)
    counted from conv1, i.e. ``[1, 2, 2, 1]`` for layer1..4. The ViT is DeiT-S by default (the number of heads
    is not in the weights); its position grid comes from the file. ``cnn``/``vit`` override those config
    sections (a ResNetConfig / BackboneConfig dict). ``num_fg=None`` takes the class count from the classifier.
    A CAP/SAP projection absent from a file is initialised from a fixed seed and listed as initialised.
    """
    cnn_state, vit_state = _read_cobra(cnn_path, "cnn"), _read_cobra(vit_path, "vit")
    source = f"{cnn_path} + {vit_path}"
    mapped, skipped, unexpected, merged = _map_aliased(cnn_state, COBRA_CNN_KEYS, str(cnn_path))
    vit_mapped, vit_skipped, vit_unexpected, _ = _map_aliased(vit_state, COBRA_VIT_KEYS, str(vit_path))
    mapped.update(vit_mapped)
    for key in ("cnn_classifier.weight", "vit_classifier.weight", "backbone.pos_embed",
                "backbone.patch_embed.proj.weight"):  # fmt: skip
        if key not in mapped:
            raise CheckpointError(f"{source}: no tensor for {key}; not an official CoBra checkpoint pair")
    classes_in_file = mapped["cnn_classifier.weight"].shape[0] - 1
    if num_fg is not None and num_fg != classes_in_file:
        raise CheckpointError(f"{source}: the classifier has {classes_in_file} + 1 channels, not {num_fg} + 1")
    num_fg = classes_in_file
    if class_names is None:
        class_names = list(VOC_CLASSES if num_fg == 20 else COCO_CLASSES if num_fg == 80 else _generic(num_fg))
    if len(class_names) != num_fg + 1:
        raise CheckpointError(f"{source}: {len(class_names)} class names for {num_fg} + 1 channels")
    proj = {mapped[k].shape[0] for k in COBRA_OPTIONAL if k in mapped}
    if len(proj) > 1:
        raise CheckpointError(f"{source}: the CAP and SAP projections have different widths {sorted(proj)}")

    from ..train.configs import get_config  # the training package imports the models: import it late

    config = get_config(COBRA_CONFIG)
    model_cfg = config["model"]
    model_cfg["cnn"] = {**model_cfg["cnn"], **_resnet_config(mapped, str(cnn_path)), **(cnn or {})}
    grid = int(round((mapped["backbone.pos_embed"].shape[1] - 1) ** 0.5))
    patch = mapped["backbone.patch_embed.proj.weight"].shape[-1]
    model_cfg["backbone"] = {**model_cfg["backbone"], "img_size": patch * grid, **(vit or {})}
    model_cfg["proj_dim"] = proj.pop() if proj else model_cfg["proj_dim"]
    if model_cfg["cnn"]["name"] != "resnet152":
        config["name"] = f"{COBRA_CONFIG} ({model_cfg['cnn']['name']} CNN, imported)"
    model = CoBraNet(ResNetConfig.from_dict(model_cfg["cnn"]), BackboneConfig(**model_cfg["backbone"]), num_fg,
                     model_cfg["proj_dim"])  # fmt: skip
    report = ImportReport("cobra", skipped=skipped + vit_skipped, unexpected=unexpected + vit_unexpected,
                          aliases=merged)  # fmt: skip
    fitting = _fit(model, mapped, report, optional=COBRA_OPTIONAL)
    if report.missing or report.mismatched:
        raise CheckpointError(f"{source}: CoBra checkpoint does not fit the network\n{report}")
    generator = torch.Generator().manual_seed(0)
    for key in COBRA_OPTIONAL:
        if key not in fitting:  # Kaiming-uniform like nn.Conv2d's default, from a fixed seed
            weight = model.state_dict()[key]
            bound = (1 / weight[0].numel()) ** 0.5
            fitting[key] = torch.empty_like(weight).uniform_(-bound, bound, generator=generator)
            report.initialised.append(key)
    model.load_state_dict(fitting)
    meta = {
        "method": "cobra", "config_name": config["name"], "model": model_cfg, "config": config,
        "class_names": list(class_names), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "imported_from": {"cnn": str(cnn_path), "vit": str(vit_path)},
        "source_sha256": file_sha256(cnn_path), "source_sha256_vit": file_sha256(vit_path),
    }  # fmt: skip
    return model.eval(), meta, report


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


def load_any(
    path: str | Path, method: str = "auto", vit_path: str | Path | None = None
) -> tuple[torch.nn.Module, dict, ImportReport | None]:
    """Our checkpoint (.safetensors with metadata) or an official one; returns (model, meta, import report).

    Official CoBra checkpoints are two files: ``path`` is one of them (normally the CNN file) and ``vit_path``
    the other; without ``vit_path`` the partner is looked up next to ``path`` by the official naming
    (``ep19_cnn_checkpoint.pth`` <-> ``ep19_tf_checkpoint.pth``).
    """
    from . import load_model

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            load_checkpoint(path)
            model, meta = load_model(path)
            if vit_path is not None:
                raise CheckpointError(f"{path}: a wsss checkpoint holds every branch; --vit-ckpt is for official "
                                      "CoBra checkpoints only")  # fmt: skip
            return model, {**meta, "source_sha256": file_sha256(path)}, None
        except CheckpointError as err:
            if "metadata" not in str(err):
                raise
    state = read_state_dict(path)
    kind = detect_method(list(state)) if method == "auto" else method
    if kind in ("cobra", "cobra-vit"):
        branch = cobra_branch(list(state))
        if branch is None:
            raise CheckpointError(f"{path}: not a file of an official CoBra checkpoint (neither its CNN nor ViT)")
        other = Path(vit_path) if vit_path is not None else cobra_partner(path, branch)
        if other is None:
            want = "ViT file (ep19_tf_checkpoint.pth)" if branch == "cnn" else "CNN file (ep19_cnn_checkpoint.pth)"
            raise CheckpointError(f"{path}: official CoBra checkpoints come in two files and its {want} was not "
                                  "found next to it; pass it with --vit-ckpt")  # fmt: skip
        pair = (path, other) if branch == "cnn" else (other, path)
        return load_official_cobra(*pair, num_fg=None)
    if vit_path is not None:
        raise CheckpointError(f"{path}: --vit-ckpt is for official CoBra checkpoints; this is a {kind} checkpoint")
    if kind != "seco":
        raise CheckpointError(f"{path}: importing official {kind} checkpoints is not supported")
    model, meta, report = import_seco(state, str(path))
    return model, {**meta, "source_sha256": file_sha256(path)}, report


def _generic(num_fg: int) -> tuple[str, ...]:
    return ("background", *(f"class_{i}" for i in range(1, num_fg + 1)))
