"""Official CoBra checkpoints give the official seeds at any image size (§4.3, §4.4, §4.8, §4.9).

The networks below are tiny stand-ins written in the official module layouts, ``net/resnet50_cam.py: Net`` (a
torchvision-named ResNet registered three times: ``resnet50``, ``stage1..4``, ``backbone``) and
``net/deit_cam.py: TSCAM`` (a DeiT with timm names, a 3x3 CAM head and the SAP projection), with seeded random
weights, saved with ``torch.save`` as ``ep19_cnn_checkpoint.pth`` / ``ep19_tf_checkpoint.pth``. Their forward
methods are an independent reference of the official rules, written from METHODS (not from wsss):

* ViT: floor patch grid (a stride-16 convolution over the whole image), DINO position interpolation with the
  ``(h + 0.1) / 14`` scale factor, kept as is for a square image with the stored token count; attention maps
  averaged over heads and summed over layers; ``A_obj * head(tokens)`` then ReLU; flips summed on the grid.
* CNN: ReLU(conv(classifier)) on the grid, flips summed.
* make_cam / eval_cam: PIL bicubic ``round(s * H)`` pyramid on the uint8 image, each scale's maps upsampled
  bilinearly to (H, W) and summed, GT classes max-normalised, ``A_obj`` summed; seeds are the argmax over
  ``[Perc_theta(A_obj), (max(M_cnn, M_tran) + M_tran) / 2]`` mapped through the keys.

wsss loads the files with ``load_model`` and runs its one CAM path (``wsss.cam.pipeline``); every intermediate
must match the reference to 1e-5 of its scale. Seeds must agree except at near-ties (see ``assert_seeds_agree``).
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from wsss.cam.pipeline import RawCAMs, postprocess, predict_cams, stack_maps
from wsss.models import CheckpointError, load_model
from wsss.models.backbone import resize_pos_grid
from wsss.models.official import COBRA_CNN_KEYS, _map_aliased, _resnet_config, detect_layout

NUM_FG = 3
DIM, DEPTH, HEADS, PATCH, GRID, PROJ = 48, 2, 2, 16, 14, 16
PLANES, BLOCKS = (8, 16, 16, 32), (1, 2, 1, 1)  # a tiny Bottleneck ResNet; the official stem (64) is kept
ARCH = {"backbone": {"name": "deit_small_patch16_224",
                     "overrides": {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS}}}  # fmt: skip
SIZES = [(281, 500), (375, 500), (333, 333), (224, 224), (448, 448)]
FEW_SCALES = (0.5, 1.0, 1.5)
OFFICIAL_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
TAGS = np.array([1, 0, 1], np.float32)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EPS = 1e-5  # the max-normalisation epsilon of make_cam
TIE = 1e-4  # seeds may differ only where the reference's two best scores are closer than this


# ---------------------------------------------------------------- reference ViT (the official DeiT / SeCo ViT)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, need_attn: bool = True):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if not need_attn:  # the same softmax(q k^T / sqrt(d_h)) v, without materialising the maps (speed only)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)), None
        attn = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)

    def forward(self, x, need_attn: bool = True):
        out, attn = self.attn(self.norm1(x), need_attn)
        x = x + out
        return x + self.mlp(self.norm2(x)), attn


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


def dino_pos(pos: torch.Tensor, h: int, w: int, image: tuple[int, int]) -> torch.Tensor:
    """CoBra's DeiT (§4.4): as is for a square image with the stored token count, else bicubic by the scale
    factor ``(h + 0.1) / g`` (the DINO trick), which maps coordinates by that factor, not by ``h / g``."""
    n = pos.shape[1] - 1
    if h * w == n and image[0] == image[1]:
        return pos
    g = math.sqrt(n)
    grid = pos[:, 1:].reshape(1, int(g), int(g), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
    assert grid.shape[-2:] == (h, w)
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def size_pos(pos: torch.Tensor, h: int, w: int, image: tuple[int, int]) -> torch.Tensor:
    """SeCo (§1.1): the stored grid resized to (h, w) bicubically (ac=False) at every forward pass."""
    g = int(round(math.sqrt(pos.shape[1] - 1)))
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


class RefViT(nn.Module):
    """A ViT with the official key names (timm's): ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
    ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``."""

    def __init__(self, dim: int = DIM, depth: int = DEPTH, heads: int = HEADS, patch: int = PATCH, grid: int = GRID):
        super().__init__()
        self.patch = patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.patch_embed = PatchEmbed(dim, patch)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def run(self, x: torch.Tensor, pos_rule, need_attn: bool = True):
        """(final LayerNorm-ed tokens, every block's output, every block's attention (B, heads, T, T) or None)."""
        tokens = self.patch_embed.proj(x)  # the convolution drops rows/columns past the last whole patch
        h, w = tokens.shape[-2:]
        assert (h, w) == (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens.flatten(2).transpose(1, 2)], 1)
        tokens = tokens + pos_rule(self.pos_embed, h, w, tuple(x.shape[-2:]))
        outs, attns = [], []
        for block in self.blocks:
            tokens, attn = block(tokens, need_attn)
            outs.append(tokens)
            attns.append(attn)
        return self.norm(tokens), outs, attns


class TSCAM(RefViT):
    """``net/deit_cam.py: TSCAM`` in eval mode: ``cam(x)`` is ``forward(x, return_cam=True)`` on an image and its
    flip, plus the per-sample maps before the flip sum."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(DIM, NUM_FG + 1, 3, padding=1)
        self.embed = nn.Conv2d(DIM, PROJ, 1, bias=False)

    def cam(self, x: torch.Tensor):
        b, _, height, width = x.shape
        tokens, _, attns = self.run(x, dino_pos)
        n = tokens.shape[1] - 1
        h, w = (height // self.patch, width // self.patch) if height != width else (int(n**0.5),) * 2
        m_tran = self.head(tokens[:, 1:].reshape(b, h, w, -1).permute(0, 3, 1, 2))
        a_obj = torch.stack(attns).mean(2).sum(0)[:, 0, 1:].reshape(b, 1, h, w)  # heads averaged, layers summed
        cams, attn = F.relu(a_obj * m_tran), F.relu(a_obj)
        return cams[0] + cams[1].flip(-1), attn[0] + attn[1].flip(-1), cams, attn


# ---------------------------------------------------------------- reference ResNet (net/resnet50.py, resnet50_cam.py)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # the stride sits in the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.downsample = None
        if stride != 1 or cin != 4 * planes:
            conv = nn.Conv2d(cin, 4 * planes, 1, stride, bias=False)
            self.downsample = nn.Sequential(conv, nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Strides (2, 2, 2, 1): conv1, layer2, layer3, layer4 (layer1 and the 3x3/2 max-pool as always): stride 16."""

    def __init__(self, planes=PLANES, blocks=BLOCKS, strides=(2, 2, 2, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, strides[0], 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (p, n, s) in enumerate(zip(planes, blocks, (1, *strides[1:]), strict=True)):
            layer = []
            for j in range(n):
                layer.append(Bottleneck(cin, p, s if j == 0 else 1))
                cin = 4 * p
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.out_channels = cin


class CoBraCNN(nn.Module):
    """``net/resnet50_cam.py: Net`` (registration order kept, so ``state_dict()`` writes the official aliases);
    ``cam(x)`` is its ``CAM.forward`` on an image and its flip, plus the per-sample maps."""

    def __init__(self, resnet: nn.Module | None = None, classes: int = NUM_FG + 1, proj: int = PROJ):
        super().__init__()
        self.resnet50 = r = resnet if resnet is not None else ResNet()
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2 = nn.Sequential(r.layer2)
        self.stage3 = nn.Sequential(r.layer3)
        self.stage4 = nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(r.out_channels, classes, 1, bias=False)
        self.embed = nn.Conv2d(r.out_channels, proj, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])

    def cam(self, x: torch.Tensor):
        f = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        cams = F.relu(F.conv2d(f, self.classifier.weight))
        return cams[0] + cams[1].flip(-1), cams


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Seeded weights with healthy activations: norms' scales near 1, fan-in-scaled weights, small biases,
    BatchNorm statistics away from (0, 1), and position embeddings large enough that their resizing rule shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            own = dict(m.named_parameters(recurse=False))
            if isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
                own["weight"].copy_(torch.rand(own["weight"].shape, generator=g) + 0.5)
                own["bias"].copy_(0.1 * torch.randn(own["bias"].shape, generator=g))
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                    m.num_batches_tracked.fill_(1000)
                continue
            for name, p in own.items():
                if name == "bias":
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                elif isinstance(m, nn.Conv2d | nn.Linear):
                    p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
                else:  # cls_token, pos_embed
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module.eval()


def save_pair(folder, seed: int = 0):
    """(CNN reference, ViT reference, CNN file, ViT file), named as ``step/train_cam.py`` names them."""
    cnn, vit = randomise(CoBraCNN(), seed), randomise(TSCAM(), seed + 1)
    cnn_path, vit_path = folder / "ep19_cnn_checkpoint.pth", folder / "ep19_tf_checkpoint.pth"
    torch.save(cnn.state_dict(), cnn_path)
    torch.save(vit.state_dict(), vit_path)
    return cnn, vit, cnn_path, vit_path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small ops; on 2 shared cores one intra-op thread is several times faster than two
    (no OpenMP spinning against other processes). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("cobra"))


@pytest.fixture(scope="module")
def loaded(pair):
    return load_model(pair[2], vit_path=pair[3], arch=ARCH)


# ---------------------------------------------------------------- the official make_cam + eval_cam


def make_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A uint8 RGB image with structure at several scales (so CAMs vary) and noise."""
    h, w = size
    rng = np.random.default_rng(seed + h * 1000 + w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([np.sin(xx / (9 + 7 * c) + c) * np.cos(yy / (13 - 3 * c) - 2 * c) for c in range(3)], -1)
    blob = np.exp(-(((yy - 0.3 * h) / (0.2 * h)) ** 2 + ((xx - 0.6 * w) / (0.25 * w)) ** 2))[..., None]
    img = 128 + 70 * base + 90 * blob * np.array([1.0, -0.5, 0.3]) + 20 * rng.standard_normal((h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def official_normalise(img: np.ndarray) -> np.ndarray:
    """``TorchvisionNormalize`` then ``HWC_to_CHW``: float64 arithmetic stored as float32."""
    out = np.empty(img.shape, np.float32)
    for c in range(3):
        out[..., c] = (img[..., c] / 255.0 - MEAN[c]) / STD[c]
    return out.transpose(2, 0, 1)


def up(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W), each channel resized on its own as make_cam does (``unsqueeze(1)``)."""
    return F.interpolate(maps[:, None], size, mode="bilinear", align_corners=False)[:, 0]


@torch.no_grad()
def reference_make_cam(cnn: CoBraCNN, vit: TSCAM, img: np.ndarray, label: np.ndarray, scales, thetas=(70.0,)):
    """The official seed path for one image: per-scale grid maps, the (H, W) maps and the seeds per theta."""
    size = img.shape[:2]
    per_scale, cnn_hr, tran_hr, attn_hr = [], [], [], []
    for s in scales:
        scaled = (int(np.round(size[0] * s)), int(np.round(size[1] * s)))  # half to even, as np.round
        im = img if scaled == size else np.asarray(Image.fromarray(img).resize(scaled[::-1], Image.BICUBIC))
        x = official_normalise(im)
        batch = torch.from_numpy(np.stack([x, np.flip(x, -1)]).copy())
        c, c_each = cnn.cam(batch)
        t, a, t_each, a_each = vit.cam(batch)
        per_scale.append({"size": scaled, "cnn": c, "tran": t, "attn": a, "cnn_each": c_each, "tran_each": t_each,
                          "attn_each": a_each, "input": batch[:1]})  # fmt: skip
        cnn_hr.append(up(c[1:], size))
        tran_hr.append(up(t[1:], size))
        attn_hr.append(up(a, size))
    keys = np.nonzero(label)[0]
    m_cnn, m_tran = torch.stack(cnn_hr).sum(0)[keys], torch.stack(tran_hr).sum(0)[keys]
    m_cnn = m_cnn / (F.adaptive_max_pool2d(m_cnn, (1, 1)) + EPS)
    m_tran = m_tran / (F.adaptive_max_pool2d(m_tran, (1, 1)) + EPS)
    a_obj = torch.stack(attn_hr).sum(0)[0]
    fuse = (torch.maximum(m_tran, m_cnn) + m_tran) / 2  # eval_cam.py's form of (4.19)
    out = {"scales": per_scale, "keys": keys, "m_cnn": m_cnn, "m_tran": m_tran, "a_obj": a_obj, "fuse": fuse,
           "bkg": {}, "seed": {}, "margin": {}}  # fmt: skip
    for theta in thetas:
        thres = np.percentile(a_obj.numpy(), theta)
        cams = np.pad(fuse.numpy(), ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=thres)
        top2 = np.sort(cams, axis=0)[-2:]
        out["bkg"][theta] = float(thres)
        out["seed"][theta] = np.pad(keys + 1, (1, 0))[np.argmax(cams, axis=0)]
        out["margin"][theta] = top2[1] - top2[0]
    return out


def assert_maps_close(got, want, what: str, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` of each value and of the map's scale (max |want|): float noise of a different but
    equivalent order of operations (flip before or after the linear upsampling, fused attention, sum order)."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    scale = float(want.abs().max())
    err = (got - want).abs()
    bad = err > rtol * (scale + want.abs())
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values differ; max |diff| "
                           f"{float(err.max()):.3g} = {float(err.max()) / max(scale, 1e-30):.3g} of the scale "
                           f"{scale:.3g}")  # fmt: skip


def assert_seeds_agree(got, want, margin, what: str) -> float:
    """Identical seeds except at near-ties: where the reference's best two scores (background included) are
    within ``TIE``, float noise of 1e-7 may pick the other one. At least 99.9 % must agree; returns the share."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: seed shape {got.shape} != {want.shape}"
    differ = got != want
    share = 1 - differ.mean()
    assert share >= 0.999, f"{what}: only {share:.4%} of seed pixels agree"
    assert (np.asarray(margin)[differ] < TIE).all(), f"{what}: seeds differ where the reference has a clear winner"
    return share


class Recording:
    """The network as ``forward_pyramid`` calls it, keeping every call's input batch and outputs, so that one
    ``predict_cams`` run also yields the raw per-scale outputs the lower-level checks need."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x):
        out = self.net(x)
        self.calls.append((x, out))
        return out

    def raw(self) -> RawCAMs:
        return RawCAMs(self.calls[0][1][0][:1], [list(out[1:]) for _, out in self.calls], batch=1, flip=True)


@pytest.fixture(scope="module")
def runs(pair, loaded):
    """``run(size, scales, tags, seed, thetas)``: (settings, reference, recorded network, predict_cams result),
    computed once per case: the reference and the wsss path each run the networks once."""
    cache = {}

    def run(size, scales=FEW_SCALES, tags=TAGS, seed=0, thetas=(70.0,)):
        key = (size, tuple(scales), tuple(tags), seed, thetas)
        if key not in cache:
            settings = dataclasses.replace(loaded.spec.cam, scales=tuple(scales))
            img = make_image(size, seed)
            want = reference_make_cam(pair[0], pair[1], img, tags, settings.scales, thetas)
            net = Recording(loaded.model)
            result = predict_cams(net, [img], [tags], settings)[0]
            cache[key] = settings, want, net, result
        return cache[key]

    return run


SIZE_IDS = [f"{h}x{w}" for h, w in SIZES]


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_pyramid_and_raw_branch_outputs_match_the_official_rules(runs, size):
    settings, want, net, _ = runs(size)
    k = NUM_FG
    assert len(net.calls) == len(want["scales"]) == len(settings.scales)
    for (x, (_, m_cnn, vit_maps)), ref in zip(net.calls, want["scales"], strict=True):
        at = f"{size} at scale size {ref['size']}"
        assert tuple(x.shape[-2:]) == ref["size"], at  # PIL bicubic to round(s * H), half to even
        assert_maps_close(x[:1], ref["input"], f"normalised input {at}")
        assert torch.equal(x[1:], x[:1].flip(-1)), at
        # raw branch outputs on their own grids (the CNN's and the ViT's differ at most sizes), both flips
        assert m_cnn.shape[-2:] == ref["cnn"].shape[-2:], f"CNN grid {at}"
        assert vit_maps.shape[-2:] == ref["tran"].shape[-2:], f"ViT grid {at}"
        assert_maps_close(m_cnn.relu(), ref["cnn_each"][:, 1:], f"CNN CAM ReLU(W_c * F) {at}")
        assert_maps_close(vit_maps[:, :k].relu(), ref["tran_each"][:, 1:], f"ViT CAM ReLU(A_obj * M_tran) {at}")
        assert_maps_close(vit_maps[:, k].relu(), ref["attn_each"][:, 0], f"A_obj {at}")
        # the flip sums on the grid (§4.8)
        assert_maps_close(m_cnn[0].relu() + m_cnn[1].relu().flip(-1), ref["cnn"][1:], f"flip-summed CNN CAM {at}")
        a_sum = vit_maps[0, k].relu() + vit_maps[1, k].relu().flip(-1)
        assert_maps_close(a_sum, ref["attn"][0], f"flip-summed A_obj {at}")


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_fused_maps_a_obj_background_and_seeds_match_the_official_rules(runs, size):
    """The lower-level steps on the recorded outputs, stacked at the image's own size (H, W)."""
    settings, want, net, _ = runs(size)
    k, keys = NUM_FG, want["keys"]
    stack = stack_maps(net.raw(), size, settings)
    y = torch.as_tensor(TAGS)[None]
    assert_maps_close(stack[:, :, 0, 2 * k].relu().sum((0, 1)), want["a_obj"], f"A_obj summed at (H, W) {size}")
    for source, ref in (("cnn", want["m_cnn"]), ("vit", want["m_tran"])):
        cams, _, _ = postprocess(stack, y, dataclasses.replace(settings, source=source))
        assert_maps_close(cams[0, keys], ref, f"max-normalised {source} maps (4.17) {size}")
    cams, bkg, label = postprocess(stack, y, settings)
    assert_maps_close(cams[0, keys], want["fuse"], f"M_fuse (4.19) {size}")
    assert_maps_close(bkg, [want["bkg"][70.0]], f"background Perc_70(A_obj) (4.20) {size}")
    assert_seeds_agree(label[0].numpy(), want["seed"][70.0], want["margin"][70.0], f"seeds {size}")
    assert len(np.unique(want["seed"][70.0])) >= 2  # not a trivial seed


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_predict_cams_gives_the_official_maps_and_seeds(runs, size):
    """The entry point every command uses: maps and seeds at the image's own size."""
    _, want, _, result = runs(size)
    keys = want["keys"]
    assert tuple(result.cam.shape[-2:]) == size, f"predict_cams maps at {tuple(result.cam.shape[-2:])}, not {size}"
    assert_maps_close(result.cam[keys], want["fuse"], f"predict_cams M_fuse {size}")
    assert torch.equal(result.tags, torch.as_tensor(TAGS))
    assert_seeds_agree(result.seed, want["seed"][70.0], want["margin"][70.0], f"predict_cams seeds {size}")


def test_official_seven_scales_and_percentiles_at_a_small_odd_size(runs, loaded):
    """The spec's own scales (all seven; round half to even at 97 x 131 x 0.5 = 48.5 x 65.5) and two percentiles."""
    assert loaded.spec.cam.scales == OFFICIAL_SCALES
    size, tags, thetas = (97, 131), np.array([1, 1, 1], np.float32), (70.0, 85.0)
    settings, want, net, result = runs(size, OFFICIAL_SCALES, tags, 3, thetas)
    sizes = [(48, 66), (73, 98), (97, 131), (121, 164), (146, 196), (170, 229), (194, 262)]
    assert [s["size"] for s in want["scales"]] == sizes
    assert [tuple(x.shape[-2:]) for x, _ in net.calls] == sizes
    stack = stack_maps(net.raw(), size, settings)
    for theta in thetas:
        cams, bkg, label = postprocess(stack, torch.as_tensor(tags)[None], settings.with_background(theta))
        assert_maps_close(cams[0], want["fuse"], "M_fuse, 7 scales")
        assert_maps_close(bkg, [want["bkg"][theta]], f"Perc_{theta}(A_obj), 7 scales")
        assert_seeds_agree(label[0].numpy(), want["seed"][theta], want["margin"][theta], f"seeds theta={theta}")
    assert tuple(result.seed.shape) == size, f"predict_cams seeds at {result.seed.shape}, not {size}"
    assert_seeds_agree(result.seed, want["seed"][70.0], want["margin"][70.0], "predict_cams seeds, 7 scales")


@pytest.mark.parametrize("grid", [(14, 14), (17, 31), (20, 20), (28, 28), (12, 14)])
def test_position_rule_is_dinos_and_matters(grid):
    """wsss's "dino" rule is CoBra's (kept only for a square image with the stored count), and it is not the
    "size" rule: a test that mixed them up would fail (this is what the forward tests above rely on)."""
    pos = 0.5 * torch.randn(1, 1 + GRID * GRID, DIM, generator=torch.Generator().manual_seed(1))
    h, w = grid
    image = (h * PATCH + 5, w * PATCH + (5 if h == w else 9))  # floors to the grid; square iff h == w
    want = dino_pos(pos, h, w, image)
    got = resize_pos_grid(pos[:, 1:], (GRID, GRID), (h, w), image, "dino")
    assert_maps_close(got, want[:, 1:], f"dino position grid {grid}")
    if grid == (GRID, GRID):
        assert torch.equal(got, pos[:, 1:])  # kept as is
        # 14 x 14 tokens from a 224 x 227 image: not square, so resampled by 14.1 / 14 (not an identity)
        non_square = resize_pos_grid(pos[:, 1:], (GRID, GRID), (h, w), (h * PATCH, w * PATCH + 3), "dino")
        assert_maps_close(non_square, dino_pos(pos, h, w, (h * PATCH, w * PATCH + 3))[:, 1:], "dino, 224 x 227")
        assert (non_square - pos[:, 1:]).abs().max() > 1e-3
    else:
        size_rule = size_pos(pos, h, w, image)[:, 1:]
        assert (size_rule - want[:, 1:]).abs().max() > 1e-2


# ---------------------------------------------------------------- the loader on the official pair


def test_official_layout_has_the_expected_aliases(pair):
    cnn, _, cnn_path, vit_path = pair
    keys = list(torch.load(cnn_path, weights_only=True))
    trunk = len(cnn.resnet50.state_dict())
    assert len(keys) == 3 * trunk + 2 + 1  # resnet50.*, stage1..4.*, backbone.*; classifier x2, embed
    for key in ("resnet50.layer3.0.conv3.weight", "stage1.0.weight", "stage1.1.running_var", "stage1.4.0.bn2.bias",
                "stage4.0.0.downsample.1.weight", "backbone.2.0.0.conv1.weight", "newly_added.0.weight",
                "resnet50.layer2.1.bn3.num_batches_tracked"):  # fmt: skip
        assert key in keys
    assert detect_layout(keys) == "cobra-cnn"
    assert detect_layout(["module." + k for k in keys]) == "cobra-cnn"
    vit_keys = list(torch.load(vit_path, weights_only=True))
    assert {"cls_token", "pos_embed", "head.weight", "head.bias", "embed.weight"} <= set(vit_keys)
    assert detect_layout(vit_keys) == "cobra-vit"


def test_import_report_spec_and_weights(pair, loaded):
    cnn, vit, cnn_path, vit_path = pair
    model, spec, report = loaded.model, loaded.spec, loaded.report
    assert report.missing == [] and report.unexpected == [] and report.mismatched == [] and report.initialised == []
    assert report.skipped == {} and report.layout == "cobra"
    assert report.loaded == len(model.state_dict())
    assert report.aliases == 2 * len(cnn.resnet50.state_dict()) + 1  # trunk stored 3x, classifier 2x
    assert f"merged {report.aliases} aliased copies" in str(report)
    assert spec.family == "cobra" and spec.class_names == ("background", "class_1", "class_2", "class_3")
    read = {"name": "custom", "layers": list(BLOCKS), "channels": list(PLANES), "block": "bottleneck"}
    assert {k: spec.arch["cnn"][k] for k in read} == read
    assert list(spec.arch["cnn"]["strides"]) == [1, 2, 2, 1]  # the official (2, 2, 2, 1) counted from conv1
    assert spec.arch["backbone"]["img_size"] == GRID * PATCH and spec.arch["backbone"]["pos_resize"] == "dino"
    assert spec.arch["proj_dim"] == PROJ
    cam = spec.cam
    assert (cam.scales, cam.flip, cam.flip_merge, cam.relu_first, cam.rescale, cam.norm, cam.background,
            cam.bg_percentile, cam.source, cam.input_size) == (OFFICIAL_SCALES, True, "sum", True,
            "pil_bicubic_round", "max", "attention_percentile", 70.0, "fuse", None)  # fmt: skip
    assert loaded.meta["imported_from"] == {"cnn": str(cnn_path), "vit": str(vit_path)}
    assert len(loaded.meta["source_sha256"]) == 64 and loaded.meta["source_sha256"] != loaded.meta["source_sha256_vit"]
    # the projections never reach a CAM: check them by value
    assert torch.equal(model.cnn_proj.weight, cnn.embed.weight) and torch.equal(model.vit_proj.weight, vit.embed.weight)


def test_ddp_prefix_and_wrappers_are_accepted(pair, loaded, tmp_path):
    _, _, cnn_path, vit_path = pair
    state = torch.load(cnn_path, weights_only=True)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ep1_cnn_checkpoint.pth")
    torch.save({"model": torch.load(vit_path, weights_only=True)}, tmp_path / "ep1_tf_checkpoint.pth")
    other = load_model(tmp_path / "ep1_cnn_checkpoint.pth", arch=ARCH)  # the partner found by name
    assert other.report.loaded == loaded.report.loaded and other.report.aliases == loaded.report.aliases
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[key], value), key


def test_resnet_depth_is_read_from_the_official_layout():
    """The paper's ResNet-152 and its siblings in the official aliased layout (shapes only, on the meta device)."""
    for name, blocks in (("resnet50", (3, 4, 6, 3)), ("resnet101", (3, 4, 23, 3)), ("resnet152", (3, 8, 36, 3))):
        with torch.device("meta"):
            state = CoBraCNN(ResNet((64, 128, 256, 512), blocks), 21, 256).state_dict()
        mapped, skipped, unexpected, merged = _map_aliased(state, COBRA_CNN_KEYS, name)
        assert skipped == [] and unexpected == [] and merged == 2 * (len(state) - 3) // 3 + 1
        assert _resnet_config(mapped, name) == {"name": name}
        assert mapped["cnn_classifier.weight"].shape == (21, 2048, 1, 1)


def test_partner_file_is_found_and_either_file_may_come_first(pair, loaded, tmp_path):
    _, _, cnn_path, vit_path = pair
    lonely = tmp_path / "weights.pth"
    lonely.write_bytes(cnn_path.read_bytes())
    want = loaded.model.state_dict()
    for args, kwargs in (((cnn_path,), {}), ((vit_path,), {}), ((lonely,), {"vit_path": vit_path}),
                         ((vit_path,), {"vit_path": lonely})):  # fmt: skip
        got = load_model(*args, arch=ARCH, **kwargs)
        assert got.report.loaded == loaded.report.loaded
        assert all(torch.equal(got.model.state_dict()[k], v) for k, v in want.items())
    with pytest.raises(CheckpointError, match="two files.*--vit-ckpt"):
        load_model(lonely, arch=ARCH)
    with pytest.raises(CheckpointError, match="expected the ViT"):
        load_model(cnn_path, vit_path=lonely, arch=ARCH)  # two CNN files
    vit_copy = tmp_path / "other.pth"
    vit_copy.write_bytes(vit_path.read_bytes())
    with pytest.raises(CheckpointError, match="expected the CNN"):
        load_model(vit_path, vit_path=vit_copy, arch=ARCH)  # two ViT files


def test_missing_projection_is_initialised_deterministically(pair, loaded, tmp_path):
    _, _, cnn_path, vit_path = pair
    state = torch.load(cnn_path, weights_only=True)
    del state["embed.weight"]
    torch.save(state, tmp_path / "cnn.pth")
    a = load_model(tmp_path / "cnn.pth", vit_path=vit_path, arch=ARCH)
    b = load_model(tmp_path / "cnn.pth", vit_path=vit_path, arch=ARCH)
    assert a.report.initialised == ["cnn_proj.weight"] and "initialised" in str(a.report)
    assert torch.equal(a.model.cnn_proj.weight, b.model.cnn_proj.weight)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        for got, want in zip(a.model(x), loaded.model(x), strict=True):  # CAMs never use the projections
            assert torch.equal(got, want)


def test_disagreeing_aliases_missing_and_mismatched_tensors_are_refused(pair, tmp_path):
    _, _, cnn_path, vit_path = pair
    state = torch.load(cnn_path, weights_only=True)
    bad = dict(state)
    bad["stage3.0.0.conv1.weight"] = state["stage3.0.0.conv1.weight"] + 1
    torch.save(bad, tmp_path / "aliases.pth")
    with pytest.raises(CheckpointError, match=r"resnet50.layer3.0.conv1.weight and stage3.0.0.conv1.weight"):
        load_model(tmp_path / "aliases.pth", vit_path=vit_path, arch=ARCH)
    bad = dict(state)
    bad["newly_added.0.weight"] = torch.randn_like(state["classifier.weight"])
    torch.save(bad, tmp_path / "classifier.pth")
    with pytest.raises(CheckpointError, match="aliases of one tensor"):
        load_model(tmp_path / "classifier.pth", vit_path=vit_path, arch=ARCH)
    gone = ("resnet50.layer4.0.bn3.running_var", "stage4.0.0.bn3.running_var", "backbone.3.0.0.bn3.running_var")
    torch.save({k: v for k, v in state.items() if k not in gone}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): cnn.net.layer4.0.bn3.running_var"):
        load_model(tmp_path / "missing.pth", vit_path=vit_path, arch=ARCH)
    vit_state = torch.load(vit_path, weights_only=True)
    vit_state["head.weight"] = torch.randn(NUM_FG + 1, DIM, 1, 1)  # a 1x1 head is not CoBra's 3x3
    torch.save(vit_state, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(cnn_path, vit_path=tmp_path / "vit.pth", arch=ARCH)
    assert "vit_classifier.weight (4, 48, 1, 1) != (4, 48, 3, 3)" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"21 class names for 3 \+ 1 classifier channels"):
        load_model(cnn_path, vit_path=vit_path, arch=ARCH, class_names=["background", *"abcdefghijklmnopqrst"])


def test_a_file_of_no_family_is_refused_in_one_line(pair, tmp_path):
    _, _, cnn_path, _ = pair
    state = torch.load(cnn_path, weights_only=True)
    plain = {k.removeprefix("resnet50."): v for k, v in state.items() if k.startswith("resnet50.")}
    torch.save(plain, tmp_path / "resnet.pth")  # a bare torchvision-named trunk: no fc, no CoBra head
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "resnet.pth")
    msg = str(err.value)
    assert "matches no model family" in msg and "torchvision ResNet" in msg and "lacks fc.weight" in msg
    assert "\n" not in msg
    torch.save({"foo.weight": torch.zeros(2), "bar": torch.zeros(1)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match=r"no known layout \(keys like bar, foo.weight\)"):
        load_model(tmp_path / "junk.pth")


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_hostile_and_truncated_files_are_refused(pair, tmp_path, monkeypatch):
    _, _, cnn_path, vit_path = pair
    monkeypatch.chdir(tmp_path)
    hostile = tmp_path / "ep19_cnn_checkpoint.pth"
    with open(hostile, "wb") as f:
        pickle.dump({"resnet50.conv1.weight": Boom()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(hostile, vit_path=vit_path, arch=ARCH)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(cnn_path, vit_path=hostile, arch=ARCH)
    assert not (tmp_path / "PWNED").exists()
    truncated = tmp_path / "cut_cnn_checkpoint.pth"
    truncated.write_bytes(cnn_path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(truncated, vit_path=vit_path, arch=ARCH)
